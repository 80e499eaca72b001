"""The inference engine: greedy == model.generate for every variant (batched, continuous
batching), sampling parameters, seeds, stop strings, incremental detokenization, logprobs, and
the `complexity generate` CLI."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch
from _serve_fixtures import make_tiny_checkpoint, make_tokenizer

from complexity.inference import Engine, SamplingParams
from complexity.inference.detokenize import IncrementalDetokenizer, StopMatcher
from complexity.inference.engine import CPU_SLOTS, _collector_paused
from complexity.inference.sampling import Penalties, filter_logits

torch.set_num_threads(1)  # tiny matrices: extra threads only contend on shared CPUs
# Engines are built with device="cpu": the default picks CUDA (bf16) where there is a GPU, and
# these tests compare the engine with float32 CPU forwards token for token.

PROMPTS = [
    "the cat sat on the mat",
    "once",
    "hello world there was a little girl who loved to play in the garden and the sun was big",
    "déjà vu 東京 猫",
    "red blue green",
]

VARIANTS = {
    "token_routed": {},
    "token_routed_shared": dict(shared_expert=True, routing="range"),
    "dense": dict(mlp_type="dense"),
    "learned_moe": dict(mlp_type="learned_moe", shared_expert=True),
    "learned_moe_top2": dict(mlp_type="learned_moe", num_experts_per_tok=2),
    "guidance": dict(mu_mode="guidance", shared_expert=True),
    "guidance_dense": dict(mlp_type="dense", mu_mode="guidance"),
    "inl": dict(mu_mode="inl"),
    "sliding_window": dict(sliding_window=6, mu_mode="guidance"),
    "no_qk_norm": dict(use_qk_norm=False),
    "hash_top2_shared": dict(
        mlp_type="hash_routed", num_experts_per_tok=2, shared_expert=True, routed_output_scale=2.0
    ),
    # RoPE on 6 of the 16 dims of a head, muP's softmax scale 1/head_dim, logits divided by 2.5
    "partial_rope_mup": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        shared_expert=True,
        partial_rotary_factor=0.4,
        attention_multiplier=1 / 16,
        logits_scaling=2.5,
    ),
}


def _reference(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inference")


def _load(path):
    from transformers import AutoModelForCausalLM

    import complexity  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_generate(ckpt_dir, variant):
    path = make_tiny_checkpoint(ckpt_dir / variant, **VARIANTS[variant])
    # 3 slots for 5 prompts: requests join and leave the decode batch between steps
    engine = Engine.from_pretrained(path, device="cpu", max_batch=3)
    model = _load(path)
    n = 20
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=n, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == engine.tokenizer(prompt).input_ids
        ref = _reference(model, out.prompt_token_ids, n)
        assert out.token_ids == ref[: len(out.token_ids)], (variant, prompt)
        if out.finish_reason == "length":
            assert len(out.token_ids) == n
        else:  # stopped on eos: generate stops there too
            assert (
                out.token_ids[-1] == 0
                and len(ref) == len(out.token_ids)
                or ref[len(out.token_ids) :] == [1] * (n - len(out.token_ids))
            )


def test_staggered_arrivals_match_generate(ckpt_dir):
    """Requests added while others are mid-decode (continuous batching) keep exact greedy outputs."""
    path = make_tiny_checkpoint(ckpt_dir / "stagger", mu_mode="inl")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4)
    model = _load(path)
    reqs = []
    lengths = [7, 15, 3, 11, 9, 5]
    for i, prompt in enumerate(PROMPTS + ["the"]):
        reqs.append(
            engine.add_request(prompt, SamplingParams(max_new_tokens=lengths[i], temperature=0, ignore_eos=True))
        )
        engine.step()
        engine.step()
    while engine.has_unfinished():
        engine.step()
    for r in reqs:
        assert len(r.output_ids) == r.params.max_new_tokens
        ids = torch.tensor([r.prompt_ids])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=r.params.max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )[0, ids.shape[1] :].tolist()
        assert r.output_ids == ref
    assert sorted(engine.free_slots) == [0, 1, 2, 3]


def test_token_id_prompts_and_context_limit(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "ctx", max_position_embeddings=64)
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    [out] = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 64 + 1
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([list(range(5, 70))])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[1, 2, 10**6]])


_TOKEN_IDS = "token ids in [0, 2147483647]"
_TEMPERATURE = "must be 0 (greedy) or in [0.0001, 10000]"
_STOP = "stop strings must be strings of 1 to 1000 characters"
BAD_SAMPLING = [
    # each field: its type first (a bool is not a number, "0.9" is not a number), then its range
    (dict(max_new_tokens=True), "max_new_tokens: must be an integer, got True"),
    (dict(max_new_tokens=2.0), "max_new_tokens: must be an integer, got 2.0"),
    (dict(max_new_tokens=0), "max_new_tokens: must be >= 1 (0 only when scoring the prompt), got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens: must be in [1, 2147483647], got -3"),
    (dict(max_new_tokens=-3, prompt_logprobs=0), "max_new_tokens: must be in [0, 2147483647], got -3"),
    (dict(max_new_tokens=2**31), "max_new_tokens: must be in [1, 2147483647], got 2147483648"),
    (dict(max_new_tokens=2**63), "max_new_tokens: must be in [1, 2147483647], got 9223372036854775808"),
    (dict(temperature="0.9"), "temperature: must be a finite number, got '0.9'"),
    (dict(temperature=True), "temperature: must be a finite number, got True"),
    (dict(temperature=float("nan")), "temperature: must be a finite number, got nan"),
    (dict(temperature=10**400), "temperature: must be a finite number, got " + "1" + "0" * 39),
    (dict(temperature=-0.1), f"temperature: {_TEMPERATURE}, got -0.1"),
    (dict(temperature=1e-45), f"temperature: {_TEMPERATURE}, got 1e-45"),
    (dict(top_k=1.0), "top_k: must be an integer, got 1.0"),
    (dict(top_k=-1), "top_k: must be in [0, 2147483647] (0 = off), got -1"),
    (dict(top_k=2**63), "top_k: must be in [0, 2147483647] (0 = off), got 9223372036854775808"),
    (dict(top_p="1"), "top_p: must be a finite number, got '1'"),
    (dict(top_p=0.0), "top_p: must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p: must be in (0, 1], got 1.5"),
    (dict(min_p=None), "min_p: must be a finite number, got None"),
    (dict(min_p=-0.1), "min_p: must be in [0, 1], got -0.1"),
    (dict(min_p=1.5), "min_p: must be in [0, 1], got 1.5"),
    (dict(repetition_penalty=False), "repetition_penalty: must be a finite number, got False"),
    (dict(repetition_penalty=0.0), "repetition_penalty: must be in [0.01, 100] (1 = off), got 0.0"),
    (dict(repetition_penalty=1e-40), "repetition_penalty: must be in [0.01, 100] (1 = off), got 1e-40"),
    (dict(repetition_penalty=5e-324), "repetition_penalty: must be in [0.01, 100] (1 = off), got 5e-324"),
    (dict(presence_penalty=2.5), "presence_penalty: must be in [-2, 2] (0 = off), got 2.5"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty: must be a finite number, got inf"),
    (dict(frequency_penalty=-2.01), "frequency_penalty: must be in [-2, 2] (0 = off), got -2.01"),
    (dict(logit_bias=dict.fromkeys(range(2049), 1.0)), "logit_bias: at most 2048 entries, got 2049"),
    (dict(logit_bias={"3": 1.0}), "logit_bias: must be an integer, got '3'"),
    (dict(logit_bias={True: 1.0}), "logit_bias: must be an integer, got True"),
    (dict(logit_bias={-1: 1.0}), f"logit_bias: must be keyed by {_TOKEN_IDS}, got -1"),
    (dict(logit_bias={2**31: 1.0}), f"logit_bias: must be keyed by {_TOKEN_IDS}, got 2147483648"),
    (dict(logit_bias={3: "1"}), "logit_bias: must be a finite number, got '1'"),
    (dict(logit_bias={3: float("nan")}), "logit_bias: must be a finite number, got nan"),
    (dict(logit_bias={3: 101.0}), "logit_bias: must be biases in [-100, 100] (token 3), got 101.0"),
    (dict(stop=["x"] * 17), "stop: at most 16 stop strings, got 17"),
    (dict(stop=[""]), f"stop: {_STOP}, got ''"),
    (dict(stop=[3]), f"stop: {_STOP}, got 3"),
    (dict(stop=["y" * 1001]), f"stop: {_STOP}, got '" + "y" * 39),
    (dict(stop_token_ids=[1.0]), "stop_token_ids: must be an integer, got 1.0"),
    (dict(stop_token_ids=[-1]), "stop_token_ids: must be token ids in [0, 2147483647], got -1"),
    (dict(stop_token_ids=[2**31]), "stop_token_ids: must be token ids in [0, 2147483647], got 2147483648"),
    (dict(seed=1.5), "seed: must be an integer, got 1.5"),
    (dict(seed=True), "seed: must be an integer, got True"),
    (dict(seed=2**64), f"seed: must be in [{-(2**63)}, {2**64 - 1}], got {2**64}"),
    (dict(seed=-(2**63) - 1), f"seed: must be in [{-(2**63)}, {2**64 - 1}], got {-(2**63) - 1}"),
    (dict(logprobs=True), "logprobs: must be an integer, got True"),
    (dict(logprobs=-1), "logprobs: must be in [0, 20], got -1"),
    (dict(logprobs=50), "logprobs: must be in [0, 20], got 50"),
    (dict(prompt_logprobs="2"), "prompt_logprobs: must be an integer, got '2'"),
    (dict(prompt_logprobs=21), "prompt_logprobs: must be in [0, 20], got 21"),
    # several bad fields: the first in this order wins (the server's 400 names that one)
    (dict(max_new_tokens=0, temperature=-1), "max_new_tokens: must be >= 1 (0 only when scoring the prompt), got 0"),
    (dict(max_new_tokens=0, prompt_logprobs=-1), "prompt_logprobs: must be in [0, 20], got -1"),
    (dict(temperature=-1, top_k=-1, top_p=2), f"temperature: {_TEMPERATURE}, got -1"),
    (dict(top_k=-1, top_p=2), "top_k: must be in [0, 2147483647] (0 = off), got -1"),
    (dict(top_p=0, min_p=2), "top_p: must be in (0, 1], got 0"),
    (dict(min_p=2, repetition_penalty=0), "min_p: must be in [0, 1], got 2"),
    (dict(repetition_penalty=0, presence_penalty=3), "repetition_penalty: must be in [0.01, 100] (1 = off), got 0"),
    (dict(presence_penalty=3, frequency_penalty=3), "presence_penalty: must be in [-2, 2] (0 = off), got 3"),
    (dict(frequency_penalty=3, logit_bias={-1: 1}), "frequency_penalty: must be in [-2, 2] (0 = off), got 3"),
    (dict(logit_bias={-1: 200}), f"logit_bias: must be keyed by {_TOKEN_IDS}, got -1"),
    (dict(logit_bias={1: 1, 2: 200, -5: 1}), "logit_bias: must be biases in [-100, 100] (token 2), got 200"),
    (dict(logit_bias={-1: 1}, stop=[""]), f"logit_bias: must be keyed by {_TOKEN_IDS}, got -1"),
    (dict(stop=[""] * 17), "stop: at most 16 stop strings, got 17"),
    (dict(stop=[""], stop_token_ids=[-1]), f"stop: {_STOP}, got ''"),
    (dict(stop_token_ids=[-1], seed=True), "stop_token_ids: must be token ids in [0, 2147483647], got -1"),
    (dict(seed=True, logprobs=-1), "seed: must be an integer, got True"),
    (dict(logprobs=-1, prompt_logprobs=-1), "logprobs: must be in [0, 20], got -1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SAMPLING)
def test_sampling_params_errors_name_the_first_bad_field(kwargs, message):
    """The exact message the server returns in its 400 (its `param` is the field), one per field
    and kind of mistake, and which field is reported when several are bad."""
    from complexity.inference.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message
    assert err.value.param == message.split(":")[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=None),
        dict(max_new_tokens=0, prompt_logprobs=0),
        dict(max_new_tokens=2**31 - 1),
        dict(temperature=0),
        dict(temperature=1e-4, top_k=0, top_p=1, min_p=0),
        dict(temperature=10**4, top_k=2**31 - 1, top_p=5e-324, min_p=1),
        dict(repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=2),
        dict(logit_bias=dict.fromkeys(range(2**31 - 2048, 2**31), -100)),
        dict(stop=["x" * 1000] + ["y"] * 15, stop_token_ids=[0, 2**31 - 1]),
        dict(seed=-(2**63), logprobs=0, prompt_logprobs=20),
    ],
)
def test_sampling_params_accept_the_edges_of_their_ranges(kwargs):
    """Every range is inclusive at its stated ends, and a value passed is kept as given."""
    params = SamplingParams(**kwargs)
    assert {name: getattr(params, name) for name in kwargs} == kwargs


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    t = torch.ones(4)
    probs = filter_logits(
        logits, t, torch.tensor([1, 0, 0, 0]), torch.tensor([1.0, 0.5, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.3, 0.0])
    )
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # top-k 1
    assert probs[1, 0] == 1.0  # top-p 0.5: the first token already holds 0.64
    assert (probs[2, 2:] == 0).all() and probs[2, 1] > 0  # min-p 0.3 keeps p >= 0.3 * p_max
    assert torch.allclose(probs[3], logits[3].softmax(-1))


def _filter_reference(logits, temperature, top_k, top_p, min_p):
    """vLLM's order in float64, one token at a time: temperature, min-p, top-k, then top-p over
    what is left, renormalized."""
    p = (logits.double() / temperature).softmax(-1)
    keep = p >= min_p * p.max()
    order = sorted(range(len(p)), key=lambda t: -p[t].item())
    if top_k:
        for t in order[top_k:]:
            keep[t] = False
    mass, total = 0.0, p[keep].sum().item()
    for rank, t in enumerate(order):
        if keep[t]:
            if rank and mass >= top_p:
                keep[t] = False
            mass += p[t].item() / total
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


@pytest.mark.parametrize("seed", range(4))
def test_filter_logits_matches_vllms_order_in_float64(seed):
    """Every combination of the four filters on random rows, min-p and top-p together included
    (top-p's mass is counted after min-p removed its tokens)."""
    torch.manual_seed(seed)
    rows = [(t, k, p, m) for t in (0.7, 1.3) for k in (0, 5) for p in (1.0, 0.6) for m in (0.0, 0.08)]
    logits = torch.randn(len(rows), 40) * 2
    got = filter_logits(
        logits,
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]),
        torch.tensor([r[3] for r in rows]),
    )
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i].double(), _filter_reference(logits[i], *row), atol=1e-6, rtol=1e-5)


