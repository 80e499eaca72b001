"""`decode_steps`: several decode steps on the device per read of their tokens; `async_decode`:
the next steps launched before the last ones' tokens are read (one step or a window at a time).
Each gives the same tokens, finish reasons, texts and logprobs as one step per read, read at once
(greedy and seeded sampling, penalties, logit bias, stop tokens and strings, lengths, full slots,
continuous batching, aborts), windows in fewer host rounds, and a row whose logits break inside a
window fails alone with the tokens it had."""

from __future__ import annotations

import pytest
import torch
from _serve_fixtures import make_tiny_checkpoint

from complexity.inference import Engine, SamplingParams

torch.set_num_threads(1)  # tiny matrices: extra threads only contend on shared CPUs

PROMPTS = ["the cat sat on the mat", "once", "hello world there was a little girl", "red blue green", "the"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("decode_steps")


# how the engine under test decodes, against one step per read: windows of N steps, one step at a
# time launched ahead of the read (async), windows launched ahead
MODES = ["windows", "async", "async windows"]


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def _engines(path, steps: int, mode: str = "windows", **kwargs) -> tuple[Engine, Engine]:
    ahead = {
        "windows": dict(decode_steps=steps),
        "async": dict(async_decode=True),
        "async windows": dict(async_decode=True, decode_steps=steps),
    }[mode]
    return (
        Engine.from_pretrained(path, device="cpu", **kwargs),
        Engine.from_pretrained(path, device="cpu", **ahead, **kwargs),
    )


def _run(engine: Engine, prompts, params) -> tuple[list, int]:
    """The completions, and how many engine steps (host rounds) they took."""
    reqs = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    rounds = 0
    while engine.has_unfinished():
        engine.step()
        rounds += 1
    return [(r.output_ids, r.finish_reason) for r in reqs], rounds


@pytest.mark.parametrize("variant", ["token_routed", "hash_top2_shared", "inl", "sliding_window"])
def test_decode_steps_give_the_single_steps_tokens(ckpt_dir, variant, mode):
    """Five requests through three slots (requests join as others leave, some mid-window): greedy
    ones of several lengths, one ended by a stop token inside a window, seeded sampling with
    top-k/top-p/min-p; token for token and reason for reason as one step per read."""
    overrides = {
        "token_routed": {},
        "hash_top2_shared": dict(mlp_type="hash_routed", num_experts_per_tok=2, shared_expert=True),
        "inl": dict(mu_mode="inl"),
        "sliding_window": dict(sliding_window=6, mu_mode="guidance"),
    }[variant]
    path = make_tiny_checkpoint(ckpt_dir / variant, **overrides)
    single, ahead = _engines(path, 4, mode, max_batch=3)
    greedy = SamplingParams(max_new_tokens=13, temperature=0, ignore_eos=True)
    [(probe, _)], _ = _run(single, PROMPTS[:1], [greedy])
    params = [
        greedy,
        greedy.copy(max_new_tokens=1),
        greedy.copy(stop_token_ids=[probe[6]], max_new_tokens=20),  # stops at the 7th token at the latest
        SamplingParams(max_new_tokens=11, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=5, ignore_eos=True),
        greedy.copy(max_new_tokens=6),
    ]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[4]]  # the stop token's on its prompt
    want, single_rounds = _run(single, prompts, params)
    got, ahead_rounds = _run(ahead, prompts, params)
    assert got == want
    assert want[2][1] == "stop" and len(want[2][0]) <= 7
    assert [len(t) for i, (t, _) in enumerate(want) if i != 2] == [13, 1, 11, 6]
    if ahead.decode_steps > 1:
        assert ahead_rounds < single_rounds
    assert sorted(ahead.free_slots) == [0, 1, 2]


def test_decode_steps_texts(ckpt_dir, mode):
    """Through generate(), stream() and the output processor: the same texts."""
    path = make_tiny_checkpoint(ckpt_dir / "texts")
    single, ahead = _engines(path, 8, mode, max_batch=3)
    params = [
        SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=17, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=0),
    ]
    want = [(c.token_ids, c.text, c.finish_reason) for c in single.generate(PROMPTS[:3], params)]
    got = [(c.token_ids, c.text, c.finish_reason) for c in ahead.generate(PROMPTS[:3], params)]
    assert got == want and all(text for _, text, _ in want)
    assert "".join(o.new_text for o in ahead.stream(PROMPTS[0], params[0])) == want[0][1]


def test_decode_steps_stop_where_the_slot_is_full(ckpt_dir, mode):
    """A request without max_new_tokens runs to its slot's end: windows never write past it, and
    it ends with "length" at the same token as one step per read."""
    path = make_tiny_checkpoint(ckpt_dir / "full", max_position_embeddings=64)
    single, ahead = _engines(path, 16, mode, max_batch=2, max_seq_len=40)
    params = [SamplingParams(max_new_tokens=None, temperature=0, ignore_eos=True)] * 2
    prompts = [list(range(5, 30)), list(range(7, 18))]
    want, _ = _run(single, prompts, params)
    got, _ = _run(ahead, prompts, params)
    assert got == want
    assert [len(p) + len(t) for p, (t, _) in zip(prompts, got)] == [41, 41]  # the last token is never cached
    assert {reason for _, reason in got} == {"length"}


