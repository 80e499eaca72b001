"""The Engine's decode with and without torch.compile, side by side at each batch size: the
measurement behind `COMPILED_DECODE_MAX_ROWS` (the engine compiles its decode step for batches up
to that many rows and replays the eager step above); and the engine's defaults with several
decode steps per read of the tokens (`--decode-steps`, the engine's `decode_steps`) against its
defaults with one, the measurement its default waits for.

    python benchmarks/bench_compile_choice.py --out results/compile_choice.json           # GPU
    python benchmarks/bench_compile_choice.py --device cpu --presets tiny --batches 1,4 \\
        --vocab 512 --prompt-len 8 --new-tokens 8 --out /tmp/compile_choice.json            # CPU smoke

For each preset (random weights, bf16 on CUDA) and batch B, an Engine with max_batch=B is built
with compile=False, with compile forced over every bucket (the batch range patched to B), and
with its defaults and decode_steps=N; B prompts decode `--new-tokens` greedy tokens each, and
tokens/s counts the decode steps only: (tokens generated after the first, per request) / (time
from the last first token to the end). CUDA graphs are on as the engine's defaults have them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import complexity  # noqa: E402
from complexity.inference import Engine, SamplingParams  # noqa: E402
from complexity.inference import engine as engine_module  # noqa: E402
from complexity.inference.args import positive_int  # noqa: E402


def batch_list(text: str) -> list[int]:
    """argparse type of --batches: a comma list of positive integers, sorted, each once."""
    return sorted({positive_int(b) for b in text.split(",") if b.strip()} or {positive_int(text)})


def preset_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in complexity.PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown preset {', '.join(unknown) or repr(text)} (choose from {', '.join(complexity.PRESETS)})"
        )
    return names


def decode_tokens_per_s(engine: Engine, prompts: list[list[int]], params: SamplingParams, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        done = engine.generate(prompts, params)
        first = max(d.time_to_first_token for d in done)  # every request decoding from here on
        end = max(d.latency for d in done)
        best = max(best, sum(len(d.token_ids) - 1 for d in done) / max(end - first, 1e-9))
    return best


def measure(preset: str, batch: int, compile_: bool | None, args, decode_steps: int = 1) -> dict:
    """compile_: False, True (forced at every bucket of this engine) or None (the defaults)."""
    cfg = complexity.ComplexityConfig.from_preset(preset, vocab_size=args.vocab, max_position_embeddings=2048)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = complexity.ComplexityForCausalLM(cfg).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, args.vocab, (batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    torch._dynamo.reset()
    saved = engine_module.COMPILED_DECODE_MAX_ROWS
    if compile_:
        engine_module.COMPILED_DECODE_MAX_ROWS = max(batch, saved)  # compiled at every bucket of this engine
    try:
        t = time.perf_counter()
        engine = Engine(
            model,
            None,
            max_batch=batch,
            max_seq_len=args.prompt_len + args.new_tokens + 1,
            compile=None if compile_ is None else (args.backend if compile_ else False),
            decode_steps=decode_steps,
        )
        engine.generate(prompts, params)  # warm-up
        setup = time.perf_counter() - t
        tokens_per_s = decode_tokens_per_s(engine, prompts, params, args.repeats)
    finally:
        engine_module.COMPILED_DECODE_MAX_ROWS = saved
    return {"tokens_per_s": tokens_per_s, "setup_s": setup, "compiled": engine.compile, "engine": engine.describe()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=preset_list, default="base,pacific-prime")
    p.add_argument("--batches", type=batch_list, default="1,16,64,256")
    p.add_argument("--vocab", type=positive_int, default=32000)
    p.add_argument("--prompt-len", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=positive_int, default=256)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled side")
    p.add_argument("--decode-steps", type=positive_int, default=8, help="decode steps per read on the third side")
    p.add_argument("--out", required=True, help="JSON results path")
    args = p.parse_args(argv)
    import transformers

    results = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "rows": [],
    }
    n = args.decode_steps
    print(
        f"{'preset':<16}{'batch':>6}{'eager tok/s':>14}{'compiled tok/s':>16}{'compiled/eager':>16}"
        f"{f'defaults, {n} steps':>20}{f'{n} steps / 1':>14}"
    )
    for preset in args.presets:
        for batch in args.batches:
            eager, compiled = (measure(preset, batch, c, args) for c in (False, True))
            ahead = measure(preset, batch, None, args, decode_steps=n)
            ratio = compiled["tokens_per_s"] / eager["tokens_per_s"]
            # the defaults with one step per read: the compiled or the eager side, as they chose
            single = compiled if ahead["compiled"] and batch <= engine_module.COMPILED_DECODE_MAX_ROWS else eager
            steps_ratio = ahead["tokens_per_s"] / single["tokens_per_s"]
            results["rows"].append(
                {
                    "preset": preset,
                    "batch": batch,
                    "eager": eager,
                    "compiled": compiled,
                    "compiled_over_eager": ratio,
                    "defaults_decode_steps": ahead,
                    "decode_steps_over_one": steps_ratio,
                }
            )
            print(
                f"{preset:<16}{batch:>6}{eager['tokens_per_s']:>14,.0f}{compiled['tokens_per_s']:>16,.0f}{ratio:>16.2f}"
                f"{ahead['tokens_per_s']:>20,.0f}{steps_ratio:>14.2f}",
                flush=True,
            )
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