def test_penalties_and_logit_bias_match_their_formulas_in_float64():
    """Logit bias, then the CTRL repetition penalty over prompt + output, then OpenAI's presence
    and frequency penalties over the output only; rows that use none are left untouched."""
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    prompts, outputs = [[1, 2], [1, 2], [5]], [[3, 3, 7, 2], [3, 3, 7, 2], []]
    p = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=-0.25, logit_bias={7: 5.0, 11: -100.0}
    )
    penalties = Penalties([p, SamplingParams(), SamplingParams(presence_penalty=1.0)], prompts, outputs, 12, "cpu")
    got = penalties(logits)
    ref = logits[0].double().clone()
    ref[7] += 5.0
    ref[11] -= 100.0
    for t in {1, 2, 3, 7}:
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t, count in {3: 2, 7: 1, 2: 1}.items():
        ref[t] -= 0.4 + (-0.25) * count
    torch.testing.assert_close(got[0].double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[2], logits[2])  # nothing generated yet
    assert got is not logits and torch.equal(logits, logits.clone())  # the caller's tensor is not written
    # a step's tokens counted on the device (-1, a failed row, is not a token) = the state built
    # from the longer outputs
    penalties.count(torch.tensor([3, 4, 8]))
    penalties.count(torch.tensor([-1, 5, -1]))
    longer = [[3, 3, 7, 2, 3], [3, 3, 7, 2, 4, 5], [8]]
    rebuilt = Penalties([p, SamplingParams(), SamplingParams(presence_penalty=1.0)], prompts, longer, 12, "cpu")
    assert torch.equal(penalties(logits), rebuilt(logits)) and not torch.equal(penalties(logits), got)


