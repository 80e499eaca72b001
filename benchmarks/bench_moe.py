"""The hash-routed top-k MLP (`complexity.hash_routing.hash_routed_mlp`) against a dense SwiGLU of
equal active FLOPs (width S + k*W), side by side in one process.

    python benchmarks/bench_moe.py --out results/                 # GPU, the issue-22 shapes, ~3 min on an H200
    python benchmarks/bench_moe.py --device cpu --out /tmp/moe    # CPU smoke test: tiny shapes, eager

Shapes are (H, E, k, W, S): hidden, experts, routes per token, expert width, shared width. For
each shape, at the training size (16,384 tokens) and decode sizes (1 and 32 tokens), every
strategy is first checked against an fp32 per-expert reference, then timed forward + backward and
forward only, eager and compiled (fullgraph), with `triton.testing.do_bench` medians (CUDA-event
medians without triton; wall-clock medians on the CPU). "rows" (the decode kernels) is timed
forward only, at the sizes they take (at most `DECODE_MAX_ROWS` tokens, 16; `--decode-max-rows`
raises it up to the kernels' 64 to time them at 32 tokens), whether or not they are switched on
(COMPLEXITY_DECODE_KERNELS, on by default); "auto" says what the model picks for each pass as configured. On
the GPU the decode sizes' forward is also timed captured in a CUDA graph and replayed, as the
engine runs a decode step: a plain call at these sizes mostly times the host's launches. Routes
come from a real balanced-hash table over a 32,000-token vocabulary. Prints the tables and writes
`bench_moe.json` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import cuda_graph  # noqa: E402

from complexity import complexity_kernels  # noqa: E402
from complexity.complexity_kernels import decode_kernels_serve, decode_rows, grouped_mm_supported  # noqa: E402
from complexity.hash_routing import (  # noqa: E402
    build_route_table,
    hash_routed_mlp,
    pick_strategy,
    slot_weights,
    token_routes,
)

VOCAB = 32000
GRAPH_MAX_TOKENS = 32  # decode sizes: their forward is also timed as a CUDA graph replay


@dataclass(frozen=True)
class Shape:
    hidden: int
    experts: int
    top_k: int
    width: int
    shared: int  # 0: no shared expert

    @property
    def name(self) -> str:
        return f"H{self.hidden}-E{self.experts}-k{self.top_k}-W{self.width}-S{self.shared}"

    @property
    def active_width(self) -> int:
        return self.shared + self.top_k * self.width


GPU_SHAPES = (
    Shape(896, 4, 2, 64, 3072),
    Shape(1024, 4, 2, 512, 1024),
    Shape(1024, 8, 2, 512, 1024),
    Shape(1024, 8, 4, 512, 1024),
)
CPU_SHAPES = (Shape(64, 4, 2, 16, 64), Shape(64, 8, 4, 16, 0), Shape(64, 8, 2, 8, 32))
try:  # the most rows the decode kernels take (`--decode-max-rows` may go up to it)
    from complexity.complexity_triton import MAX_ROWS as KERNEL_MAX_ROWS
except ImportError:  # no triton: "rows" never runs
    KERNEL_MAX_ROWS = complexity_kernels.DECODE_MAX_ROWS


def make_inputs(shape: Shape, tokens: int, device, dtype, seed: int = 0) -> dict:
    """x, routes from a balanced-hash table, slot weights, expert and shared weights (1/sqrt(fan_in)
    scale, so every term matters), branch scales."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, fan_in):
        t = torch.randn(*size, generator=gen) / fan_in**0.5
        return t.to(device, dtype).requires_grad_()

    h, e, k, w, s = shape.hidden, shape.experts, shape.top_k, shape.width, shape.shared
    table = build_route_table("balanced_hash", vocab_size=VOCAB, num_experts=e, num_experts_per_tok=k, layer_idx=0)
    ids = torch.randint(0, VOCAB, (tokens,), generator=gen)
    return dict(
        x=rand(tokens, h, fan_in=1),
        routes=token_routes(table, ids).to(device),
        weights=slot_weights(k, 0.6 if k > 1 else None),
        gate_up=rand(e, h, 2 * w, fan_in=h),
        down=rand(e, w, h, fan_in=w),
        shared=(rand(s, h, fan_in=h), rand(s, h, fan_in=h), rand(h, s, fan_in=s)) if s else None,
        shared_scale=1.0,
        routed_scale=2.0,
    )


