"""Decode kernels (complexity_triton.py) against float64 references, run on the CPU by triton's
interpreter (TRITON_INTERPRET=1), and the model's decode paths with them against the generic
paths; the decode attention and when the kernels apply. The same kernels compiled for a GPU are
checked in tests/gpu/test_kernels_gpu.py.

Triton's interpreter multiplies bfloat16 tiles wrongly on the CPU (numpy has no bfloat16), so
these tests run float32 and float16, which take the same code paths."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, tiny_model

from complexity import complexity_kernels as ck
from complexity import modeling_complexity as mc

torch.set_num_threads(1)  # tiny matrices: extra threads only contend on shared CPUs

TRITON_FILE = Path(ck.__file__).with_name("complexity_triton.py")
# float32: IEEE products, differences come from summation order only; float16: one rounding of
# each output (and of gate, up, silu) against float64.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3}


@pytest.fixture(scope="module")
def _interpreted_module():
    """complexity_triton loaded afresh with TRITON_INTERPRET=1 (triton reads it when it decorates
    the kernels), so a copy already imported for a GPU in this process is left alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location("complexity_triton_interpreted", TRITON_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # the interpreter resolves the kernels' helpers through it
        spec.loader.exec_module(module)
    return module


@pytest.fixture
def kernels(_interpreted_module, monkeypatch):
    """The interpreted kernels; the interpreter also reads TRITON_INTERPRET when they run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _interpreted_module


def randn(*shape, dtype=torch.float32, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5).to(dtype)


def assert_close(got, want, dtype):
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])


def silu_glu(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
def test_linear_rows_matches_float64(kernels, dtype, rows):
    """Three segments with every combination of a second input and a bias, widths that are not
    multiples of the tile, K past one tile, a broadcast second input (row stride 0) and weights
    that are column slices of a wider one."""
    gen = torch.Generator().manual_seed(rows)
    k_a, k_b = 300, 72
    a = randn(rows, k_a, dtype=dtype, gen=gen)
    b = randn(1, k_b, dtype=dtype, gen=gen).expand(rows, k_b)  # like mu_init broadcast to every token
    wide = randn(40, k_a + 8, dtype=dtype, gen=gen)
    segments = [
        (wide[:, :k_a], randn(40, k_b, dtype=dtype, gen=gen), None),
        (randn(24, k_a, dtype=dtype, gen=gen), None, randn(24, dtype=dtype, gen=gen)),
        (randn(17, k_a, dtype=dtype, gen=gen), randn(17, k_b, dtype=dtype, gen=gen), randn(17, dtype=dtype, gen=gen)),
    ]
    out = kernels.linear_rows(a, b, segments)
    want = []
    for w_a, w_b, bias in segments:
        y = a.double() @ w_a.double().T
        if w_b is not None:
            y = y + b.double() @ w_b.double().T
        if bias is not None:
            y = y + bias.double()
        want.append(y)
    assert out.shape == (rows, 81) and out.dtype == dtype
    assert_close(out, torch.cat(want, dim=-1), dtype)
    # one segment, no second input; and on silu(a) (INL's controller output layer)
    assert_close(kernels.linear_rows(a, None, segments[1:2]), want[1], dtype)
    w, _, bias = segments[1]
    activated = F.silu(a.float()).to(dtype).double()  # F.silu's output in the activations' dtype
    assert_close(
        kernels.linear_rows(a, None, segments[1:2], silu_a=True), activated @ w.double().T + bias.double(), dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("rows", [6, 40])
def test_expert_swiglu_and_down_rows_match_float64(kernels, dtype, shared, rows):
    """Rows through their own experts (one expert chosen twice or more, one never) and the shared
    expert; the gate/up kernel's output is the SwiGLU, the down kernel sums routed and shared; a
    tile of 16 rows and one of 64."""
    gen = torch.Generator().manual_seed(7 + shared)
    hidden, width, shared_width, experts = 96, 40, 24, 4
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    ids = torch.tensor([2, 0, 2, 3, 0, 2] * (rows // 6) + [3] * (rows % 6))  # expert 1 unused
    gate_up = randn(experts, hidden, 2 * width, dtype=dtype, gen=gen)
    down = randn(experts, width, hidden, dtype=dtype, gen=gen)
    sg, su, sd = (
        randn(shared_width, hidden, dtype=dtype, gen=gen),
        randn(shared_width, hidden, dtype=dtype, gen=gen),
        randn(hidden, shared_width, dtype=dtype, gen=gen),
    )
    h = kernels.swiglu_rows(x, ids, gate_up, sg if shared else None, su if shared else None)
    x64 = x.double()
    gate, up = torch.einsum("rk,rkn->rn", x64, gate_up.double()[ids]).chunk(2, dim=-1)
    assert h.shape == (rows, width + (shared_width if shared else 0))
    assert_close(h[:, :width], silu_glu(gate, up), dtype)
    if shared:
        assert_close(h[:, width:], silu_glu(x64 @ sg.double().T, x64 @ su.double().T), dtype)
    y = kernels.down_rows(h, hidden, ids, down, sd if shared else None)
    want = torch.einsum("rk,rkn->rn", h[:, :width].double(), down.double()[ids])
    if shared:
        want = want + h[:, width:].double() @ sd.double().T
    assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("groups,length", [(1, 20), (3, 150), (4, 64)])
def test_attend_one_position_matches_float64(kernels, dtype, mask_kind, groups, length):
    """One query per row against K/V read in place from a wider cache (a slice of its positions,
    as a decode step attends over a context bucket): lengths below, at and past one block of keys,
    1 to 4 query heads per K/V head, no mask, an additive mask (the engine's: finfo.min where
    hidden, a sliding window's start hidden too) or a boolean one (transformers'), a block that
    sees no key at all."""
    gen = torch.Generator().manual_seed(groups * 1000 + length)
    rows, kv_heads, d, capacity = 3, 2, 64, 200
    q = randn(rows, kv_heads, groups, d, dtype=dtype, gen=gen)
    k_cache = randn(rows, kv_heads, capacity, d, dtype=dtype, gen=gen)
    v_cache = randn(rows, kv_heads, capacity, d, dtype=dtype, gen=gen)
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    pos = torch.tensor([length - 1, length // 2, 0])
    j = torch.arange(length)
    visible = (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - 40)  # a window of 40
    if mask_kind == "none":
        mask, visible = None, torch.ones(rows, length, dtype=torch.bool)
    elif mask_kind == "bool":
        mask = visible
    else:
        mask = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)
    scale = d**-0.5
    out = kernels.attend_one_position(q, k, v, mask, scale)
    scores = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    want = torch.einsum("bhgl,bhld->bhgd", scores.softmax(-1), v.double())
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, want, dtype)


def test_past_max_rows_is_refused(kernels):
    x = torch.zeros(kernels.MAX_ROWS + 1, 32)
    with pytest.raises(ValueError, match=f"at most {kernels.MAX_ROWS}"):
        kernels.linear_rows(x, None, [(torch.zeros(16, 32), None, None)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launches_take_their_tiles_from_the_table(kernels, monkeypatch, dtype):
    """Each launch looks its tiles up by its key (kernel and the sizes that decide them), an entry
    of TILES replaces the defaults for that key only, and other tiles (wider column blocks, a
    shorter K tile: another summation order) give the same results within the tolerance."""
    gen = torch.Generator().manual_seed(11)
    rows, hidden, width, shared_width, experts = 3, 96, 40, 24, 4
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    w_q, w_k = randn(48, hidden, dtype=dtype, gen=gen), randn(16, hidden, dtype=dtype, gen=gen)
    ids = torch.tensor([1, 3, 1])
    gate_up = randn(experts, hidden, 2 * width, dtype=dtype, gen=gen)
    down = randn(experts, width, hidden, dtype=dtype, gen=gen)
    sg, su = randn(shared_width, hidden, dtype=dtype, gen=gen), randn(shared_width, hidden, dtype=dtype, gen=gen)
    sd = randn(hidden, shared_width, dtype=dtype, gen=gen)
    other = kernels.Tiles(block_n=32, max_block_k=32, num_warps=2, num_stages=2)
    keys = [
        ("linear", 48, 16, hidden, 0),
        ("swiglu", 1, width, shared_width, hidden),
        ("down", 1, width, shared_width, hidden),
    ]
    seen = []
    lookup = kernels.tiles_for
    monkeypatch.setattr(kernels, "tiles_for", lambda key: seen.append(key) or lookup(key))
    monkeypatch.setattr(kernels, "TILES", {key: other for key in keys})
    assert kernels.tiles_for(("linear", 48, hidden, 0)) is kernels.DEFAULT_TILES  # another key
    seen.clear()
    out = kernels.linear_rows(x, None, [(w_q, None, None), (w_k, None, None)])
    h = kernels.swiglu_rows(x, ids, gate_up, sg, su)
    y = kernels.down_rows(h, hidden, ids, down, sd)
    assert seen == keys
    x64 = x.double()
    assert_close(out, torch.cat([x64 @ w_q.double().T, x64 @ w_k.double().T], dim=-1), dtype)
    gate, up = torch.einsum("rk,rkn->rn", x64, gate_up.double()[ids]).chunk(2, dim=-1)
    assert_close(h[:, :width], silu_glu(gate, up), dtype)
    assert_close(h[:, width:], silu_glu(x64 @ sg.double().T, x64 @ su.double().T), dtype)
    want = torch.einsum("rk,rkn->rn", h[:, :width].double(), down.double()[ids]) + h[:, width:].double() @ sd.double().T
    assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_top_k_expert_kernels_match_float64(kernels, dtype, slots):
    """k routes per row (top-k hash routing): slot j's SwiGLU times its scale in columns j*W, the
    down kernel summing every slot and the shared expert (scaled) in one accumulator; an expert
    chosen in two slots of a row, and one never chosen."""
    gen = torch.Generator().manual_seed(slots)
    rows, hidden, width, shared_width, experts = 5, 80, 24, 40, 6
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    routes = torch.stack([(torch.arange(rows) * (j + 1)) % (experts - 1) for j in range(slots)], dim=1)
    scales = [0.7, 0.3, -1.5, 2.0][:slots]
    gate_up = randn(experts, hidden, 2 * width, dtype=dtype, gen=gen)
    down = randn(experts, width, hidden, dtype=dtype, gen=gen)
    sg, su = randn(shared_width, hidden, dtype=dtype, gen=gen), randn(shared_width, hidden, dtype=dtype, gen=gen)
    sd = randn(hidden, shared_width, dtype=dtype, gen=gen)
    h = kernels.swiglu_rows(x, routes.contiguous(), gate_up, sg, su, scales, 0.25)
    y = kernels.down_rows(h, hidden, routes.contiguous(), down, sd)
    x64 = x.double()
    assert h.shape == (rows, slots * width + shared_width)
    want = torch.zeros(rows, hidden, dtype=torch.float64)
    for j, scale in enumerate(scales):
        gate, up = torch.einsum("rk,rkn->rn", x64, gate_up.double()[routes[:, j]]).chunk(2, dim=-1)
        assert_close(h[:, j * width : (j + 1) * width], scale * silu_glu(gate, up), dtype)
        want += torch.einsum("rk,rkn->rn", h[:, j * width : (j + 1) * width].double(), down.double()[routes[:, j]])
    assert_close(h[:, slots * width :], 0.25 * silu_glu(x64 @ sg.double().T, x64 @ su.double().T), dtype)
    assert_close(y, want + h[:, slots * width :].double() @ sd.double().T, dtype)


def test_expert_kernels_refuse_more_routes_than_they_take(kernels):
    x, bank = torch.zeros(2, 16), torch.zeros(8, 16, 32)
    routes = torch.zeros(2, kernels.MAX_SLOTS + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expert_ids: shape \[2, 5\]; expected contiguous"):
        kernels.swiglu_rows(x, routes, bank, slot_scales=[1.0] * (kernels.MAX_SLOTS + 1))
    with pytest.raises(ValueError, match="slot_scales: 1 values for 2 routes per row"):
        kernels.swiglu_rows(x, routes[:, :2].contiguous(), bank, slot_scales=[1.0])


def test_dense_swiglu_rows_without_experts(kernels):
    """No expert bank: the two kernels are a plain SwiGLU (the dense MLP at decode)."""
    gen = torch.Generator().manual_seed(9)
    x = randn(3, 64, gen=gen)
    sg, su, sd = randn(50, 64, gen=gen), randn(50, 64, gen=gen), randn(64, 50, gen=gen)
    h = kernels.swiglu_rows(x, None, None, sg, su)
    y = kernels.down_rows(h, 64, None, None, sd)
    x64 = x.double()
    want = silu_glu(x64 @ sg.double().T, x64 @ su.double().T) @ sd.double().T
    assert_close(y, want, torch.float32)


@pytest.fixture
def cpu_kernels(kernels, monkeypatch):
    """The model's decode paths on the CPU through the interpreted kernels; counts their launches."""
    calls = {"linear_rows": 0, "swiglu_rows": 0, "down_rows": 0, "attend_one_position": 0}

    def counted(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return getattr(kernels, name)(*args, **kwargs)

        return run

    for name in calls:
        monkeypatch.setattr(ck, name, counted(name), raising=False)
    monkeypatch.setattr(ck, "_DECODE_DEVICES", ("cpu",))
    monkeypatch.setattr(ck, "DECODE_MAX_SLOTS", kernels.MAX_SLOTS)
    monkeypatch.setattr(ck, "DECODE_KERNELS", True)  # whatever COMPLEXITY_DECODE_KERNELS says here
    monkeypatch.setattr(ck, "DECODE_ATTENTION", True)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_decode_with_kernels_equals_the_generic_paths(cpu_kernels, name):
    """Every variant, float32: a prefill and three one-token steps of two sequences through the
    cache (at most 16 rows each: the decode kernels) equal the full forward (18 rows: the generic
    paths), and the kernels did serve the projections, the MLPs and the steps' attention."""
    model = tiny_model(**VARIANTS[name])
    ids = torch.randint(4, 256, (2, 9), generator=torch.Generator().manual_seed(11))
    out = model(ids[:, :6], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(6, 9):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids).logits, atol=1e-5, rtol=0)
    layers = model.config.num_hidden_layers
    assert cpu_kernels["linear_rows"] >= 4 * 2 * layers  # q/k/v and o_proj, prefill and steps
    assert cpu_kernels["swiglu_rows"] == cpu_kernels["down_rows"] >= 4 * layers
    assert cpu_kernels["attend_one_position"] == 3 * layers  # the one-token steps (GQA: 4 heads, 2 K/V)


@pytest.mark.parametrize("mask_rows", [1, 3], ids=["broadcast-mask", "mask-per-row"])
def test_decode_attention_through_the_kernels_equals_sdpa(cpu_kernels, mask_rows):
    """`decode_attention` (the model's attention function at one query) through the kernels gives
    SDPA's output, for a mask per row and for one mask broadcast over the batch."""
    gen = torch.Generator().manual_seed(mask_rows)
    b, heads, kv_heads, d, length = 3, 4, 2, 16, 70
    q = randn(b, heads, 1, d, gen=gen)
    k, v = randn(b, kv_heads, length, d, gen=gen), randn(b, kv_heads, length, d, gen=gen)
    visible = torch.arange(length)[None, :] <= torch.tensor([30, 69, 5])[:mask_rows, None]
    mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    with torch.no_grad():
        out, _ = ck.decode_attention(None, q, k, v, mask, d**-0.5)
    assert cpu_kernels["attend_one_position"] == 1
    grouped = q.reshape(b, kv_heads, heads // kv_heads, d)
    want = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=d**-0.5)
    torch.testing.assert_close(out, want.reshape(b, heads, 1, d).transpose(1, 2), atol=2e-6, rtol=0)


def test_decode_attention_kernels_are_on_by_default():
    """Faster than SDPA on the GPU at every size timed: off only with COMPLEXITY_DECODE_ATTENTION=0."""
    assert ck.DECODE_ATTENTION == (os.environ.get("COMPLEXITY_DECODE_ATTENTION") != "0")


@torch.no_grad()
def test_decode_attention_kernels_off_leave_attention_to_sdpa(cpu_kernels, monkeypatch):
    """With the decode attention kernels off a decode step attends through SDPA, its projections
    still through the decode kernels."""
    monkeypatch.setattr(ck, "DECODE_ATTENTION", False)
    model = tiny_model(**VARIANTS["routed"])
    ids = torch.randint(4, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    out = model(ids[:, :6], use_cache=True)
    model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True)
    assert cpu_kernels["attend_one_position"] == 0 and cpu_kernels["linear_rows"] > 0


@torch.no_grad()
@pytest.mark.parametrize("shared", [False, True])
def test_hash_routed_rows_strategy_equals_dense_and_is_auto_at_decode(cpu_kernels, shared):
    """The hash-routed MLP's "rows" strategy (the decode kernels, k = 3 routes per row, slot
    weights and both branch scales) equals its "dense" strategy in float32, and "auto" takes it
    for a few rows without autograd; asked for where the kernels cannot serve, it is refused."""
    from complexity.hash_routing import hash_routed_mlp

    gen = torch.Generator().manual_seed(3 + shared)
    x = randn(7, 48, gen=gen)
    routes = torch.stack([torch.arange(7) % 5, (torch.arange(7) + 1) % 5, (torch.arange(7) * 2) % 5], dim=1)
    gate_up, down = randn(5, 48, 32, gen=gen), randn(5, 16, 48, gen=gen)
    weights = [0.5, 0.3, 0.2]
    args = (
        x,
        routes,
        weights,
        gate_up,
        down,
        (randn(24, 48, gen=gen), randn(24, 48, gen=gen), randn(48, 24, gen=gen)) if shared else None,
        0.5,
        1.7,
    )
    dense = hash_routed_mlp(*args, strategy="dense")
    torch.testing.assert_close(hash_routed_mlp(*args, strategy="rows"), dense, atol=1e-5, rtol=1e-5)
    assert cpu_kernels["swiglu_rows"] == cpu_kernels["down_rows"] == 1
    torch.testing.assert_close(hash_routed_mlp(*args), dense, atol=1e-5, rtol=1e-5)
    assert cpu_kernels["swiglu_rows"] == 2
    with torch.enable_grad(), pytest.raises(ValueError, match="strategy: 'rows' needs the decode kernels"):
        hash_routed_mlp(*args, strategy="rows")
    five = torch.cat([routes, routes[:, :2]], dim=1)  # past the kernels' 4 routes per row
    with pytest.raises(ValueError, match="with 5 routes; use 'auto'"):
        hash_routed_mlp(x, five, weights + [0.0, 0.0], gate_up, down, strategy="rows")
    hash_routed_mlp(x, five, weights + [0.0, 0.0], gate_up, down)  # auto: the generic paths
    assert cpu_kernels["swiglu_rows"] == 2


def test_bench_moe_checks_and_times_the_decode_kernels(cpu_kernels):
    """benchmarks/bench_moe.py takes "rows" where the kernels serve: checked against its fp32
    reference, timed forward only, and reported as auto's inference pick when they are on."""
    spec = importlib.util.spec_from_file_location("bench_moe", Path(__file__).parents[1] / "benchmarks/bench_moe.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    shape = bench.CPU_SHAPES[0]
    assert set(bench.check(shape, 3, "cpu", torch.float32)) == {"dense", "grouped", "rows"}
    row = bench.bench_shape(shape, 3, "cpu", torch.float32, False, ["fwd_bwd", "fwd"], lambda fn: fn() or 1.0)
    assert row["auto"] == {"fwd_bwd": "grouped", "fwd": "rows"}
    assert "rows/eager/fwd" in row["ms"] and "rows/eager/fwd_bwd" not in row["ms"]
    assert cpu_kernels["swiglu_rows"] == cpu_kernels["down_rows"] == 2  # the check and the timing


def test_bench_moe_times_the_decode_kernels_past_16_rows(cpu_kernels, kernels, monkeypatch, tmp_path):
    """--decode-max-rows raises the kernels' row limit for the run: "rows" checked and timed at 20
    tokens (the model sends them 16 at most); past what the kernels take it is refused. (float32
    only: the interpreter's bfloat16 products are wrong, see the top of this file.)"""
    monkeypatch.setattr(ck, "DECODE_MAX_ROWS", ck.DECODE_MAX_ROWS)  # restored after main() sets it
    spec = importlib.util.spec_from_file_location("bench_moe", Path(__file__).parents[1] / "benchmarks/bench_moe.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--tokens", "20", "--check-only", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.main([*argv, "--decode-max-rows", str(kernels.MAX_ROWS + 1)])
    checked, check = [], bench.check

    def float32_check(shape, tokens, device, dtype):
        if dtype != torch.float32:
            return {}
        checked.append(check(shape, tokens, device, dtype))
        return checked[-1]

    monkeypatch.setattr(bench, "check", float32_check)
    assert bench.main([*argv, "--decode-max-rows", "32"])["decode_max_rows"] == ck.DECODE_MAX_ROWS == 32
    assert len(checked) == len(bench.CPU_SHAPES) and all("rows" in errs for errs in checked), checked
    row = bench.bench_shape(bench.CPU_SHAPES[0], 20, "cpu", torch.float32, False, ["fwd"], lambda fn: fn() or 1.0)
    assert row["auto"] == {"fwd": "rows"} and "rows/eager/fwd" in row["ms"]


@torch.no_grad()
def test_decode_attention_takes_the_configs_softmax_scale(cpu_kernels, monkeypatch):
    """A one-token step's attention (`decode_attention`, kernels on or off) scores with
    the config's attention_multiplier, never a recomputed 1/sqrt(head_dim), and its partial RoPE
    steps equal the full forward."""
    scales = []

    def recording(module, *args, scaling, **kwargs):
        scales.append(scaling)
        return ck.decode_attention(module, *args, scaling=scaling, **kwargs)

    monkeypatch.setattr(mc, "decode_attention", recording)
    model = tiny_model(**VARIANTS["partial-rope-mup"], attn_implementation="sdpa")
    ids = torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(12))
    out = model(ids[:, :6], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(6, 8):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), model(ids).logits, atol=1e-5, rtol=0)
    assert len(scales) == 2 * model.config.num_hidden_layers and set(scales) == {1 / 16}


def test_decode_kernels_are_for_inference_on_few_rows(cpu_kernels):
    x = torch.zeros(2, 8, 64)
    with torch.no_grad():
        assert ck.decode_rows(x)
        assert not ck.decode_rows(torch.zeros(17, 64))  # past DECODE_MAX_ROWS
        assert not ck.decode_rows(torch.zeros(0, 64))
        assert not ck.decode_rows(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ck.decode_rows(x)
    assert not ck.decode_rows(x)  # autograd on: the generic paths, which have gradients


@pytest.mark.parametrize("scale", ["default", "mup"])
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_decode_attention_equals_repeated_kv_in_float64(mask_kind, scale):
    """One query per sequence, GQA groups attending to their K/V head in place, against
    attention with K/V repeated to every head, in float64; with the default softmax scale
    1/sqrt(d) and with a config's attention_multiplier (here muP's 1/d)."""
    gen = torch.Generator().manual_seed(5)
    b, heads, kv_heads, length, d = 3, 6, 2, 11, 8
    q = torch.randn(b, heads, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv_heads, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, kv_heads, length, d, generator=gen, dtype=torch.float64)
    visible = (torch.arange(length)[None, :] <= torch.tensor([4, 10, 0])[:, None])[:, None, None, :]
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    mask = {"none": None, "bool": visible, "float": additive}[mask_kind]
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    scaling = {"default": d**-0.5, "mup": 1 / d}[scale]
    got, _ = ck.decode_attention(module, q, k, v, mask, scaling=scaling)
    k_all, v_all = mc.repeat_kv(k, heads // kv_heads), mc.repeat_kv(v, heads // kv_heads)
    scores = q @ k_all.transpose(2, 3) * scaling + (0.0 if mask is None else additive)
    want = (scores.softmax(-1) @ v_all).transpose(1, 2)
    assert got.shape == (b, 1, heads, d)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_saved_checkpoints_carry_the_kernel_file(tmp_path):
    """trust_remote_code folders carry complexity_triton.py (imported relatively by
    complexity_kernels.py) and load where triton is not importable: its import sits in a `try`."""
    model = tiny_model(**VARIANTS["routed"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "complexity_triton.py").is_file()
    from transformers.dynamic_module_utils import get_imports

    assert "triton" not in get_imports(tmp_path / "complexity_triton.py")
    assert "triton" not in get_imports(tmp_path / "complexity_kernels.py")


# ----------------------------------------------------------------------------- for the GPU, without one


def _compile_for(kernel, target, types: dict, constants: dict, aligned: list[str], num_stages: int):
    """triton.compile for a GPU target on this CPU machine (ptxas ships with triton), with the
    16-byte alignment the launches specialise on (weights and activations are aligned, widths
    multiples of 16). -> (shared memory bytes, async global-to-shared copies in the kernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = compile(source, target=GPUTarget("cuda", *target), options={"num_warps": 4, "num_stages": num_stages})
    return compiled.metadata.shared, len(re.findall("async_copy_global_to_local", compiled.asm["ttgir"]))


@pytest.fixture(scope="module")
def compiled_kernels():
    """complexity_triton loaded for compiling (not interpreting)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        spec = importlib.util.spec_from_file_location("complexity_triton_compiled", TRITON_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", [(90, 32), (80, 32)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_kernels_compile_for_gpus_with_pipelined_weight_loads(compiled_kernels, target, block_m):
    """Every kernel configuration the model launches compiles for Hopper and Ampere in bf16, the
    weight loads of its K loops software-pipelined (asynchronous copies several stages deep: a
    decode kernel is only as fast as the bytes it keeps in flight) within the SM's shared memory,
    for a tile of 16 rows and one of 64 (with the stages the launches take for it)."""
    k, bf16 = compiled_kernels, "*bf16"
    smem_limit = {90: 227 * 1024, 80: 163 * 1024}[target[0]]
    common = dict(BLOCK_M=block_m, BLOCK_N=16, PRECISION="ieee")
    stages = k._launch_options(torch.bfloat16, k.DEFAULT_TILES, block_m)["num_stages"]
    assert stages == (4 if block_m == 16 else 2)
    linear_ptrs = ["out_ptr", "a_ptr", "b_ptr"] + [f"{w}{i}" for i in range(3) for w in ("wa", "wb", "bias")]
    linear_aligned = (
        linear_ptrs
        + ["out_stride", "a_stride", "K_A", "b_stride", "K_B"]
        + [f"s{w}{i}" for i in range(3) for w in ("wa", "wb")]
    )
    linear_cases = [  # q/k/v + mu's (three segments, two inputs); one projection; INL (mu_proj | controller)
        dict(NUM_SEGMENTS=3, SILU_A=False, B0=True, BIAS0=False, B1=True, BIAS1=False, B2=True, BIAS2=False),
        dict(NUM_SEGMENTS=1, SILU_A=True, B0=False, BIAS0=True, B1=False, BIAS1=False, B2=False, BIAS2=False),
        dict(NUM_SEGMENTS=2, SILU_A=False, B0=False, BIAS0=False, B1=True, BIAS1=True, B2=False, BIAS2=False),
    ]
    for case in linear_cases:
        smem, copies = _compile_for(
            k._linear_rows_kernel,
            target,
            dict.fromkeys(linear_ptrs, bf16),
            {**case, **common, "BLOCK_KA": 256, "BLOCK_KB": 256},
            linear_aligned,
            stages,
        )
        assert copies >= 2 and smem <= smem_limit, (case, copies, smem)
    up_ptrs = {"h_ptr": bf16, "x_ptr": bf16, "ids_ptr": "*i64", "w_ptr": bf16, "sg_ptr": bf16, "su_ptr": bf16}
    up_aligned = list(up_ptrs) + ["h_stride", "x_stride", "K", "w_expert_stride", "w_stride", "I_E", "s_stride", "I_S"]
    scales = dict.fromkeys(["scale0", "scale1", "scale2", "scale3", "shared_scale"], "fp32")
    for experts, shared in ((True, False), (True, True), (False, True)):
        smem, copies = _compile_for(
            k._swiglu_rows_kernel,
            target,
            {**up_ptrs, **scales},
            dict(HAS_EXPERTS=experts, HAS_SHARED=shared, BLOCK_K=256, **common),
            up_aligned,
            stages,
        )
        assert copies >= 2 and smem <= smem_limit, (experts, shared, copies, smem)
    down_ptrs = {"y_ptr": bf16, "h_ptr": bf16, "ids_ptr": "*i64", "w_ptr": bf16, "sd_ptr": bf16}
    down_aligned = list(down_ptrs) + [
        "y_stride",
        "h_stride",
        "I_E",
        "N",
        "w_expert_stride",
        "w_stride",
        "sd_stride",
        "I_S",
    ]
    smem, copies = _compile_for(
        k._down_rows_kernel,
        target,
        down_ptrs,
        dict(HAS_EXPERTS=True, HAS_SHARED=True, BLOCK_K=256, BLOCK_KS=256, **common),
        down_aligned,
        stages,
    )
    assert copies >= 2 and smem <= smem_limit, (copies, smem)


@pytest.mark.parametrize("target", [(90, 32), (80, 32)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_kernels_compile_for_gpus(compiled_kernels, target, head_dim):
    """The decode attention's two kernels compile for Hopper and Ampere in bf16 with every mask
    kind, within the SM's shared memory."""
    k = compiled_kernels
    smem_limit = {90: 227 * 1024, 80: 163 * 1024}[target[0]]
    aligned = ["q_ptr", "k_ptr", "v_ptr", "acc_ptr", "ml_ptr", "q_sb", "q_sh", "k_sb", "k_sh", "k_sl", "v_sb"]
    for kind, mask_type in ((0, "*bf16"), (1, "*bf16"), (2, "*i1")):
        types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": mask_type}
        types.update({"acc_ptr": "*fp32", "ml_ptr": "*fp32", "scale": "fp32"})
        constants = dict(MASK=kind, BLOCK_G=16, BLOCK_L=k.ATTEND_BLOCK, D=head_dim, PRECISION="ieee")
        smem, _ = _compile_for(k._attend_block_kernel, target, types, constants, aligned, 1)
        assert smem <= smem_limit, (kind, smem)
    types = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": "*bf16"}
    smem, _ = _compile_for(k._attend_combine_kernel, target, types, dict(BLOCK_G=16, D=head_dim), list(types), 1)
    assert smem <= smem_limit, smem


class _TargetOnlyDriver:
    """Stands in for triton's CUDA driver where torch.compile asks it only which GPU to compile
    for (its analysis of which tensors a kernel writes), on a machine without one."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.fixture
def traceable_kernels(compiled_kernels, monkeypatch):
    """The compiled (not interpreted) kernels in the model's decode paths, for dynamo to trace with
    fake tensors on this CPU machine: dynamo is told triton has a device and triton's driver is a
    stand-in; nothing runs."""
    import torch.utils._triton
    import triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda *args, **kwargs: True)
    drivers = triton.runtime.driver  # the active driver is `_active` (triton >= 3.7) or `active`
    monkeypatch.setattr(drivers, "_active" if "_active" in vars(drivers) else "active", _TargetOnlyDriver())
    monkeypatch.setattr(ck, "DECODE_KERNELS", True)
    monkeypatch.setattr(ck, "DECODE_ATTENTION", True)
    for fn in ("linear_rows", "swiglu_rows", "down_rows", "attend_one_position"):
        monkeypatch.setattr(ck, fn, getattr(compiled_kernels, fn), raising=False)
    monkeypatch.setattr(ck, "_DECODE_DEVICES", ("cpu",))
    monkeypatch.setattr(ck, "DECODE_MAX_SLOTS", compiled_kernels.MAX_SLOTS)


def _launches(graph_module) -> int:
    return len(re.findall(r"triton_kernel_wrapper_mutation\(", graph_module.code))


@torch.no_grad()
@pytest.mark.parametrize(
    "name, per_layer",
    [
        ("routed", 6),
        ("inl", 9),
        ("hash-top2-shared", 6),
        ("routed-shared-mu", None),
        ("dense", 6),
        ("learned-top2-shared-mu", None),
        ("sliding", None),
    ],
)
def test_decode_step_traces_to_one_graph_with_its_kernels(traceable_kernels, name, per_layer):
    """torch.compile's front end (dynamo, fullgraph) takes a decode step of every kind of layer as
    ONE graph with the Triton launches in it: no graph break for the engine's CUDA graphs. Traced
    with fake tensors (torch._dynamo.export), so no GPU runs. Kernels per layer: token-routed and
    hash-routed 6 (q/k/v, attention's two, o_proj, gate/up, down), INL 9 (+ its two controller
    kernels and the mu router)."""
    model = tiny_model(**VARIANTS[name])

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, pos):
            return self.model(ids, position_ids=pos, use_cache=False).logits

    def launches(**dynamic) -> int:
        ids, pos = torch.randint(4, 256, (2, 1)), torch.zeros(2, 1, dtype=torch.long)
        return _launches(torch._dynamo.export(Step(), **dynamic)(ids, pos).graph_module)  # raises on a graph break

    layers = model.config.num_hidden_layers
    static = launches(assume_static_by_default=True)
    assert static == per_layer * layers if per_layer else static >= 6 * layers
    if per_layer:  # (top-2 routing sends 2 rows per token to the experts: its range differs)
        # A dynamic batch declared within the kernels' rows takes them too; one reaching past
        # them the generic paths, without a guard on the batch (no recompile, no violated
        # mark_dynamic).
        batch = torch.export.Dim("batch", min=2, max=ck.DECODE_MAX_ROWS)
        assert launches(dynamic_shapes={"ids": {0: batch}, "pos": {0: batch}}) == static
        wide = torch.export.Dim("batch", min=2, max=64)
        assert launches(dynamic_shapes={"ids": {0: wide}, "pos": {0: wide}}) == 0


@torch.no_grad()
@pytest.mark.parametrize("name, per_layer", [("routed", 6), ("inl", 9), ("hash-top2-shared", 6), ("sliding", None)])
def test_the_engines_decode_step_traces_with_a_dynamic_context(traceable_kernels, name, per_layer):
    """The engine's decode step as it compiles it: the slot cache's rows, the decode mask over
    arange(kv_len), the batch AND the attended length dynamic (one graph for every context
    bucket). It traces as one graph with every kernel, the attention kernels included, and no
    check of theirs specializes either dimension (export raises on a violated range)."""
    from complexity.inference.cache import SlotKVCache, attention_mask_decode

    model = tiny_model(**VARIANTS[name])
    c = model.config
    cache = SlotKVCache(c.num_hidden_layers, 16, c.num_key_value_heads, 64, c.head_dim, torch.float32, "cpu")

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, pos, kv_range):
            cache.set_decode(pos, kv_range.shape[0])
            mask = attention_mask_decode(pos, kv_range, c.sliding_window, torch.float32)
            out = self.model.model(
                input_ids=tokens, attention_mask=mask, position_ids=pos[:, None], past_key_values=cache, use_cache=True
            )
            return out.last_hidden_state

    batch, kv = torch.export.Dim("batch", min=2, max=16), torch.export.Dim("kv", min=2, max=64)
    dynamic = {"tokens": {0: batch}, "pos": {0: batch}, "kv_range": {0: kv}}
    args = (torch.randint(4, 256, (2, 1)), torch.tensor([3, 5]), torch.arange(32))
    launches = _launches(torch._dynamo.export(Step(), dynamic_shapes=dynamic)(*args).graph_module)
    layers = c.num_hidden_layers
    assert launches == per_layer * layers if per_layer else launches >= 6 * layers


def test_a_bad_decode_attention_switch_is_refused():
    """COMPLEXITY_DECODE_ATTENTION takes 0 or 1; anything else fails the import with its name."""
    env = {**os.environ, "COMPLEXITY_DECODE_ATTENTION": "yes"}
    proc = subprocess.run(
        [sys.executable, "-c", "import complexity.complexity_kernels"], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "COMPLEXITY_DECODE_ATTENTION='yes': expected 0 (off) or 1 (on)" in proc.stderr


@pytest.mark.parametrize(
    "bad", [dict(block_n=24), dict(max_block_k=8), dict(num_warps=3), dict(num_stages=0), dict(block_n="16")]
)
def test_bad_tiles_are_refused(kernels, bad):
    with pytest.raises(ValueError, match=f"Tiles.{next(iter(bad))}"):
        kernels.Tiles(**bad)
