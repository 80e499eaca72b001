"""The token-routed MLP's grouped GEMM on CUDA (`grouped_matmul`) against a per-expert loop of
plain matmuls, forward and backward, eager and compiled, in bf16 (the grouped kernel) and fp32
(the static-shape fallback), with empty and uneven groups.

Reference: the per-expert loop in float64. Tolerances: fp32 1e-5 relative to the output's scale
(TF32 off; only the order of the K-sums differs); bf16 2e-2 relative to the scale (inputs rounded
to bf16 once, products accumulated in fp32 by both kernels).
"""

from __future__ import annotations

import pytest
import torch

from complexity.complexity_kernels import grouped_matmul

N, K, M, E = 300, 96, 160, 4
SIZES = (0, 170, 1, 129)  # an empty group, a single row, uneven groups


def _reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(x[start:end].double() @ w[e].double())
        start = end
    return torch.cat(out)


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x scale {scale:.3g}"


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_grouped_matmul_matches_per_expert_loop(dtype, rtol, compiled):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, K, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(E, K, M, device="cuda", generator=g) / K**0.5).to(dtype).requires_grad_()
    offsets = torch.tensor(SIZES, device="cuda").cumsum(0).to(torch.int32)
    assert offsets[-1].item() == N
    fn = torch.compile(grouped_matmul, dynamic=False) if compiled else grouped_matmul
    out = fn(x, w, offsets)
    assert out.dtype == dtype and out.shape == (N, M)
    ref = _reference(x.detach(), w.detach(), offsets)
    _close(out, ref, rtol)
    # Backward: d/dx and d/dw of <out, upstream>, against float64 autograd through the loop.
    upstream = torch.randn(N, M, device="cuda", generator=g).to(dtype)
    out.backward(upstream)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _reference(x64, w64, offsets).backward(upstream.double())
    _close(x.grad, x64.grad, rtol)
    _close(w.grad, w64.grad, rtol)
    assert w.grad[0].abs().max().item() == 0  # the empty group gets no gradient
    torch.compiler.reset()
