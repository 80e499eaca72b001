"""Inference benchmarks: batch-1 decode against a dense reference of the same weight bytes,
decode steps at larger batches, prefill, continuous-batching throughput.

    # GPU (H200): decode + prefill for the three presets, one table at the end (~5 minutes)
    python benchmarks/bench_inference.py --parts decode,prefill --out runs/bench_decode.json
    # add --profile for a kernel table of one decode step (ours, ours without the decode kernels,
    # the reference); --parts serving for continuous batching; --parts check for graphs == eager
    # CPU smoke test (tiny shapes, eager, no graphs)
    python benchmarks/bench_inference.py --device cpu --parts decode,prefill --models tiny --vocab 512 \
        --prompt-len 16 --decode-tokens 16 --step-count 8 --batches 1,2 --prefill-shapes 1x32 --out /tmp/bench.json

decode (per preset, random weights, bf16 on CUDA):
  - engine: our `Engine` with its defaults (on CUDA: graphs, torch.compile, each step launched
    before the last one's tokens are read) generating `--decode-tokens` greedy tokens after a
    `--prompt-len` prompt at batch 1, end to end (its host work per token included); then the
    same engine reading the tokens every `--decode-steps` steps (`Engine.decode_steps`), and
    reading each step's tokens before launching the next (`async_decode=False`);
  - reference: `decode_reference.DenseDecoder`, a gpt-fast-style dense decoder sized to read the
    same weight bytes per token, its compiled step in a loop that never waits for the host;
  - steps: one decode step of our model (compiled, as a CUDA graph replayed back to back: the
    GPU's time) and of the reference, at each of `--batches`, as tokens/s; ours once more with the
    decode kernels off (`complexity_kernels.DECODE_KERNELS`), which measures what they bring, once
    with the decode attention the other way from the default (`DECODE_ATTENTION`: through SDPA, as
    the attention kernels are on by default; where they can run), and once with the decode kernels
    taking up to 64 rows (`DECODE_MAX_ROWS`, where a batch of 17 to 64 rows is measured);
  - generate(): `model.generate()` with a static cache, eager, batch 1;
  - the bound: weight bytes a batch-1 token reads / the device copy bandwidth measured here.
prefill: prompts of `--prefill-shapes` (batch x length) through the engine's prefill (eager) and
  the reference's (eager, causal flash attention), tokens/s.

Compiling dominates the time: every (preset, system) pair builds, compiles and captures in its
own process, all at once; then the parent gives each process the GPU in turn for its timed part,
so no measurement overlaps another process's work. A process that fails is recorded, not fatal.
serving: N requests of P prompt tokens + G new tokens through the engine's continuous batching,
  against transformers' `generate_batch` on a Llama of the serving preset's shape.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_reference import (  # noqa: E402
    DenseDecoder,
    compiled_decoder,
    decode_bytes_per_token,
    decode_one_token,
    prefill,
    same_bytes_config,
)
from profiling import cuda_graph, kernel_table  # noqa: E402

import complexity  # noqa: E402
from complexity import complexity_kernels  # noqa: E402
from complexity.inference import Engine, SamplingParams  # noqa: E402
from complexity.inference.cache import SlotKVCache, attention_mask_decode  # noqa: E402
from complexity.inference.engine import COMPILED_DECODE_MAX_ROWS  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(preset: str, vocab: int, dtype, device, max_pos: int):
    cfg = complexity.ComplexityConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=max(max_pos, 2048))
    torch.manual_seed(0)
    return complexity.ComplexityForCausalLM(cfg).to(dtype=dtype, device=device).eval()


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    dt = (time.perf_counter() - t) / reps
    del x, y
    return 2 * nbytes / dt


def seq_capacity(prompt_len: int, new_tokens: int) -> int:
    """The decode cache length both sides attend over: prompt + new tokens, rounded up to 64."""
    return -(-(prompt_len + new_tokens + 1) // 64) * 64


# the column of StepsOtherAttentionWorker's steps
OTHER_ATTENTION = "with SDPA attention" if complexity_kernels.DECODE_ATTENTION else "with attention kernels"
STEP_ROUNDS = 3  # timed runs of a step comparison (the best is kept)


def time_steps(run_step, n: int, device, rounds: int = STEP_ROUNDS) -> float:
    """Seconds per call of run_step(), the best of `rounds` runs of n back-to-back calls."""
    best = math.inf
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            run_step()
        sync(device)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def profile_steps(run_step, n: int, top: int) -> dict:
    """Kernel table of n calls of run_step() (per call): kernel time, kernel count, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run_step()
        torch.cuda.synchronize()
    return kernel_table(prof, n, top)


