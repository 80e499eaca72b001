"""GPU helpers shared by the benchmark scripts: a call captured as a CUDA graph, and kernel time
by kernel from a torch profiler run."""

from __future__ import annotations

import torch


def cuda_graph(fn, *args) -> torch.cuda.CUDAGraph:
    """fn(*args) warmed up on a side stream (compiled there, where it compiles, as capture
    requires) and captured; -> the graph (replay re-runs it on the same tensors)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph


def kernel_table(prof, calls: int, top: int, name_len: int = 120) -> dict:
    """Per call of the profiled region (`calls` of them): total kernel ms, kernel count, and the
    `top` kernels by time, each {"name", "ms", "calls"}."""
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:name_len], [0.0, 0])
            k[0] += e.device_time
            k[1] += 1
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernel_ms": sum(v[0] for v in kernels.values()) / 1e3 / calls,
        "kernels_per_call": sum(v[1] for v in kernels.values()) / calls,
        "top": [{"name": n, "ms": v[0] / 1e3 / calls, "calls": v[1] / calls} for n, v in ranked],
    }