def test_penalised_greedy_decoding_equals_a_full_forward_loop(ckpt_dir):
    """The engine (cached, batched with an unpenalised neighbour) against the formulas applied
    to the model's uncached logits step by step, in float32."""
    path = make_tiny_checkpoint(ckpt_dir / "penalties")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    model = _load(path)
    p = SamplingParams(
        max_new_tokens=12,
        temperature=0,
        ignore_eos=True,
        presence_penalty=1.5,
        frequency_penalty=0.7,
        logit_bias={5: 2.0, 9: -100.0},
    )
    plain = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompt = engine.tokenizer("the cat sat").input_ids
    outs = engine.generate([prompt, prompt], [p, plain])
    ids, generated = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            logits[5] += 2.0
            logits[9] -= 100.0
            for t in set(generated):
                logits[t] -= 1.5 + 0.7 * generated.count(t)
            generated.append(int(logits.argmax()))
            ids.append(generated[-1])
    assert outs[0].token_ids == generated and 9 not in generated
    [alone] = engine.generate([prompt], plain)
    assert outs[1].token_ids == alone.token_ids and outs[1].token_ids != generated
    with pytest.raises(ValueError, match="logit_bias: token id 100000 is outside the vocabulary"):
        engine.generate([prompt], SamplingParams(logit_bias={100000: 1.0}))


def test_seeded_sampling_is_reproducible_and_batch_independent(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "seed")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4)
    p = SamplingParams(
        max_new_tokens=24,
        temperature=1.0,
        top_k=50,
        top_p=0.95,
        min_p=0.01,
        repetition_penalty=1.2,
        seed=1234,
        ignore_eos=True,
    )
    [a] = engine.generate(["the cat"], p)
    [b] = engine.generate(["the cat"], p)
    assert a.token_ids == b.token_ids
    # the same seeded request inside a batch of other (unseeded) requests draws the same tokens
    others = SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True)
    outs = engine.generate(["hello world", "the cat", "once upon"], [others, p, others])
    assert outs[1].token_ids == a.token_ids
    [c] = engine.generate(["the cat"], p.copy(seed=99))
    assert c.token_ids != a.token_ids


