"""GPU kernel time by kernel from a torch profiler run, shared by the benchmark scripts."""

from __future__ import annotations

import torch


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
