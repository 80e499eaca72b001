"""The decode kernels measured where they are chosen: the projection kernels' tiles, swept per
launch shape against cuBLAS reading the same bytes, and the decode attention kernels against the
SDPA they replace, in one run.

    # GPU (about 5 minutes for the three presets):
    python benchmarks/bench_decode_kernels.py --out runs/bench_decode_kernels.json
    # CPU smoke test (triton's interpreter; what tests/test_bench_decode_kernels.py runs):
    TRITON_INTERPRET=1 python benchmarks/bench_decode_kernels.py --device cpu --presets tiny \
        --vocab 512 --quick --out /tmp/tiles.json

Part `tiles`. For each preset (random weights, vocab --vocab, --dtype): one token goes through the model with
the decode kernels on, and every launch of `linear_rows`, `swiglu_rows` and `down_rows` is
recorded with its key in `complexity_triton.TILES` (the layers repeat the same few shapes). Each
distinct launch (once over all presets: two presets of the same widths share launches) is then timed with the default tiles and with every candidate (stage 1: column
block x K tile; stage 2: warps x pipeline stages around the two best of stage 1), each
candidate's output checked against the default's. Timing: `rotate` copies of the launch's
weights, enough to exceed the L2 cache, called in turn inside a CUDA graph, so every call reads
its weights from memory as a decode step does. The yardstick: `F.linear` on one row reading the
same bytes (cuBLAS's GEMV), timed the same way.

Printed last: per launch, the bytes it reads, GB/s with the default tiles, the best tiles and
cuBLAS; per preset, the step time the best tiles would save; and the `TILES` entries to paste into
complexity/complexity_triton.py where they pay.

Part `attention`. For each preset's heads, at --rows rows and --lengths keys (context buckets),
rows at different positions under the engine's additive mask: `attend_one_position` (the decode
attention kernels, on unless COMPLEXITY_DECODE_ATTENTION=0) against `F.scaled_dot_product_attention`
on the same grouped views, as `decode_attention` calls it, timed the same way (K/V rotated past the
L2 cache), with the largest difference between the two: whether the kernels should stay the default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_inference import build_model  # noqa: E402

import complexity  # noqa: E402
from complexity import complexity_kernels as ck  # noqa: E402

L2_BYTES = 256 << 20  # rotated weights per timed launch: several times any L2 cache
MAX_COPIES = 32
STAGE1 = [(n, k) for n in (16, 32, 64) for k in (64, 128, 256, 512)]  # (block_n, max_block_k)
STAGE2 = [(w, s) for w in (2, 4, 8) for s in (2, 3, 4, 6)]  # (num_warps, num_stages)
QUICK1, QUICK2 = [(16, 256), (32, 64)], [(2, 2)]
KERNELS = ("linear_rows", "swiglu_rows", "down_rows")


def triton_module():
    from complexity import complexity_triton

    return complexity_triton


# ----------------------------------------------------------------------------- the launches


def record_launches(model, device) -> list[dict]:
    """One token through `model` with the decode kernels on: each distinct launch (by its TILES
    key) with its arguments, how many times a step makes it, and the weight bytes it reads."""
    tt = triton_module()
    lookup, seen, current = tt.tiles_for, {}, {}
    originals = {name: getattr(ck, name) for name in KERNELS}

    def key_spy(key):
        current["key"] = key
        return lookup(key)

    def recorder(name):
        def call(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            key = current.pop("key")
            entry = seen.setdefault(key, {"key": key, "kernel": name, "args": args, "kwargs": kwargs, "count": 0})
            entry["count"] += 1
            return out

        return call

    tt.tiles_for = key_spy
    for name in KERNELS:
        setattr(ck, name, recorder(name))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[5]], device=device))
    finally:
        tt.tiles_for = lookup
        for name, fn in originals.items():
            setattr(ck, name, fn)
    launches = list(seen.values())
    for entry in launches:
        entry["bytes"] = weight_bytes(entry)
    return launches


def weight_bytes(entry: dict) -> int:
    """Bytes of weights one launch reads at one row (an expert bank: the chosen expert only)."""
    args, kwargs = entry["args"], entry["kwargs"]
    size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    if entry["kernel"] == "linear_rows":
        return sum(size(w_a) + size(w_b) + size(bias) for w_a, w_b, bias in args[2])
    bound = dict(zip(("x", "expert_ids", "bank", "shared_a", "shared_b"), args))
    bound.update(kwargs)
    if entry["kernel"] == "swiglu_rows":  # (x, expert_ids, gate_up, shared_gate, shared_up, ...)
        slots = 0 if bound["expert_ids"] is None else bound["expert_ids"].numel() // bound["x"].shape[0]
        bank = bound["bank"]
        return slots * (0 if bank is None else size(bank[0])) + size(bound["shared_a"]) + size(bound["shared_b"])
    # down_rows (h, out_features, expert_ids, down, shared_down)
    h, _, ids, bank, shared = (list(args) + [None] * 5)[:5]
    slots = 0 if ids is None else ids.numel() // h.shape[0]
    return slots * (0 if bank is None else size(bank[0])) + size(shared)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def rotated(entry: dict, copies: int) -> list[tuple]:
    """`copies` independent copies of a launch's arguments (the first is the recorded one)."""
    first = (entry["args"], entry["kwargs"])
    return [first] + [(_clone(entry["args"]), _clone(entry["kwargs"])) for _ in range(copies - 1)]


