"""`complexity eval CKPT --data DIR`: held-out loss, perplexity, bits per byte, expert shares (JSON)."""

from __future__ import annotations

import json


def run(args) -> int:
    from ..train.eval import evaluate_checkpoint

    if args.data is None and not args.tasks:
        raise ValueError("give --data DIR (held-out loss) and/or --tasks T1,T2 (lm-evaluation-harness)")
    for flag in ("batch_size", "seq_len", "max_batches"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    result = {}
    if args.data is not None:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            max_batches=args.max_batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            device=args.device,
        )
    if args.tasks:  # lm-evaluation-harness tasks (optional dependency: pip install lm-eval accelerate)
        from ..experiments.lm_eval_bridge import run_lm_eval

        result["lm_eval"] = run_lm_eval(
            args.checkpoint,
            args.tasks,
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
        )
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="held-out loss / perplexity / bits-per-byte of a checkpoint (JSON)",
        description="CKPT: a Hugging Face folder (e.g. RUN/final), a training checkpoint folder "
        "(RUN/checkpoints/step_*), or a run folder (its latest checkpoint).",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", default=None, metavar="DIR", help="prepared data folder (its val split is used)")
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="lm-evaluation-harness tasks (needs lm-eval)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, metavar="N", help="lm-eval: at most N documents per task")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="default: the whole val split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's seq_len (or the model's max, <= 2048)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run)