def error_entry(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2500:]}


# ----------------------------------------------------------------------------- decode / prefill workers
#
# Each worker is one (preset, system) pair in its own process: `setup()` builds, compiles and
# warms up everything it will time (in parallel with the other workers), `measure()` runs when
# the parent hands it the GPU. Settings arrive as a plain dict (the parsed arguments).


class Worker:
    def __init__(self, preset: str, settings: dict):
        self.preset, self.s = preset, settings
        self.device = torch.device(settings["device"])
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings["dtype"]]
        self.graphs = self.device.type == "cuda" and not settings["no_graphs"]
        self.compile = self.device.type == "cuda" and not settings["no_compile"]
        self.max_len = seq_capacity(settings["prompt_len"], settings["decode_tokens"])
        self.gen = torch.Generator().manual_seed(1)

    def prompts(self, batch: int, length: int) -> torch.Tensor:
        return torch.randint(4, self.s["vocab"], (batch, length), generator=self.gen)

    def model(self, max_pos: int):
        return build_model(self.preset, self.s["vocab"], self.dtype, self.device, max_pos)


class EngineWorker(Worker):
    """Our engine at batch 1 (decode), `generate()` with a static cache (decode), the engine's
    prefill (prefill)."""

    def setup(self) -> dict:
        self.lm = self.model(max(self.s["prefill_lengths"] + [self.max_len]))
        self.lm.generation_config.pad_token_id = self.lm.config.pad_token_id
        self.prompt = self.prompts(1, self.s["prompt_len"])[0].tolist()
        info = {}
        if self.s["decode"]:
            t = time.perf_counter()
            self.engine = Engine(
                self.lm, None, max_batch=1, max_seq_len=self.max_len, cuda_graphs=self.graphs, compile=self.compile
            )
            self.params = SamplingParams(max_new_tokens=self.s["decode_tokens"], temperature=0, ignore_eos=True)
            self.engine.generate([self.prompt], self.params)  # warm-up (compile, allocator)
            info["engine_setup_s"] = time.perf_counter() - t
        return info

    def measure(self) -> dict:
        out = {}
        if self.s["decode"]:
            out["engine"] = self.engine_decode()
            # the same engine (its graphs and compiled step) reading the tokens every N steps
            self.engine.decode_steps = self.s["decode_steps"]
            out["engine_decode_steps"] = {**self.engine_decode(), "decode_steps": self.s["decode_steps"]}
            # and reading each step's tokens before launching the next (what async_decode saves)
            self.engine.decode_steps, self.engine.async_decode = 1, False
            out["engine_sync"] = self.engine_decode()
            del self.engine
            out["generate"] = self.hf_generate()
        if self.s["prefill"]:
            out["prefill"] = self.engine_prefill()
        return out

    def engine_decode(self) -> dict:
        n, runs = self.s["decode_tokens"], []
        for _ in range(self.s["repeats"]):
            sync(self.device)
            [done] = self.engine.generate([self.prompt], self.params)
            runs.append((n - 1) / (done.latency - done.time_to_first_token))
        return {
            "tokens_per_s": max(runs),
            "runs": runs,
            "graphs": self.engine.use_graphs,
            "compiled": self.engine.compile,
        }

    def hf_generate(self) -> dict:
        """model.generate(), static cache, eager: (n - 1) tokens / (time for n - time for 1)."""
        ids = torch.tensor([self.prompt], device=self.device)
        n = self.s["generate_tokens"]

        def timed(k):
            sync(self.device)
            t = time.perf_counter()
            self.lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                cache_implementation="static",
                eos_token_id=None,
                # eager, as reported: on CUDA a static cache makes generate() compile the forward
                # itself (minutes for the larger presets, and the figure would be a compiled one)
                disable_compile=True,
            )
            sync(self.device)
            return time.perf_counter() - t

        try:
            timed(2)  # warm-up
            runs = [(n - 1) / max(timed(n) - timed(1), 1e-9) for _ in range(2)]
            return {"tokens_per_s": max(runs), "runs": runs, "new_tokens": n, "compiled": False}
        except Exception as err:
            return error_entry(err)

    def engine_prefill(self) -> dict:
        """Prompt tokens / time to the first token, through the engine's prefill (eager); and with
        the attention given the explicit causal mask instead of its kernel's causal mode (what
        the engine did before it asked the model `causal_without_mask`)."""
        out = {}
        for batch, length in self.s["prefill_shapes"]:
            engine = Engine(
                self.lm,
                None,
                max_batch=batch,
                max_seq_len=max(length, 2),
                max_prefill_tokens=batch * length,
                cuda_graphs=False,
                compile=False,
            )
            prompts = self.prompts(batch, length).tolist()
            best = self.best_prefill_seconds(engine, prompts)
            engine.model.model.causal_without_mask = lambda *args: False  # the masked path
            masked = self.best_prefill_seconds(engine, prompts)
            del engine.model.model.causal_without_mask
            out[f"{batch}x{length}"] = {
                "tokens_per_s": batch * length / best,
                "seconds": best,
                "masked_tokens_per_s": batch * length / masked,
            }
            del engine
            gc.collect()
        return out

    def best_prefill_seconds(self, engine: Engine, prompts: list[list[int]]) -> float:
        params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
        engine.generate(prompts, params)  # warm-up
        best = math.inf
        for _ in range(self.s["repeats"]):
            sync(self.device)
            t = time.perf_counter()
            engine.generate(prompts, params)
            sync(self.device)
            best = min(best, time.perf_counter() - t)
        return best