def test_stop_strings_and_eos(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "stop")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    [full] = engine.generate(["the cat sat"], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    [cut] = engine.generate(
        ["the cat sat"], SamplingParams(max_new_tokens=30, temperature=0, stop=[stop], ignore_eos=True)
    )
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    # a stop token id ends generation (and is reported in token_ids, not in the text)
    tok = full.token_ids[4]
    [st] = engine.generate(["the cat sat"], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[tok]))
    assert st.finish_reason == "stop" and st.token_ids[-1] == tok and tok not in st.token_ids[:-1]


def test_stream_matches_generate(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "stream")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    p = SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True)
    [out] = engine.generate(["déjà vu"], p)
    assert "".join(o.new_text for o in engine.stream("déjà vu", p)) == out.text


def test_incremental_detokenizer_multibyte():
    tok = make_tokenizer()
    text = " café naïve 東京 猫 🙂 über déjà vu 🙂🙂"
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(tok, tok("hello").input_ids)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_partial_match():
    m = StopMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)
    assert m.feed("yy STO") == ("yy ", False)
    assert m.feed("P tail") == ("", True)
    assert m.text == "abc STxyy "


@pytest.mark.parametrize("variant", ["guidance", "partial_rope_mup"])
def test_prompt_logprobs_match_forward(ckpt_dir, variant):
    """Prompt and generated-token log-probabilities are the model's (with partial_rope_mup, of
    logits divided by logits_scaling: greedy tokens alone would not show a missing divisor)."""
    path = make_tiny_checkpoint(ckpt_dir / f"lp-{variant}", **VARIANTS[variant])
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    model = _load(path)
    prompts = ["the cat sat on the mat", "once upon a time"]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=0, prompt_logprobs=2, temperature=0))
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        assert out.prompt_logprobs[0].logprob is None and out.token_ids == []
        for i, e in enumerate(out.prompt_logprobs[1:], start=1):
            assert abs(e.logprob - logp[i - 1, ids[0, i]].item()) < 1e-4
            assert [t for t, _ in e.top] == logp[i - 1].topk(2).indices.tolist()
    # generated-token logprobs (the decode step's logits): greedy picks the top-1
    [g] = engine.generate(["the cat"], SamplingParams(max_new_tokens=5, temperature=0, logprobs=1, ignore_eos=True))
    ids = torch.tensor([g.prompt_token_ids + g.token_ids])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = len(g.prompt_token_ids) - 1
    for j, (e, t) in enumerate(zip(g.logprobs, g.token_ids)):
        assert e.token_id == t and e.top[0][0] == t and e.top[0][1] == e.logprob
        assert abs(e.logprob - logp[start + j, t].item()) < 1e-4


@pytest.mark.parametrize(
    "variant, attn, masked",
    [
        ("inl", "sdpa", False),
        ("hash_top2_shared", "sdpa", False),
        ("inl", "eager", True),  # no causal mode: the engine builds the mask
        ("sliding_window", "sdpa", True),  # a window of 6 < the prompts: the mask says it
    ],
)
def test_prefill_takes_the_causal_kernel_where_it_can(ckpt_dir, monkeypatch, variant, attn, masked):
    """A right-padded prefill batch runs with no mask (the attention kernel's causal mode, 1.2x
    faster on the CPU) unless the model's attention needs one; either way every prompt
    position's log-probabilities are those of a float32 forward of that prompt alone."""
    from complexity.inference import engine as engine_module

    built = []
    real = engine_module.attention_mask_prefill
    monkeypatch.setattr(engine_module, "attention_mask_prefill", lambda *a: built.append(a) or real(*a))
    path = make_tiny_checkpoint(ckpt_dir / f"causal-{variant}", **VARIANTS[variant])
    engine = Engine.from_pretrained(path, device="cpu", max_batch=3, attn_implementation=attn)
    model = _load(path)
    prompts = ["the cat sat on the mat and the dog", "once", "hello world there was"]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    assert engine.stats["prefill_steps"] == 1 and bool(built) == masked
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        want = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_abort_frees_slot(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "abort")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    r = engine.add_request("the cat", SamplingParams(max_new_tokens=100, ignore_eos=True))
    engine.step()
    assert len(engine.free_slots) == 1
    assert engine.abort(r.request_id)
    assert len(engine.free_slots) == 2 and r.finish_reason == "abort"


# ----------------------------------------------------------------------------- the CLI


