"""Small CPU runs of benchmarks/bench_inference.py (decode + prefill, every worker: the engine,
the dense reference, our decode step with and without the decode kernels): every worker reports
figures, none an error, and bad step settings are refused before anything runs; and of
benchmarks/bench_compile_choice.py."""

from __future__ import annotations

import json

from conftest import run_benchmark

SMALL = ["--device", "cpu", "--models", "tiny", "--vocab", "512", "--prompt-len", "16", "--decode-tokens", "16"]


def _run(*args):
    return run_benchmark("bench_inference.py", *SMALL, *args)


def test_every_worker_reports(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--step-count", "8", "--batches", "1,2,20", "--prefill-shapes", "1x32", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiny = json.loads(out.read_text())["decode_prefill"]["tiny"]
    assert not [k for k, v in tiny.items() if isinstance(v, dict) and "error" in v], tiny
    assert tiny["engine"]["engine"]["tokens_per_s"] > 0 and tiny["reference"]["decode"]["tokens_per_s"] > 0
    assert tiny["engine"]["engine_decode_steps"]["tokens_per_s"] > 0  # the same engine, 8 steps per read
    assert tiny["engine"]["engine_sync"]["tokens_per_s"] > 0  # and with async_decode off
    for kind in ("steps", "steps_off"):
        assert set(tiny[kind]["steps"]) == {"1", "2", "20"}, tiny[kind]
    assert set(tiny["reference"]["steps"]) == {"1", "2", "20"}
    assert tiny["engine"]["prefill"]["1x32"]["tokens_per_s"] > 0
    assert tiny["engine"]["prefill"]["1x32"]["masked_tokens_per_s"] > 0  # the same engine given the mask
    # the reference reads the same bytes per token as the model (within its MLP width's rounding)
    assert abs(tiny["reference_bytes_per_token"] / tiny["bytes_per_token"] - 1) < 0.01


def test_steps_past_the_cache_are_refused(tmp_path):
    proc = _run("--out", str(tmp_path / "bench.json"))  # 3 x 64 steps after 16 tokens, a 64-position cache
    assert proc.returncode != 0 and "--step-count" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "bench.json").exists()


def test_bench_compile_choice_measures_both_sides(tmp_path):
    """benchmarks/bench_compile_choice.py (the measurement behind COMPILED_DECODE_MAX_ROWS): both
    sides at each batch, the compiled one compiled (here with the aot_eager backend, for time),
    and the defaults with several decode steps per read."""
    out = tmp_path / "choice.json"
    proc = run_benchmark(
        "bench_compile_choice.py",
        *["--device", "cpu", "--presets", "tiny", "--batches", "1,4", "--vocab", "512"],
        *["--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--backend", "aot_eager", "--out", str(out)],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["compiled"]["compiled"], r["eager"]["compiled"]) for r in rows] == [
        (1, True, False),
        (4, True, False),
    ]
    assert all(r["eager"]["tokens_per_s"] > 0 and r["compiled_over_eager"] > 0 for r in rows)
    # the third side: the engine's defaults (eager on the CPU) reading the tokens every 8 steps
    assert all("8 decode steps per read" in r["defaults_decode_steps"]["engine"] for r in rows)
    assert all(not r["defaults_decode_steps"]["compiled"] and r["decode_steps_over_one"] > 0 for r in rows)


def test_bench_compile_choice_refuses_bad_arguments(tmp_path):
    out = tmp_path / "choice.json"
    for flag, value in (("--batches", "1,0"), ("--presets", "tiny,nope"), ("--repeats", "x")):
        proc = run_benchmark("bench_compile_choice.py", "--device", "cpu", flag, value, "--out", str(out))
        assert proc.returncode == 2 and f"argument {flag}" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_bench_engine_host_cpu(tmp_path):
    """The host's share of a decode step, both modes, every request still running at the end."""
    out = tmp_path / "host.json"
    proc = run_benchmark("bench_engine_host.py", "--rows", "8", "--steps", "4", "--repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"one step per read", "async_decode"}
    assert all(r["best_ms"] > 0 and len(r["runs_ms"]) == 2 for r in res.values()), res
