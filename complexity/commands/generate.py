"""`complexity generate CKPT --prompt TEXT`: sample from a checkpoint, streaming to the terminal."""

from __future__ import annotations

import sys
import time


def run(args) -> int:
    import torch

    from ..inference import Engine, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    # validate before loading anything (clear errors for bad flags)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [], seed=args.seed,
        ignore_eos=args.ignore_eos)
    engine = Engine.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, max_batch=1,
                                    max_seq_len=args.max_seq_len, cuda_graphs=args.cuda_graphs, compile=args.compile)
    prompt = args.prompt
    if prompt is None:
        prompt = sys.stdin.read()
    if args.chat:
        tok = engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("--chat: this checkpoint's tokenizer has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False).input_ids
    if engine.tokenizer is None:
        raise ValueError(f"checkpoint {args.checkpoint!r}: has no tokenizer files")
    if args.echo and isinstance(prompt, str):
        sys.stdout.write(prompt)
    t0 = time.perf_counter()
    for delta in engine.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    done = engine.last_completion
    if args.verbose:
        dt = time.perf_counter() - t0
        n = len(done.token_ids)
        print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, finish_reason={done.finish_reason}]",
              file=sys.stderr)
    return 0


def register(subparsers) -> None:
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
    p.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--seed", type=int, default=None, help="same seed, same sample")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu), float32, bfloat16, float16")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: the model's context)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed and finish reason to stderr")
    p.set_defaults(func=run)