def reference(inputs: dict) -> torch.Tensor:
    """fp32, one expert at a time over the rows that chose it (host syncs are fine here)."""
    x = inputs["x"].detach().float()
    gate_up, down = inputs["gate_up"].detach().float(), inputs["down"].detach().float()
    width = down.shape[1]
    out = torch.zeros_like(x)
    for j, weight in enumerate(inputs["weights"]):
        for e in range(gate_up.shape[0]):
            rows = (inputs["routes"][:, j] == e).nonzero().squeeze(1)
            h = x[rows] @ gate_up[e]
            y = (F.silu(h[:, :width]) * h[:, width:]) @ down[e]
            out.index_add_(0, rows, weight * inputs["routed_scale"] * y)
    if inputs["shared"] is not None:
        gate, up, d = (t.detach().float() for t in inputs["shared"])
        out += inputs["shared_scale"] * ((F.silu(x @ gate.t()) * (x @ up.t())) @ d.t())
    return out


def strategies_for(x: torch.Tensor, shape: Shape) -> list[str]:
    """The strategies that can run x's forward: "rows" where the decode kernels serve it."""
    grouped = grouped_mm_supported(x.device, x.dtype, shape.hidden, 2 * shape.width, shape.width)
    with torch.no_grad():
        rows = decode_kernels_serve(x, slots=shape.top_k)
    return ["dense"] + ["grouped"] * grouped + ["rows"] * rows


def auto_strategy(x: torch.Tensor, shape: Shape, which: str) -> str:
    """What "auto" runs for x in pass `which` ("fwd": inference, "fwd_bwd") as the process is
    configured."""
    with torch.no_grad():
        if which == "fwd" and decode_rows(x, slots=shape.top_k):
            return "rows"
    grouped = grouped_mm_supported(x.device, x.dtype, shape.hidden, 2 * shape.width, shape.width)
    return pick_strategy(shape.experts, shape.top_k, shape.width, shape.shared, grouped)


def run_moe(inputs: dict, strategy: str) -> torch.Tensor:
    return hash_routed_mlp(
        inputs["x"],
        inputs["routes"],
        inputs["weights"],
        inputs["gate_up"],
        inputs["down"],
        inputs["shared"],
        inputs["shared_scale"],
        inputs["routed_scale"],
        strategy=strategy,
    )


