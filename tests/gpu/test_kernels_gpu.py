"""The decode kernels compiled for the GPU: against float64 references at the presets' shapes,
inside torch.compile (fullgraph) and CUDA graphs, and the engine with graphs + compile equal to
the eager engine and to `generate()`, token for token in float32, for every variant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache

from complexity import complexity_kernels as ck
from complexity.inference import Engine, SamplingParams
from complexity.modeling_complexity import ComplexityMLP

# The suite's variants and tiny models (tests/conftest.py; `conftest` here is tests/gpu's own).
_spec = importlib.util.spec_from_file_location("suite_conftest", Path(__file__).parents[1] / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
VARIANTS, tiny_model = _suite.VARIANTS, _suite.tiny_model

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _decode_kernels_on(monkeypatch):
    """On, whatever COMPLEXITY_DECODE_KERNELS says in this environment: this suite checks them."""
    monkeypatch.setattr(ck, "DECODE_KERNELS", True)


def randn(*shape, dtype, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.05).to("cuda", dtype)


def assert_close(got, want, dtype):
    scale = want.abs().max().clamp(min=1e-3)
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])


def test_the_decode_kernels_serve_cuda():
    assert "cuda" in ck._DECODE_DEVICES, "triton is not importable: the decode kernels are off on this GPU"
    with torch.no_grad():
        assert ck.decode_rows(torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_linear_rows_at_preset_shapes(dtype, rows):
    """pacific-prime's q/k/v + mu's q/k/v (H 2048, 2048 + 1024 + 1024 outputs, one launch)."""
    gen = torch.Generator().manual_seed(rows)
    h = 2048
    x, mu = randn(rows, h, dtype=dtype, gen=gen), randn(rows, h, dtype=dtype, gen=gen)
    segments = [
        (randn(n, h, dtype=dtype, gen=gen), randn(n, h, dtype=dtype, gen=gen), None) for n in (2048, 1024, 1024)
    ]
    q, k, v = ck.rows_projections(x, mu, segments)
    for got, (w, w_mu, _) in zip((q, k, v), segments):
        assert_close(got, x.double() @ w.double().T + mu.double() @ w_mu.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("shared", [False, True])
def test_expert_kernels_at_preset_shapes(dtype, rows, shared):
    """pacific-prime's experts (H 2048, 4 experts of 1408) and tmlr-187m's shared expert shape."""
    gen = torch.Generator().manual_seed(rows + 10 * shared)
    h, width, experts = 2048, 1408, 4
    x = randn(rows, h, dtype=dtype, gen=gen)
    ids = torch.arange(rows, device="cuda") % 3  # expert 3 unused
    gate_up, down = randn(experts, h, 2 * width, dtype=dtype, gen=gen), randn(experts, width, h, dtype=dtype, gen=gen)
    mlp = None
    if shared:
        mlp = ComplexityMLP(h, 512).to("cuda", dtype)
        for p in mlp.parameters():
            p.data.copy_(randn(*p.shape, dtype=dtype, gen=gen))
    out = ck.rows_swiglu(x, ids, gate_up, down, ck.swiglu_weights(mlp))
    x64 = x.double()
    gate, up = torch.einsum("rk,rkn->rn", x64, gate_up.double()[ids]).chunk(2, dim=-1)
    want = torch.einsum("rk,rkn->rn", F.silu(gate) * up, down.double()[ids])
    if shared:
        m64 = {n: p.detach().double() for n, p in mlp.named_parameters()}
        s = F.silu(x64 @ m64["gate_proj.weight"].T) * (x64 @ m64["up_proj.weight"].T)
        want = want + s @ m64["down_proj.weight"].T
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape", [(896, 4, 2, 64, 3072), (1024, 8, 4, 512, 1024)], ids=["trhash-200m", "E8-k4"])
def test_top_k_expert_kernels_at_hash_routing_shapes(dtype, rows, shape):
    """The hash-routed MLP's decode path ("rows": k routes per row, slot weights, branch scales)
    against float64, at the TR-Hash 200M shape and a top-4 one."""
    from complexity.hash_routing import hash_routed_mlp

    gen = torch.Generator().manual_seed(rows)
    h, experts, k, width, shared_width = shape
    x = randn(rows, h, dtype=dtype, gen=gen)
    routes = torch.stack([(torch.arange(rows) + j) % experts for j in range(k)], dim=1).cuda()
    gate_up, down = randn(experts, h, 2 * width, dtype=dtype, gen=gen), randn(experts, width, h, dtype=dtype, gen=gen)
    shared = tuple(
        randn(*size, dtype=dtype, gen=gen) for size in ((shared_width, h), (shared_width, h), (h, shared_width))
    )
    weights = [0.6] + [0.4 / (k - 1)] * (k - 1)
    with torch.no_grad():
        out = hash_routed_mlp(x, routes, weights, gate_up, down, shared, 0.5, 2.0, strategy="rows")
    x64, bank_up, bank_down = x.double(), gate_up.double(), down.double()
    want = torch.zeros_like(x64)
    for j, w in enumerate(weights):
        gate, up = torch.einsum("rk,rkn->rn", x64, bank_up[routes[:, j]]).chunk(2, dim=-1)
        want += 2.0 * w * torch.einsum("rk,rkn->rn", F.silu(gate) * up, bank_down[routes[:, j]])
    g, u, d = (t.double() for t in shared)
    want += 0.5 * (F.silu(x64 @ g.T) * (x64 @ u.T)) @ d.T
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (12, 4, 64)], ids=["pacific-prime", "base"])
@pytest.mark.parametrize("length", [300, 2048])
def test_attend_one_position_at_preset_shapes(dtype, rows, heads, kv_heads, head_dim, length):
    """The decode attention kernels against float64: pacific-prime's and base's heads, a context
    bucket's view of a wider cache, the engine's additive mask with rows at different positions."""
    gen = torch.Generator().manual_seed(rows + length)
    groups = heads // kv_heads
    q = randn(rows, kv_heads, groups, head_dim, dtype=dtype, gen=gen) * 20
    k_cache, v_cache = (randn(rows, kv_heads, 4097, head_dim, dtype=dtype, gen=gen) * 20 for _ in range(2))
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    pos = torch.randint(0, length, (rows,), generator=gen).cuda()
    visible = torch.arange(length, device="cuda")[None, :] <= pos[:, None]
    mask = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)
    out = ck.attend_one_position(q, k, v, mask, head_dim**-0.5)
    scores = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * head_dim**-0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    assert_close(out, torch.einsum("bhgl,bhld->bhgd", scores.softmax(-1), v.double()), dtype)


@torch.no_grad()
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_decode_step_with_kernels_equals_eager(name):
    """fullgraph compile (no graph break) of a decode step that takes the kernels, float32."""
    model = tiny_model(**VARIANTS[name]).cuda()
    ids = torch.randint(4, 256, (2, 9), generator=torch.Generator().manual_seed(3)).cuda()

    def prefilled():
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids[:, :8], past_key_values=cache, use_cache=True)
        return cache

    def step(tokens, cache):
        return model(tokens, past_key_values=cache, use_cache=True).logits

    eager = step(ids[:, 8:], prefilled())
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(ids[:, 8:], prefilled())
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def _greedy(engine, prompts, n):
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


def _generated(model, prompts, n):
    """model.generate()'s n greedy tokens for each prompt alone."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        gen_ids = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out.append(gen_ids[0, len(p) :].tolist())
    return out


