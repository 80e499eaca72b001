"""Serving benchmark: the real `complexity serve` process with its default flags, over HTTP,
against the Engine called directly on the same checkpoint, in one run.

    # GPU (H200): base and pacific-prime, random bf16 weights, vocab 32,000 (about 5 minutes)
    python benchmarks/bench_serve.py --out runs/bench_serve
    # CPU smoke test (what tests/test_serve_bench.py runs)
    python benchmarks/bench_serve.py --device cpu --presets tiny --vocab 512 --requests 6 --streams 3 \
        --prompt-len 8 --new-tokens 4 --workers 1 --out /tmp/bench_serve

For each preset: a checkpoint is written (random weights, a word-level tokenizer of exactly
--vocab tokens); the Engine's own throughput is measured on it (Engine.from_pretrained with its
defaults, `generate` of --requests token-id prompts of --prompt-len tokens, --new-tokens greedy
tokens each); then `complexity serve CKPT` is started as a subprocess with no tuning flags
(startup = launch to a healthy /health, with empty compile caches unless --warm-cache: a user's
first start), and driven by asyncio clients in --workers processes:
(a) --requests non-streaming completions at once -> generated tokens/s over HTTP;
(b) --streams streaming completions at once -> TTFT p50/p99, inter-chunk latency p50/p99, time per
output token p50/p99, tokens/s. Every request is checked: HTTP status, finish_reason "length",
completion_tokens == --new-tokens; errors are counted, never hidden. Each measured phase (the
Engine's, (a), (b)) runs --repeat times (default 2) and each side reports its best run, with every
run's figure beside it: one run of a few seconds moved the HTTP / Engine ratio by 0.17 between two
GPU calls. The client is the standard
library only (asyncio streams, HTTP/1.1, chunked SSE), so the GPU machine needs only the server's
wheels: fastapi, starlette, uvicorn, h11, pydantic, pydantic-core, annotated-types,
typing-inspection, anyio, sniffio, click, prometheus-client (versions of
requirements/ci-constraints.txt). Results: one JSON per preset and summary.json in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- the checkpoint


def make_checkpoint(path: str, preset: str, vocab: int, device: str) -> None:
    """Random weights of `preset` (bf16 on CUDA, float32 on the CPU) and a word-level tokenizer
    of exactly `vocab` tokens ("w4" ... one token per word; </s>=0 <pad>=1 <s>=2 <unk>=3)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import complexity

    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = complexity.ComplexityConfig.from_preset(preset, vocab_size=vocab)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = complexity.ComplexityForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    words = ["</s>", "<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)
    del model


def prompts_for(args) -> list[list[int]]:
    import random

    rng = random.Random(0)
    n = max(args.requests, args.streams)
    return [[rng.randrange(4, args.vocab) for _ in range(args.prompt_len)] for _ in range(n)]


# ----------------------------------------------------------------------------- Engine direct


def engine_direct(ckpt: str, args, prompts, **engine_kwargs) -> dict:
    """The Engine in this process (its defaults, updated by engine_kwargs) on the same workload
    as the server: generated tokens/s, startup, what it chose."""
    import torch

    from complexity.inference import Engine, SamplingParams

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(ckpt, device=args.device, **engine_kwargs)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:4], params)  # warm-up
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def once() -> dict:
        sync()
        before = dict(engine.stats)
        t = time.perf_counter()
        outs = engine.generate(prompts[: args.requests], params)
        sync()
        wall = time.perf_counter() - t
        gen = sum(len(o.token_ids) for o in outs)
        return {
            "scheduling": scheduling({k: engine.stats[k] - before.get(k, 0) for k in _STEP_COUNTERS}, wall),
            "generated_tokens_per_s": gen / wall,
            "wall_s": wall,
            "generated_tokens": gen,
        }

    res = best_of([once() for _ in range(args.repeat)])
    res.update(startup_s=startup, engine=engine.describe(), max_batch=engine.max_batch, max_seq_len=engine.max_seq_len)
    engine = None  # freed, the closure's reference with it, before the server starts
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- how the steps went


def best_of(runs: list[dict]) -> dict:
    """The run with the most generated tokens/s (--repeat runs of one phase, the same rule on both
    sides), with every run's figure beside it. Errors are never dropped with a run: `errors` and
    `five_xx` count them over all runs."""
    best = dict(max(runs, key=lambda r: r["generated_tokens_per_s"] or 0))
    best["runs_tokens_per_s"] = [r["generated_tokens_per_s"] for r in runs]
    if "ttft_p50_s" in best:
        best["runs_ttft_p50_s"] = [r["ttft_p50_s"] for r in runs]
    for counted in ("errors", "five_xx"):
        if counted in best:
            best[counted] = sum(r[counted] for r in runs)
    if "error_samples" in best:
        best["error_samples"] = [e for r in runs for e in r["error_samples"]][:5]
    return best


