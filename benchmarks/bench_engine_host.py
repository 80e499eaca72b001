"""The host's share of a decode step: what the engine does around the model's forward (building
the step's input, reading the sampled tokens back, the requests' bookkeeping, the step's outputs),
with the forward replaced by fixed logits, at a batch of --rows running requests.

    python benchmarks/bench_engine_host.py --out /tmp/host.json      # CPU, about 10 s

On a GPU this work runs between two steps unless `async_decode` overlaps it with the next one, so
its cost per step against the GPU's step time says how much the overlap can bring (BENCHMARKS.md:
on an H100 a base step at 256 rows waited 57% of its time for the GPU, the rest was this). The
logits' vocabulary is small on purpose: their argmax is the device's work, not the host's. Each
mode (one step per read, async) is timed in turn on the same engine, best and median of --repeats
runs of --steps steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import complexity  # noqa: E402
from complexity.inference import Engine, SamplingParams  # noqa: E402


def host_step_ms(engine: Engine, steps: int, repeats: int) -> list[float]:
    """Milliseconds per `engine.step()` over `repeats` runs of `steps` decode steps."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        runs.append((time.perf_counter() - t) / steps * 1e3)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="running requests (the decode batch)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # room for every timed step: one prefill, then (repeats + 1) x steps decode steps per mode
    max_new = 4 + 2 * (args.repeats + 1) * args.steps
    config = complexity.ComplexityConfig.from_preset("tiny", vocab_size=args.vocab, max_position_embeddings=max_new + 8)
    model = complexity.ComplexityForCausalLM(config)
    engine = Engine(model, None, max_batch=args.rows)
    params = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    for i in range(args.rows):
        engine.add_request([4 + i % (args.vocab - 4), 5, 6, 7], params)
    engine.step()  # every request prefilled: from here on each step is a decode step of all rows
    logits = torch.randn(args.rows, args.vocab)
    engine._run_decode = lambda tokens_pos, nrows, need_kv: logits[:nrows]
    results = {}
    for mode, overlap in (("one step per read", False), ("async_decode", True)):
        engine.async_decode = overlap
        host_step_ms(engine, args.steps, 1)  # warm-up (and, for async, the first window in flight)
        runs = host_step_ms(engine, args.steps, args.repeats)
        results[mode] = {"best_ms": min(runs), "median_ms": statistics.median(runs), "runs_ms": runs}
        print(f"{mode}: host {statistics.median(runs):.3f} ms per step at {args.rows} rows (median)", flush=True)
    if engine.num_running != args.rows:
        raise SystemExit(f"only {engine.num_running} of {args.rows} requests ran to the end of the timing")
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
