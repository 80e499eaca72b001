"""Training telemetry: metrics.jsonl, TensorBoard, optional wandb, the live progress line, MFU.

MFU (model FLOPs utilisation), the PaLM / torchtitan accounting:

    flops_per_token = 6 * N_active + 12 * L * n_heads * head_dim * S

N_active is the live parameter count a token passes through (`complexity.count_parameters`:
tied embedding counted once, as the LM-head matmul; experts a token does not visit excluded).
The attention term counts QK^T and AV for forward+backward over the full S x S score matrix
(the causal mask's half is not subtracted, as in PaLM's appendix B and torchtitan).
MFU = flops_per_token * tokens_per_second / (peak_flops_per_device * world_size), where the peak
is the bf16 matmul throughput measured once at the start of the run on the run's own GPU
(`measure_matmul_peak`; `logging.peak_flops` replaces it). The same definition is used in the
trainer's log, metrics.jsonl, summary.json, bench_train.py and BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path

import torch

MATMUL_PEAK = "measured bf16 matmul peak (8192^3 GEMM, best of 5)"


def measure_matmul_peak(device: torch.device, n: int = 8192, iters: int = 50, trials: int = 5) -> float:
    """FLOP/s of a large bf16 GEMM on `device`, the best of several timed runs: the peak that MFU
    is reported against everywhere (trainer log, summary.json, bench_train, BENCHMARKS.md).

    Measured rather than taken from a datasheet: the nominal dense peak (989 TFLOP/s on H100/H200
    SXM) is not reached by any real GEMM (780-798 measured), and a measured peak carries over to
    any GPU. The best of several runs because a single run moved by 8% from one process to the
    next (clocks still ramping up). About half a second on an H100."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(trials):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(device)
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t))
    del a, b
    torch.cuda.empty_cache()
    return best


def flops_per_token(active_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * active_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: Path | None, *, enabled: bool, tensorboard: bool, wandb: bool = False,
                 wandb_project: str = "complexity", run_config: dict | None = None, progress: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled and out_dir is not None
        self.progress = progress and enabled
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self._tty = sys.stderr.isatty()
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        path = out_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            # Drop what was logged after the checkpoint we resume from: it is about to be redone.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by the kill
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                print("warning: tensorboard is not installed; no TensorBoard events", file=sys.stderr)
        if wandb:
            try:
                import wandb as _wandb
                self.wandb = _wandb.init(project=wandb_project, config=run_config, dir=str(out_dir),
                                         name=out_dir.name, resume="allow")
            except ImportError:
                print("warning: logging.wandb = true but wandb is not installed; skipping", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            prefix = "eval/" if any(k.startswith("val_") for k in record) else "train/"
            for k, v in scalars.items():
                self.tb.add_scalar(prefix + k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def event(self, step: int, event: str, **fields) -> None:
        self.log({"step": step, "event": event, **fields})
        self.message(f"step {step}: {event} {json.dumps(fields)}")

    def progress_line(self, step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float,
                      mfu: float | None, eta_s: float) -> None:
        if not self.progress:
            return
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        line = (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                f"MFU {mfu_s} | ETA {format_duration(eta_s)}")
        if self._tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if not self.progress:
            return
        if self._tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tty and self.progress:
            sys.stderr.write("\n")
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Seconds per step, measured between the points where the loop waits for the device (log,
    eval and checkpoint steps): in between, steps are only launched, and one step's host time
    says nothing of its device time."""

    def __init__(self, window: int = 20):
        self.intervals: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, steps)
        self.start(0)

    def start(self, step: int) -> None:
        """Begin an interval at `step` (also after a pause: eval and checkpoint time is not counted)."""
        self._t0, self._step0 = time.perf_counter(), step

    def mark(self, step: int) -> tuple[float, int]:
        """End the interval at `step` (the device has finished it) and begin the next:
        -> (seconds, steps) of the interval."""
        now = time.perf_counter()
        interval = (now - self._t0, step - self._step0)
        if interval[1] > 0:
            self.intervals.append(interval)
        self._t0, self._step0 = now, step
        return interval

    @property
    def mean_step_time(self) -> float:
        steps = sum(n for _, n in self.intervals)
        return sum(s for s, _ in self.intervals) / steps if steps else float("nan")