def test_penalties_logprobs_and_stop_strings_inside_windows(ckpt_dir, monkeypatch, mode):
    """Penalties count each step's tokens on the device, logprobs are kept per step and stop
    strings are matched token by token in the window's text: every kind of request takes windows,
    with the tokens, texts and finish reasons of one step per read (a stop string's completion
    ends at the token that completed it) and the same logprobs."""
    path = make_tiny_checkpoint(ckpt_dir / "host")
    single, ahead = _engines(path, 4, mode, max_batch=3)
    base = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)
    [probe] = single.generate(PROMPTS[2:3], base)  # " girl girlorldorld...": text to stop at
    cases = {
        "repetition and frequency": base.copy(repetition_penalty=1.3, frequency_penalty=0.5),
        "presence, seeded sampling": base.copy(presence_penalty=1.5, temperature=0.8, top_k=20, seed=11),
        "logit bias": base.copy(logit_bias={5: 3.0, probe.token_ids[2]: -100.0}),
        "logprobs": base.copy(logprobs=2),
        "stop string": base.copy(stop=[probe.text[8:13]]),
        "everything": base.copy(repetition_penalty=0.7, logprobs=0, stop=[probe.text[10:14]], logit_bias={3: 1.0}),
    }
    windows = []
    real = ahead._launch_window
    monkeypatch.setattr(ahead, "_launch_window", lambda *args: windows.append(args) or real(*args))
    for name, special in cases.items():
        want = single.generate(PROMPTS[:3:2], [base, special])
        got = ahead.generate(PROMPTS[:3:2], [base, special])
        assert [(c.token_ids, c.text, c.finish_reason) for c in got] == [
            (c.token_ids, c.text, c.finish_reason) for c in want
        ], name
        for g, w in zip(got, want):
            assert (g.logprobs is None) == (w.logprobs is None), name
            if w.logprobs is not None:
                assert [(e.token_id, [t for t, _ in e.top]) for e in g.logprobs] == [
                    (e.token_id, [t for t, _ in e.top]) for e in w.logprobs
                ], name
                torch.testing.assert_close(
                    [[e.logprob, *(lp for _, lp in e.top)] for e in g.logprobs],
                    [[e.logprob, *(lp for _, lp in e.top)] for e in w.logprobs],
                    rtol=0,
                    atol=1e-5,
                )
        assert windows, name
        windows.clear()
    [stopped] = ahead.generate(PROMPTS[2:3], cases["stop string"])
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", probe.token_ids[:3])  # cut inside a window


def test_non_finite_logits_inside_a_window_fail_their_request_only(ckpt_dir, monkeypatch, mode):
    """Row 1's logits turn NaN at the third step of a window: its request ends with an error
    after the tokens it had sampled before, its neighbour gets every one of its exact tokens."""
    path = make_tiny_checkpoint(ckpt_dir / "nan")
    single, ahead = _engines(path, 4, mode, max_batch=2)
    p = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in single.generate(PROMPTS[:2], p)]
    real, calls = ahead._run_decode, []

    def breaking(tokens_pos, nrows, need_kv):
        logits = real(tokens_pos, nrows, need_kv)
        calls.append(nrows)
        if len(calls) == 3:
            logits = logits.clone()
            logits[1] = float("nan")
        return logits

    monkeypatch.setattr(ahead, "_run_decode", breaking)
    outs = ahead.generate(PROMPTS[:2], p)
    assert outs[0].token_ids == want[0] and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and outs[1].token_ids == want[1][:3]  # the prefill's and two steps'
    assert sorted(ahead.free_slots) == [0, 1]


def test_decode_steps_with_the_compiled_step(ckpt_dir):
    """The compiled decode step (aot_eager: dynamo's tracing and guards) fed on the device from
    one step to the next: one graph for every window, the single eager steps' tokens."""
    from torch._dynamo.utils import counters

    path = make_tiny_checkpoint(ckpt_dir / "compiled")
    torch._dynamo.reset()
    counters.clear()
    ahead = Engine.from_pretrained(path, device="cpu", max_batch=3, compile="aot_eager", decode_steps=6)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [c.token_ids for c in ahead.generate(PROMPTS, params)]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    single = Engine.from_pretrained(path, device="cpu", max_batch=3)
    assert got == [c.token_ids for c in single.generate(PROMPTS, params)]


