"""The hash-routed top-k MLP on the GPU: every strategy against the fp32 reference at the issue-22
shapes, no host syncs, CUDA graph capture and replay, fullgraph compilation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from complexity import complexity_kernels as ck

_spec = importlib.util.spec_from_file_location("bench_moe", Path(__file__).parents[2] / "benchmarks" / "bench_moe.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

SHAPES = {s.name: s for s in bench.GPU_SHAPES}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def leaves(inputs):
    return [inputs["x"], inputs["gate_up"], inputs["down"], *(inputs["shared"] or ())]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 32, 2048])
def test_strategies_match_the_fp32_reference(name, tokens):
    errors = bench.check(SHAPES[name], tokens, "cuda", torch.bfloat16)
    # all run on the GPU in bf16; the decode kernels ("rows") up to their row limit
    assert set(errors) == {"dense", "grouped"} | ({"rows"} if tokens <= ck.DECODE_MAX_ROWS else set())
    bench.check(SHAPES[name], tokens, "cuda", torch.float32)  # fp32: dense (and rows), within 1e-5


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("tokens", [8, 4096])
def test_no_host_sync_forward_and_backward(strategy, tokens):
    inputs = bench.make_inputs(SHAPES["H1024-E8-k2-W512-S1024"], tokens, "cuda", torch.bfloat16)
    grad = torch.randn_like(inputs["x"])
    bench.run_moe(inputs, strategy).backward(grad)  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bench.run_moe(inputs, strategy).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("name", ["H896-E4-k2-W64-S3072", "H1024-E8-k4-W512-S1024"])
def test_cuda_graph_replay_equals_eager(strategy, name):
    # The eager reference runs on its own copies of the inputs (same seed, same values): a leaf
    # whose first backward ran on the default stream has its gradient accumulated there, which a
    # captured backward may not touch (cudaErrorStreamCaptureImplicit). The captured leaves see
    # their first backward in the side-stream warm-up, as in PyTorch's whole-network capture.
    reference = bench.make_inputs(SHAPES[name], 1024, "cuda", torch.bfloat16)
    inputs = bench.make_inputs(SHAPES[name], 1024, "cuda", torch.bfloat16)
    grad = torch.randn_like(inputs["x"])
    out = {}

    def step(inputs):
        for t in leaves(inputs):
            t.grad = None
        out["y"] = bench.run_moe(inputs, strategy)
        out["y"].backward(grad)

    step(reference)
    eager = [out["y"].clone()] + [t.grad.clone() for t in leaves(reference)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(inputs)
    with torch.no_grad():
        inputs["x"].mul_(0.5)  # replay must follow new inputs
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        inputs["x"].mul_(2.0)
    graph.replay()
    replayed = [out["y"]] + [t.grad for t in leaves(inputs)]
    errors = [rel(a, b) for a, b in zip(replayed, eager)]
    assert max(errors) < 1e-3, errors  # the same kernels on the same inputs; a stale input would be far off


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
def test_compiled_fullgraph_matches_eager(strategy):
    torch._dynamo.reset()
    inputs = bench.make_inputs(SHAPES["H1024-E4-k2-W512-S1024"], 2048, "cuda", torch.bfloat16)
    grad = torch.randn_like(inputs["x"])
    eager = bench.run_moe(inputs, strategy)
    eager.backward(grad)
    want = [eager.detach()] + [t.grad.clone() for t in leaves(inputs)]
    for t in leaves(inputs):
        t.grad = None
    compiled = torch.compile(bench.run_moe, fullgraph=True, dynamic=False)
    got = compiled(inputs, strategy)
    got.backward(grad)
    errors = [rel(a, b) for a, b in zip([got.detach()] + [t.grad for t in leaves(inputs)], want)]
    assert max(errors) < 1e-2, errors


def test_bench_times_decode_sizes_as_graph_replays(monkeypatch):
    """bench_moe at one token: every strategy (the decode kernels' "rows" included, switched on
    here) timed as a plain call and as a CUDA graph replay, each against the dense reference's
    time of the same kind."""
    monkeypatch.setattr(ck, "DECODE_KERNELS", True)
    row = bench.bench_shape(
        SHAPES["H896-E4-k2-W64-S3072"], 1, "cuda", torch.bfloat16, True, ["fwd_bwd", "fwd"], bench.timer("cuda")
    )
    assert row["auto"] == {"fwd_bwd": "dense", "fwd": "rows"}
    for name in ("dense", "grouped", "rows"):
        assert row["ms"][f"{name}/eager+graph/fwd"] > 0
        assert f"{name}/eager+graph/fwd_bwd" not in row["ms"]
    assert row["ms"]["rows/compiled+graph/fwd"] > 0 and row["ratio_to_dense"]["rows/compiled+graph/fwd"] > 0
