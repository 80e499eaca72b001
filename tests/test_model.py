"""Model core: numerics of every variant against references, caching, batching, gradients, I/O."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

import complexity
from complexity import ComplexityConfig, ComplexityForCausalLM, count_parameters, create_complexity_model
from complexity import complexity_kernels as ck
from complexity import modeling_complexity as mc

ATOL = 1e-5  # float32, tiny widths: differences come only from summation order


def cached_logits(model, ids, attention_mask=None, prefill=5, cache=None):
    """Prefill `prefill` tokens, then feed the rest one at a time through the cache."""
    kwargs = {}
    if attention_mask is not None:  # left padding: positions count only real tokens
        kwargs["attention_mask"] = attention_mask[:, :prefill]
        kwargs["position_ids"] = (attention_mask[:, :prefill].cumsum(-1) - 1).clamp(min=0)
    out = model(ids[:, :prefill], past_key_values=cache, use_cache=True, **kwargs)
    pieces, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, : t + 1]
            kwargs["position_ids"] = (attention_mask[:, : t + 1].cumsum(-1) - 1).clamp(min=0)[:, -1:]
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kwargs)
        pieces.append(out.logits)
        cache = out.past_key_values
    return torch.cat(pieces, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("fuse_min_rows", [1024, 8])
def test_cached_decoding_equals_full_forward(variant, fuse_min_rows, monkeypatch):
    """With fuse_min_rows=8 the full forward and the prefill take the fused q/k/v GEMM and the
    one-token steps the separate projections: the two paths must agree too."""
    monkeypatch.setattr(mc.ComplexityAttention, "fuse_min_rows", fuse_min_rows)
    name, overrides = variant
    model = tiny_model(**overrides)
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    torch.testing.assert_close(cached_logits(model, ids), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_decoding_equals_full_forward(variant):
    name, overrides = variant
    model = tiny_model(**overrides)
    ids = torch.randint(4, 256, (2, 14), generator=torch.Generator().manual_seed(2))
    cache = StaticCache(config=model.config, max_cache_len=32)
    torch.testing.assert_close(cached_logits(model, ids, cache=cache), model(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_cached_and_uncached(variant):
    """A left-padded sequence gets the logits it gets alone, with and without a cache."""
    name, overrides = variant
    model = tiny_model(**overrides)
    gen = torch.Generator().manual_seed(3)
    long_ids = torch.randint(4, 256, (1, 12), generator=gen)
    short_ids = torch.randint(4, 256, (1, 8), generator=gen)
    pad = 4
    ids = torch.cat([long_ids, torch.cat([torch.full((1, pad), 1), short_ids], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    alone_long = model(long_ids).logits
    alone_short = model(short_ids).logits
    torch.testing.assert_close(batched[0], alone_long[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1, pad:], alone_short[0], atol=ATOL, rtol=0)
    cached = cached_logits(model, ids, attention_mask=mask, prefill=pad + 2)
    torch.testing.assert_close(cached[1, pad:], alone_short[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached[0], alone_long[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_batch_invariance(variant):
    """A sequence's logits do not depend on what else is in the batch (routing is per token)."""
    name, overrides = variant
    model = tiny_model(**overrides)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(4, 256, (5, 10), generator=gen)
    batched = model(ids).logits
    for i in range(ids.shape[0]):
        torch.testing.assert_close(batched[i], model(ids[i : i + 1]).logits[0], atol=ATOL, rtol=0)
    # Reordering the batch permutes the output and changes nothing else.
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(model(ids[perm]).logits, batched[perm], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fuse_min_rows", [1024, 0])
def test_gradient_reaches_every_parameter(variant, fuse_min_rows, monkeypatch):
    monkeypatch.setattr(mc.ComplexityAttention, "fuse_min_rows", fuse_min_rows)
    name, overrides = variant
    model = tiny_model(**overrides).train()
    # Every token id, so every expert of every routed layer receives tokens.
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(5)).reshape(4, 64)
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # docs/architecture.md §3b: the INL mu-router override is an argmax, which has no gradient by definition.
    expected = [n for n, _ in model.named_parameters() if n.endswith("mlp.mu_router.weight")]
    assert missing == expected, f"{name}: no gradient for {sorted(set(missing) - set(expected))}"


def test_save_load_round_trip_is_bitwise(tmp_path, variant):
    name, overrides = variant
    model = tiny_model(**overrides)
    if model.model.token_to_expert is not None:
        model.set_routing_table(torch.randperm(256) % 4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ComplexityForCausalLM)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key in saved_state:
        assert torch.equal(saved_state[key], loaded_state[key]), key
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # The model file and the files it imports travel with the weights (trust_remote_code).
    for code in (
        "modeling_complexity.py",
        "configuration_complexity.py",
        "complexity_math.py",
        "complexity_kernels.py",
        "hash_routing.py",
    ):
        assert (tmp_path / code).is_file(), code
    reloaded = AutoConfig.from_pretrained(tmp_path).to_diff_dict()
    for key, value in model.config.to_diff_dict().items():
        if key not in ("_name_or_path", "auto_map", "transformers_version"):
            assert reloaded[key] == value, key