class StepsWorker(Worker):
    """One decode step of our model at each batch: the engine's decode forward (slot cache rows
    0..B-1, the decode mask over the whole cache) plus the greedy pick, compiled as the engine
    compiles it (for batch 1 and a dynamic batch of 2 to COMPILED_DECODE_MAX_ROWS; the decode
    kernels' rows), eager past that, and captured as one CUDA graph per batch."""

    decode_kernels = True
    decode_attention = complexity_kernels.DECODE_ATTENTION  # the default (COMPLEXITY_DECODE_ATTENTION)
    decode_max_rows = complexity_kernels.DECODE_MAX_ROWS

    def setup(self) -> dict:
        complexity_kernels.DECODE_KERNELS = self.decode_kernels
        complexity_kernels.DECODE_ATTENTION = self.decode_attention
        complexity_kernels.DECODE_MAX_ROWS = self.decode_max_rows
        self.batches = self.s["batches"]
        self.lm = self.model(self.max_len)
        self.lm.model.validate_token_ids = False  # a host sync per step otherwise (the engine does the same)
        c = self.lm.config
        self.cache = SlotKVCache(
            c.num_hidden_layers,
            max(self.batches),
            c.num_key_value_heads,
            self.max_len,
            c.head_dim,
            self.dtype,
            self.device,
        )
        # the engine's decode mask takes the attended length as an int or (newer) as arange(kv_len)
        takes_range = "kv_range" in inspect.signature(attention_mask_decode).parameters
        self.kv_extent = torch.arange(self.max_len, device=self.device) if takes_range else self.max_len
        compiled = torch.compile(self.step, fullgraph=True) if self.compile else None
        self.runs = {}
        t = time.perf_counter()
        with torch.inference_mode():
            for b in self.batches:
                tokens = self.prompts(b, 1).to(self.device)
                pos = torch.full((b,), self.s["prompt_len"], device=self.device)
                # as the engine: compiled up to COMPILED_DECODE_MAX_ROWS rows, eager above
                step = compiled if compiled is not None and b <= COMPILED_DECODE_MAX_ROWS else self.step
                if step is compiled and b > 1:  # a declared range: the kernels' choice needs no guard
                    for x in (tokens, pos):
                        torch._dynamo.mark_dynamic(x, 0, min=2, max=COMPILED_DECODE_MAX_ROWS)
                graph = cuda_graph(step, tokens, pos) if self.graphs else None
                self.runs[b] = (graph, step, tokens, pos)
        return {"steps_setup_s": time.perf_counter() - t}

    def step(self, tokens, pos):
        self.cache.set_decode(pos, self.max_len)
        mask = attention_mask_decode(pos, self.kv_extent, self.lm.config.sliding_window, self.dtype)
        hidden = self.lm.model(
            input_ids=tokens, attention_mask=mask, position_ids=pos[:, None], past_key_values=self.cache, use_cache=True
        ).last_hidden_state
        tokens.copy_(self.lm.lm_head(hidden[:, -1]).argmax(-1, keepdim=True))
        pos.add_(1)

    def measure(self) -> dict:
        with torch.inference_mode():
            return {"steps": time_batches(self.runs, self.s, self.device)}


class StepsWithoutKernelsWorker(StepsWorker):
    """The same steps with the decode kernels and the decode attention switched off: the generic
    paths the engine ran before them, in the same run (and no extra compile past batch 8: without
    the kernels nothing branches on the row count)."""

    decode_kernels = False
    decode_attention = False


class StepsOtherAttentionWorker(StepsWorker):
    """The same steps with the decode attention the other way from the default: through SDPA where
    the decode attention kernels are on (COMPLEXITY_DECODE_ATTENTION), through them where they are
    off. What they change in a whole step, beside `bench_decode_kernels.py`'s attention alone."""

    decode_attention = not complexity_kernels.DECODE_ATTENTION