def _cli(capsys, *argv):
    from complexity.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(["generate", *map(str, argv), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's count: not for the tests after this one
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_generate_says_when_the_context_ends_it_early(ckpt_dir, capsys):
    path = make_tiny_checkpoint(ckpt_dir / "cli_context")
    args = (path, "--prompt", "the cat", "--temperature", 0, "--ignore-eos", "--max-seq-len", 16)
    rc, out, err = _cli(capsys, *args, "--max-new-tokens", 40)
    assert rc == 0 and out.strip()
    assert "stopped after" in err and "of --max-new-tokens 40" in err and "context length 16" in err
    rc, _, err = _cli(capsys, *args, "--max-new-tokens", 4)  # fits: nothing to say
    assert rc == 0 and "stopped after" not in err


def test_cli_generate(ckpt_dir, capsys):
    path = make_tiny_checkpoint(ckpt_dir / "cli")
    rc, greedy, _ = _cli(
        capsys, path, "--prompt", "the cat", "--max-new-tokens", 20, "--temperature", 0, "--ignore-eos"
    )
    assert rc == 0 and len(greedy.strip()) > 0
    stop = greedy[2:5]
    rc, cut, _ = _cli(
        capsys, path, "--prompt", "the cat", "--max-new-tokens", 20, "--temperature", 0, "--ignore-eos", "--stop", stop
    )
    assert rc == 0 and cut == greedy[: greedy.index(stop)] + "\n"
    runs = [
        _cli(capsys, path, "--prompt", "the cat", "--max-new-tokens", 20, "--seed", s, "--ignore-eos")[1]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    rc, _, err = _cli(capsys, path, "--prompt", "x", "--top-p", "1.5")
    assert rc == 2 and "top_p" in err
    rc, _, err = _cli(capsys, path, "--prompt", "x", "--frequency-penalty", "3")
    assert rc == 2 and "frequency_penalty: must be in [-2, 2]" in err
    rc, spread, _ = _cli(
        capsys,
        path,
        "--prompt",
        "the cat",
        "--max-new-tokens",
        20,
        "--temperature",
        0,
        "--ignore-eos",
        "--presence-penalty",
        "2",
        "--frequency-penalty",
        "2",
    )
    assert rc == 0 and spread != greedy
    rc, _, err = _cli(capsys, ckpt_dir / "missing", "--prompt", "x")
    assert rc == 2 and "missing" in err


def test_extreme_valid_values_sample_finite_tokens(ckpt_dir):
    """The edges of the stated ranges sample real tokens (no overflow, no NaN), batched together."""
    path = make_tiny_checkpoint(ckpt_dir / "edges")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=8)
    edges = [
        dict(temperature=1e-4),
        dict(temperature=1e4),
        dict(top_k=2**31 - 1),
        dict(top_p=1e-300),
        dict(min_p=1.0),
        dict(repetition_penalty=0.01),
        dict(repetition_penalty=100.0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0, logit_bias={0: -100.0, 1: 100.0}),
        dict(seed=2**64 - 1),
    ]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, **kw) for kw in edges]
    outs = engine.generate(["the cat sat"] * len(edges), params)
    for kw, out in zip(edges, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == 6, kw
        assert all(0 <= t < engine.vocab_size for t in out.token_ids)
    # a tiny temperature is greedy in effect
    [greedy] = engine.generate(["the cat sat"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert outs[0].token_ids == greedy.token_ids


def test_a_failing_request_fails_alone(ckpt_dir, monkeypatch):
    """Sampling that raises for one request's values fails that request only; its batch
    neighbours get their exact greedy tokens."""
    import complexity.inference.engine as engine_mod

    path = make_tiny_checkpoint(ckpt_dir / "isolate")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4)
    p = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(PROMPTS[:3], p)]
    real = engine_mod.BatchSampler.sample

    def flaky(self, logits):
        if any(q.seed == 666 for q in self.params):
            raise RuntimeError("probability tensor contains inf")
        return real(self, logits)

    monkeypatch.setattr(engine_mod.BatchSampler, "sample", flaky)
    bad = p.copy(seed=666)
    outs = engine.generate([PROMPTS[0], "the", PROMPTS[1], PROMPTS[2]], [p, bad, p, p])
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert [o.token_ids for o in (outs[0], outs[2], outs[3])] == expected
    assert sorted(engine.free_slots) == [0, 1, 2, 3]


def test_compiled_decode_compiles_once(ckpt_dir):
    """The decode step marks its batch and context dimensions dynamic: one graph serves batches
    1 (run as 2 rows) to 3 and contexts past several 128-token roundings, without a recompile.
    (aot_eager: the same dynamo tracing and guards as inductor, minus the code generation.)"""
    from torch._dynamo.utils import counters

    path = make_tiny_checkpoint(ckpt_dir / "compile", max_position_embeddings=512)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=3, compile="aot_eager")
    assert counters["stats"]["unique_graphs"] == 1  # compiled while the engine starts, not in a request
    assert engine.startup["compile_s"] > 0 and "compiled for batches up to 3" in engine.describe()
    # the start-up line's phases, in the order they ran, with the seconds recorded for each
    startup = engine.describe().split("; start-up ")[1]
    assert startup == f"load {engine.startup['load_s']:.1f}s, compile and warm-up {engine.startup['compile_s']:.1f}s"
    plain = Engine(engine.model)  # built from a model, slots by default: nothing timed, nothing said
    assert plain.max_batch == CPU_SLOTS and "start-up" not in plain.describe()
    p = SamplingParams(max_new_tokens=140, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 7]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = engine.generate(prompts, p)
        engine.generate([[5, 6, 7]], p.copy(max_new_tokens=5))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # and no graph break
    eager = Engine.from_pretrained(path, device="cpu", max_batch=3).generate(prompts, p)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]


def test_a_decode_step_that_fails_to_compile_leaves_the_eager_step(ckpt_dir, caplog):
    """A compile that fails (here a backend that raises; on a machine without a C++ compiler,
    inductor's CPU code) fails while the engine starts, says so, and the engine decodes eagerly:
    no request ever fails for it."""
    from torch._dynamo import register_backend

    @register_backend
    def broken_for_the_test(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    path = make_tiny_checkpoint(ckpt_dir / "compile_fails")
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="complexity.inference.engine"):
        engine = Engine.from_pretrained(path, device="cpu", max_batch=2, compile="broken_for_the_test")
    assert not engine.compile and "no C++ compiler found" in engine.startup["compile_error"]
    assert "decode: eager (compile failed)" in engine.describe()
    assert "torch.compile of the decode step failed" in caplog.text
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    eager = Engine.from_pretrained(path, device="cpu", max_batch=2)
    got, want = ([o.token_ids for o in e.generate(PROMPTS[:2], p)] for e in (engine, eager))
    assert got == want and all(len(t) == 12 for t in got)


