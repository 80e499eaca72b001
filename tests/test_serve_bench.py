"""A small CPU run of benchmarks/bench_serve.py: the real `complexity serve` process with its
default flags, driven over HTTP by the benchmark's own clients, must answer every request in full
(streaming and not), next to the Engine-direct figure."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import run_benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_serve import best_of  # noqa: E402


@pytest.mark.parametrize("overlap", [[], ["--async-decode"]], ids=["defaults", "async"])
def test_bench_serve_cpu_answers_everything(tmp_path, overlap):
    out = tmp_path / "bench"
    proc = run_benchmark(
        "bench_serve.py",
        "--device",
        "cpu",
        "--presets",
        "tiny",
        "--vocab",
        "512",
        "--requests",
        "6",
        "--streams",
        "3",
        "--prompt-len",
        "8",
        "--new-tokens",
        "4",
        "--workers",
        "1",
        "--server-args",
        "--threads 1",
        "--compare-uncompiled",
        *overlap,
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "bench_serve_tiny.json").read_text())
    http = res["http"]
    for part, n in (("non_stream", 6), ("streams", 3)):
        assert http[part]["requests"] == n and http[part]["answered_ok"] == n, http[part]
        assert http[part]["errors"] == 0 and http[part]["five_xx"] == 0
        assert http[part]["generated_tokens"] == n * 4
    assert http["streams"]["ttft_p50_s"] is not None
    # the engine's own counters, read from the server's /metrics around each phase
    for part, n in (("non_stream", 6), ("streams", 3)):
        sched = http[part]["scheduling"]
        assert sched["generated_tokens"] == n * 4 and sched["prompt_tokens"] == n * 8, sched
        assert sched["prefill_steps"] >= 1 and sched["decode_steps"] >= 3, sched
        assert 0 < sched["step_seconds_share_of_wall"] <= 1.05 and sched["output_seconds"] >= 0, sched
        # the device's share of those steps (waited for when reading tokens), within them
        assert 0 < sched["device_wait_seconds"] <= sched["step_seconds"], sched
    described = "launched before the tokens are read (async)"  # on the CPU, off by default
    assert (described in res["engine_direct"]["engine"]) == bool(overlap)
    assert any(described in line for line in http["startup_log"]) == bool(overlap), http["startup_log"]
    # each phase twice (--repeat's default), the best run reported with both runs' figures
    assert len(res["engine_direct"]["runs_tokens_per_s"]) == 2
    assert len(http["non_stream"]["runs_tokens_per_s"]) == len(http["streams"]["runs_ttft_p50_s"]) == 2
    assert http["non_stream"]["generated_tokens_per_s"] == max(http["non_stream"]["runs_tokens_per_s"])
    direct = res["engine_direct"]["scheduling"]
    assert 0 < direct["device_wait_seconds_share_of_wall"] <= 1, direct
    assert direct["generated_tokens"] == 6 * 4 and direct["decode_steps"] >= 3, direct
    assert res["engine_direct"]["generated_tokens"] == res["engine_uncompiled"]["generated_tokens"] == 6 * 4
    assert res["compiled_over_uncompiled"] > 0
    assert http["tracebacks"] == 0 and http["recompile_warnings"] == 0 and http["stuck_at_shutdown"] is None
    assert "leaked semaphore" not in (out / "server-tiny.log").read_text()  # nothing left for the tracker
    # the server started with empty compile caches (a first start), removed afterwards
    assert http["compile_cache"] == "empty" and not list(out.glob("compile-cache-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["torch"] and summary["results"]["tiny"]["http_over_engine"] > 0


def test_the_best_run_keeps_every_runs_errors():
    """A phase's best run is reported, but the errors of the runs around it are never dropped."""
    runs = [
        {"generated_tokens_per_s": 90.0, "errors": 2, "five_xx": 1, "error_samples": ["HTTP 500"], "ttft_p50_s": 0.3},
        {"generated_tokens_per_s": 100.0, "errors": 0, "five_xx": 0, "error_samples": [], "ttft_p50_s": 0.2},
    ]
    best = best_of(runs)
    assert best["generated_tokens_per_s"] == 100.0 and best["ttft_p50_s"] == 0.2
    assert best["runs_tokens_per_s"] == [90.0, 100.0] and best["runs_ttft_p50_s"] == [0.3, 0.2]
    assert best["errors"] == 2 and best["five_xx"] == 1 and best["error_samples"] == ["HTTP 500"]
    assert runs[1]["errors"] == 0  # the runs themselves are left as they were


def test_no_runs_is_refused(tmp_path):
    proc = run_benchmark("bench_serve.py", "--device", "cpu", "--repeat", "0", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "--repeat: 0; at least 1 run" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "b").exists()