# the engine's counters (Engine.stats keys, exported by the server's /metrics)
_STEP_COUNTERS = ("prefill_steps", "decode_steps", "prompt_tokens", "generated_tokens", "device_wait_seconds")
# the engine core's loop (server only): seconds in steps, seconds handing outputs to the API process
_LOOP_COUNTERS = ("step_seconds", "output_seconds")


def scheduling(counts: dict, wall: float) -> dict:
    """What the engine did in one phase: how many prefill forwards and decode steps, how full the
    decode steps were, and how many steps per second it kept up; for the server also the share of
    the wall time its engine core spent in steps and in handing outputs over; for both the share it
    waited for the device inside its steps (the rest of a step is host work). The Engine-direct and
    HTTP figures side by side say whether the server ran more (smaller) steps, slower steps (and
    whether the host or the device made them slower), or waited between them."""
    decode = counts["decode_steps"]
    shares = (*_LOOP_COUNTERS, "device_wait_seconds")
    loop = {f"{k}_share_of_wall": counts[k] / wall for k in shares if k in counts and wall > 0}
    return {
        **counts,
        **loop,
        "rows_per_decode_step": counts["generated_tokens"] / decode if decode else None,
        "decode_steps_per_s": decode / wall if wall > 0 else None,
    }


def server_counters(port: int) -> dict:
    """The engine's counters from the server's /metrics (Prometheus text)."""
    from complexity.serve.metrics import counter_sample

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b""
        while chunk := s.recv(1 << 16):
            text += chunk
    out = {}
    for key in _STEP_COUNTERS + _LOOP_COUNTERS:
        metric = counter_sample(key)
        m = re.search(rf"^{metric}{{[^}}]*}} ([0-9.e+-]+)$", text.decode(), re.M)
        if m is None:
            raise RuntimeError(f"/metrics has no {metric}")
        out[key] = float(m.group(1))
    return out


# ----------------------------------------------------------------------------- the HTTP client (stdlib)


_EMPTY_TEXT = re.compile(rb'"text": ?""')