def test_compiled_decode_first_traced_at_the_largest_shapes_serves_every_bucket(ckpt_dir):
    """The CUDA warm-up compiles the decode step at its largest shapes first: every slot and the
    whole context. There the cache's view is its whole buffer unless the slot has a spare
    position, and the compiled step would specialize kv_len to max_seq_len (a violated
    mark_dynamic); with it, one graph serves every (batch, context) bucket, equal to eager."""
    path = make_tiny_checkpoint(ckpt_dir / "largest_first", max_position_embeddings=256)
    torch._dynamo.reset()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4, compile="aot_eager")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows, kv_len in ((4, 256), (2, 128), (4, 128), (3, 256)):
            tokens = torch.randint(0, engine.vocab_size, (rows, 1), generator=g)
            pos = torch.randint(0, kv_len, (rows,), generator=g)
            got = engine._call_decode(tokens, pos, engine._kv_range(kv_len))
            want = engine._decode_forward(tokens, pos, engine._kv_range(kv_len))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_decode_writes_the_cache_in_place(ckpt_dir):
    """The compiled step (inductor, here its CPU code) writes each row's new K/V into the cache
    buffer itself. Through a view cache[:batch] it copied all the batch's cache rows out and back
    around the write, per layer and step (on an H100 that made 256-row decoding 4x slower)."""
    from torch._inductor.utils import run_and_get_code

    from complexity.inference.cache import positions_per_slot

    path = make_tiny_checkpoint(ckpt_dir / "in_place", max_position_embeddings=256, num_hidden_layers=1)
    torch._dynamo.reset()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4, max_seq_len=256, compile=True)
    tokens, pos = torch.tensor([[5], [6], [7], [8]]), torch.tensor([3, 4, 5, 6])
    with torch.inference_mode():
        got, code = run_and_get_code(engine._call_decode, tokens, pos, engine._kv_range(256))
        want = engine._decode_forward(tokens, pos, engine._kv_range(256))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    c = engine.config
    row = c.num_key_value_heads * positions_per_slot(256) * c.head_dim  # elements of one slot's K
    assert f"{row}L*ks" not in "\n".join(code)  # no loop over the batch's whole rows (row size x batch)


def test_only_small_batches_take_the_compiled_decode_step(ckpt_dir, monkeypatch):
    """Batches of at most COMPILED_DECODE_MAX_ROWS take the compiled step (compiled once), larger
    ones the eager step, in one engine; both decode what the eager engine decodes."""
    from torch._dynamo.utils import counters

    from complexity.inference import engine as engine_module

    monkeypatch.setattr(engine_module, "COMPILED_DECODE_MAX_ROWS", 3)
    path = make_tiny_checkpoint(ckpt_dir / "compiled_rows", max_position_embeddings=256)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=6, compile="aot_eager")
    rows = []
    forward = engine._decode_forward
    monkeypatch.setattr(
        engine, "_decode_forward", lambda tokens, *a: rows.append(tokens.shape[0]) or forward(tokens, *a)
    )
    prompts = [[5 + i] * (3 + i) for i in range(6)]
    # the first slot's request runs longest: the decode batch (rows up to the last busy slot) shrinks
    params = [SamplingParams(max_new_tokens=19 - 3 * i, temperature=0, ignore_eos=True) for i in range(6)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = engine.generate(prompts, params)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert rows and min(rows) > 3  # the eager step ran the large batches only (compiled calls bypass the patch)
    assert engine.stats["decode_steps"] > len(rows)  # and the small ones ran compiled
    eager = Engine.from_pretrained(path, device="cpu", max_batch=6).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]


@pytest.mark.parametrize("max_batch", [1, 2])
def test_compiled_decode_at_one_or_two_slots(ckpt_dir, max_batch):
    """`complexity generate` runs one slot. Its compiled step runs batch 1 as 2 rows; on a cache
    of 2 rows dynamo proved the view cache[:2] whole and specialized the batch (a violated
    mark_dynamic, every decode step failed). It compiles once and equals eager."""
    path = make_tiny_checkpoint(ckpt_dir / f"slots{max_batch}", max_position_embeddings=256)
    torch._dynamo.reset()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=max_batch, compile="aot_eager")
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40))][:max_batch]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = engine.generate(prompts, p)
    eager = Engine.from_pretrained(path, device="cpu", max_batch=max_batch).generate(prompts, p)
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]


def test_failing_prefill_or_decode_fails_only_its_request(ckpt_dir, monkeypatch):
    """A forward that raises for a batch is retried request by request: only the request that
    fails alone fails."""
    path = make_tiny_checkpoint(ckpt_dir / "isolate_fwd")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=4)
    p = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(PROMPTS[:3], p)]
    poison = [7, 7, 7, 7, 7, 7, 7]
    for stage in ("_prefill_batch", "_decode"):
        real = getattr(engine, stage)

        def flaky(reqs, outputs, real=real):
            if any(r.prompt_ids == poison for r in reqs):
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(reqs, outputs)

        monkeypatch.setattr(engine, stage, flaky)
        outs = engine.generate([PROMPTS[0], poison, PROMPTS[1], PROMPTS[2]], p)
        assert outs[1].finish_reason == "error", stage
        assert [o.token_ids for o in (outs[0], outs[2], outs[3])] == expected, stage
        assert sorted(engine.free_slots) == [0, 1, 2, 3]
        monkeypatch.undo()


