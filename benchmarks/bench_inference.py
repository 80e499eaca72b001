"""Inference benchmarks: batch-1 decode speed and continuous-batching throughput.

    # GPU (H100): both parts, both models, results to JSON
    python benchmarks/bench_inference.py --out runs/bench_inference.json
    # CPU smoke test (tiny shapes, eager)
    python benchmarks/bench_inference.py --device cpu --models tiny --vocab 512 --requests 8 \
        --prompt-len 16 --new-tokens 16 --decode-tokens 32 --out /tmp/bench.json

(a) decode: tokens/s at batch 1 for each model (random weights, bf16 on CUDA) with our Engine
    (CUDA graphs, + torch.compile unless --no-compile) against `model.generate()` with
    cache_implementation="static" and a torch.compile'd forward; plus the memory-bandwidth bound
    (weight bytes read per token / measured device copy bandwidth). For token-routed models a
    batch-1 token reads one expert per layer, so both bounds (all weights, active weights) are given.
(b) serving: N requests of P prompt tokens + G new tokens submitted at once through the
    Engine's continuous batching (generated tokens/s, time-to-first-token p50/p99), against
    transformers' continuous batching (`generate_batch`) on a LlamaForCausalLM of the base shape.

Every part is bounded (sizes are flags) and failures of a baseline are recorded, not fatal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import complexity  # noqa: E402
from complexity.inference import Engine, SamplingParams  # noqa: E402

MODEL_PRESETS = {"base": "base", "pacific-prime": "pacific-prime", "tiny": "tiny", "small": "small"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(preset: str, vocab: int, dtype, device, max_pos: int):
    cfg = complexity.ComplexityConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=max(max_pos, 2048))
    with torch.device("meta"):
        pass
    torch.manual_seed(0)
    model = complexity.ComplexityForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    return model


def weight_bytes(model) -> tuple[int, int]:
    """(all weight bytes, bytes one batch-1 token reads: a single expert per routed layer)."""
    total = active = 0
    seen = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:  # tied embedding / lm_head counted once
            continue
        seen.add(p.data_ptr())
        b = p.numel() * p.element_size()
        total += b
        if ".experts." in name and model.config.mlp_type != "dense":
            b = b * max(1, model.config.num_experts_per_tok if model.config.mlp_type == "learned_moe" else 1) // model.config.num_experts
        active += b
    return total, active


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


def bench_engine_decode(model, prompt, n_new, device, use_graphs, use_compile):
    max_len = -(-(len(prompt) + n_new + 1) // 64) * 64
    t0 = time.perf_counter()
    engine = Engine(model, None, max_batch=1, max_seq_len=max_len, cuda_graphs=use_graphs, compile=use_compile)
    params = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up (compile, allocator)
    setup = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        sync(device)
        [out] = engine.generate([prompt], params)
        sync(device)
        runs.append((n_new - 1) / (out.latency - out.time_to_first_token))
    res = {"tokens_per_s": max(runs), "runs": runs, "setup_s": setup, "graphs": engine.use_graphs,
           "compiled": engine.compile}
    del engine
    return res


def bench_hf_decode_isolated(args, name, prompt, device, use_compile):
    """Run the HF baseline in a fresh process: its reduce-overhead compile segfaulted on
    torch 2.11 / H100 with this model, which must not take the whole benchmark down. Falls back to
    compile mode "default" (no CUDA graphs) if the first attempt dies."""
    import subprocess
    import tempfile

    attempts = []
    for mode in ([args.hf_compile_mode, "default"] if use_compile else ["none"]):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--hf-decode-worker", name, "--hf-compile-mode", mode,
               "--vocab", str(args.vocab), "--device", str(device), "--prompt-len", str(args.prompt_len),
               "--decode-tokens", str(args.decode_tokens), "--out", path] + (["--dtype", args.dtype] if args.dtype else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.part_timeout)
        if proc.returncode == 0:
            with open(path) as f:
                res = json.load(f)
            res["compile_mode"] = mode
            res["failed_attempts"] = attempts
            return res
        attempts.append({"compile_mode": mode, "returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:]})
    return {"error": "all attempts failed", "failed_attempts": attempts}


def bench_hf_decode(model, prompt, n_new, device, use_compile, mode="reduce-overhead"):
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    orig_forward = model.forward
    if use_compile:
        model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    kw = dict(attention_mask=mask, do_sample=False, cache_implementation="static", eos_token_id=None,
              pad_token_id=model.config.pad_token_id)
    try:
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up / compile
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        setup = time.perf_counter() - t0

        def timed(n):
            sync(device)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync(device)
            return time.perf_counter() - t

        runs = []
        for _ in range(3):
            t1, tn = timed(1), timed(n_new)
            runs.append((n_new - 1) / max(tn - t1, 1e-9))
        return {"tokens_per_s": max(runs), "runs": runs, "setup_s": setup, "compiled": use_compile}
    finally:
        model.forward = orig_forward


def part_decode(args, device, dtype, results):
    bw = copy_bandwidth(device)
    results["copy_bandwidth_GBps"] = bw / 1e9
    out = {}
    for name in args.models:
        g = torch.Generator().manual_seed(1)
        model = build_model(MODEL_PRESETS.get(name, name), args.vocab, dtype, device, args.prompt_len + args.decode_tokens)
        prompt = torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist()
        total, active = weight_bytes(model)
        entry = {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": total,
                 "active_weight_bytes_per_token": active,
                 "bandwidth_bound_tokens_per_s_all_weights": bw / total,
                 "bandwidth_bound_tokens_per_s_active_weights": bw / active}
        use_graphs = device.type == "cuda" and not args.no_graphs
        use_compile = device.type == "cuda" and not args.no_compile
        # the HF baseline runs in a subprocess: generate(static cache) + compile(reduce-overhead)
        # segfaulted on this model with torch 2.11 / transformers 5.17 on an H100
        for key, fn in (("hf_generate_static", lambda: bench_hf_decode_isolated(args, name, prompt, device, use_compile)),
                        ("engine", lambda: bench_engine_decode(model, prompt, args.decode_tokens, device, use_graphs, use_compile))):
            try:
                entry[key] = fn()
            except Exception as err:
                entry[key] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()
            print(f"[decode] {name} {key}: {entry[key].get('tokens_per_s', entry[key].get('error'))}", flush=True)
        if "tokens_per_s" in entry.get("engine", {}):
            entry["engine_fraction_of_bound_active"] = entry["engine"]["tokens_per_s"] / entry["bandwidth_bound_tokens_per_s_active_weights"]
        out[name] = entry
        del model
        gc.collect()
    results["decode"] = out


def _percentiles(values):
    vals = sorted(values)
    if not vals:
        return None, None
    return statistics.median(vals), vals[min(len(vals) - 1, int(0.99 * len(vals)))]


def part_serving(args, device, dtype, results):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    out = {"requests": args.requests, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    model = build_model(MODEL_PRESETS.get(args.serving_model, args.serving_model), args.vocab, dtype, device,
                        args.prompt_len + args.new_tokens)
    try:
        max_len = -(-(args.prompt_len + args.new_tokens + 1) // 64) * 64
        t0 = time.perf_counter()
        engine = Engine(model, None, max_batch=min(args.max_batch, args.requests), max_seq_len=max_len,
                        cuda_graphs=device.type == "cuda" and not args.no_graphs,
                        compile=device.type == "cuda" and args.compile_serving,
                        max_prefill_tokens=args.max_prefill_tokens)
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
        out["engine"] = {"generated_tokens_per_s": gen / wall, "wall_s": wall, "generated_tokens": gen,
                         "ttft_p50_s": p50, "ttft_p99_s": p99, "max_batch": engine.max_batch, "setup_s": setup}
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
        out["hf_continuous_batching"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    print(f"[serving] hf: {out['hf_continuous_batching']}", flush=True)
    results["serving"] = out


def hf_serving(args, prompts, device, dtype):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    base = complexity.ComplexityConfig.from_preset(MODEL_PRESETS.get(args.serving_model, args.serving_model))
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
                      num_hidden_layers=base.num_hidden_layers, num_attention_heads=base.num_attention_heads,
                      num_key_value_heads=base.num_key_value_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    gcfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    model.generate_batch(inputs=prompts[: min(4, len(prompts))], generation_config=gcfg)  # warm-up
    sync(device)
    t = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gcfg, record_timestamps=True)
    sync(device)
    wall = time.perf_counter() - t
    gen = sum(len(o.generated_tokens) for o in res.values())
    ttft = [o.timestamps[0] - o.created_time for o in res.values() if getattr(o, "timestamps", None)]
    p50, p99 = _percentiles(ttft)
    return {"generated_tokens_per_s": gen / wall, "wall_s": wall, "generated_tokens": gen, "ttft_p50_s": p50,
            "ttft_p99_s": p99, "note": "ttft from GenerationOutput timestamps (created_time -> first token)"}


def part_check(args, device, results):
    """Greedy tokens of the engine with CUDA graphs (+ compile) == eager engine == model.generate,
    in float32 on small random models of several variants (catches capture bugs)."""
    out = {}
    variants = {"token_routed": {}, "dense": dict(mlp_type="dense"), "inl": dict(mu_mode="inl"),
                "guidance_sw": dict(mu_mode="guidance", sliding_window=24, shared_expert=True),
                "learned_moe": dict(mlp_type="learned_moe")}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]
    for name, over in variants.items():
        entry = {}
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            cfg = complexity.ComplexityConfig.from_preset("tiny", vocab_size=512, initializer_range=0.1,
                                                          max_position_embeddings=256, **over)
            model = complexity.ComplexityForCausalLM(cfg).to(device=device, dtype=dtype).eval()
            params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
            key = str(dtype).removeprefix("torch.")
            try:
                eager = [o.token_ids for o in Engine(model, None, max_batch=4, max_seq_len=128, cuda_graphs=False,
                                                      compile=False).generate(prompts, params)]
                graphs = [o.token_ids for o in Engine(model, None, max_batch=4, max_seq_len=128, cuda_graphs=True,
                                                      compile=not args.no_compile).generate(prompts, params)]
                ref = []
                for p_ in prompts:
                    ids = torch.tensor([p_], device=device)
                    ref.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                              do_sample=False, eos_token_id=None)[0, len(p_):].tolist())
                agree = lambda a, b: sum(x == y for u, v in zip(a, b) for x, y in zip(u, v)) / sum(map(len, a))
                entry[key] = {"graphs_eq_eager": graphs == eager, "eager_eq_generate": eager == ref,
                              "token_agreement_graphs_vs_generate": agree(graphs, ref)}
            except Exception as err:
                entry[key] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
            torch._dynamo.reset()
            print(f"[check] {name} {key}: {entry[key] if 'error' not in entry[key] else entry[key]['error']}", flush=True)
        out[name] = entry
    results["check"] = out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="decode,serving", help="comma list: check (graphs == eager == generate), decode, serving")
    p.add_argument("--models", default="base,pacific-prime", help="decode part: presets (comma list)")
    p.add_argument("--serving-model", default="base", help="serving part: preset (HF baseline is a Llama of its shape)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bf16 on cuda, float32 on cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=256, help="decode part: tokens generated per run")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=256, help="serving: engine cache slots")
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="decode part: skip torch.compile (both sides)")
    p.add_argument("--compile-serving", action="store_true", help="serving: also torch.compile the engine's decode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hf-compile-mode", default="reduce-overhead", help="torch.compile mode of the HF baseline")
    p.add_argument("--part-timeout", type=int, default=600, help="seconds for one isolated baseline run")
    p.add_argument("--hf-decode-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, None: None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.hf_decode_worker:  # internal: one isolated HF decode measurement
        name = args.hf_decode_worker
        g = torch.Generator().manual_seed(1)
        model = build_model(MODEL_PRESETS.get(name, name), args.vocab, dtype, device, args.prompt_len + args.decode_tokens)
        prompt = torch.randint(4, args.vocab, (args.prompt_len,), generator=g).tolist()
        mode = args.hf_compile_mode
        res = bench_hf_decode(model, prompt, args.decode_tokens, device, mode != "none", mode)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return 0
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": str(dtype), "args": vars(args)}
    import transformers

    results["transformers"] = transformers.__version__
    t = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every part, so a run cut short still leaves what it measured
        results["total_s"] = time.perf_counter() - t
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)

    if "check" in parts:
        part_check(args, device, results)
        save()
    if "decode" in parts:
        part_decode(args, device, dtype, results)
        save()
    if "serving" in parts:
        part_serving(args, device, dtype, results)
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2, default=lambda o: str(o))[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