async def _request(port: int, body: dict, stream: bool) -> dict:
    """One POST /v1/completions. -> status, completion tokens, finish reason, and for streams the
    arrival times of the chunks that carried text."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    res = {"status": None, "start": time.time(), "chunk_times": [], "error": None}
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        res["status"] = status
        if headers.get("transfer-encoding") == "chunked":
            buf, events = b"", []
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size + 2)
                now = time.perf_counter()
                buf += chunk[:-2]
                *complete, buf = buf.split(b"\n\n")
                for ev in complete:
                    events.append(ev)
                    if stream and b'"text":' in ev and not _EMPTY_TEXT.search(ev):
                        res["chunk_times"].append(now - start)
            payload = [e[len(b"data: ") :] for e in events if e.startswith(b"data: ")]
        else:
            payload = [await reader.readexactly(int(headers.get("content-length", 0)))]
        writer.close()
        if status != 200:
            res["error"] = payload[0][:300].decode("utf-8", "replace") if payload else f"HTTP {status}"
            return res
        if stream:
            if payload[-1] != b"[DONE]":
                res["error"] = "stream did not end with [DONE]"
            objs = [json.loads(p) for p in payload if p != b"[DONE]"]
            res["completion_tokens"] = next((o["usage"]["completion_tokens"] for o in objs if o.get("usage")), None)
            res["finish_reason"] = next(
                (c["finish_reason"] for o in objs for c in o.get("choices", []) if c.get("finish_reason")), None
            )
            if any("error" in o for o in objs):
                res["error"] = json.dumps(next(o for o in objs if "error" in o))[:300]
        else:
            obj = json.loads(payload[0])
            res["completion_tokens"] = obj["usage"]["completion_tokens"]
            res["finish_reason"] = obj["choices"][0]["finish_reason"]
    except Exception as err:  # counted as an error of this request
        res["error"] = f"{type(err).__name__}: {err}"
    res["end"] = time.time()
    res["latency"] = time.perf_counter() - start
    return res


def _client_worker(port: int, bodies: list[dict], stream: bool) -> list[dict]:
    async def run():
        return await asyncio.gather(*[_request(port, b, stream) for b in bodies])

    return asyncio.run(run())


def drive(port: int, prompts, args, stream: bool) -> list[dict]:
    """All requests at once, spread over --workers client processes (one asyncio client would
    itself be the bottleneck at tens of thousands of tokens per second)."""
    bodies = [
        {
            "prompt": p,
            "max_tokens": args.new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }
        for p in prompts
    ]
    workers = max(1, min(args.workers, len(bodies)))
    shares = [bodies[i::workers] for i in range(workers)]
    if workers == 1:
        return _client_worker(port, bodies, stream)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_client_worker, [(port, s, stream) for s in shares])
    return [r for part in parts for r in part]


def _pct(values, q):
    vals = sorted(values)
    if not vals:
        return None
    return vals[min(len(vals) - 1, int(q * len(vals)))] if q != 0.5 else statistics.median(vals)


def summarize(results: list[dict], args, stream: bool) -> dict:
    ok = [
        r
        for r in results
        if r["error"] is None
        and r["status"] == 200
        and r.get("completion_tokens") == args.new_tokens
        and r.get("finish_reason") == "length"
    ]
    errors = [r for r in results if r not in ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    wall = max(r.get("end", r["start"]) for r in results) - min(r["start"] for r in results)
    gen = sum(r.get("completion_tokens") or 0 for r in ok)
    out = {
        "requests": len(results),
        "answered_ok": len(ok),
        "errors": len(errors),
        "statuses": statuses,
        "five_xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "error_samples": [
            r["error"] or f"tokens {r.get('completion_tokens')} reason {r.get('finish_reason')}" for r in errors[:5]
        ],
        "wall_s": wall,
        # how long the clients took to send every request: the server admits what has arrived
        "arrival_spread_s": max(r["start"] for r in results) - min(r["start"] for r in results),
        "generated_tokens": gen,
        "generated_tokens_per_s": gen / wall if wall > 0 else None,
    }
    if stream:
        ttft = [r["chunk_times"][0] for r in ok if r["chunk_times"]]
        gaps = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
        tpot = [
            (r["chunk_times"][-1] - r["chunk_times"][0]) / (args.new_tokens - 1)
            for r in ok
            if len(r["chunk_times"]) > 1 and args.new_tokens > 1
        ]
        chunks = [len(r["chunk_times"]) for r in ok]
        out.update(
            {
                "ttft_p50_s": _pct(ttft, 0.5),
                "ttft_p99_s": _pct(ttft, 0.99),
                "inter_chunk_p50_s": _pct(gaps, 0.5),
                "inter_chunk_p99_s": _pct(gaps, 0.99),
                "tpot_p50_s": _pct(tpot, 0.5),
                "tpot_p99_s": _pct(tpot, 0.99),
                "tokens_per_chunk": (args.new_tokens * len(chunks) / sum(chunks)) if chunks and sum(chunks) else None,
            }
        )
    return out


# ----------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).split(b" ")[1] == b"200"
    except OSError:
        return False


def phase(port: int, prompts, args, stream: bool) -> dict:
    """Every prompt sent at once, summarized, with the engine's counters over the phase."""
    before = server_counters(port)
    res = summarize(drive(port, prompts, args, stream=stream), args, stream=stream)
    after = server_counters(port)
    res["scheduling"] = scheduling({k: after[k] - before[k] for k in after}, res["wall_s"])
    return res