class StepsWithKernelsTo64RowsWorker(StepsWorker):
    """The same steps with the decode kernels taking up to 64 rows (DECODE_MAX_ROWS is 16): at 32
    rows, the kernels against the generic paths (sorted experts, grouped GEMMs) in an eager step."""

    decode_max_rows = 64


class ReferenceWorker(Worker):
    """decode_reference.DenseDecoder of the same weight bytes: batch-1 decode as gpt-fast runs it
    (prefill, then the step compiled with mode="reduce-overhead" in a loop), its step at each
    batch timed as ours is (compiled, one CUDA graph per batch, replayed back to back), its
    prefill."""

    def setup(self) -> dict:
        ours = self.model(self.max_len)
        self.bytes_per_token = decode_bytes_per_token(ours)
        self.config = same_bytes_config(ours)
        del ours
        self.ref = DenseDecoder(self.config).init_weights_().to(device=self.device, dtype=self.dtype).eval()
        info = {"reference_bytes_per_token": decode_bytes_per_token(self.ref)}
        if self.s["decode"]:
            t = time.perf_counter()
            self.ref.setup_caches(max(self.s["batches"]), self.max_len)
            self.loop_step = compiled_decoder() if self.compile else decode_one_token
            step = torch.compile(self.step, fullgraph=True) if self.compile else self.step
            with torch.inference_mode():
                self.decode_tokens_per_s()  # warm-up: compile, record the graph
                self.runs = {}
                for b in self.s["batches"]:
                    tokens = self.prompts(b, 1).to(self.device)
                    pos = torch.tensor([self.s["prompt_len"]], device=self.device)
                    graph = cuda_graph(step, tokens, pos) if self.graphs else None
                    self.runs[b] = (graph, step, tokens, pos)
            info["reference_setup_s"] = time.perf_counter() - t
        return info

    def step(self, tokens, pos):
        tokens.copy_(decode_one_token(self.ref, tokens, pos))
        pos.add_(1)

    def decode_tokens_per_s(self) -> float:
        """gpt-fast's loop at batch 1: prefill, then decode_tokens - 1 steps timed, the host never
        waiting for the device in between."""
        prompt = self.prompts(1, self.s["prompt_len"]).to(self.device)
        cur = prefill(self.ref, prompt)
        input_pos = torch.tensor([prompt.shape[1]], device=self.device)
        sync(self.device)
        t = time.perf_counter()
        for _ in range(self.s["decode_tokens"] - 1):
            cur = self.loop_step(self.ref, cur, input_pos).clone()
            input_pos += 1
        sync(self.device)
        return (self.s["decode_tokens"] - 1) / (time.perf_counter() - t)

    def measure(self) -> dict:
        out = {"bytes_per_token": self.bytes_per_token, "config": vars(self.config)}
        with torch.inference_mode():
            if self.s["decode"]:
                runs = [self.decode_tokens_per_s() for _ in range(self.s["repeats"])]
                out["decode"] = {"tokens_per_s": max(runs), "runs": runs, "compiled": self.compile}
                out["steps"] = time_batches(self.runs, self.s, self.device)
            if self.s["prefill"]:
                out["prefill"] = self.prefill()
        return out

    def prefill(self) -> dict:
        out = {}
        for batch, length in self.s["prefill_shapes"]:
            self.ref.setup_caches(batch, length)
            prompt = self.prompts(batch, length).to(self.device)
            prefill(self.ref, prompt)  # warm-up
            seconds = time_steps(
                lambda prompt=prompt: prefill(self.ref, prompt), 1, self.device, rounds=self.s["repeats"]
            )
            out[f"{batch}x{length}"] = {"tokens_per_s": batch * length / seconds, "seconds": seconds}
        return out


def time_batches(runs: dict, s: dict, device) -> dict:
    """tokens/s of a decode step at each batch: {batch: (graph or None, step, tokens, pos)}, each
    call advancing `pos` by one from the prompt length; a kernel table at batch 1 with --profile."""
    out = {}
    for b, (graph, step, tokens, pos) in runs.items():
        run = graph.replay if graph is not None else (lambda step=step, tokens=tokens, pos=pos: step(tokens, pos))
        pos.fill_(s["prompt_len"])
        seconds = time_steps(run, s["step_count"], device)
        entry = {"tokens_per_s": b / seconds, "step_ms": seconds * 1e3}
        if s["profile"] and b == 1 and device.type == "cuda":
            pos.fill_(s["prompt_len"])
            entry["profile"] = profile_steps(run, 16, s["profile_top"])
        out[str(b)] = entry
    return out