@torch.no_grad()
@pytest.mark.parametrize(
    "name", ["dense", "routed-shared-mu", "inl", "learned", "hash-top2-shared", "partial-rope-mup"]
)
def test_generate_greedy_equals_argmax_loop(name):
    model = tiny_model(**VARIANTS[name])
    prompt = torch.randint(4, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    static = model.generate(
        prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1, cache_implementation="static"
    )
    assert torch.equal(static, ids)


@torch.no_grad()
def test_generate_left_padded_batch_and_sampling():
    model = tiny_model(**VARIANTS["routed-shared-mu"])
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randint(4, 256, (1, 7), generator=gen), torch.randint(4, 256, (1, 4), generator=gen)
    ids = torch.cat([a, torch.cat([torch.full((1, 3), 1), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1
    )
    alone = model.generate(b, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(batched[1, 3:], alone[0])
    torch.manual_seed(0)
    s1 = model.generate(
        a, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, eos_token_id=None, pad_token_id=1
    )
    torch.manual_seed(0)
    s2 = model.generate(
        a, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, eos_token_id=None, pad_token_id=1
    )
    assert torch.equal(s1, s2) and s1.shape == (1, 15)
    assert int(s1.max()) < 256


def test_compiled_training_forward_keeps_the_causal_fast_path(monkeypatch):
    """A batch of whole sequences without a cache must reach SDPA with no mask (so it takes its
    causal flash path), compiled as well as eager, and compute what the masked path computes.
    Caller-given positions (possibly packed sequences) and a cache still get a mask built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask is None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording_sdpa)
    model = tiny_model(**VARIANTS["routed-shared-mu"])
    model.config._attn_implementation = "sdpa"
    model.train()
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    eager = model(ids).logits
    compiled = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    assert masks and all(masks), "a mask was built for a batch of whole sequences"
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
    masks.clear()
    # Positions 0..n-1 given explicitly: the builder runs (and, eagerly, finds nothing packed).
    positions = torch.arange(12).expand(2, -1)
    with_positions = torch.compile(model, backend="eager", fullgraph=True)(ids, position_ids=positions).logits
    torch.testing.assert_close(with_positions, eager, atol=ATOL, rtol=0)
    model.config._attn_implementation = "eager"  # explicit masks only: never the fast path
    torch.testing.assert_close(model(ids).logits, eager, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["routed-shared-mu", "partial-rope-mup"])
def test_compiled_model_computes_rope_tables_once_as_an_op(name):
    """Compiled, the RoPE tables are one opaque op per forward (the compiler would otherwise
    inline pow/sin/cos into every layer's q/k kernels); eager calls skip the op's dispatch. A
    partial RoPE asks the same op for tables of its rotary width."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = tiny_model(**VARIANTS[name]).train()
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)(ids).logits
    assert targets.count(torch.ops.complexity.rope_tables.default) == 1
    torch.testing.assert_close(compiled, model(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_generate_with_static_cache_and_torch_compile():
    model = tiny_model(**VARIANTS["routed-shared-mu"])
    prompt = torch.randint(4, 256, (1, 5), generator=torch.Generator().manual_seed(8))
    eager = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    compiled = model.generate(
        prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1, cache_implementation="static"
    )
    assert torch.equal(compiled, eager)


@torch.no_grad()
def test_attention_backends_agree():
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    outputs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(**VARIANTS["sliding"], attn_implementation=impl)
        assert model.config._attn_implementation == impl
        outputs[impl] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(outputs["eager"][:, 3:], outputs["sdpa"][:, 3:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_sliding_window_limits_what_a_query_sees():
    model = tiny_model(**VARIANTS["sliding"])  # window 5
    ids = torch.randint(4, 256, (1, 12), generator=torch.Generator().manual_seed(10))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 7) % 256
    a, b = model(ids).logits, model(changed).logits
    # With 3 layers of window 5, information travels at most 3 * 4 positions: position 11 still
    # sees position 0 through stacked windows, but a single layer must not. Check one layer:
    one_layer = tiny_model(**{**VARIANTS["sliding"], "num_hidden_layers": 1})
    a1, b1 = one_layer(ids).logits, one_layer(changed).logits
    assert not torch.allclose(a1[0, 4], b1[0, 4])  # inside the window of position 0
    torch.testing.assert_close(a1[0, 5:], b1[0, 5:], atol=ATOL, rtol=0)  # outside it
    assert not torch.allclose(a[0, 8], b[0, 8])


def reference_attention(attn, x, positions, config, scale):
    """One attention sublayer in plain float64 torch, written apart from the model: QK-norm over
    the whole head, then RoPE turning pairs (i, i + r/2) of the first r = floor(d f / 2) * 2 dims
    by position * theta^(-2i/r) and passing the rest through, scores times `scale`, causal
    softmax, grouped heads."""
    b, s, _ = x.shape
    d, n_q, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    r = math.floor(d * config.partial_rotary_factor / 2) * 2
    eps = config.qk_norm_eps or config.rms_norm_eps

    def heads(proj, n):
        return (x @ proj.weight.T).view(b, s, n, d)

    def rms(t, gain):
        return gain * t / torch.sqrt(t.square().mean(-1, keepdim=True) + eps)

    q, k, v = heads(attn.q_proj, n_q), heads(attn.k_proj, n_kv), heads(attn.v_proj, n_kv)
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    half = r // 2
    angle = positions[..., None].double() * config.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / r)
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]  # [b, s, 1, r/2]

    def rope(t):
        first, second = t[..., :half], t[..., half:r]
        return torch.cat([first * cos - second * sin, second * cos + first * sin, t[..., r:]], dim=-1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(n_q // n_kv, dim=2), v.repeat_interleave(n_q // n_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, n_q * d)
    return out @ attn.o_proj.weight.T


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "knobs",
    [
        dict(),  # the defaults: full RoPE, 1/sqrt(d), logits as they are
        dict(partial_rotary_factor=0.4, attention_multiplier=1 / 16, logits_scaling=2.5),  # r = 6 of 16
        dict(partial_rotary_factor=0.25, attention_multiplier=0.4, logits_scaling=0.5),  # r = 4
    ],
    ids=["defaults", "r6-mup", "r4"],
)
def test_partial_rope_attention_scale_and_logits_scaling_match_a_float64_reference(impl, knobs):
    """partial_rotary_factor, attention_multiplier and logits_scaling (docs/architecture.md §1):
    every layer's attention, at positions that do not start at 0, equals the plain float64
    computation, and the logits are LMHead(h) / logits_scaling."""
    model = tiny_model(**VARIANTS["hash-top2-shared"], **knobs, attn_implementation=impl).double()
    config = model.config
    scale = knobs.get("attention_multiplier", config.head_dim**-0.5)
    ids = torch.randint(4, 256, (2, 11), generator=torch.Generator().manual_seed(13))
    positions = torch.arange(11)[None] + torch.tensor([[0], [7]])
    seen = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
        for layer in model.model.layers
    ]
    out = model(ids, attention_mask=torch.ones_like(ids), position_ids=positions, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    assert len(seen) == config.num_hidden_layers
    for attn, x, got in seen:
        # the model's cos/sin tables are float32 (as in every HF RoPE): 1e-6, not float64's 1e-12
        torch.testing.assert_close(got, reference_attention(attn, x, positions, config, scale), atol=1e-6, rtol=0)
    final = out.hidden_states[-1]
    want = final @ model.model.embed_tokens.weight.T / knobs.get("logits_scaling", 1.0)
    torch.testing.assert_close(out.logits, want, atol=1e-10, rtol=0)


@torch.no_grad()
def test_flash_attention_path_gets_the_configs_scale(monkeypatch):
    """The flash-attention path (no kernel on a CPU: a stand-in registered under its name that
    records its arguments and runs SDPA) is called with the config's attention_multiplier and
    computes what SDPA computes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    scales = []

    def flash_stand_in(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scales.append(scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_stand_in)
    model = tiny_model(**VARIANTS["partial-rope-mup"], attn_implementation="sdpa")
    ids = torch.randint(4, 256, (2, 10), generator=torch.Generator().manual_seed(14))
    want = model(ids).logits
    model.config._attn_implementation = "flash_attention_2"
    torch.testing.assert_close(model(ids).logits, want, atol=ATOL, rtol=0)
    assert scales == [1 / 16] * model.config.num_hidden_layers


def test_default_knobs_are_not_written_differently_and_old_configs_load(tmp_path):
    """A config.json without the three fields (every checkpoint saved before them) gets today's
    computation: full RoPE, 1/sqrt(head_dim), undivided logits; saved values read back."""
    import json

    model = tiny_model(**VARIANTS["routed"])
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("partial_rotary_factor", "attention_multiplier", "logits_scaling"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = loaded.config
    assert (cfg.partial_rotary_factor, cfg.attention_multiplier, cfg.logits_scaling) == (1.0, None, 1.0)
    assert (cfg.rotary_dim, cfg.attention_scale) == (16, 0.25)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    knobs = tiny_model(**VARIANTS["partial-rope-mup"])
    knobs.save_pretrained(tmp_path / "knobs")
    cfg = AutoConfig.from_pretrained(tmp_path / "knobs")
    assert (cfg.partial_rotary_factor, cfg.attention_multiplier, cfg.logits_scaling) == (0.4, 1 / 16, 2.5)
    assert cfg.rotary_dim == 6


@torch.no_grad()
def test_token_routing_follows_the_table():
    """Perturbing expert e's weights changes exactly the tokens whose table entry is e."""
    model = tiny_model(**VARIANTS["routed"])
    table = torch.randperm(256, generator=torch.Generator().manual_seed(11)) % 4
    model.set_routing_table(table)
    ids = torch.arange(256).reshape(4, 64)
    routing = mc.Routing.for_tokens(ids, model.model.token_to_expert, 4)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))
    hidden_before = model.model.layers[0].mlp(x, routing)[0]
    model.model.layers[0].mlp.experts.down_proj[2].add_(1.0)
    hidden_after = model.model.layers[0].mlp(x, routing)[0]
    changed = (hidden_before - hidden_after).abs().amax(-1) > 0
    assert torch.equal(changed, table[ids] == 2)


def test_grouped_matmul_matches_per_expert_loop(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(37, 16, generator=gen)
    w = torch.randn(4, 16, 8, generator=gen)
    offsets = torch.tensor([10, 10, 30, 37], dtype=torch.int32)  # expert 1 receives no rows
    reference = torch.cat([x[0:10] @ w[0], x[10:10] @ w[1], x[10:30] @ w[2], x[30:37] @ w[3]])
    torch.testing.assert_close(ck.grouped_matmul(x, w, offsets), reference, atol=1e-5, rtol=0)
    monkeypatch.setattr(ck, "_GROUPED_MM", None)
    torch.testing.assert_close(ck.grouped_matmul(x, w, offsets), reference, atol=1e-5, rtol=0)


def test_dispatch_is_a_stable_sort_by_expert():
    expert_idx = torch.randint(0, 5, (301,), generator=torch.Generator().manual_seed(14))
    expert_idx[expert_idx == 3] = 4  # expert 3 receives no rows
    order, inverse, offsets = ck.dispatch_by_expert(expert_idx, 5)
    assert torch.equal(order, torch.argsort(expert_idx, stable=True))
    assert torch.equal(order[inverse], torch.arange(301))
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == torch.bincount(expert_idx, minlength=5).cumsum(0).tolist()


@pytest.mark.parametrize("shared, seq", [(False, 20), (True, 20), (True, 64)])
def test_token_routed_mlp_matches_a_float64_per_expert_loop(shared, seq):
    """The dispatch against the obvious loop; with a shared expert both ways of running it: its
    own pass (60 rows) and fused into the grouped GEMM (192 rows >= E x shared width)."""
    overrides = {**VARIANTS["routed"], "shared_expert": shared}
    mlp = tiny_model(**overrides).model.layers[0].mlp
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)  # the zero-initialised projections would hide mistakes
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(3, seq, 64, generator=gen)
    expert_ids = torch.randint(0, 4, (3, seq), generator=gen)
    out, aux = mlp(x, mc.Routing(None, expert_ids=expert_ids))
    assert aux is None

    mlp64, x64 = mlp.double(), x.double()
    reference = torch.zeros_like(x64)
    for e in range(4):
        rows = expert_ids == e
        gate, up = (x64[rows] @ mlp64.experts.gate_up_proj[e]).chunk(2, dim=-1)
        reference[rows] = (F.silu(gate) * up) @ mlp64.experts.down_proj[e]
    if shared:
        reference = reference + mlp64.shared_expert(x64)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mu", [False, True])
def test_fused_qkv_projection_matches_a_float64_reference(with_mu):
    """Large batches run q/k/v (and mu's q/k/v) as one concatenated GEMM, small ones as separate
    projections: both equal x W_q + mu W_muq (etc.) computed in float64."""
    attn = tiny_model(**VARIANTS["routed-shared-mu"]).model.layers[1].self_attn
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)  # the mu projections start at zero
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 64, generator=gen)
    mu = torch.randn(2, 40, 64, generator=gen) if with_mu else None
    reference = [x.double() @ proj.weight.double().T for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if with_mu:
        reference = [
            r + mu.double() @ proj.weight.double().T
            for r, proj in zip(reference, (attn.mu_to_q, attn.mu_to_k, attn.mu_to_v))
        ]
    for min_rows in (0, 10**9):  # fused, separate
        attn.fuse_min_rows = min_rows
        for got, want in zip(attn.project_qkv(x, mu), reference):
            torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=ATOL)
    # The fused path's gradients reach every projection.
    attn.fuse_min_rows = 0
    sum(t.square().sum() for t in attn.project_qkv(x, mu)).backward()
    used = [attn.q_proj, attn.k_proj, attn.v_proj] + ([attn.mu_to_q, attn.mu_to_k, attn.mu_to_v] if with_mu else [])
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in used)


def test_token_routed_mlp_compiles_fullgraph():
    mlp = tiny_model(**VARIANTS["routed-shared-mu"]).model.layers[0].mlp
    ids = torch.randint(0, 256, (2, 16))
    routing = mc.Routing.for_tokens(ids, torch.arange(256) % 4, 4)
    # bf16 takes the grouped GEMM; fp32 under the compiler takes the static-shape fallback.
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        mlp = mlp.to(dtype)
        x = torch.randn(2, 16, 64, dtype=dtype)
        eager = mlp(x, routing)[0]
        torch._dynamo.reset()
        compiled = torch.compile(mlp, fullgraph=True, dynamic=False)(x, routing)[0]
        torch.testing.assert_close(compiled, eager, atol=tol, rtol=tol)


def test_learned_router_aux_loss_is_added_and_trains_the_router():
    model = tiny_model(**VARIANTS["learned"]).train()
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(13))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() >= 1.0 - 1e-6  # Switch loss is >= 1
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + model.config.router_aux_loss_coef * out.aux_loss)
    # The aux loss alone gives every router a gradient.
    out.aux_loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0