# ----------------------------------------------------------------------------- timing


def rotation(nbytes: int, device) -> int:
    """Copies of a launch's operands to call in turn, so that each call reads them from memory:
    their bytes past L2_BYTES (one copy on the CPU, where only the plumbing is checked)."""
    return max(1, min(MAX_COPIES, math.ceil(L2_BYTES / max(nbytes, 1)))) if device.type == "cuda" else 1


def time_calls(fns: list, device) -> float:
    """Seconds per call of the functions in `fns` (one launch each), called in turn: inside a CUDA
    graph replayed on the GPU, back to back on the CPU."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench_cudagraph(lambda: [f() for f in fns], rep=30)
        return ms / 1e3 / len(fns)
    t = time.perf_counter()
    for f in fns:
        f()
    return (time.perf_counter() - t) / len(fns)


def time_tiles(entry: dict, copies: list[tuple], tiles, device) -> tuple[float, torch.Tensor]:
    """(seconds per launch, the launch's output) with `tiles` in TILES for the launch's key."""
    tt = triton_module()
    fn = getattr(ck, entry["kernel"])
    saved = dict(tt.TILES)
    tt.TILES[entry["key"]] = tiles
    try:
        out = fn(*entry["args"], **entry["kwargs"])
        return time_calls([lambda a=a, k=k: fn(*a, **k) for a, k in copies], device), out
    finally:
        tt.TILES.clear()
        tt.TILES.update(saved)


def time_cublas(entry: dict, copies: int, device) -> float:
    """Seconds per `F.linear` of one row reading the launch's bytes (weights [bytes / K, K], K the
    launch's input width)."""
    x = entry["args"][0][:1]
    k = x.shape[-1]
    n = max(1, entry["bytes"] // (k * x.element_size()))
    weights = [torch.randn(n, k, dtype=x.dtype, device=device) for _ in range(copies)]
    return time_calls([lambda w=w: F.linear(x, w) for w in weights], device)


def candidates(stage: int, best: list, quick: bool) -> list:
    tt = triton_module()
    if stage == 1:
        return [tt.Tiles(block_n=n, max_block_k=k) for n, k in (QUICK1 if quick else STAGE1)]
    return [
        tt.Tiles(block_n=b.block_n, max_block_k=b.max_block_k, num_warps=w, num_stages=s)
        for b in best
        for w, s in (QUICK2 if quick else STAGE2)
    ]


def sweep(entry: dict, device, quick: bool) -> dict:
    """The launch timed with the default tiles, every candidate and cuBLAS."""
    tt = triton_module()
    copies = rotation(entry["bytes"], device)
    args = rotated(entry, copies)
    t_default, want = time_tiles(entry, args, tt.DEFAULT_TILES, device)
    scale = want.float().abs().max().clamp(min=1.0).item()
    tried, failed = {}, {}

    def run(tiles):
        if tiles in tried or tiles in failed:
            return
        try:
            t, out = time_tiles(entry, args, tiles, device)
        except Exception as err:  # e.g. more shared memory than an SM has: not a candidate
            failed[tiles] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return
        tried[tiles] = {"seconds": t, "max_abs_diff": (out.float() - want.float()).abs().max().item() / scale}

    for tiles in candidates(1, [], quick):
        run(tiles)
    best1 = sorted(tried, key=lambda t: tried[t]["seconds"])[:2]
    for tiles in candidates(2, best1, quick):
        run(tiles)
    best = min(tried, key=lambda t: tried[t]["seconds"], default=tt.DEFAULT_TILES)
    t_best = tried[best]["seconds"] if best in tried else t_default
    t_cublas = time_cublas(entry, copies, device)
    gbps = lambda t: entry["bytes"] / t / 1e9  # noqa: E731
    return {
        "kernel": entry["kernel"],
        "key": list(entry["key"]),
        "per_step": entry["count"],
        "bytes": entry["bytes"],
        "copies": copies,
        "default": {"us": t_default * 1e6, "GBps": gbps(t_default)},
        "best": {"tiles": vars(best), "us": t_best * 1e6, "GBps": gbps(t_best)},
        "cublas": {"us": t_cublas * 1e6, "GBps": gbps(t_cublas)},
        "max_rel_diff": max((v["max_abs_diff"] for v in tried.values()), default=0.0),
        "tried": [{"tiles": vars(t), "us": v["seconds"] * 1e6} for t, v in tried.items()],
        "failed": [{"tiles": vars(t), "error": e} for t, e in failed.items()],
    }


# ----------------------------------------------------------------------------- attention


def attention_case(cfg, rows: int, length: int, dtype, device) -> dict:
    """One (rows, keys) point of a preset's decode attention: kernels against SDPA."""
    kv, groups, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    kv_bytes = 2 * rows * kv * length * d * torch.tensor([], dtype=dtype).element_size()
    copies = rotation(kv_bytes, device)
    gen = torch.Generator().manual_seed(rows + length)
    q = torch.randn(rows, kv, groups, d, generator=gen).to(device, dtype)
    pos = torch.randint(0, length, (rows,), generator=gen).to(device)
    visible = torch.arange(length, device=device)[None, :] <= pos[:, None]
    mask = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)
    caches = [
        tuple(torch.randn(rows, kv, length, d, generator=gen).to(device, dtype) for _ in range(2))
        for _ in range(copies)
    ]
    scale = d**-0.5
    attend = triton_module().attend_one_position
    ours = [lambda k=k, v=v: attend(q, k, v, mask, scale) for k, v in caches]
    sdpa = [
        lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
        for k, v in caches
    ]
    diff = (ours[0]().float() - sdpa[0]().float()).abs().max().item()
    t_ours, t_sdpa = time_calls(ours, device), time_calls(sdpa, device)
    return {
        "rows": rows,
        "keys": length,
        "kernels_us": t_ours * 1e6,
        "sdpa_us": t_sdpa * 1e6,
        "sdpa_over_kernels": t_sdpa / t_ours,
        "max_abs_diff": diff,
    }


# ----------------------------------------------------------------------------- main


def report_attention(results: dict) -> list[str]:
    lines = ["preset | rows | keys | kernels us | SDPA us | SDPA / kernels | max abs diff"]
    for preset, res in results["presets"].items():
        for r in res.get("attention", []):
            lines.append(
                f"{preset} | {r['rows']} | {r['keys']} | {r['kernels_us']:.1f} | {r['sdpa_us']:.1f} | "
                f"{r['sdpa_over_kernels']:.2f} | {r['max_abs_diff']:.2e}"
            )
    return lines


def report(results: dict) -> list[str]:
    if not any("launches" in res for res in results["presets"].values()):
        return []
    lines = ["preset | launch | per step | MB | default GB/s | best GB/s | best tiles | cuBLAS GB/s"]
    paste, default = {}, vars(triton_module().DEFAULT_TILES)  # one entry per key
    for preset, res in results["presets"].items():
        if "launches" not in res:
            continue
        for r in res["launches"]:
            t = r["best"]["tiles"]
            lines.append(
                f"{preset} | {r['kernel']} {tuple(r['key'][1:])} | {r['per_step']} | {r['bytes'] / 1e6:.1f} | "
                f"{r['default']['GBps']:,.0f} | {r['best']['GBps']:,.0f} | "
                f"n{t['block_n']} k{t['max_block_k']} w{t['num_warps']} s{t['num_stages']} | {r['cublas']['GBps']:,.0f}"
            )
            if t != default and r["best"]["us"] < 0.97 * r["default"]["us"]:
                args = ", ".join(f"{k}={v}" for k, v in t.items())
                paste[tuple(r["key"])] = f"    {tuple(r['key'])}: Tiles({args}),"
        lines.append(
            f"{preset} | step: {res['step_us_default']:.0f} us of these launches with the defaults, "
            f"{res['step_us_best']:.0f} with the best tiles, {res['step_us_cublas']:.0f} as cuBLAS GEMVs"
        )
    lines += ["", "TILES entries (launches >= 3% faster than with the defaults):", "{", *paste.values(), "}"]
    return lines


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (argparse type)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="base,tmlr-187m,pacific-prime")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="tiles,attention", help="tiles, attention, or both")
    p.add_argument("--quick", action="store_true", help="two column/K tiles and one warps/stages pair")
    p.add_argument(
        "--rows",
        type=positive_ints,
        default="1,8,16",
        help="attention: rows (16 at most reach the kernels in the model)",
    )
    p.add_argument(
        "--lengths", type=positive_ints, default="512,2048", help="attention: keys attended (context buckets)"
    )
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on the CPU the kernels run only in triton's interpreter: set TRITON_INTERPRET=1")
    if not ck.DECODE_KERNELS or device.type not in ck._DECODE_DEVICES:
        p.error(f"the decode kernels do not run on {device} here (triton missing or COMPLEXITY_DECODE_KERNELS=0)")
    t0 = time.perf_counter()
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "args": vars(args),
        "presets": {},
    }
    parts = set(args.parts.split(","))
    if not parts or not parts <= {"tiles", "attention"}:
        p.error(f"--parts: {args.parts!r}; expected tiles, attention or both")
    sweeps: dict[tuple, dict] = {}  # by TILES key: a launch shape two presets share is swept once
    for preset in args.presets.split(","):
        res = results["presets"][preset] = {}
        if "tiles" in parts:
            model = build_model(preset, args.vocab, dtype, device, max_pos=0)  # (one token: any context)
            swept = []
            for entry in record_launches(model, device):
                if entry["key"] not in sweeps:
                    with torch.inference_mode():
                        sweeps[entry["key"]] = sweep(entry, device, args.quick)
                    print(f"[{preset}] {entry['kernel']} {entry['key'][1:]}: done", flush=True)
                swept.append({**sweeps[entry["key"]], "per_step": entry["count"]})
            res["launches"] = swept
            res["step_us_default"] = sum(r["default"]["us"] * r["per_step"] for r in swept)
            res["step_us_best"] = sum(r["best"]["us"] * r["per_step"] for r in swept)
            res["step_us_cublas"] = sum(r["cublas"]["us"] * r["per_step"] for r in swept)
            del model
        if "attention" in parts:
            cfg = complexity.ComplexityConfig.from_preset(preset, vocab_size=args.vocab)
            with torch.inference_mode():
                res["attention"] = [
                    attention_case(cfg, rows, length, dtype, device) for rows in args.rows for length in args.lengths
                ]
            print(f"[{preset}] attention: done", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["total_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(report(results) + [""] + report_attention(results)))
    print(f"total {results['total_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
