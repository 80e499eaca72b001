"""`complexity serve` on CUDA with its default flags (engine process, CUDA graphs, compile, slots
sized from memory): 64 concurrent requests over HTTP all answered in full, no recompile warning
in the log, a clean shutdown. Needs fastapi / uvicorn / pydantic / prometheus_client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_defaults_on_cuda(tmp_path):
    import asyncio

    import torch

    assert torch.cuda.is_available()

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_serve import _request, make_checkpoint

    ckpt = str(tmp_path / "ckpt")
    make_checkpoint(ckpt, "tiny", 512, "cuda")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "complexity.cli", "serve", ckpt, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    health = json.loads(r.read())
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.5)
        assert health["max_batch"] > 16  # sized from memory, not the old fixed 16
        prompts = [[(7 * i + j) % 500 + 4 for j in range(3 + i % 20)] for i in range(64)]

        async def run():
            return await asyncio.gather(
                *[
                    _request(port, {"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}, False)
                    for p in prompts
                ]
            )

        results = asyncio.run(run())
        assert all(r["status"] == 200 and r["error"] is None for r in results), [r for r in results if r["error"]][:3]
        assert all(r["completion_tokens"] == 24 for r in results)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    log = proc.stdout.read().decode()
    assert code in (0, -signal.SIGTERM), log
    assert "Traceback" not in log and "ecompil" not in log, log
    assert "CUDA graphs" in log  # the startup line says what was chosen
