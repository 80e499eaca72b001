"""Training telemetry: metrics.jsonl (its writer and its one reader), TensorBoard, optional
wandb, the live progress line, MFU.

On a resume from step S, TensorBoard drops the events of the steps after S (purge_step) and wandb
continues the same run (its id is kept in OUT/wandb.json).

metrics.jsonl is a log: one JSON object per line, appended, never rewritten. A resumed run
first drops a torn last line (a kill in the middle of a write) and appends
{"event": "resumed", "step": K}: the records of steps after K that precede it are superseded by
what follows. `read_metrics` applies that and returns the records of the run as if it had never
been interrupted; plots, the ablation runner and its report read the file through it.

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
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.files import DiskFullError, FileFormatError, read_json_object
from .durable import caused_by_full_disk, drop_torn_tail, fault_point, write_json

if TYPE_CHECKING:
    import torch

METRICS = "metrics.jsonl"


def read_log(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every record of an append-only JSON-lines log (metrics.jsonl,
    the ablation's batches.jsonl), in order. A torn last line (a kill in the middle of a write: no
    newline after it) is skipped; a damaged line anywhere else is a `FileFormatError` naming the
    file and the line."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline (a torn line or b"")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FileFormatError(f"{path}:{number}: not a JSON record (the file is damaged)") from None
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{number}: not a JSON object (the file is damaged)")
        records.append((number, record))
    return records


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a run folder or the file), resumes applied: what an
    uninterrupted run would have logged. A torn last line (cut by a kill) is skipped; a damaged
    line anywhere else, or a record without an integer "step", is a `FileFormatError` naming the
    file and line."""
    path = Path(run)
    path = path / METRICS if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {METRICS}")
    records: list[dict] = []
    for number, record in read_log(path):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise FileFormatError(f'{path}:{number}: a record without an integer "step" (the file is damaged)')
        if record.get("event") == "resumed":
            records = [r for r in records if r["step"] <= step]
            continue
        records.append(record)
    return records


def train_losses(records: list[dict]) -> dict[int, float]:
    """step -> training loss, from `read_metrics` records."""
    return {r["step"]: r["loss"] for r in records if "event" not in r and r.get("loss") is not None}


MATMUL_PEAK = "measured bf16 matmul peak (8192^3 GEMM, best of 5)"


def measure_matmul_peak(device: torch.device, n: int = 8192, iters: int = 50, trials: int = 5) -> float:
    """FLOP/s of a large bf16 GEMM on `device`, the best of several timed runs: the peak that MFU
    is reported against everywhere (trainer log, summary.json, bench_train, BENCHMARKS.md).

    Measured rather than taken from a datasheet: the nominal dense peak (989 TFLOP/s on H100/H200
    SXM) is not reached by any real GEMM (780-798 measured), and a measured peak carries over to
    any GPU. The best of several runs because a single run moved by 8% from one process to the
    next (clocks still ramping up). About half a second on an H100."""
    import torch  # here, not at the top: reading metrics (complexity plot) needs no torch

    g = torch.Generator(device=device).manual_seed(0)  # the run's own random state stays untouched
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(trials):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t))
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


WANDB_RUN = "wandb.json"