def test_stop_strings_need_a_tokenizer(ckpt_dir):
    path = make_tiny_checkpoint(ckpt_dir / "notok")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2, tokenizer=False)
    with pytest.raises(ValueError, match="stop"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=3, stop=["x"]))
    [out] = engine.generate([[5, 6]], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.text == ""


def test_engine_and_server_tokenize_prompts_alike(ckpt_dir, monkeypatch):
    """`Engine.encode` (generate, Python callers) and `AsyncEngine.encode` (the server's API
    process) are one tokenization: the same ids, and a text far past the context refused from a
    prefix by both (never tokenized whole), with the same error."""
    import asyncio

    from complexity.inference.async_engine import AsyncEngine
    from complexity.inference.errors import InvalidRequest

    path = make_tiny_checkpoint(ckpt_dir / "encode", max_position_embeddings=64)
    engine = Engine.from_pretrained(path, device="cpu", max_batch=1)
    aengine = AsyncEngine(engine)
    try:
        for text in ("the cat sat on the mat", "", "déjà vu 東京 猫"):
            assert (
                engine.encode(text)
                == asyncio.run(aengine.encode(text))
                == list(engine.tokenizer(text).input_ids or [2])
            )
        huge = "the cat sat on the mat " * 20_000
        calls = []
        real = type(engine.tokenizer).__call__

        def spy(tok, text, *args, **kwargs):
            calls.append(len(text))
            return real(tok, text, *args, **kwargs)

        monkeypatch.setattr(type(engine.tokenizer), "__call__", spy)
        errors = []
        for encode in (engine.encode, lambda t: asyncio.run(aengine.encode(t))):
            with pytest.raises(InvalidRequest, match=r"^prompt: exceeds the context length 64: its first") as err:
                encode(huge)
            errors.append((str(err.value), err.value.code))
        monkeypatch.undo()
        assert errors[0] == errors[1] and errors[0][1] == "context_length_exceeded"
        assert calls and max(calls) <= 64 * 16  # only the prefix was tokenized
    finally:
        aengine._executor.shutdown()


def test_requests_are_added_while_the_reader_makes_text(ckpt_dir, monkeypatch):
    """The event loop adds an arriving request without waiting for the outputs reader to finish
    detokenizing a hand-over (it held the shared lock throughout, and every arrival queued behind
    it); the request is then served in full."""
    import asyncio
    import threading

    from complexity.inference.async_engine import AsyncEngine

    path = make_tiny_checkpoint(ckpt_dir / "reader-lock")
    aengine = AsyncEngine(Engine.from_pretrained(path, device="cpu", max_batch=2))
    aengine.start()
    entered, release, waited_out = threading.Event(), threading.Event(), []
    real = aengine._processor.process

    def slow_process(outs):
        entered.set()
        waited_out.append(not release.wait(5))  # True: nobody released it, add_request was stuck
        return real(outs)

    monkeypatch.setattr(aengine._processor, "process", slow_process)
    reader = threading.Thread(target=aengine._on_outputs, args=([],))

    async def run():
        reader.start()
        assert entered.wait(5)
        params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
        group = aengine.add_request([[5, 6, 7]], [params], stream=False)  # while the reader holds on
        release.set()
        monkeypatch.setattr(aengine._processor, "process", real)
        return await asyncio.wait_for(group.result(), 60)

    try:
        [out] = asyncio.run(run())
        reader.join(5)
        assert waited_out == [False] and len(out.token_ids) == 3
    finally:
        aengine.stop()


def test_token_id_prompts_are_never_rounded_or_parsed(ckpt_dir):
    import numpy as np

    path = make_tiny_checkpoint(ckpt_dir / "ids")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=1)
    assert engine.encode([np.int64(5), torch.tensor(6), 7]) == [5, 6, 7]
    for bad in (5.7, True, "5", np.float32(5.0), torch.tensor(5.0)):
        with pytest.raises(ValueError, match=r"^prompt: token ids must be integers, got"):
            engine.add_request([4, bad], SamplingParams(max_new_tokens=1))
    assert not engine.requests


@pytest.mark.parametrize(
    "name,value",
    [
        ("max_batch", True),
        ("max_batch", 2.0),
        ("max_batch", "4"),
        ("max_batch", 0),
        ("max_seq_len", True),
        ("max_seq_len", 32.0),
        ("max_seq_len", "32"),
        ("max_seq_len", 1),
        ("max_seq_len", 10**6),
        ("max_prefill_tokens", True),
        ("max_prefill_tokens", 64.5),
        ("max_prefill_tokens", "64"),
        ("max_prefill_tokens", 0),
        ("gpu_memory_utilization", True),
        ("gpu_memory_utilization", "0.9"),
        ("gpu_memory_utilization", None),
        ("gpu_memory_utilization", float("nan")),
        ("gpu_memory_utilization", 1.5),
        ("cuda_graphs", "yes"),
        ("cuda_graphs", 1),
        ("compile", 1),
        ("compile", ""),
        ("seed", 1.5),
        ("seed", True),
        ("seed", "7"),
        ("seed", 2**64),
        ("decode_steps", 0),
        ("decode_steps", 65),
        ("decode_steps", True),
        ("decode_steps", 2.0),
        ("async_decode", 1),
        ("async_decode", "yes"),
        ("async_decode", 0),
    ],
)
def test_engine_arguments_are_checked_by_type_and_range(ckpt_dir, name, value):
    """A bool or a float where an integer goes, a string where a number goes: a ValueError naming
    the argument before anything is allocated, never a coerced value or a TypeError from deep
    inside torch."""
    from complexity.checkpoint_folder import load_checkpoint_folder

    path = ckpt_dir / "args"
    if not path.exists():
        make_tiny_checkpoint(path, max_position_embeddings=64)
    model, tok = load_checkpoint_folder(path, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"^{name}: (must be|.*exceeds)") as err:
        Engine(model, tok, **{name: value})
    assert repr(value) in str(err.value)
    Engine(model, tok, max_batch=1, max_seq_len=32, max_prefill_tokens=64, gpu_memory_utilization=1, seed=2**64 - 1)


# ----------------------------------------------------------------------------- the API process's reader


def _reader_over_pipe():
    """A ProcessCore's reader over a pipe this test writes to (no engine process)."""
    import multiprocessing
    import types

    from complexity.inference import core

    recv, send = multiprocessing.Pipe(duplex=False)
    reader = core.ProcessCore("unused", {}, on_message=None)
    reader._out = recv
    reader._proc = types.SimpleNamespace(join=lambda timeout: None, is_alive=lambda: False, exitcode=-9)
    return reader, send, core


def _step(core, step: int, rids=("a", "b")) -> tuple:
    outs = [core.StepOutput(rid, [step], None, None, False, None, 3, step + 1) for rid in rids]
    return ("outputs", core.pack_outputs(outs), {"decode_steps": step + 1})


def test_reader_merges_the_steps_already_waiting_and_keeps_their_order():
    reader, send, core = _reader_over_pipe()
    for step in range(3):
        send.send(_step(core, step))
    send.send(("fatal", "Traceback: boom"))
    send.send(_step(core, 3))
    msgs, gone = reader._receive()
    # the three steps as one hand-over, in order, with the last step's stats; the fatal after them
    assert not gone and [m[0] for m in msgs] == ["outputs", "fatal"]
    assert [(o.request_id, o.new_token_ids) for o in msgs[0][1]] == [(r, [s]) for s in range(3) for r in "ab"]
    assert msgs[0][2] == {"decode_steps": 3}
    msgs, gone = reader._receive()
    assert not gone and [o.new_token_ids for o in msgs[0][1]] == [[3], [3]]


