"""Training throughput benchmark (GPU): tokens/s, MFU and peak memory of one training step loop.

Same trainer settings for every arm: bf16-mixed autocast, fp32 master weights, torch.compile per
decoder layer in the default mode unless the arm says otherwise, seq 2048, micro-batch 8,
`--accum` micro-batches per optimizer step (gradient accumulation, default 4), fused AdamW, the
spike guard on (as by default), random tokens (data.synthetic).
Arms (all 768 hidden, 18 layers, 12 heads / 4 kv, vocab 32000, tied embeddings):

  complexity-tmlr-187m   token_routed (4 experts) + shared expert + mu guidance (zipf table:
                         the modulo table on random tokens, which is the same balance)
  complexity-tmlr-187m-separate-qkv   the same, q/k/v and mu's q/k/v as six separate projections
  complexity-dense       dense SwiGLU, no mu, intermediate_size 3242 (equal live parameters)
  hf-llama-dense         transformers LlamaForCausalLM of the dense arm's shape
  hf-mixtral-top1        transformers MixtralForCausalLM, 4 experts, top-1, expert width 512

Suffixes: -cudagraphs = training.compile_mode "reduce-overhead" (a CUDA graph per layer);
-model-cudagraphs = the same with compile_scope "model" (one graph for the whole model).

MFU = (6 * active_params + 12 * L * heads * head_dim * S) * tokens/s / peak, with the peak the
bf16 matmul throughput measured first (`complexity.train.metrics.measure_matmul_peak`, the same
peak the trainer reports MFU against).

    python benchmarks/bench_train.py --out results/bench_train.json [--steps 10] [--rounds 5] [--accum 4] [--arms a,b]

All arms are built first and stay on the GPU; tokens/s is the median over rounds of timed steps
in which the arms take turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from profiling import kernel_table

import complexity  # noqa: F401
from complexity.train import load_config
from complexity.train.metrics import MATMUL_PEAK, flops_per_token, measure_matmul_peak
from complexity.train.trainer import Trainer

L, H, HEADS, KV, V, S, MB = 18, 768, 12, 4, 32000, 2048, 8


def base_overrides(model: dict, steps: int, accum: int) -> dict:
    o = {f"model.{k}": v for k, v in model.items()}
    o.update(
        {
            "data.synthetic": True,
            "training.max_steps": steps,
            "training.micro_batch_size": MB,
            "training.seq_len": S,
            "training.tokens_per_step": MB * S * accum,
            "training.precision": "bf16-mixed",
            "training.compile": True,
            "training.compile_scope": "layers",
            "training.compile_mode": "default",
            "training.device": "cuda",
            "schedule.warmup_steps": 1,
            "checkpoint.every": 0,
            "checkpoint.export_final": False,
            "eval.every": 0,
            "eval.at_end": False,
            "logging.tensorboard": False,
            "logging.progress": False,
        }
    )
    return o


def active_params(model, top_k: int | None = None, num_experts: int | None = None) -> int:
    total = sum(p.numel() for p in model.parameters())
    if not top_k:
        return total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - expert + expert * top_k // num_experts


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=3242,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=S,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        return LlamaForCausalLM(c)


def hf_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    c = MixtralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=512,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=S,
        tie_word_embeddings=True,
        num_local_experts=4,
        num_experts_per_tok=1,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        return MixtralForCausalLM(c)


TMLR = {"preset": "tmlr-187m"}
DENSE = {
    "preset": "tmlr-187m",
    "mlp_type": "dense",
    "mu_mode": "none",
    "shared_expert": False,
    "intermediate_size": 3242,
}
GRAPHS = {"compile_mode": "reduce-overhead"}  # CUDA graphs, per layer
MODEL_GRAPHS = {"compile_mode": "reduce-overhead", "compile_scope": "model"}  # one graph per direction
MODEL = {"compile_scope": "model"}  # one graph, kernels launched
ARMS = {
    "complexity-tmlr-187m": dict(model=TMLR),
    # The same model with q/k/v and mu's q/k/v as six separate projections: what the fused GEMM buys.
    "complexity-tmlr-187m-separate-qkv": dict(model=TMLR, separate_qkv=True),
    "complexity-tmlr-187m-cudagraphs": dict(model=TMLR, training=GRAPHS),
    "complexity-tmlr-187m-model-cudagraphs": dict(model=TMLR, training=MODEL_GRAPHS),
    "complexity-tmlr-187m-model": dict(model=TMLR, training=MODEL),
    "complexity-dense": dict(model=DENSE),
    "complexity-dense-cudagraphs": dict(model=DENSE, training=GRAPHS),
    "complexity-dense-model-cudagraphs": dict(model=DENSE, training=MODEL_GRAPHS),
    "hf-llama-dense": dict(model=DENSE, factory=hf_llama),
    "hf-llama-dense-cudagraphs": dict(model=DENSE, factory=hf_llama, training=GRAPHS),
    "hf-llama-dense-model-cudagraphs": dict(model=DENSE, factory=hf_llama, training=MODEL_GRAPHS),
    "hf-mixtral-top1": dict(
        model={"preset": "tmlr-187m", "mlp_type": "learned_moe", "mu_mode": "none", "shared_expert": False},
        factory=hf_mixtral,
        top_k=(1, 4),
    ),
}


def build_arm(name: str, spec: dict, total_steps: int, warmup: int, accum: int):
    """Build one arm's trainer and run its warm-up steps (compilation happens here). Returns the
    trainer and its static facts; its peak memory is its own (allocations before it excluded)."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    overrides = base_overrides(spec["model"], total_steps, accum)
    overrides.update({f"training.{k}": v for k, v in spec.get("training", {}).items()})
    cfg = load_config(None, overrides)
    model = None
    if spec.get("factory") is not None:  # another architecture through the same training step
        torch.manual_seed(cfg.training.seed)
        model = spec["factory"]()
    trainer = Trainer(cfg, out_dir=None, model=model, progress=False)
    if spec.get("separate_qkv"):
        for layer in trainer.model.model.layers:
            layer.self_attn.fuse_min_rows = 2**62
    if spec.get("factory") is None:
        n_active = trainer.active_params
    else:
        k, e = spec.get("top_k", (None, None))
        n_active = active_params(trainer.model, k, e)
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    facts = {
        "arm": name,
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "active_params": n_active,
        "flops_per_token": flops_per_token(n_active, L, HEADS, H // HEADS, S),
        "warmup_steps": warmup,
        "warmup_s": time.perf_counter() - t0,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }
    return trainer, facts


def time_steps(trainer, steps: int) -> tuple[float, float]:
    """(seconds per step, last loss) over `steps` steps."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    trainer.settle()  # waits for the last step, as the trainer does at a log step
    return (time.perf_counter() - t) / steps, trainer.losses[trainer.step]


def profile_steps(trainer, steps: int, top: int = 30) -> dict:
    """Wall time and GPU kernel time per step (torch profiler), and the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile

    trainer.settle()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        trainer.settle()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    table = kernel_table(prof, steps, top)
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "kernel_ms_per_step": table["kernel_ms"],
        "kernels_per_step": table["kernels_per_call"],
        "kernels": [{"name": k["name"], "ms_per_step": k["ms"], "calls_per_step": k["calls"]} for k in table["top"]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds of timed steps, the arms interleaved")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation) per arm")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--accum", type=int, default=4, help="micro-batches of 8 x 2048 per optimizer step")
    p.add_argument("--profile", default="", help="arms to profile after the rounds (kernel time per step, top kernels)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_matmul_peak(torch.device("cuda"))
    print(f"{MATMUL_PEAK}: {peak / 1e12:.1f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mfu_peak_flops": peak,
        "mfu_peak": MATMUL_PEAK,
        "seq_len": S,
        "micro_batch": MB,
        "grad_accum": args.accum,
        "tokens_per_step": MB * S * args.accum,
        "precision": "bf16-mixed",
        "compile": True,
        "arms": [],
    }
    # Every arm stays resident, and the timed steps are interleaved over rounds: the machine's
    # speed drifts by tens of percent over minutes (background compile workers, clocks), which
    # sequential runs would charge to whichever arm ran at the bad moment.
    names = args.arms.split(",")
    trainers, facts = {}, {}
    total = args.warmup + (args.rounds + 1) * args.steps + 1  # + the profiled steps
    for name in list(names):
        try:
            trainers[name], facts[name] = build_arm(name, ARMS[name], total, args.warmup, args.accum)
        except Exception as e:  # one arm failing (e.g. a compile mode) must not lose the others
            names.remove(name)
            results.setdefault("failed_arms", {})[name] = f"{type(e).__name__}: {e}"[:2000]
            print(json.dumps({"arm": name, "failed": results["failed_arms"][name]}), flush=True)
            continue
        print(json.dumps(facts[name]), flush=True)
    rounds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            step_s, loss = time_steps(trainers[name], args.steps)
            rounds[name].append(step_s)
            facts[name]["final_loss"] = loss
    for name in names:
        step_s = statistics.median(rounds[name])
        tps = MB * S * args.accum / step_s
        fpt = facts[name]["flops_per_token"]
        r = {
            **facts[name],
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "step_time_s_rounds": rounds[name],
            "step_time_s": step_s,
            "tokens_per_s": tps,
            "mfu": fpt * tps / peak,
        }
        print(json.dumps(r), flush=True)
        results["arms"].append(r)
    # Arms of one model under different compile settings start from the same weights and see the
    # same batches: their losses must agree up to bf16 rounding (CUDA graphs change no numerics).
    groups = {}
    for name in names:
        spec = ARMS[name]
        groups.setdefault((json.dumps(spec["model"], sort_keys=True), spec.get("factory")), []).append(name)
    for group in groups.values():
        ref = trainers[group[0]].losses
        for name in group[1:]:
            losses = trainers[name].losses
            common = sorted(set(ref) & set(losses))
            worst = max(abs(losses[k] - ref[k]) / abs(ref[k]) for k in common)
            results.setdefault("loss_agreement", {})[f"{name} vs {group[0]}"] = {
                "steps": len(common),
                "max_relative_difference": worst,
            }
    print(json.dumps({"loss_agreement": results.get("loss_agreement", {})}), flush=True)
    for name in [n for n in args.profile.split(",") if n]:
        results.setdefault("profiles", {})[name] = profile_steps(trainers[name], args.steps)
        print(
            json.dumps({"profile": name, **{k: v for k, v in results["profiles"][name].items() if k != "kernels"}}),
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