@torch.no_grad()
@pytest.mark.parametrize("name", list(VARIANTS))
def test_engine_with_graphs_equals_eager_and_generate_in_float32(name):
    """Token for token: the engine with CUDA graphs + compile (its batch buckets 1 and 2 take the
    decode kernels; three prompts in two slots: continuous batching) == the eager engine ==
    model.generate() == the eager engine with the kernels off."""
    model = tiny_model(**VARIANTS[name]).cuda()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 256, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    n = 24
    graphs = _greedy(Engine(model, None, max_batch=2, max_seq_len=64, cuda_graphs=True, compile=True), prompts, n)
    eager = _greedy(Engine(model, None, max_batch=2, max_seq_len=64), prompts, n)
    reference = _generated(model, prompts, n)
    assert graphs == eager == reference
    ck.DECODE_KERNELS = False
    try:
        assert _greedy(Engine(model, None, max_batch=2, max_seq_len=64), prompts, n) == reference
    finally:
        ck.DECODE_KERNELS = True


@torch.no_grad()
@pytest.mark.parametrize("name", ["routed", "inl", "sliding", "dense"])
def test_engine_with_the_attention_kernels_equals_generate_in_float32(name, monkeypatch):
    """With the decode attention kernels on (COMPLEXITY_DECODE_ATTENTION=1): the engine with CUDA
    graphs + compile == the eager engine == model.generate() with them == with SDPA, token for
    token in float32."""
    model = tiny_model(**VARIANTS[name]).cuda()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 256, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    n = 24
    sdpa = _generated(model, prompts, n)
    monkeypatch.setattr(ck, "DECODE_ATTENTION", True)
    graphs = _greedy(Engine(model, None, max_batch=2, max_seq_len=64, cuda_graphs=True, compile=True), prompts, n)
    eager = _greedy(Engine(model, None, max_batch=2, max_seq_len=64, cuda_graphs=False), prompts, n)
    assert graphs == eager == _generated(model, prompts, n) == sdpa
