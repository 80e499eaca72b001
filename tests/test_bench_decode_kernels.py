"""A small CPU run of benchmarks/bench_decode_kernels.py in triton's interpreter: every launch of
a decode step is found, timed with its default tiles, the candidates and cuBLAS's stand-in, and
every candidate gives the default's results within the tolerance; the attention kernels are timed
against SDPA and agree with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_sweep_finds_and_times_every_launch(tmp_path):
    out = tmp_path / "tiles.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode_kernels.py"), "--device", "cpu"]
    cmd += ["--presets", "tiny", "--vocab", "512", "--dtype", "float32", "--quick", "--out", str(out)]
    cmd += ["--rows", "1,3", "--lengths", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiny = json.loads(out.read_text())["presets"]["tiny"]
    kinds = {r["kernel"] for r in tiny["launches"]}
    assert {"linear_rows", "swiglu_rows", "down_rows"} <= kinds, kinds
    layers = 6  # the tiny preset's
    for r in tiny["launches"]:
        assert r["per_step"] == layers and r["bytes"] > 0, r  # one launch of each shape per layer
        assert r["default"]["us"] > 0 and r["best"]["us"] > 0 and r["cublas"]["us"] > 0, r
        assert len(r["tried"]) == 4 and not r["failed"], r  # 2 tiles, then the 2 best with 1 warps/stages pair
        assert r["max_rel_diff"] < 1e-5, r  # float32: summation order only
    assert "TILES entries" in proc.stdout
    # the attention kernels against SDPA: every (rows, keys) point timed, the two agreeing
    assert [(a["rows"], a["keys"]) for a in tiny["attention"]] == [(1, 100), (3, 100)]
    for a in tiny["attention"]:
        assert a["kernels_us"] > 0 and a["sdpa_us"] > 0 and a["max_abs_diff"] < 1e-5, a


def test_a_launch_two_presets_share_is_one_tiles_entry():
    """base and tmlr-187m share launch shapes: the printed TILES dict names each key once (a dict
    literal with a key twice keeps the last silently)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_decode_kernels

    best = {"block_n": 32, "max_block_k": 256, "num_warps": 4, "num_stages": 3}
    launch = {"kernel": "linear_rows", "key": ["linear", 768, 768, 0], "per_step": 12, "bytes": 1_179_648}
    launch |= {"default": {"us": 10.0, "GBps": 118.0}, "best": {"tiles": best, "us": 8.0, "GBps": 147.0}}
    launch |= {"cublas": {"us": 9.0, "GBps": 131.0}}
    preset = {"launches": [launch], "step_us_default": 120.0, "step_us_best": 96.0, "step_us_cublas": 108.0}
    lines = bench_decode_kernels.report({"presets": {"tmlr-187m": preset, "base": preset}})
    entries = [line for line in lines if line.startswith("    ('linear', 768, 768, 0)")]
    assert entries == ["    ('linear', 768, 768, 0): Tiles(block_n=32, max_block_k=256, num_warps=4, num_stages=3),"]
    assert sum("linear_rows (768, 768, 0)" in line for line in lines) == 2  # one row per preset


def test_the_cpu_without_the_interpreter_is_refused(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode_kernels.py"), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd + ["--out", str(tmp_path / "t.json")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "t.json").exists()


def test_bad_row_and_length_lists_are_refused(tmp_path):
    for flag, value in (("--rows", "1,x"), ("--lengths", "0,512")):
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode_kernels.py"), flag, value]
        proc = subprocess.run(cmd + ["--out", str(tmp_path / "t.json")], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and f"argument {flag}: {value!r}: expected positive integers" in proc.stderr
    assert not (tmp_path / "t.json").exists()