def test_learned_router_aux_loss_matches_switch_formula():
    model = tiny_model(**VARIANTS["learned"], num_hidden_layers=1)
    x = torch.randn(3, 5, 64)
    mlp = model.model.layers[0].mlp
    _, aux = mlp(x)
    probs = torch.softmax(mlp.router(x.reshape(-1, 64)).double(), -1)
    f = F.one_hot(probs.argmax(-1), 4).double().mean(0)
    torch.testing.assert_close(aux.double(), 4 * (f * probs.mean(0)).sum(), atol=1e-6, rtol=0)


def test_aux_loss_is_an_output_field():
    """The base model returns the router's loss as `aux_loss` (router_logits stays unused); the
    models without a learned router return none."""
    ids = torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(16))
    learned = tiny_model(**VARIANTS["learned-top2-shared-mu"])
    out = learned.model(ids)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and out.router_logits is None
    torch.testing.assert_close(learned(ids).aux_loss, out.aux_loss)
    for name in ("dense", "routed-shared-mu", "inl"):
        assert tiny_model(**VARIANTS[name]).model(ids).aux_loss is None, name


@pytest.mark.parametrize("mlp_type", list(mc.MLP_KINDS))
def test_every_mlp_kind_has_one_interface(mlp_type):
    """`mlp(hidden_states, routing) -> (out, aux or None)`, whatever the kind: the decoder layer
    calls every kind the same way."""
    model = tiny_model(mlp_type=mlp_type, shared_expert=mlp_type != "dense")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, mc.MLP_KINDS[mlp_type])
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(17))
    routing = mc.Routing.for_tokens(ids, model.model.token_to_expert, 4, torch.ones_like(ids))
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(18))
    out, aux = mlp(x, routing)
    assert out.shape == x.shape
    assert (aux is not None) == (mlp_type == "learned_moe")


