"""Model-core benchmarks (GPU): the token-routed MLP against a dense SwiGLU of equal active FLOPs,
and forward+backward of the whole tmlr-187m model, eager and compiled.

    python benchmarks/bench_model.py --out results.json

Measured side by side in one process: CUDA events around N timed iterations after warm-up,
the variants interleaved over several rounds. The MLP is timed twice: launched from Python (what
an eager loop pays, kernel launches included) and replayed from a CUDA graph (the GPU's own time;
at 16k tokens the MLP's kernels are short enough that launching them from Python can take longer
than running them). Also checks on the device that the grouped-GEMM dispatch agrees with a
per-expert reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from profiling import cuda_graph, kernel_table

import complexity
from complexity import ComplexityConfig, ComplexityForCausalLM
from complexity.modeling_complexity import ComplexityMLP, ComplexityTokenRoutedMLP, Routing, dispatch_by_expert


def cuda_time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_breakdown(fn, iters: int = 20, top: int = 15) -> dict:
    """GPU time per call of `fn` by kernel (torch profiler): where a variant's time goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, iters, top, name_len=100)


class NaiveRoutedMLP(torch.nn.Module):
    """The obvious implementation: a Python loop over experts with boolean-mask gathers."""

    def __init__(self, routed: ComplexityTokenRoutedMLP):
        super().__init__()
        self.routed = routed

    def forward(self, x, routing):
        flat, ids = x.reshape(-1, x.shape[-1]), routing.expert_ids.reshape(-1)
        out = torch.zeros_like(flat)
        experts = self.routed.experts
        for e in range(experts.num_experts):
            rows = (ids == e).nonzero(as_tuple=True)[0]
            h = flat[rows] @ experts.gate_up_proj[e]
            gate, up = h.chunk(2, dim=-1)
            out.index_copy_(0, rows, (F.silu(gate) * up) @ experts.down_proj[e])
        if self.routed.shared_expert is not None:
            out = out + self.routed.shared_expert(flat)
        return out.view_as(x), None


def bench_mlp(tokens: int, results: dict, profile: bool = False) -> None:
    dtype, device = torch.bfloat16, "cuda"
    config = ComplexityConfig.from_preset("tmlr-187m")  # H 768, E 4, expert 512, shared 512
    routed = ComplexityTokenRoutedMLP(config).to(device, dtype)
    for p in routed.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = ComplexityMLP(config.hidden_size, config.expert_width + config.shared_expert_width).to(device, dtype)
    naive = NaiveRoutedMLP(routed)
    x = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    expert_ids = ids % config.num_experts
    # In the model the grouping is computed once per forward and shared by every layer.
    dispatch = dispatch_by_expert(expert_ids.reshape(-1), config.num_experts)
    per_layer, given = Routing(ids, expert_ids), Routing(ids, expert_ids, dispatch)

    # Correctness on the device: grouped GEMM dispatch == per-expert loop.
    with torch.no_grad():
        a, b = routed(x, per_layer)[0], naive(x, per_layer)[0]
    results["mlp_grouped_vs_loop_max_abs_diff"] = (a.float() - b.float()).abs().max().item()

    def step(module, *args, **kwargs):
        def run():
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad_out)

        return run

    compiled_dense = torch.compile(dense, fullgraph=True)
    compiled_routed = torch.compile(routed, fullgraph=True)
    launched = {
        "dense_swiglu_1024": step(dense, x),
        "token_routed_grouped": step(routed, x, per_layer),
        "token_routed_grouped_given_dispatch": step(routed, x, given),
        "token_routed_naive_loop": step(naive, x, per_layer),
        "dense_swiglu_1024_compiled": step(compiled_dense, x),
        "token_routed_grouped_compiled": step(compiled_routed, x, per_layer),
        "token_routed_grouped_given_dispatch_compiled": step(compiled_routed, x, given),
    }
    # The naive loop reads its group sizes on the host (nonzero): it cannot be captured.
    graphed = {name: cuda_graph(fn).replay for name, fn in launched.items() if "naive" not in name}
    variants = {**{f"launch/{k}": v for k, v in launched.items()}, **{f"graph/{k}": v for k, v in graphed.items()}}
    # The GPU is shared and noisy: interleave the variants over several rounds, keep medians.
    rounds = {name: [] for name in variants}
    for _ in range(7):
        for name, fn in variants.items():
            rounds[name].append(cuda_time_ms(fn, warmup=3, iters=30))
    timings = {name: statistics.median(values) for name, values in rounds.items()}
    results["mlp_fwd_bwd_ms"] = timings
    results["mlp_fwd_bwd_ms_all_rounds"] = rounds
    ratios = {}
    for mode in ("launch", "graph"):
        for suffix in ("", "_compiled"):
            dense_ms = timings[f"{mode}/dense_swiglu_1024{suffix}"]
            ratios[f"{mode}/routed_over_dense{suffix}"] = timings[f"{mode}/token_routed_grouped{suffix}"] / dense_ms
            ratios[f"{mode}/routed_given_dispatch_over_dense{suffix}"] = (
                timings[f"{mode}/token_routed_grouped_given_dispatch{suffix}"] / dense_ms
            )
    results["mlp_ratios"] = ratios
    if profile:
        results["mlp_kernels"] = {name: kernel_breakdown(launched[name]) for name in launched if "compiled" in name}