def test_cli_flag(ckpt_dir, capsys):
    """`complexity generate --decode-steps N` prints what one step per read prints; a value out of
    range is refused by name while the flags are parsed."""
    from complexity.cli import main

    path = make_tiny_checkpoint(ckpt_dir / "cli")
    common = ["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "20", "--temperature", "0"]
    outs = []
    flags = (
        [],
        ["--decode-steps", "8"],
        ["--async-decode"],
        ["--async-decode", "--decode-steps", "3"],
        ["--no-async-decode"],
    )
    for extra in flags:
        assert main([*common, "--ignore-eos", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert all(out == outs[0] for out in outs) and outs[0].strip()
    for value, message in (("65", "an integer in [1, 64], got 65"), ("0", "a positive integer, got 0")):
        for command in (common, ["serve", str(path)]):
            with pytest.raises(SystemExit):
                main([*command, "--decode-steps", value])
            assert f"--decode-steps: expected {message}" in capsys.readouterr().err


def test_async_decode_follows_the_device_unless_told(ckpt_dir):
    """On by default only where there is a device to overlap the host with (CUDA; the GPU suite
    checks that side): a CPU engine reads each step's tokens at once unless asked. The flags map
    --async-decode / --no-async-decode to True / False and no flag to the device's default."""
    import argparse

    from complexity.inference.args import add_engine_args, engine_kwargs

    path = make_tiny_checkpoint(ckpt_dir / "async-default")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2)
    assert engine.async_decode is False and "async" not in engine.describe()
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2, async_decode=True)
    assert engine.async_decode is True and "(async)" in engine.describe()
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for flags, value in (([], None), (["--async-decode"], True), (["--no-async-decode"], False)):
        assert engine_kwargs(parser.parse_args(flags))["async_decode"] is value


def test_async_decode_launches_the_next_steps_before_reading(ckpt_dir, monkeypatch):
    """While the batch is unchanged, each step launches the next window and only then reads the
    last one: the host reads a window while the next runs. Outputs come one step later."""
    path = make_tiny_checkpoint(ckpt_dir / "order")
    engine = Engine.from_pretrained(path, device="cpu", max_batch=2, async_decode=True)
    events = []
    for name in ("_launch_window", "_collect"):
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _r=real, _n=name: events.append(_n) or _r(*a))
    p = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(x, p) for x in PROMPTS[:2]]
    first = engine.step()  # prefill (first tokens) and the first window, launched and not read
    assert [len(o.new_token_ids) for o in first] == [1, 1] and engine._in_flight is not None
    assert events == ["_launch_window"]
    second = engine.step()
    assert events == ["_launch_window", "_launch_window", "_collect"]  # the next one before the read
    assert [o.new_token_ids for o in second] == [[r.output_ids[1]] for r in reqs]
    while engine.has_unfinished():
        engine.step()
    assert [len(r.output_ids) for r in reqs] == [6, 6] and sorted(engine.free_slots) == [0, 1]
    # their lengths were known: no step was launched past them
    assert engine._in_flight is None and events.count("_launch_window") == 5 == events.count("_collect")
    # a stop token is not known ahead: the window launched meanwhile is read and dropped by the next
    # step, before anything else
    [probe] = engine.generate(PROMPTS[2:3], p.copy(max_new_tokens=12))
    j = next(j for j, t in enumerate(probe.token_ids) if j >= 2 and t not in probe.token_ids[:j])
    stop = p.copy(max_new_tokens=None, stop_token_ids=[probe.token_ids[j]])
    [stopped] = engine.generate(PROMPTS[2:3], stop)
    assert stopped.token_ids == probe.token_ids[: j + 1] and stopped.finish_reason == "stop"
    assert engine._in_flight is not None
    [again] = engine.generate(PROMPTS[:1], p)
    assert again.token_ids == reqs[0].output_ids and engine.stats["finished"] == 5


def test_async_decode_abort_and_arrivals_while_steps_are_in_flight(ckpt_dir):
    """A request aborted while its next steps run loses them (its output ends at the abort); one
    that arrives meanwhile is admitted at the next step; everyone else's tokens are exact."""
    path = make_tiny_checkpoint(ckpt_dir / "abort")
    single = Engine.from_pretrained(path, device="cpu", max_batch=3)
    engine = Engine.from_pretrained(path, device="cpu", max_batch=3, async_decode=True)
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in single.generate(PROMPTS[:3], p)]
    a, b = (engine.add_request(x, p) for x in PROMPTS[:2])
    outs = []
    for _ in range(4):
        outs += engine.step()
    assert engine._in_flight is not None and engine.abort(a.request_id)
    c = engine.add_request(PROMPTS[2], p)
    while engine.has_unfinished():
        outs += engine.step()
    got_a = [t for o in outs if o.request_id == a.request_id for t in o.new_token_ids]
    assert a.finish_reason == "abort" and got_a == a.output_ids == want[0][: len(got_a)]
    assert [o.finish_reason for o in outs if o.request_id == a.request_id][-1] == "abort"
    assert b.output_ids == want[1] and c.output_ids == want[2]
    assert sorted(engine.free_slots) == [0, 1, 2]