def check(shape: Shape, tokens: int, device, dtype, seed: int = 0) -> dict[str, float]:
    """Relative error (Frobenius) of every strategy against the fp32 reference; raises above the
    tolerance: 1e-5 in fp32, 1e-2 in bf16 (its rounding, ~4e-3 per operand)."""
    inputs = make_inputs(shape, tokens, device, dtype, seed)
    want = reference(inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errors = {}
    for strategy in strategies_for(inputs["x"], shape):
        with torch.no_grad():
            got = run_moe(inputs, strategy).float()
        err = ((got - want).norm() / want.norm()).item()
        if not err <= tol:
            raise AssertionError(f"{shape.name}, {tokens} tokens, {strategy}: relative error {err:.2e} > {tol:.0e}")
        errors[strategy] = err
    return errors


def dense_inputs(shape: Shape, tokens: int, device, dtype, x: torch.Tensor) -> dict:
    """The dense reference: one SwiGLU of width S + k*W (the routed MLP's active FLOPs)."""
    gen = torch.Generator().manual_seed(1)
    h, width = shape.hidden, shape.active_width

    def rand(*size, fan_in):
        return (torch.randn(*size, generator=gen) / fan_in**0.5).to(device, dtype).requires_grad_()

    return dict(x=x, gate=rand(width, h, fan_in=h), up=rand(width, h, fan_in=h), down=rand(h, width, fan_in=width))


def run_dense(d: dict) -> torch.Tensor:
    return F.linear(F.silu(F.linear(d["x"], d["gate"])) * F.linear(d["x"], d["up"]), d["down"])


def timer(device: str):
    """fn -> median ms."""
    if device == "cpu":

        def cpu_ms(fn):
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

        return cpu_ms
    try:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:

        def cuda_ms(fn):
            for _ in range(5):
                fn()
            times = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return cuda_ms


def step(fn, inputs: dict, backward: bool):
    """One call of fn(inputs); with backward, then backward of a fixed cotangent (grads reset)."""
    params = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    params += [t for t in (inputs.get("shared") or ())]
    if not backward:

        def fwd():
            with torch.no_grad():
                fn(inputs)

        return fwd
    grad = torch.randn(inputs["x"].shape, device=inputs["x"].device, dtype=inputs["x"].dtype)

    def fwd_bwd():
        for p in params:
            p.grad = None
        fn(inputs).backward(grad)

    return fwd_bwd


def reference_key(key: str, compile_: bool) -> str:
    """The dense SwiGLU's time a time is compared with: compiled (eager when nothing compiled),
    replayed as a graph when the time is a graph's, same pass."""
    _, mode, which = key.split("/")
    return f"dense_swiglu/{'compiled' if compile_ else 'eager'}{'+graph' if mode.endswith('+graph') else ''}/{which}"


def bench_shape(shape: Shape, tokens: int, device: str, dtype, compile_: bool, passes: list[str], measure) -> dict:
    # Compiled afresh for each shape: the variants share code objects (run_moe, the lambda), whose
    # compiled entries would otherwise pile up across shapes to dynamo's recompile limit, which
    # fullgraph turns into an error.
    torch._dynamo.reset()
    inputs = make_inputs(shape, tokens, device, dtype)
    dense = dense_inputs(shape, tokens, device, dtype, inputs["x"])
    strategies = strategies_for(inputs["x"], shape)
    variants = {"dense_swiglu": (run_dense, dense)}
    for strategy in strategies:
        variants[strategy] = ((lambda s: lambda i: run_moe(i, s))(strategy), inputs)
    auto = {which: auto_strategy(inputs["x"], shape, which) for which in passes}
    row = {"shape": asdict(shape), "tokens": tokens, "auto": auto, "ms": {}}

    def compiled_for(name: str, which: str) -> bool:
        # Compiling is what takes the time: every variant forward + backward at the training size
        # (the comparison behind `pick_strategy`), otherwise the dense reference, auto's pick and
        # the decode kernels.
        return compile_ and (name in ("dense_swiglu", auto[which], "rows") or (which == "fwd_bwd" and tokens >= 1024))

    graphs = device == "cuda" and tokens <= GRAPH_MAX_TOKENS
    for name, (fn, args) in variants.items():
        compiled = torch.compile(fn, fullgraph=True, dynamic=False) if compile_ else None
        for which in passes if name != "rows" else ["fwd"]:  # (the kernels have no backward)
            modes = {"eager": fn, "compiled": compiled} if compiled_for(name, which) else {"eager": fn}
            for mode, call in modes.items():
                timed = step(call, args, backward=which == "fwd_bwd")
                row["ms"][f"{name}/{mode}/{which}"] = measure(timed)
                if graphs and which == "fwd":
                    row["ms"][f"{name}/{mode}+graph/{which}"] = measure(cuda_graph(timed).replay)
    row["ratio_to_dense"] = {  # against the compiled dense MLP (the eager one without compilation)
        key: value / row["ms"][reference_key(key, compile_)]
        for key, value in row["ms"].items()
        if not key.startswith("dense_swiglu")
    }
    return row


def print_table(rows: list[dict], graph: bool = False) -> None:
    """One line per (shape, tokens, pass): the dense MLP, then each strategy eager and compiled,
    as ms and as a ratio to the compiled dense MLP (to the eager one when nothing was compiled).
    `graph`: the decode sizes' CUDA graph replays instead."""
    suffix = "+graph" if graph else ""
    width = 28 if graph else 22  # a column's characters
    cols = [
        (name, mode + suffix) for name in ("dense_swiglu", "dense", "grouped", "rows") for mode in ("eager", "compiled")
    ]
    if graph:
        print("\nthe forward at decode sizes, captured in a CUDA graph and replayed (as the engine runs it):")
    print(
        f"\n{'shape (H-E-k-W-S)':<24}{'tokens':>6} {'pass':<8}"
        # the reference dense SwiGLU apart from the routed MLP's own "dense" strategy
        + "".join(f"{('ref SwiGLU' if n == 'dense_swiglu' else 'moe ' + n) + ' ' + m:>{width}}" for n, m in cols)
        + "  auto"
    )
    for row in rows:
        ms = row["ms"]
        for which in ("fwd",) if graph else ("fwd_bwd", "fwd"):
            ref = ms.get(f"dense_swiglu/compiled{suffix}/{which}") or ms.get(f"dense_swiglu/eager{suffix}/{which}")
            if ref is None:
                continue
            cells = []
            for name, mode in cols:
                v = ms.get(f"{name}/{mode}/{which}")
                cells.append("-" if v is None else f"{v:.3f} ({v / ref:.2f}x)")
            print(
                f"{Shape(**row['shape']).name:<24}{row['tokens']:>6} {which:<8}"
                + "".join(f"{c:>{width}}" for c in cells)
                + f"  {row['auto'][which]}"
            )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for bench_moe.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="token counts (default: 16384 1 32 on the GPU, 256 1 on the CPU)",
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only (the CPU default)")
    parser.add_argument("--check-only", action="store_true", help="only check every strategy against the reference")
    parser.add_argument(
        "--decode-max-rows",
        type=int,
        default=complexity_kernels.DECODE_MAX_ROWS,
        help=f'the most tokens "rows" takes (the model\'s DECODE_MAX_ROWS, {complexity_kernels.DECODE_MAX_ROWS}, by default; '
        f"at most {KERNEL_MAX_ROWS}, what the kernels take)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.decode_max_rows <= KERNEL_MAX_ROWS:
        parser.error(f"--decode-max-rows: {args.decode_max_rows}; expected 1 to {KERNEL_MAX_ROWS}")
    complexity_kernels.DECODE_MAX_ROWS = args.decode_max_rows
    cpu = args.device == "cpu"
    shapes = CPU_SHAPES if cpu else GPU_SHAPES
    tokens = args.tokens or ([256, 1] if cpu else [16384, 1, 32])
    compile_ = not (args.no_compile or cpu)
    if cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {
        "device": torch.cuda.get_device_name() if not cpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "dtype": "float32 (check) + bfloat16",
        "decode_max_rows": args.decode_max_rows,
        "checks": {},
        "rows": [],
    }
    t0 = time.perf_counter()
    for shape in shapes:
        for n in tokens:
            for dtype in (torch.float32, torch.bfloat16):
                errs = check(shape, n, args.device, dtype)
                results["checks"][f"{shape.name}/{n}/{str(dtype).split('.')[-1]}"] = errs
    print("checks passed (relative error vs the fp32 reference):")
    for key, errs in results["checks"].items():
        print(f"  {key:<44}" + "  ".join(f"{s} {e:.1e}" for s, e in errs.items()))
    if not args.check_only:
        measure = timer(args.device)
        for shape in shapes:
            for n in tokens:
                passes = ["fwd_bwd", "fwd"]
                results["rows"].append(bench_shape(shape, n, args.device, torch.bfloat16, compile_, passes, measure))
                print(f"  timed {shape.name} at {n} tokens ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        print_table(results["rows"])
        if any("+graph/" in key for row in results["rows"] for key in row["ms"]):
            print_table(results["rows"], graph=True)
    results["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {os.path.join(args.out, 'bench_moe.json')} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