@torch.no_grad()
def test_compiled_inl_forward_matches_eager():
    """The INL layer hands its mu_c to the MLP inside the routing (and re-groups the tokens the
    override moved): the whole forward still compiles as one graph."""
    model = tiny_model(**VARIANTS["inl"])
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(19))
    compiled = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, model(ids).logits, atol=ATOL, rtol=0)


SAVED = Path(__file__).parent / "fixtures" / "saved_checkpoints"


@pytest.mark.parametrize(
    "overrides,edit,message",
    [
        (
            dict(mlp_type="token_routed"),
            lambda sd: sd["model.token_to_expert"].__setitem__(5, 9),
            "model.token_to_expert: holds expert ids in [0, 9], outside [0, num_experts=4)",
        ),
        (
            dict(mlp_type="hash_routed", num_experts_per_tok=2),
            lambda sd: sd["model.layers.1.mlp.route_table"].__setitem__((0, 3), -1),
            "model.layers.1.mlp.route_table",
        ),
    ],
)
def test_from_pretrained_refuses_a_routing_table_naming_no_expert(tmp_path, overrides, edit, message):
    # such a table loaded silently and failed at the first forward, as an index error in the MLP
    from safetensors.torch import save_file

    tiny_model(**overrides).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (AutoModelForCausalLM.from_pretrained, ComplexityForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(message)):
            load(tmp_path)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(p.name for p in SAVED.iterdir() if p.is_dir()))