def test_reader_merges_at_most_max_merged_steps_and_delivers_what_came_before_eof():
    reader, send, core = _reader_over_pipe()
    n = core.MAX_MERGED_STEPS + 2
    for step in range(n):
        send.send(_step(core, step, rids=("a",)))
    send.close()
    msgs, gone = reader._receive()
    assert not gone and len(msgs[0][1]) == core.MAX_MERGED_STEPS
    msgs, gone = reader._receive()  # the rest, then the closed pipe
    assert gone and [o.new_token_ids for o in msgs[0][1]] == [[n - 2], [n - 1]]
    delivered = []
    reader.on_message = delivered.append
    reader._read()  # nothing left: reports the dead engine
    assert delivered == [("dead", "the engine process exited (exit code -9)")]


def test_merged_steps_detokenize_as_one_delta():
    """Several steps of one request handed over at once give the text of their tokens together."""
    from complexity.inference.detokenize import OutputProcessor
    from complexity.inference.outputs import StepOutput

    tok = make_tokenizer()
    ids = tok.encode("the cat sat on the mat", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=len(ids))
    one, merged = OutputProcessor(tok), OutputProcessor(tok)
    for proc in (one, merged):
        proc.add_request("r", [], params, incremental=True)
    steps = [StepOutput("r", [t], None, None, i == len(ids) - 1, None, 0, i + 1) for i, t in enumerate(ids)]
    text_by_step = "".join(one.process([s])[0][0].new_text for s in steps)
    text_merged = "".join(o.new_text for o in merged.process(steps[:3])[0] + merged.process(steps[3:])[0])
    assert text_merged == text_by_step == tok.decode(ids)


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="F_SETPIPE_SZ is Linux-only")
def test_the_outputs_pipe_holds_many_steps():
    """The engine's outputs pipe is widened so a busy API process does not stall the engine."""
    import fcntl
    import multiprocessing

    from complexity.inference import core

    recv, send = multiprocessing.Pipe(duplex=False)
    before = fcntl.fcntl(send.fileno(), fcntl.F_GETPIPE_SZ)
    core.widen_pipe(send)
    assert fcntl.fcntl(recv.fileno(), fcntl.F_GETPIPE_SZ) == core.PIPE_BYTES > before


# ----------------------------------------------------------------------------- the core process


def _process_core(path):
    import queue

    from complexity.inference import core

    messages = queue.Queue()
    proc_core = core.ProcessCore(str(path), {"device": "cpu", "max_batch": 2}, on_message=messages.put, threads=1)
    proc_core.start()
    return proc_core, messages


def test_a_core_asked_for_its_stacks_writes_them_and_serves_on_then_stops_cleanly(ckpt_dir, capfd, caplog):
    """SIGUSR1 (what close() sends a core that did not stop, before killing it) makes a core process
    write every thread's stack to its stderr, the server's log, and serve on. Then close() stops
    it: exit code 0, no warning (the reader thread, which sees the pipe close, and close() both
    wait for the process; when both reaped it, the loser was told "alive" and warned falsely)."""
    import os

    from complexity.inference import core

    proc_core, messages = _process_core(make_tiny_checkpoint(ckpt_dir / "stacks"))
    try:
        os.kill(proc_core._proc.pid, core.STACKS_SIGNAL)
        params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
        proc_core.send(("add", [("r1", [5, 6, 7], params)]))
        outs = []
        while not (outs and outs[-1].finished):
            kind, *rest = messages.get(timeout=120)
            assert kind == "outputs", (kind, rest)
            outs += rest[0]
        assert sum(len(o.new_token_ids) for o in outs) == 3 and outs[-1].finish_reason == "length"
        err = capfd.readouterr().err
        assert "most recent call first" in err and "run_engine_loop" in err, err[-2000:]
        with caplog.at_level("WARNING", logger=core.__name__):
            proc_core.close(timeout=30)
        assert proc_core._proc.exitcode == 0 and "did not stop" not in caplog.text
    finally:
        if proc_core._proc.is_alive():
            proc_core._proc.kill()


def test_a_core_that_does_not_stop_is_asked_for_its_stacks_then_killed(ckpt_dir, caplog, monkeypatch):
    """A core frozen where no message reaches it: close() waits its timeout, logs that it did not
    stop, sends the stacks signal, then kills it, and returns."""
    import os
    import signal
    import time

    from complexity.inference import core

    proc_core, _ = _process_core(make_tiny_checkpoint(ckpt_dir / "frozen"))
    try:
        os.kill(proc_core._proc.pid, signal.SIGSTOP)
        sent = []
        real_kill = os.kill
        monkeypatch.setattr(core.os, "kill", lambda pid, sig: sent.append(sig) or real_kill(pid, sig))
        t = time.monotonic()
        with caplog.at_level("WARNING", logger=core.__name__):
            proc_core.close(timeout=1)
        assert time.monotonic() - t < 1 + core.STACKS_WAIT_S + 5
        assert sent[0] == core.STACKS_SIGNAL and proc_core._proc.exitcode == -signal.SIGKILL
        assert "did not stop in 1s: its threads' stacks follow" in caplog.text
    finally:
        if proc_core._proc.is_alive():
            proc_core._proc.kill()


def test_graph_capture_runs_with_the_cyclic_collector_paused():
    """Garbage made before the capture is collected first, none during it (a CUDA graph freed by the
    collector mid-capture invalidates the capture), and the collector is on again afterwards."""

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage
    gone = weakref.ref(garbage)
    del garbage
    with _collector_paused():
        assert gone() is None
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.parametrize("async_decode", [False, True])
def test_the_time_waiting_for_the_device_is_counted(ckpt_dir, async_decode):
    """stats["device_wait_seconds"] grows by the time spent reading sampled tokens (the device's
    share of a step), in both decode paths, and stays within the time of the run."""
    path = make_tiny_checkpoint(ckpt_dir / f"device-wait-{async_decode}")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2, async_decode=async_decode)
    assert engine.stats["device_wait_seconds"] == 0.0
    t = time.perf_counter()
    engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert 0 < engine.stats["device_wait_seconds"] < time.perf_counter() - t
