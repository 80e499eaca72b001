"""`complexity generate CKPT --prompt TEXT`: sample from a checkpoint, streaming to the terminal.

On CUDA the engine's defaults are the fast ones (the decode step compiled and replayed as CUDA
graphs); `--eager` turns them off.
"""

from __future__ import annotations

import sys
import time


def run(args) -> int:
    import torch

    from ..inference import Engine, SamplingParams
    from ..inference.args import engine_kwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    # validate before loading anything (clear errors for bad flags)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop or [],
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    engine = Engine.from_pretrained(args.checkpoint, max_batch=1, **engine_kwargs(args))
    if engine.tokenizer is None:
        raise ValueError(f"checkpoint {args.checkpoint!r}: has no tokenizer files")
    prompt = args.prompt
    if prompt is None:
        prompt = sys.stdin.read()
    if args.chat:
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("--chat: this checkpoint's tokenizer has no chat template")
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt = tok(text, add_special_tokens=False).input_ids
    if args.echo and isinstance(prompt, str):
        sys.stdout.write(prompt)
    t0 = time.perf_counter()
    last = None
    for last in engine.stream(prompt, params):
        sys.stdout.write(last.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and last.finish_reason == "length" and last.num_generated_tokens < params.max_new_tokens:
        # the engine stops a sequence at the end of its context; say so rather than look as if
        # --max-new-tokens had been honoured (the server refuses such a request up front instead)
        print(
            f"complexity generate: stopped after {last.num_generated_tokens} of --max-new-tokens "
            f"{params.max_new_tokens}: the prompt's {last.num_prompt_tokens} tokens and the continuation "
            f"filled the context length {engine.max_seq_len} (--max-seq-len)",
            file=sys.stderr,
        )
    if args.verbose and last is not None:
        dt = time.perf_counter() - t0
        n = last.num_generated_tokens
        print(
            f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, finish_reason={last.finish_reason}; "
            f"engine: {engine.describe()}]",
            file=sys.stderr,
        )
    return 0


def register(subparsers) -> None:
    from ..inference.args import add_engine_args

    p = subparsers.add_parser("generate", help="generate text from a checkpoint (streams to the terminal)")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder")
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2] over generated tokens; 0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2] over generated tokens; 0 = off")
    p.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--seed", type=int, default=None, help="same seed, same sample")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed and finish reason to stderr")
    add_engine_args(p, batch=False)
    p.set_defaults(func=run)