def _tensorboard_writer(out_dir: Path, resume_step: int | None):
    """A SummaryWriter for OUT/tensorboard (None without tensorboard). A run resumed at step S
    (0 included: stopped before its first checkpoint) purges the events of steps > S
    (purge_step=S+1): the stopped process logged them after its checkpoint; they are logged again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: tensorboard is not installed; no TensorBoard events", file=sys.stderr)
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)


def _wandb_run(out_dir: Path, project: str, run_config: dict | None, resume_step: int | None):
    """The wandb run this run logs to (None without wandb). Its id is kept in OUT/wandb.json: a
    resumed run continues that wandb run (resume="allow"); a new run, or one started again with
    --overwrite (which deletes the file), starts a new one. wandb takes steps in increasing order
    only: after a resume at step S it keeps what the stopped process logged for the steps after S
    and ignores those steps when they are logged again."""
    try:
        import wandb
    except ImportError:
        print("warning: logging.wandb = true but wandb is not installed; skipping", file=sys.stderr)
        return None
    path = out_dir / WANDB_RUN
    if resume_step is not None and path.is_file():
        remedy = "it holds the id of the run's wandb run: restore it, or delete it to log to a new wandb run"
        run_id = read_json_object(path, remedy, {"id": str})["id"]
    else:
        run_id = wandb.util.generate_id()
        write_json(path, {"id": run_id, "project": project}, indent=2)
    return wandb.init(
        project=project, id=run_id, resume="allow", config=run_config, dir=str(out_dir), name=out_dir.name
    )


class MetricsLogger:
    """Writes the run's log in `out_dir` (None: nothing is written; other ranks than 0 pass None)
    and, with `progress`, the progress line and messages on stderr.

    `resume_step`: None for a new run (no metrics.jsonl yet), else the step the run continues
    from (0 for a run restarted before its first checkpoint): the log gets a "resumed" record."""

    def __init__(
        self,
        out_dir: Path | None,
        *,
        tensorboard: bool,
        wandb: bool = False,
        wandb_project: str = "complexity",
        run_config: dict | None = None,
        progress: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = out_dir is not None
        self.progress = progress
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self._tty = sys.stderr.isatty()
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        self.path = out_dir / METRICS
        resumed = self.path.exists()
        if resumed:
            drop_torn_tail(self.path)
        self.jsonl = open(self.path, "a", buffering=1)
        if resumed:
            self._append({"step": resume_step or 0, "event": "resumed"})
        if tensorboard:
            self.tb = _tensorboard_writer(out_dir, resume_step)
        if wandb:
            self.wandb = _wandb_run(out_dir, wandb_project, run_config, resume_step)

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        try:
            self.jsonl.write(line)
        except OSError as err:
            if caused_by_full_disk(err):
                raise DiskFullError(
                    self.path, len(line), hint="training stopped; its last checkpoint is intact"
                ) from None
            raise
        fault_point("metrics.appended")

    def sync(self) -> None:
        """fsync metrics.jsonl (before a checkpoint: the log is durable up to the saved step)."""
        if self.jsonl is not None:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._append(record)
        step = record.get("step", 0)
        scalars = {
            k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        if self.tb is not None:
            prefix = "eval/" if any(k.startswith("val_") for k in record) else "train/"
            for k, v in scalars.items():
                self.tb.add_scalar(prefix + k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def event(self, step: int, event: str, **fields) -> None:
        self.log({"step": step, "event": event, **fields})
        self.message(f"step {step}: {event} {json.dumps(fields)}")

    def progress_line(
        self, step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, eta_s: float
    ) -> None:
        if not self.progress:
            return
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        line = (
            f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"MFU {mfu_s} | ETA {format_duration(eta_s)}"
        )
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
    says nothing of its device time.

    The run's tokens/s counts every interval but the process's first (which holds compilation
    and CUDA-graph recording); pauses (eval, checkpoints) are not training time (`start` after one)."""

    def __init__(self, step: int, window: int = 20):
        self.intervals: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, steps), recent
        self.measured_s, self.measured_steps, self._first = 0.0, 0, True
        self.last: tuple[float, int] = (float("nan"), 0)
        self.start(step)

    def start(self, step: int) -> None:
        """Begin an interval at `step`."""
        self._t0, self._step0 = time.perf_counter(), step

    def mark(self, step: int) -> None:
        """End the interval at `step` (the device has finished it) and begin the next."""
        now = time.perf_counter()
        self.last = (now - self._t0, step - self._step0)
        if self.last[1] > 0:
            self.intervals.append(self.last)
            if not self._first:
                self.measured_s += self.last[0]
                self.measured_steps += self.last[1]
            self._first = False
        self._t0, self._step0 = now, step

    @property
    def last_step_time(self) -> float:
        return self.last[0] / self.last[1] if self.last[1] else float("nan")

    def last_tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step / self.last_step_time if self.last[1] else float("nan")

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        """Over the measured steps (None before any)."""
        return tokens_per_step * self.measured_steps / self.measured_s if self.measured_steps else None

    @property
    def mean_step_time(self) -> float:
        steps = sum(n for _, n in self.intervals)
        return sum(s for s, _ in self.intervals) / steps if steps else float("nan")
