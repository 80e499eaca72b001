"""Decode kernels (complexity_triton.py) against float64 references, run on the CPU by triton's
interpreter (TRITON_INTERPRET=1), and the model's decode paths with them against the generic
paths; the decode attention and when the kernels apply. The same kernels compiled for a GPU are
checked in tests/gpu/test_kernels_gpu.py.

Triton's interpreter multiplies bfloat16 tiles wrongly on the CPU (numpy has no bfloat16), so
these tests run float32 and float16, which take the same code paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from complexity import complexity_kernels as ck
from complexity import modeling_complexity as mc

from conftest import VARIANTS, tiny_model

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
@pytest.mark.parametrize("rows", [1, 5, 16])
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
    # one segment, no second input
    single = kernels.linear_rows(a, None, segments[1:2])
    assert_close(single, want[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
def test_expert_swiglu_and_down_rows_match_float64(kernels, dtype, shared):
    """Rows through their own experts (one expert chosen twice, one never) and the shared expert;
    the gate/up kernel's output is the SwiGLU, the down kernel sums routed and shared."""
    gen = torch.Generator().manual_seed(7 + shared)
    rows, hidden, width, shared_width, experts = 6, 96, 40, 24, 4
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    ids = torch.tensor([2, 0, 2, 3, 0, 2])  # expert 1 unused
    gate_up = randn(experts, hidden, 2 * width, dtype=dtype, gen=gen)
    down = randn(experts, width, hidden, dtype=dtype, gen=gen)
    sg, su, sd = (randn(shared_width, hidden, dtype=dtype, gen=gen), randn(shared_width, hidden, dtype=dtype, gen=gen),
                  randn(hidden, shared_width, dtype=dtype, gen=gen))
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
    calls = {"linear_rows": 0, "swiglu_rows": 0, "down_rows": 0}

    def counted(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return getattr(kernels, name)(*args, **kwargs)

        return run

    for name in calls:
        monkeypatch.setattr(ck, name, counted(name), raising=False)
    monkeypatch.setattr(ck, "_DECODE_DEVICES", ("cpu",))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_decode_with_kernels_equals_the_generic_paths(cpu_kernels, name):
    """Every variant, float32: a prefill and three one-token steps of two sequences through the
    cache (at most 16 rows each: the decode kernels) equal the full forward (18 rows: the generic
    paths), and the kernels did serve the projections and the MLPs."""
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


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_decode_attention_equals_repeated_kv_in_float64(mask_kind):
    """One query per sequence, GQA groups attending to their K/V head in place, against
    attention with K/V repeated to every head, in float64."""
    gen = torch.Generator().manual_seed(5)
    b, heads, kv_heads, length, d = 3, 6, 2, 11, 8
    q = torch.randn(b, heads, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv_heads, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, kv_heads, length, d, generator=gen, dtype=torch.float64)
    visible = (torch.arange(length)[None, :] <= torch.tensor([4, 10, 0])[:, None])[:, None, None, :]
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    mask = {"none": None, "bool": visible, "float": additive}[mask_kind]
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    got, _ = ck.decode_attention(module, q, k, v, mask, scaling=d**-0.5)
    k_all, v_all = mc.repeat_kv(k, heads // kv_heads), mc.repeat_kv(v, heads // kv_heads)
    scores = q @ k_all.transpose(2, 3) * d**-0.5 + (0.0 if mask is None else additive)
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