WORKERS = {
    "engine": EngineWorker,
    "steps": StepsWorker,
    "steps_off": StepsWithoutKernelsWorker,
    "steps_other_attention": StepsOtherAttentionWorker,
    "steps_rows64": StepsWithKernelsTo64RowsWorker,
    "reference": ReferenceWorker,
}


def worker_main(kind: str, preset: str, settings: dict, conn) -> None:
    """A worker process: set up, report ready, wait for the GPU, measure, report."""
    try:
        torch.set_num_threads(settings["threads"])
        worker = WORKERS[kind](preset, settings)
        info = worker.setup()
        conn.send(("ready", info))
    except BaseException as err:  # noqa: BLE001  (reported to the parent, which goes on)
        conn.send(("failed", error_entry(err)))
        return
    conn.recv()  # our turn on the GPU
    try:
        conn.send(("done", worker.measure()))
    except BaseException as err:  # noqa: BLE001
        conn.send(("done", error_entry(err)))


def receive(conn, proc, deadline: float):
    """The worker's next message, or a failure if it dies or stays silent until `deadline`."""
    while time.monotonic() < deadline:
        if conn.poll(1.0):
            try:
                return conn.recv()
            except EOFError:
                break
        if not proc.is_alive() and not conn.poll(0):
            break
    code = proc.exitcode
    return "failed", {"error": f"worker {'exited with code ' + str(code) if code is not None else 'timed out'}"}


