"""benchmarks/run_ablation_gpu.sh end to end on the CPU, small: its TIME_LIMIT stops it at the
limit, or before a run that could not finish in time, every finished run packed, and the same
command then completes it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_ablation_gpu.sh"

# tiny model, two arms x two seeds, 6 steps of 256 tokens: about 13 s a run on two CPU cores
SMALL = {
    "PRESET": "tiny",
    "DEVICE": "cpu",
    "PRECISION": "fp32",
    "COMPILE": "false",
    "STEPS": "6",
    "SEQ": "64",
    "MICRO": "2",
    "TOKENS_PER_STEP": "256",
    "SEEDS": "2",
    "ARMS": "dense routed",
    "CORPUS_MB": "1",
    "TOKENIZER_MB": "1",
}


def _run(work: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TIME_LIMIT", "RUN_SECONDS", "SPIKE")}
    env.update(SMALL, WORK=str(work), PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )


def _finished(work: Path) -> list[str]:
    return sorted(p.parent.name for p in (work / "ablation" / "runs").glob("*/done.json"))


def _packed(work: Path) -> list[str]:
    if not (work / "out" / "ablation.tgz").exists():
        return []
    with tarfile.open(work / "out" / "ablation.tgz") as tar:
        return sorted({Path(n).parts[1] for n in tar.getnames() if n.startswith("runs/") and len(Path(n).parts) > 1})


@pytest.mark.slow
def test_time_limit_stops_at_the_limit_or_before_a_run_and_the_same_command_completes(tmp_path):
    work = tmp_path / "abl"
    # at the limit: the run in flight is stopped (checkpointed), nothing finished, exit 143 as on a TERM
    at_limit = _run(work, TIME_LIMIT="1")
    log = at_limit.stdout + at_limit.stderr
    assert at_limit.returncode == 143, log[-3000:]
    assert "TIME_LIMIT: 1s reached: stopping the run in flight" in log and "Traceback" not in log
    assert _finished(work) == [] and _packed(work) == []
    assert "nothing to pack" in log or "0 finished run(s)" in log

    # before a run: a run takes RUN_SECONDS here, more than is left, so `complexity ablate
    # --time-limit` starts none (exit 75) and the script packs and exits 143 as on a TERM
    before = _run(work, TIME_LIMIT="100000", RUN_SECONDS="100000")
    log = before.stdout + before.stderr
    assert before.returncode == 143, log[-3000:]
    assert "ablate: not starting dense-s0: a run takes about 100000 s" in log and "Traceback" not in log
    assert "TIME_LIMIT: the next run would not finish in time" in log
    assert _finished(work) == []

    # the same command without a limit: every run trained, the report written
    done = _run(work)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "TIME_LIMIT" not in log
    runs = ["dense-s0", "dense-s1", "routed-s0", "routed-s1"]
    assert _finished(work) == _packed(work) == runs
    assert (work / "out" / "results.md").read_text().count("| routed |") >= 1


@pytest.mark.parametrize("knob", ["TIME_LIMIT", "RUN_SECONDS"])
def test_a_time_knob_that_is_not_whole_seconds_is_refused_before_any_work(tmp_path, knob):
    """bash arithmetic would read "9m" or "ten" as 0 (an immediate stop, or no estimate): refused
    with the knob's name, before the corpus stage writes anything."""
    res = _run(tmp_path / "abl", **{knob: "9m"})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"run_ablation_gpu.sh: {knob}: '9m' is not a whole number of seconds" in res.stderr
    assert not (tmp_path / "abl").exists()