def bench_model(batch: int, seq: int, results: dict) -> None:
    torch.manual_seed(0)
    model = ComplexityForCausalLM(ComplexityConfig.from_preset("tmlr-187m")).cuda()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def run(m):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()

        return step

    timings = {"eager": cuda_time_ms(run(model), warmup=3, iters=10)}
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    run(compiled)()
    torch.cuda.synchronize()
    results["model_compile_s"] = time.perf_counter() - t0
    timings["compiled"] = cuda_time_ms(run(compiled), warmup=3, iters=10)
    results["model_fwd_bwd_ms"] = timings
    tokens = batch * seq
    results["model_tokens_per_s"] = {k: tokens / (v / 1e3) for k, v in timings.items()}
    results["model_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


def check_cuda_numerics(results: dict) -> None:
    """Cached vs full forward on the GPU for the main variants, bf16 and fp32."""
    checks = {}
    for name, overrides in {
        "routed-shared-mu": dict(shared_expert=True, mu_mode="guidance"),
        "inl": dict(mu_mode="inl"),
        "learned": dict(mlp_type="learned_moe"),
    }.items():
        for dtype in (torch.float32, torch.bfloat16):
            cfg = ComplexityConfig(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **overrides,
            )
            torch.manual_seed(0)
            m = ComplexityForCausalLM(cfg).cuda().to(dtype).eval()
            ids = torch.randint(0, 512, (2, 32), device="cuda")
            with torch.no_grad():
                full = m(ids).logits.float()
                out = m(ids[:, :16], use_cache=True)
                pieces, cache = [out.logits.float()], out.past_key_values
                for t in range(16, 32):
                    out = m(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    pieces.append(out.logits.float())
                    cache = out.past_key_values
                diff = (torch.cat(pieces, 1) - full).abs().max().item()
            checks[f"{name}/{str(dtype).split('.')[-1]}"] = diff
    results["cuda_cached_vs_full_max_abs_diff"] = checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default="bench_model.json")
    parser.add_argument("--parts", default="check,mlp,model", help="comma-separated subset of check, mlp, model")
    parser.add_argument("--profile", action="store_true", help="also break the compiled MLPs' GPU time down by kernel")
    args = parser.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "complexity": complexity.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "grouped_mm_available": hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm"),
    }
    parts = set(args.parts.split(","))
    if "check" in parts:
        check_cuda_numerics(results)
    if "mlp" in parts:
        bench_mlp(args.tokens, results, args.profile)
    if "model" in parts:
        bench_model(args.batch, args.seq, results)
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