def serve_and_drive(ckpt: str, args, prompts, log_path: str) -> dict:
    port = _free_port()
    env = dict(os.environ)
    cache = None
    if not args.warm_cache:
        # the compile caches the Engine-direct run (or an earlier server) filled would make the
        # server's startup a restart's: give it empty ones, as on a user's first start
        cache = tempfile.mkdtemp(prefix="compile-cache-", dir=args.out)
        env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = cache, os.path.join(cache, "triton")
    cmd = [
        sys.executable,
        "-m",
        "complexity.cli",
        "serve",
        ckpt,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *([] if args.async_decode is None else ["--async-decode" if args.async_decode else "--no-async-decode"]),
        *args.server_args.split(),
    ]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            while not _healthy(port):
                if proc.poll() is not None or time.perf_counter() - t0 > args.startup_timeout:
                    raise RuntimeError(f"server did not start (exit code {proc.poll()}); see {log_path}")
                time.sleep(0.2)
            startup = time.perf_counter() - t0
            drive(port, prompts[:2], argparse.Namespace(**{**vars(args), "new_tokens": 4}), stream=False)  # warm-up
            plain = best_of([phase(port, prompts[: args.requests], args, stream=False) for _ in range(args.repeat)])
            runs = ", ".join(f"{v:.0f}" for v in plain["runs_tokens_per_s"])
            print(f"  http non-stream: {runs} tok/s, errors {plain['errors']}", flush=True)
            streams = best_of([phase(port, prompts[: args.streams], args, stream=True) for _ in range(args.repeat)])
            print(f"  http streams: TTFT p50 {streams['runs_ttft_p50_s']} s, errors {streams['errors']}", flush=True)
        finally:
            proc.terminate()
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
    text = open(log_path).read()
    return {
        "command": " ".join(cmd[1:]),
        "startup_s": startup,
        "compile_cache": "shared" if args.warm_cache else "empty",
        "non_stream": plain,
        "streams": streams,
        "exit_code": exit_code,
        "recompile_warnings": len(re.findall(r"[Rr]ecompil", text)),
        "tracebacks": text.count("Traceback"),
        "startup_log": [line for line in text.splitlines() if "engine" in line][:4],
        # an engine process that did not stop wrote its threads' stacks to the log: keep them
        "stuck_at_shutdown": text[text.index("did not stop") :].splitlines()[:200] if "did not stop" in text else None,
    }


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "fastapi", "uvicorn", "pydantic", "prometheus_client", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="base,pacific-prime")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--requests", type=int, default=512, help="non-streaming requests sent at once")
    p.add_argument("--streams", type=int, default=256, help="streaming requests sent at once")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=8, help="client processes")
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each measured phase (Engine, HTTP requests, HTTP streams); each side's best "
        "run is reported, every run's figure beside it",
    )
    p.add_argument("--server-args", default="", help="extra flags for `complexity serve` (default: none)")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--skip-engine", action="store_true", help="no Engine-direct figure")
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="start the server with the compile caches the Engine-direct run filled (a restart's "
        "startup) instead of empty ones (a first start's, the default)",
    )
    p.add_argument(
        "--async-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="both sides with async_decode on or off (the Engine's keyword, the server's flag; "
        "default: neither says, so both take the device's default)",
    )
    p.add_argument(
        "--compare-uncompiled",
        action="store_true",
        help="also the Engine with compile=False (CUDA graphs of the eager step): what compile brings",
    )
    p.add_argument("--out", required=True, help="folder for the JSON results and server logs")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat: {args.repeat}; at least 1 run of each phase")
    os.makedirs(args.out, exist_ok=True)
    import torch

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = None
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "versions": versions(),
        "commit": commit,
        "args": vars(args),
        "results": {},
    }
    prompts = prompts_for(args)
    overlap = {} if args.async_decode is None else {"async_decode": args.async_decode}
    for preset in args.presets.split(","):
        t = time.perf_counter()
        ckpt = os.path.join(args.out, f"ckpt-{preset}")
        print(f"[{preset}] checkpoint", flush=True)
        make_checkpoint(ckpt, preset, args.vocab, args.device)
        res = {}
        if not args.skip_engine:
            print(f"[{preset}] engine direct", flush=True)
            res["engine_direct"] = engine_direct(ckpt, args, prompts, **overlap)
            runs = ", ".join(f"{v:.0f}" for v in res["engine_direct"]["runs_tokens_per_s"])
            print(f"  engine: {runs} tok/s", flush=True)
            if args.compare_uncompiled:
                res["engine_uncompiled"] = engine_direct(ckpt, args, prompts, compile=False, **overlap)
                res["compiled_over_uncompiled"] = (
                    res["engine_direct"]["generated_tokens_per_s"] / res["engine_uncompiled"]["generated_tokens_per_s"]
                )
                print(
                    f"  engine, compile=False: {res['engine_uncompiled']['generated_tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
        print(f"[{preset}] complexity serve", flush=True)
        res["http"] = serve_and_drive(ckpt, args, prompts, os.path.join(args.out, f"server-{preset}.log"))
        if "engine_direct" in res:
            res["http_over_engine"] = (
                res["http"]["non_stream"]["generated_tokens_per_s"] / res["engine_direct"]["generated_tokens_per_s"]
            )
        res["total_s"] = time.perf_counter() - t
        summary["results"][preset] = res
        with open(os.path.join(args.out, f"bench_serve_{preset}.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary["results"], indent=1)[:8000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
