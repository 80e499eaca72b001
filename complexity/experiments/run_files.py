"""What an ablation folder holds, and how a rerun and the report read it back:

    OUT/ablation.json              the plan: the command, its settings, each arm's plan and the
                                   identity a rerun must match (damaged: `PLAN_REMEDY`)
    OUT/runs/<arm>-s<seed>/        one arm x seed (`run_name`): a `complexity train` run folder, plus
        batches.jsonl              each micro-batch's sha1, appended to; a resume supersedes the
                                   lines of later steps (`read_batches`)
        done.json                  the finished run's summary, written last: the measures of its
                                   metrics.jsonl (`summarise_run`, `read_run_metrics`), its parameter
                                   counts and the command that trains it alone (`read_done`)
    OUT/results.md, *.png          the report (`report.write_report`)

A damaged file is a `FileFormatError` naming the file, what is wrong (a value of the wrong type or
not finite included) and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..data.files import NUMBER, FileFormatError, read_json_object
from ..train.metrics import read_log, read_metrics


def run_name(arm: str, seed: int) -> str:
    """The name of the run folder of `arm` with `seed`, under OUT/runs."""
    return f"{arm}-s{seed}"


def read_batches(run_dir: Path) -> dict[tuple[int, int], str]:
    """(step, micro) -> sha1 from a run's batches.jsonl, resumes applied (a torn last line skipped;
    a damaged line is a FileFormatError naming the file and line)."""
    path = run_dir / "batches.jsonl"
    out: dict[tuple[int, int], str] = {}
    for number, r in read_log(path):
        try:
            if "resumed" in r:
                out = {k: v for k, v in out.items() if k[0] <= int(r["resumed"])}
            else:
                out[int(r["step"]), int(r["micro"])] = str(r["sha1"])
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}:{number}: not a batch record (the file is damaged)") from None
    return out


PLAN_REMEDY = (
    "it records the plan the ablation's runs were made with: restore it, or delete it and rerun the exact "
    "command that made the ablation (results.md shows it) to write it again"
)


DONE_REMEDY = (
    "it is the summary of a finished run: delete it and rerun the ablation command, which summarises the "
    "run again from its folder without training it again"
)


def _finite(value) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def _measure(value) -> bool:
    return value is None or _finite(value)  # None: not measured


def _shares(value) -> bool:
    return value is None or (isinstance(value, list) and all(map(_finite, value)))


def _steps(value) -> bool:
    return isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)


# What a rerun and the report read from done.json (`summarise_run`, and the counts and command the
# runner adds): these fields always ...
_DONE_FIELDS = {"train_command": str, "total_params": int, "active_params": int}
# ... and these where present (an absent measure reads as not measured): field -> (check, what it should be).
_MEASURE = (_measure, "a finite number or null")
_DONE_VALUES = {
    **dict.fromkeys(("avg_train_loss_first_k", "final_train_loss", "val_loss", "val_bpb", "tokens_per_s"), _MEASURE),
    "expert_shares": (_shares, "a list of finite numbers or null"),
    "spike": (lambda v: isinstance(v, dict), "an object"),
}
_SPIKE_VALUES = {
    **dict.fromkeys(("pre", "fault_loss", "peak", "peak_ratio", "recovery"), _MEASURE),
    "injected_at": (_steps, "a list of step numbers"),
}


def read_done(run_dir: Path) -> dict:
    """A finished run's done.json (its summary). A damaged one (unreadable, or a field read back
    from it missing or holding a wrong or non-finite value) is a FileFormatError naming the file,
    the field and the value, and saying what to do."""
    path = run_dir / "done.json"
    done = read_json_object(path, DONE_REMEDY, _DONE_FIELDS)
    _check_values(done, _DONE_VALUES, str(path))
    if "spike" in done:
        _check_values(done["spike"], _SPIKE_VALUES, f"{path}: the spike summary")
    return done


def _check_values(obj: dict, values: dict, where: str) -> None:
    for name, (ok, expected) in values.items():
        if name in obj and not ok(obj[name]):
            raise FileFormatError(
                f"{where}: the field {name!r} should be {expected}, found {obj[name]!r}; {DONE_REMEDY}"
            )


def read_run_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl (`read_metrics`); a damaged one is a FileFormatError saying what to do."""
    try:
        return read_metrics(run_dir / "metrics.jsonl")
    except FileFormatError as err:
        raise FileFormatError(
            f"{err}; remove the run folder {run_dir} and rerun the ablation command to train that run again"
        ) from None


def summarise_run(records: list[dict], arm: str, seed: int, avg_k: int) -> dict:
    """A run's measures from its metrics.jsonl records (None: not measured)."""
    train = {r["step"]: r for r in records if "event" not in r and r.get("loss") is not None}
    evals = [r for r in records if r.get("val_loss") is not None]
    steps = sorted(train)
    first_k = [train[s]["loss"] for s in steps if s <= avg_k]
    rates = sorted(train[s]["tokens_per_s"] for s in steps if s > 2 and train[s].get("tokens_per_s"))
    last = evals[-1] if evals else {}
    tail = [train[s]["loss"] for s in steps[-max(1, len(steps) // 20) :]]
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps[-1] if steps else 0,
        "avg_train_loss_first_k": sum(first_k) / len(first_k) if first_k else None,
        "avg_k": avg_k,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": last.get("val_loss"),
        "val_bpb": last.get("val_bpb"),
        "val_ppl": last.get("val_ppl"),
        "expert_shares": last.get("expert_shares"),
        "tokens_per_s": rates[len(rates) // 2] if rates else None,
    }