def run_workers(jobs, settings: dict, args, device, results) -> dict:
    """Start every job's process at once (their set-ups run in parallel), then hand each the GPU
    in turn for its timed part."""
    ctx = multiprocessing.get_context("spawn")
    # Compiles run in every worker at once: one Triton compile thread each (inductor's default
    # pool per process would start cores x workers processes).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // len(jobs))))
    started = []
    for kind, preset in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(kind, preset, settings, child), daemon=True)
        proc.start()
        started.append((kind, preset, proc, parent))
    setup_deadline = time.monotonic() + args.setup_timeout
    status = {}
    for kind, preset, proc, conn in started:
        status[kind, preset] = receive(conn, proc, setup_deadline)
        print(
            f"[setup] {preset} {kind}: {status[kind, preset][0]} {json.dumps(status[kind, preset][1], default=str)[:400]}",
            flush=True,
        )
    if device.type == "cuda":  # every worker is idle now: the copy bandwidth without interference
        results["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    out = {}
    for kind, preset, proc, conn in started:
        state, info = status[kind, preset]
        entry = {"setup": info}
        if state == "ready":
            conn.send("go")
            entry.update(receive(conn, proc, time.monotonic() + args.measure_timeout)[1])
        out.setdefault(preset, {})[kind] = entry
        print(f"[measure] {preset} {kind}: {summary_line(entry)}", flush=True)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return out


def summary_line(entry: dict) -> str:
    keys = ("engine", "decode", "steps", "prefill", "error")
    return json.dumps({k: entry[k] for k in keys if k in entry}, default=str)[:600]


def part_decode_prefill(args, device, dtype, parts, results) -> None:
    kinds = ["engine", "reference"]
    if "decode" in parts:
        kinds += ["steps"] + ([] if args.no_kernels_off else ["steps_off"])
        # with the decode attention the other way (SDPA or the kernels), where the kernels can run
        attention = device.type in complexity_kernels._DECODE_DEVICES and not args.no_other_attention
        kinds += ["steps_other_attention"] if attention else []
        # with the decode kernels up to 64 rows, where a batch past 16 rows is measured
        wider = device.type in complexity_kernels._DECODE_DEVICES and any(16 < b <= 64 for b in args.batches)
        kinds += ["steps_rows64"] if wider and complexity_kernels.DECODE_MAX_ROWS < 64 else []
    jobs = [(kind, preset) for preset in args.models for kind in kinds]
    settings = {
        "device": str(device),
        "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype],
        "vocab": args.vocab,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "decode_steps": args.decode_steps,
        "generate_tokens": args.generate_tokens,
        "batches": args.batches,
        "step_count": args.step_count,
        "prefill_shapes": args.prefill_shapes,
        "prefill_lengths": [length for _, length in args.prefill_shapes],
        "repeats": args.repeats,
        "profile": args.profile,
        "profile_top": args.profile_top,
        "no_graphs": args.no_graphs,
        "no_compile": args.no_compile,
        "threads": args.threads or 1,
        "decode": "decode" in parts,
        "prefill": "prefill" in parts,
    }
    raw = run_workers(jobs, settings, args, device, results)
    bandwidth = results.get("copy_bandwidth_GBps", math.nan) * 1e9
    for entries in raw.values():
        ref = entries.get("reference", {})
        bytes_per_token = ref.get("setup", {}).get("reference_bytes_per_token")
        ours_bytes = ref.get("bytes_per_token")
        entries["bytes_per_token"] = ours_bytes
        entries["bound_tokens_per_s"] = bandwidth / ours_bytes if ours_bytes else None
        entries["reference_bytes_per_token"] = bytes_per_token
    results["decode_prefill"] = raw


def _percentiles(values):
    vals = sorted(values)
    if not vals:
        return None, None
    return statistics.median(vals), vals[min(len(vals) - 1, int(0.99 * len(vals)))]


def part_serving(args, device, dtype, results):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    out = {"requests": args.requests, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    model = build_model(args.serving_model, args.vocab, dtype, device, args.prompt_len + args.new_tokens)
    try:
        max_len = -(-(args.prompt_len + args.new_tokens + 1) // 64) * 64
        t0 = time.perf_counter()
        engine = Engine(
            model,
            None,
            max_batch=min(args.max_batch, args.requests),
            max_seq_len=max_len,
            cuda_graphs=device.type == "cuda" and not args.no_graphs,
            compile=device.type == "cuda" and args.compile_serving,
            max_prefill_tokens=args.max_prefill_tokens,
        )
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        engine.generate(prompts[: min(4, len(prompts))], params)  # warm-up
        setup = time.perf_counter() - t0
        sync(device)
        t = time.perf_counter()
        outs = engine.generate(prompts, params)
        sync(device)
        wall = time.perf_counter() - t
        gen = sum(len(o.token_ids) for o in outs)
        p50, p99 = _percentiles([o.time_to_first_token for o in outs])
        out["engine"] = {
            "generated_tokens_per_s": gen / wall,
            "wall_s": wall,
            "generated_tokens": gen,
            "ttft_p50_s": p50,
            "ttft_p99_s": p99,
            "max_batch": engine.max_batch,
            "setup_s": setup,
        }
        del engine
    except Exception as err:
        out["engine"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    print(f"[serving] engine: {out['engine']}", flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        out["hf_continuous_batching"] = hf_serving(args, prompts, device, dtype)
    except Exception as err:
        out["hf_continuous_batching"] = {
            "error": f"{type(err).__name__}: {err}",
            "trace": traceback.format_exc()[-2000:],
        }
    print(f"[serving] hf: {out['hf_continuous_batching']}", flush=True)
    results["serving"] = out


def hf_serving(args, prompts, device, dtype):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    base = complexity.ComplexityConfig.from_preset(args.serving_model)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    gcfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[: min(4, len(prompts))], generation_config=gcfg)  # warm-up
    sync(device)
    t = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gcfg, record_timestamps=True)
    sync(device)
    wall = time.perf_counter() - t
    gen = sum(len(o.generated_tokens) for o in res.values())
    ttft = [o.timestamps[0] - o.created_time for o in res.values() if getattr(o, "timestamps", None)]
    p50, p99 = _percentiles(ttft)
    return {
        "generated_tokens_per_s": gen / wall,
        "wall_s": wall,
        "generated_tokens": gen,
        "ttft_p50_s": p50,
        "ttft_p99_s": p99,
        "note": "ttft from GenerationOutput timestamps (created_time -> first token)",
    }


def part_check(args, device, results):
    """Greedy tokens of the engine with CUDA graphs (+ compile) == eager engine == model.generate,
    in float32 on small random models of several variants (catches capture bugs)."""
    out = {}
    variants = {
        "token_routed": {},
        "dense": dict(mlp_type="dense"),
        "inl": dict(mu_mode="inl"),
        "guidance_sw": dict(mu_mode="guidance", sliding_window=24, shared_expert=True),
        "learned_moe": dict(mlp_type="learned_moe"),
    }
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]
    for name, over in variants.items():
        entry = {}
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            cfg = complexity.ComplexityConfig.from_preset(
                "tiny", vocab_size=512, initializer_range=0.1, max_position_embeddings=256, **over
            )
            model = complexity.ComplexityForCausalLM(cfg).to(device=device, dtype=dtype).eval()
            params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
            key = str(dtype).removeprefix("torch.")
            try:
                eager = [
                    o.token_ids
                    for o in Engine(
                        model, None, max_batch=4, max_seq_len=128, cuda_graphs=False, compile=False
                    ).generate(prompts, params)
                ]
                graphs = [
                    o.token_ids
                    for o in Engine(
                        model, None, max_batch=4, max_seq_len=128, cuda_graphs=True, compile=not args.no_compile
                    ).generate(prompts, params)
                ]
                ref = []
                for p_ in prompts:
                    ids = torch.tensor([p_], device=device)
                    ref.append(
                        model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=48,
                            do_sample=False,
                            eos_token_id=None,
                        )[0, len(p_) :].tolist()
                    )

                def agree(a, b):
                    return sum(x == y for u, v in zip(a, b) for x, y in zip(u, v)) / sum(map(len, a))

                entry[key] = {
                    "graphs_eq_eager": graphs == eager,
                    "eager_eq_generate": eager == ref,
                    "token_agreement_graphs_vs_generate": agree(graphs, ref),
                }
            except Exception as err:
                entry[key] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
            torch._dynamo.reset()
            print(
                f"[check] {name} {key}: {entry[key] if 'error' not in entry[key] else entry[key]['error']}", flush=True
            )
        out[name] = entry
    results["check"] = out


def fmt(value, spec=",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def get(entry: dict, *keys):
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def ratio(a, b):
    return a / b if a and b else None


def tables(results: dict) -> str:
    """The compact tables printed last (and kept in the JSON)."""
    data = results.get("decode_prefill", {})
    lines = [
        f"device {results.get('device')}, torch {results.get('torch')}, transformers {results.get('transformers')}, "
        f"copy bandwidth {fmt(results.get('copy_bandwidth_GBps'))} GB/s"
    ]
    lines += [
        "",
        "batch-1 decode (tokens/s) | MB/token | bound | engine | reference | engine/ref | engine/bound % | "
        "engine, N steps per read | its /ref | engine, async off | its /ref | our step (GPU) | ref step (GPU) | "
        f"without decode kernels | {OTHER_ATTENTION} | generate()",
    ]
    for preset, e in data.items():
        engine, ref = get(e, "engine", "engine", "tokens_per_s"), get(e, "reference", "decode", "tokens_per_s")
        ahead = get(e, "engine", "engine_decode_steps", "tokens_per_s")
        in_turn = get(e, "engine", "engine_sync", "tokens_per_s")
        bound = e.get("bound_tokens_per_s")
        lines.append(
            " | ".join(
                [
                    preset,
                    fmt((e.get("bytes_per_token") or math.nan) / 1e6, ".1f"),
                    fmt(bound),
                    fmt(engine),
                    fmt(ref),
                    fmt(ratio(engine, ref), ".2f"),
                    fmt(100 * ratio(engine, bound) if ratio(engine, bound) else None, ".1f"),
                    fmt(ahead),
                    fmt(ratio(ahead, ref), ".2f"),
                    fmt(in_turn),
                    fmt(ratio(in_turn, ref), ".2f"),
                    fmt(get(e, "steps", "steps", "1", "tokens_per_s")),
                    fmt(get(e, "reference", "steps", "1", "tokens_per_s")),
                    fmt(get(e, "steps_off", "steps", "1", "tokens_per_s")),
                    fmt(get(e, "steps_other_attention", "steps", "1", "tokens_per_s")),
                    fmt(get(e, "engine", "generate", "tokens_per_s")),
                ]
            )
        )
    lines += [
        "",
        "decode step (tokens/s per step, GPU) | batch | ours | reference | ours/ref | without decode kernels | "
        f"{OTHER_ATTENTION} | kernels to 64 rows",
    ]
    for preset, e in data.items():
        for b in get(e, "steps", "steps") or {}:
            ours, ref = get(e, "steps", "steps", b, "tokens_per_s"), get(e, "reference", "steps", b, "tokens_per_s")
            lines.append(
                " | ".join(
                    [
                        preset,
                        b,
                        fmt(ours),
                        fmt(ref),
                        fmt(ratio(ours, ref), ".2f"),
                        fmt(get(e, "steps_off", "steps", b, "tokens_per_s")),
                        fmt(get(e, "steps_other_attention", "steps", b, "tokens_per_s")),
                        fmt(get(e, "steps_rows64", "steps", b, "tokens_per_s")),
                    ]
                )
            )
    lines += ["", "prefill (tokens/s) | batch x length | engine | engine, masked attention | reference"]
    for preset, e in data.items():
        for shape in get(e, "engine", "prefill") or {}:
            lines.append(
                " | ".join(
                    [
                        preset,
                        shape,
                        fmt(get(e, "engine", "prefill", shape, "tokens_per_s")),
                        fmt(get(e, "engine", "prefill", shape, "masked_tokens_per_s")),
                        fmt(get(e, "reference", "prefill", shape, "tokens_per_s")),
                    ]
                )
            )
    profiles = [
        (preset, kind, get(e, kind, "steps", "1", "profile"))
        for preset, e in data.items()
        for kind in ("steps", "steps_off", "steps_other_attention", "reference")
    ]
    if any(p for _, _, p in profiles):
        lines += ["", "batch-1 step kernels | system | kernels per step | kernel ms per step"]
        for preset, kind, p in profiles:
            if p:
                lines.append(f"{preset} | {kind} | {p['kernels_per_call']:.0f} | {p['kernel_ms']:.3f}")
    failures = [
        f"{preset} {kind}: {v['error']}"
        for preset, e in data.items()
        for kind, v in e.items()
        if isinstance(v, dict) and "error" in v
    ]
    failures += [
        f"{preset} {kind} setup: {v['setup']['error']}"
        for preset, e in data.items()
        for kind, v in e.items()
        if isinstance(v, dict) and isinstance(v.get("setup"), dict) and "error" in v["setup"]
    ]
    if failures:
        lines += ["", "failed:"] + failures
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in filter(None, text.split(",")):
        batch, _, length = item.partition("x")
        if not (batch.isdigit() and length.isdigit()):
            raise SystemExit(f"--prefill-shapes: {item!r} is not BATCHxLENGTH")
        shapes.append((int(batch), int(length)))
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parts",
        default="decode,prefill",
        help="comma list: decode, prefill, serving, check (graphs == eager == generate)",
    )
    p.add_argument("--models", default="base,tmlr-187m,pacific-prime", help="decode/prefill: presets (comma list)")
    p.add_argument("--batches", default="1,8,32,128", help="decode: batch sizes of the step comparison")
    p.add_argument("--prefill-shapes", default="1x2048,32x512", help="prefill: BATCHxLENGTH list")
    p.add_argument("--serving-model", default="base", help="serving part: preset (HF baseline is a Llama of its shape)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bf16 on cuda, float32 on cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=256, help="decode: tokens generated per batch-1 run")
    p.add_argument("--generate-tokens", type=int, default=32, help="decode: tokens per generate() run (eager, slow)")
    p.add_argument(
        "--decode-steps",
        type=int,
        choices=range(1, 65),
        default=8,
        metavar="N",
        help="decode: the batch-1 engine also with N decode steps per read of the tokens (default 8, at most 64)",
    )
    p.add_argument("--step-count", type=int, default=64, help="decode: steps per timed run of the step comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the best is kept)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="decode: kernel table of a batch-1 step (ours, without the decode kernels, the reference)",
    )
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--no-kernels-off", action="store_true", help="decode: skip the run without the decode kernels")
    p.add_argument(
        "--no-other-attention",
        action="store_true",
        help="decode: skip the run with the decode attention the other way (SDPA, or the kernels where they are off)",
    )
    p.add_argument("--setup-timeout", type=float, default=420, help="seconds for every worker to compile and warm up")
    p.add_argument("--measure-timeout", type=float, default=300, help="seconds for one worker's timed part")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=256, help="serving: engine cache slots")
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="decode: no torch.compile (either side)")
    p.add_argument("--compile-serving", action="store_true", help="serving: also torch.compile the engine's decode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in complexity.PRESETS]
    if unknown:
        raise SystemExit(f"--models: unknown preset {', '.join(unknown)}")
    args.batches = sorted({int(b) for b in args.batches.split(",") if b})
    steps_end = args.prompt_len + STEP_ROUNDS * args.step_count  # the timed steps advance one position each
    if steps_end >= seq_capacity(args.prompt_len, args.decode_tokens):
        raise SystemExit(
            f"--step-count: {STEP_ROUNDS} x {args.step_count} steps after a {args.prompt_len}-token prompt pass "
            f"the decode cache ({seq_capacity(args.prompt_len, args.decode_tokens)} positions, from --prompt-len "
            "and --decode-tokens): lower it or raise --decode-tokens"
        )
    args.prefill_shapes = parse_shapes(args.prefill_shapes)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = parts - {"decode", "prefill", "serving", "check"}
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        None: None,
    }[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "args": vars(args),
    }
    t = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every part, so a run cut short still leaves what it measured
        results["total_s"] = time.perf_counter() - t
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)

    if "check" in parts:
        part_check(args, device, results)
        save()
    if parts & {"decode", "prefill"}:
        part_decode_prefill(args, device, dtype, parts, results)
        results["tables"] = tables(results)
        save()
    if "serving" in parts:
        part_serving(args, device, dtype, results)
        save()
    print(
        json.dumps(
            {k: v for k, v in results.items() if k not in ("args", "decode_prefill", "tables")}, indent=2, default=str
        )[:4000]
    )
    if "tables" in results:
        print("\n" + results["tables"], flush=True)
    print(f"total {time.perf_counter() - t:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