def test_checkpoints_saved_before_load_after(name):
    """Folders written by an earlier version of the model code (tests/fixtures/saved_checkpoints)
    load key for key and shape for shape, and compute the logits recorded then."""
    folder = SAVED / name
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, ComplexityForCausalLM)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in saved.items()}
    reference = load_file(folder / "reference.safetensors")
    logits = model.eval()(reference["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_mu_guidance_at_init_equals_the_model_without_mu():
    """The mu projections start at zero: at init the mu model computes exactly the plain model."""
    torch.manual_seed(0)
    with_mu = ComplexityForCausalLM(tiny_config(shared_expert=True, mu_mode="guidance")).eval()
    without = ComplexityForCausalLM(tiny_config(shared_expert=True, mu_mode="none")).eval()
    for name, p in with_mu.named_parameters():
        if "mu_to_" in name or "mu_proj" in name:
            assert torch.count_nonzero(p) == 0, name
    assert torch.count_nonzero(with_mu.model.mu_init) == 0
    missing = without.load_state_dict(with_mu.state_dict(), strict=False)
    assert not missing.missing_keys and all("mu" in k for k in missing.unexpected_keys)
    ids = torch.randint(0, 256, (2, 10))
    assert torch.equal(with_mu(ids).logits, without(ids).logits)


def test_init_follows_the_spec():
    torch.manual_seed(0)
    model = ComplexityForCausalLM(
        tiny_config(hidden_size=256, intermediate_size=1024, mu_mode="inl", num_hidden_layers=8)
    )
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    layer = model.model.layers[1]
    assert abs(layer.self_attn.q_proj.weight.std().item() - std) < 0.002
    assert abs(layer.self_attn.o_proj.weight.std().item() - out_std) < 0.0005
    assert abs(layer.mlp.experts.down_proj.std().item() - out_std) < 0.0005
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    bias = layer.dynamics.controller_out.bias
    alpha, beta, gate = torch.sigmoid(bias[:256]), F.softplus(bias[256:512]), torch.sigmoid(bias[512:])
    torch.testing.assert_close(alpha, torch.full((256,), 0.9))
    torch.testing.assert_close(beta, torch.full((256,), 0.1))
    torch.testing.assert_close(gate, torch.full((256,), 0.5))
    assert torch.count_nonzero(layer.dynamics.mu_proj.weight) == 0 and torch.count_nonzero(layer.dynamics.mu) == 0
    assert torch.equal(model.model.token_to_expert, torch.arange(model.config.vocab_size) % 4)


def test_no_dead_mu_parameters_when_mu_is_off():
    names = [n for n, _ in ComplexityForCausalLM(tiny_config(mu_mode="none")).named_parameters()]
    assert not any("mu" in n for n in names)
    inl = [n for n, _ in ComplexityForCausalLM(tiny_config(mu_mode="inl")).named_parameters()]
    assert not any(n.startswith("model.layers.0.self_attn.mu_to") for n in inl)  # layer 0 has no mu_prev


def closed_form_parameter_count(c: ComplexityConfig) -> tuple[int, int]:
    """docs/architecture.md's shapes written out by hand: (total, active per token)."""
    H, L, d, E = c.hidden_size, c.num_hidden_layers, c.head_dim, c.num_experts
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn = H * q + 2 * H * kv + q * H + (2 * d if c.use_qk_norm else 0)
    mu_attn = H * (q + 2 * kv)
    swiglu = lambda width: 3 * H * width  # noqa: E731
    total = c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + H  # embeddings + final norm
    inactive = 0
    for i in range(L):
        total += attn + 2 * H
        if c.mlp_type == "dense":
            total += swiglu(c.intermediate_size)
        else:
            total += E * swiglu(c.expert_width) + (swiglu(c.shared_expert_width) if c.shared_expert else 0)
            total += E * H if (c.mlp_type == "learned_moe" or c.mu_mode == "inl") else 0
            visited = 1 if c.mlp_type == "token_routed" else c.num_experts_per_tok
            inactive += (E - visited) * swiglu(c.expert_width)
        if c.mu_mode == "guidance":
            total += mu_attn + ((H + H * H) if i < L - 1 else 0)
        if c.mu_mode == "inl":
            C = c.dynamics_controller_hidden
            total += (mu_attn if i > 0 else 0) + H + H * H + (2 * H * C + C) + (C * 3 * H + 3 * H)
    total += H if c.mu_mode == "guidance" else 0
    return total, total - inactive


@pytest.mark.parametrize("preset", complexity.PRESETS)
def test_preset_parameter_counts_equal_the_formula(preset):
    config = ComplexityConfig.from_preset(preset)
    counts = count_parameters(config)
    assert (counts.total, counts.active) == closed_form_parameter_count(config)


def test_known_preset_sizes():
    # tmlr-187m: 186.8M live (upstream's 187.4M included the last layer's dead mu projection);
    # the dense ablation arm at width 3242 has 187.4M; pacific-prime is the 1.5B INL model.
    assert count_parameters(ComplexityConfig.from_preset("tmlr-187m")).total == 186_822_144
    dense = ComplexityConfig.from_preset(
        "tmlr-187m", mlp_type="dense", mu_mode="none", shared_expert=False, intermediate_size=3242
    )
    assert count_parameters(dense).total == 187_370_496
    assert round(count_parameters(ComplexityConfig.from_preset("pacific-prime")).total / 1e9, 2) == 1.51
    # trhash-200m, the shape of upstream's public TR-Hash 200M release: 2 of 4 experts (4 x 64) active
    trhash = count_parameters(ComplexityConfig.from_preset("trhash-200m"))
    assert (trhash.total, trhash.active) == (201_194_368, 195_689_344)


NAN, INF = float("nan"), float("inf")
MLP_TYPES = "('dense', 'token_routed', 'learned_moe', 'hash_routed')"
INL_NEEDS_TOKEN_ROUTED = (
    "ComplexityConfig.mu_mode: 'inl' routes through the token-routed MLP's mu override, which moves a token's one "
    "expert (top-1); it needs mlp_type='token_routed', got {!r} (mu_mode='guidance' composes with every MLP)"
)
# One bad setting each, in the order ComplexityConfig.validate_complexity checks them, with its
# exact message. A case also names the fields by which another case could turn its check off
# (mlp_type="token_routed" where the check applies only to routed MLPs, mlp_type="dense" turning
# it off), so that two cases with no field in common never hide one another: see the order test.
BAD_CONFIGS = [
    (dict(vocab_size=0), "ComplexityConfig.vocab_size: must be a positive integer, got 0"),
    # checked before transformers' own token-id check, which fails on a non-integer with a TypeError
    (dict(vocab_size="abc"), "ComplexityConfig.vocab_size: must be a positive integer, got 'abc'"),
    (dict(pad_token_id="1"), "ComplexityConfig.pad_token_id: must be None or a non-negative integer id, got '1'"),
    (dict(bos_token_id=-5), "ComplexityConfig.bos_token_id: must be None or a non-negative integer id, got -5"),
    (dict(eos_token_id=[0, 256]), "ComplexityConfig.eos_token_id: 256 is outside the vocabulary [0, vocab_size=256)"),
    (dict(hidden_size=True), "ComplexityConfig.hidden_size: must be a positive integer, got True"),
    (dict(intermediate_size=1.5), "ComplexityConfig.intermediate_size: must be a positive integer, got 1.5"),
    (dict(num_hidden_layers=-1), "ComplexityConfig.num_hidden_layers: must be a positive integer, got -1"),
    (dict(num_attention_heads=0), "ComplexityConfig.num_attention_heads: must be a positive integer, got 0"),
    (dict(num_key_value_heads="2"), "ComplexityConfig.num_key_value_heads: must be a positive integer, got '2'"),
    (
        dict(max_position_embeddings=None),
        "ComplexityConfig.max_position_embeddings: must be a positive integer, got None",
    ),
    (
        dict(hidden_size=100, num_attention_heads=3),
        "ComplexityConfig.num_attention_heads: 3 does not divide hidden_size=100",
    ),
    (dict(num_key_value_heads=3), "ComplexityConfig.num_key_value_heads: 3 does not divide num_attention_heads=4"),
    (dict(head_dim=15), "ComplexityConfig.head_dim: must be a positive even integer (RoPE rotates pairs), got 15"),
    (dict(head_dim=0), "ComplexityConfig.head_dim: must be a positive even integer (RoPE rotates pairs), got 0"),
    (dict(partial_rotary_factor=0.0), "ComplexityConfig.partial_rotary_factor: must be a number in (0, 1], got 0.0"),
    (dict(partial_rotary_factor=1.5), "ComplexityConfig.partial_rotary_factor: must be a number in (0, 1], got 1.5"),
    (
        dict(partial_rotary_factor="0.5"),
        "ComplexityConfig.partial_rotary_factor: must be a number in (0, 1], got '0.5'",
    ),
    (
        dict(partial_rotary_factor=True),
        "ComplexityConfig.partial_rotary_factor: must be a number in (0, 1], got True",
    ),
    (
        dict(partial_rotary_factor=0.1),  # floor(16 * 0.1 / 2) * 2 = 0 dims
        "ComplexityConfig.partial_rotary_factor: 0.1 gives rotary_dim = floor(head_dim * 0.1 / 2) * 2 = 0 with "
        "head_dim=16; RoPE needs at least one pair of dims",
    ),
    *(
        (
            dict(attention_multiplier=value),
            f"ComplexityConfig.attention_multiplier: must be None (1/sqrt(head_dim)) or a positive number, got {value!r}",
        )
        for value in (0.0, -0.1, NAN)
    ),
    *(
        (
            dict(logits_scaling=value),
            f"ComplexityConfig.logits_scaling: must be a positive number (the logits are divided by it), got {value!r}",
        )
        for value in (0, None, INF)
    ),
    (
        dict(mlp_type="switch"),
        f"ComplexityConfig.mlp_type: unknown value 'switch'; expected one of {MLP_TYPES}",
    ),
    (
        dict(mu_mode="fancy"),
        "ComplexityConfig.mu_mode: unknown value 'fancy'; expected one of ('none', 'guidance', 'inl')",
    ),
    (
        dict(routing="hash"),
        "ComplexityConfig.routing: unknown value 'hash'; expected one of ('range', 'modulo', 'zipf')",
    ),
    (dict(sliding_window=0), "ComplexityConfig.sliding_window: must be None or a positive integer, got 0"),
    (dict(sliding_window=2.5), "ComplexityConfig.sliding_window: must be None or a positive integer, got 2.5"),
    (dict(use_qk_norm="yes"), "ComplexityConfig.use_qk_norm: must be true or false, got 'yes'"),
    (dict(shared_expert="no"), "ComplexityConfig.shared_expert: must be true or false, got 'no'"),
    (dict(tie_word_embeddings=1), "ComplexityConfig.tie_word_embeddings: must be true or false, got 1"),
    (
        dict(mlp_type="token_routed", num_experts=0),
        "ComplexityConfig.num_experts: must be a positive integer, got 0",
    ),
    (
        dict(mlp_type="token_routed", intermediate_size=130, num_experts=4, expert_intermediate_size=None),
        "ComplexityConfig.intermediate_size: 130 is not divisible by num_experts=4 (or set expert_intermediate_size)",
    ),
    (
        dict(mlp_type="token_routed", expert_intermediate_size="64"),
        "ComplexityConfig.expert_intermediate_size: must be None or an integer, got '64'",
    ),
    (
        dict(mlp_type="token_routed", expert_intermediate_size=0),
        "ComplexityConfig.expert_intermediate_size: must be positive, got 0",
    ),
    *(
        (
            dict(mlp_type=mlp_type, num_experts_per_tok=k),
            f"ComplexityConfig.num_experts_per_tok: must be an integer in [1, num_experts=4], got {k!r}",
        )
        for mlp_type, k in (("learned_moe", 5), ("hash_routed", 5), ("hash_routed", 0), ("hash_routed", True))
    ),
    (
        dict(mlp_type="token_routed", num_experts_per_tok=2),
        "ComplexityConfig.num_experts_per_tok: token_routed sends each token to exactly one expert, so it must be 1, "
        "got 2 (hash_routed or learned_moe route to several)",
    ),
    (
        dict(route_strategy="zipf"),
        "ComplexityConfig.route_strategy: unknown value 'zipf'; expected one of "
        "('modulo_cyclic', 'balanced_hash', 'multi_hash', 'hierarchical_hash')",
    ),
    (dict(route_hash_count=9), "ComplexityConfig.route_hash_count: must be an integer in [2, 8], got 9"),
    (dict(route_hash_count=True), "ComplexityConfig.route_hash_count: must be an integer in [2, 8], got True"),
    (
        dict(route_primary_weight=1.5),
        "ComplexityConfig.route_primary_weight: must be None (1/num_experts_per_tok) or a number in [0, 1], got 1.5",
    ),
    (
        dict(shared_output_scale_last_layer="2"),
        "ComplexityConfig.shared_output_scale_last_layer: must be a finite number or None, got '2'",
    ),
    (dict(routed_output_scale=NAN), "ComplexityConfig.routed_output_scale: must be a finite number, got nan"),
    (
        dict(mlp_type="hash_routed", route_strategy="hierarchical_hash", num_experts=2),
        "ComplexityConfig.num_experts: hierarchical_hash needs an even number of experts >= 4, got 2",
    ),
    (
        dict(mlp_type="hash_routed", route_strategy="hierarchical_hash", num_experts_per_tok=3),
        "ComplexityConfig.num_experts_per_tok: hierarchical_hash routes among num_experts/2=2 parent experts, "
        "so at most 2 routes per token, got 3",
    ),
    (
        dict(
            mlp_type="hash_routed",
            route_strategy="balanced_hash",
            num_experts=6,
            num_experts_per_tok=3,
            intermediate_size=120,
        ),
        "ComplexityConfig.num_experts_per_tok: balanced_hash cannot give 3 distinct experts per token with "
        "num_experts=6 (at most 2; a power of two number of experts allows any k)",
    ),
    (
        dict(mlp_type="dense", shared_expert=True),
        "ComplexityConfig.shared_expert: a shared expert needs a routed MLP "
        "(mlp_type token_routed, learned_moe or hash_routed)",
    ),
    (
        dict(mlp_type="token_routed", shared_expert=True, shared_expert_intermediate_size=0),
        "ComplexityConfig.shared_expert_intermediate_size: must be positive, got 0",
    ),
    (dict(mlp_type="dense", mu_mode="inl"), INL_NEEDS_TOKEN_ROUTED.format("dense")),
    (dict(mlp_type="hash_routed", mu_mode="inl"), INL_NEEDS_TOKEN_ROUTED.format("hash_routed")),
    (dict(rope_theta=0.0), "ComplexityConfig.rope_theta: must be a positive number, got 0.0"),
    (dict(rms_norm_eps=-1e-6), "ComplexityConfig.rms_norm_eps: must be a positive number, got -1e-06"),
    (dict(mu_prev_clamp=NAN), "ComplexityConfig.mu_prev_clamp: must be a positive number, got nan"),
    (
        dict(mu_clamp_min=3.0, mu_clamp_max=2.0),
        "ComplexityConfig.mu_clamp_min: must be a number <= mu_clamp_max, got 3.0 and 2.0",
    ),
    (
        dict(mu_clamp_min=0.0, mu_clamp_max=INF),
        "ComplexityConfig.mu_clamp_min: must be a number <= mu_clamp_max, got 0.0 and inf",
    ),
    (
        dict(qk_norm_eps=0.0),
        "ComplexityConfig.qk_norm_eps: must be None (rms_norm_eps) or a positive number, got 0.0",
    ),
    (
        dict(dynamics_alpha=1.5),
        "ComplexityConfig.dynamics_alpha: is a sigmoid output at init and must lie in (0, 1), got 1.5",
    ),
    (
        dict(dynamics_alpha="0.9"),
        "ComplexityConfig.dynamics_alpha: is a sigmoid output at init and must lie in (0, 1), got '0.9'",
    ),
    (
        dict(dynamics_gate=0.0),
        "ComplexityConfig.dynamics_gate: is a sigmoid output at init and must lie in (0, 1), got 0.0",
    ),
    (dict(dynamics_beta_max=NAN), "ComplexityConfig.dynamics_beta_max: must be a positive number, got nan"),
    *(
        (
            dict(dynamics_beta=beta, dynamics_beta_max=2.0),
            f"ComplexityConfig.dynamics_beta: must lie in (0, dynamics_beta_max=2.0), got {beta}",
        )
        for beta in (0.0, 2.0)
    ),
    (dict(dynamics_dt=-0.1), "ComplexityConfig.dynamics_dt: must be a positive number, got -0.1"),
    (dict(dynamics_velocity_clamp=0), "ComplexityConfig.dynamics_velocity_clamp: must be a positive number, got 0"),
    (dict(initializer_range=NAN), "ComplexityConfig.initializer_range: must be a positive number, got nan"),
    (
        dict(dynamics_controller_hidden=0),
        "ComplexityConfig.dynamics_controller_hidden: must be a positive integer, got 0",
    ),
    (dict(mu_highway_scale=INF), "ComplexityConfig.mu_highway_scale: must be a finite number, got inf"),
    (dict(mu_router_bias=None), "ComplexityConfig.mu_router_bias: must be a finite number, got None"),
    (dict(attention_dropout=1.0), "ComplexityConfig.attention_dropout: must be a probability in [0, 1), got 1.0"),
    (dict(router_aux_loss_coef=-0.1), "ComplexityConfig.router_aux_loss_coef: must be a number >= 0, got -0.1"),
    (dict(router_aux_loss_coef=NAN), "ComplexityConfig.router_aux_loss_coef: must be a number >= 0, got nan"),
]


@pytest.mark.parametrize("fields, message", BAD_CONFIGS, ids=[repr(fields) for fields, _ in BAD_CONFIGS])
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ValueError) as err:
        tiny_config(**fields)
    assert str(err.value) == message


def test_the_first_invalid_setting_in_check_order_is_the_one_reported():
    # every two bad settings that touch different fields, together: the earlier one's message
    for (first, message), (second, _) in itertools.combinations(BAD_CONFIGS, 2):
        if first.keys() & second.keys():
            continue
        with pytest.raises(ValueError) as err:
            tiny_config(**first, **second)
        assert str(err.value) == message, (first, second)
    # two that share mlp_type="dense": the shared expert is checked before mu_mode
    with pytest.raises(ValueError, match=r"^ComplexityConfig\.shared_expert: a shared expert needs a routed MLP"):
        tiny_config(mlp_type="dense", shared_expert=True, mu_mode="inl")


def test_unknown_preset_and_bad_routing_tables():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ComplexityConfig.from_preset("huge")
    model = tiny_model(**VARIANTS["routed"])
    with pytest.raises(ValueError, match=r"shape \(255,\), expected \(256,\) \(vocab_size\)"):
        model.set_routing_table(torch.zeros(255, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\) \(num_experts\)"):
        model.set_routing_table(torch.full((256,), 4))
    with pytest.raises(ValueError, match="integer expert ids"):
        model.set_routing_table(torch.zeros(256))
    with pytest.raises(ValueError, match="no token routing"):
        tiny_model(**VARIANTS["dense"]).set_routing_table(torch.zeros(256, dtype=torch.long))


def test_bad_inputs_get_clear_errors():
    model = tiny_model(**VARIANTS["routed"])
    with pytest.raises(ValueError, match=r"token id 256 is outside the vocabulary \[0, 256\)"):
        model(torch.tensor([[5, 256, 7]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match="token-routed models need input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 64))
    dense = tiny_model(**VARIANTS["dense"])
    assert dense(inputs_embeds=torch.randn(1, 3, 64)).logits.shape == (1, 3, 256)


def test_create_complexity_model_and_presets():
    model = create_complexity_model("tiny", vocab_size=512, num_hidden_layers=2, routing_table=torch.arange(512) % 4)
    assert model.config.hidden_size == 256 and model.config.preset == "tiny"
    assert torch.equal(model.model.token_to_expert, torch.arange(512) % 4)
    config = ComplexityConfig.from_preset("pacific-prime")
    assert (config.mu_mode, config.routing, config.shared_expert) == ("inl", "modulo", False)
    config = ComplexityConfig.from_preset("tmlr-187m")
    assert (config.mu_mode, config.routing, config.shared_expert, config.num_hidden_layers) == (
        "guidance",
        "zipf",
        True,
        18,
    )


def test_cli_info_prints_exact_counts(capsys):
    from complexity.cli import main

    assert main(["info", "tmlr-187m"]) == 0
    out = capsys.readouterr().out
    assert "total 186,822,144" in out and "active per token 123,121,152" in out
    assert main(["info", "tiny", "mlp_type=dense", "--json"]) == 0
    assert '"mlp_type": "dense"' in capsys.readouterr().out
    assert main(["info", "tiny", "num_experts=3"]) == 2
    assert "intermediate_size" in capsys.readouterr().err
    assert main(["info", "tiny", "=3"]) == 2
    assert "override '=3': no field name before '='" in capsys.readouterr().err
    assert main(["info", "trhash-200m"]) == 0
    out = capsys.readouterr().out
    assert "mlp_type = hash_routed" in out and "total 201,194,368" in out and "active per token 195,689,344" in out
    assert main(["info", "trhash-200m", "route_strategy=learned"]) == 2
    assert "route_strategy: unknown value 'learned'" in capsys.readouterr().err


REMOTE_CODE_SCRIPT = r"""
import importlib.abc, sys

class HideComplexity(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "complexity" or name.startswith("complexity."):
            raise ImportError(f"{name} is hidden for this test")
        return None

sys.meta_path.insert(0, HideComplexity())
import torch
from transformers import AutoModelForCausalLM
try:
    import complexity  # noqa: F401
    raise SystemExit("the package should be hidden")
except ImportError:
    pass
folder = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))  # the test process's: another count sums matmuls in another order
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
data = torch.load(folder + "/expected.pt")
with torch.no_grad():
    logits = model(data["ids"]).logits
assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
generated = model.generate(data["ids"][:1], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=1)
assert generated.shape == (1, data["ids"].shape[1] + 4)
print("REMOTE-CODE-OK", type(model).__module__)
"""


@pytest.mark.parametrize("name", ["routed-shared-mu", "hash-top2-shared", "partial-rope-mup"])
def test_trust_remote_code_load_without_the_package(tmp_path, name):
    """A saved folder carries its own model code: it loads where `complexity` is not importable."""
    import subprocess
    import sys

    model = tiny_model(**VARIANTS[name])
    if model.model.token_to_expert is not None:
        model.set_routing_table(torch.randperm(256) % 4)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    assert (folder / "hash_routing.py").is_file()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, folder / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK transformers_modules" in result.stdout


@pytest.mark.parametrize("name", ["routed-shared-mu", "partial-rope-mup"])
def test_remote_code_copy_loads_beside_the_package(tmp_path, name):
    """The folder's model code imported in a process where the package is loaded too (both
    define the RoPE custom op; the copy reuses the package's) computes the same."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model = tiny_model(**VARIANTS[name])
    model.save_pretrained(tmp_path / "checkpoint")
    remote_cls = get_class_from_dynamic_module("modeling_complexity.ComplexityForCausalLM", tmp_path / "checkpoint")
    assert remote_cls is not ComplexityForCausalLM and remote_cls.__module__.startswith("transformers_modules")
    remote = remote_cls.from_pretrained(tmp_path / "checkpoint").eval()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, model.eval()(ids).logits)


def test_token_id_check_can_be_left_to_the_caller():
    """Callers that validate ids upstream (engine, trainer) switch the model's check off."""
    model = tiny_model(**VARIANTS["dense"])
    model.model.validate_token_ids = False
    with pytest.raises(IndexError):  # no check: the embedding itself refuses on CPU
        model(torch.tensor([[5, 256]]))
    model.model.validate_token_ids = True
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, 256]]))
