"""The engine's command-line flags, defined once for `complexity generate` and `complexity serve`.

add_engine_args(parser)          # --device --dtype --max-seq-len ... --eager / --no-compile
Engine.from_pretrained(path, **engine_kwargs(args))
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type of a positive integer flag (the commands' own flags use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type of a duration flag: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text}")
    return value


def _decode_steps(text: str) -> int:
    """argparse type of --decode-steps: checked against the engine's bound while the flags are
    parsed, before any weights load. The engine (and torch) is imported here, not at the top, so
    that `--help` stays free of torch."""
    from .engine import MAX_DECODE_STEPS

    value = positive_int(text)
    if value > MAX_DECODE_STEPS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_DECODE_STEPS}], got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def add_engine_args(parser: argparse.ArgumentParser, *, batch: bool = True) -> None:
    """The flags of `Engine.from_pretrained`. `batch=False` leaves out the batching flags (one
    request at a time: `complexity generate`)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu), float32, bfloat16, float16")
    g.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="per-slot context in tokens (default: the model's max_position_embeddings)",
    )
    if batch:
        g.add_argument(
            "--max-batch",
            type=positive_int,
            default=None,
            help="cache slots = largest decode batch (default: sized from free GPU memory, at most 256; 16 on the CPU)",
        )
        g.add_argument(
            "--max-prefill-tokens",
            type=positive_int,
            default=8192,
            help="padded prompt tokens per prefill forward (default 8192)",
        )
        g.add_argument(
            "--gpu-memory-utilization",
            type=_fraction,
            default=0.9,
            help="fraction of the GPU's memory for weights, activations and the KV cache when sizing "
            "--max-batch (default 0.9)",
        )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--eager", action="store_true", help="no CUDA graphs, no torch.compile (the CUDA default is both)"
    )
    mode.add_argument(
        "--no-compile", action="store_true", help="CUDA graphs of the eager decode step at every batch size"
    )
    mode.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step for batches of up to 16 rows (the CUDA default; also on the CPU)",
    )
    g.add_argument(
        "--decode-steps",
        type=_decode_steps,
        default=1,
        help="decode steps run back to back on the device before the host reads their tokens: one wait "
        "and one round of bookkeeping per N tokens, tokens streamed N at a time (default 1, at most 64)",
    )
    g.add_argument(
        "--async-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch the next decode steps before reading the last ones' tokens: the host's per-step work "
        "overlaps the device's (outputs come one step later; a finished request's slot decodes one step more). "
        "Default: on with CUDA, off on the CPU",
    )
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def engine_kwargs(args) -> dict:
    """Keyword arguments of `Engine.from_pretrained` from the parsed flags (None = the device's
    default)."""
    kw = {
        "device": args.device,
        "dtype": args.dtype,
        "max_seq_len": args.max_seq_len,
        "decode_steps": args.decode_steps,
        "async_decode": args.async_decode,
    }
    if getattr(args, "max_batch", None) is not None:
        kw["max_batch"] = args.max_batch
    for name in ("max_prefill_tokens", "gpu_memory_utilization"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    if args.eager:
        kw["cuda_graphs"], kw["compile"] = False, False
    elif args.no_compile:
        kw["compile"] = False
    elif args.compile:
        kw["compile"] = True
    return kw


__all__ = ["add_engine_args", "engine_kwargs", "positive_int", "positive_seconds"]
