"""`complexity routing build`: a token -> expert table from token counts, with a balance report."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("routing", help="build token-routed MLP routing tables")
    sub = parser.add_subparsers(dest="routing_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser(
        "build",
        help="build a routing table and report each strategy's load balance",
        description="Build the token -> expert table (int64 [V]) and print, for every strategy, the max/mean "
        "expert share of the token-count mass.",
    )
    build.add_argument(
        "--counts",
        required=True,
        help="token counts: a .npy int64 [V] file or a prepared-data folder (token_counts.npy)",
    )
    build.add_argument("--experts", type=int, required=True)
    build.add_argument("--strategy", default="zipf", choices=["zipf", "modulo", "range"])
    build.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="table size (default: len(counts); larger pads the counts with zeros)",
    )
    build.add_argument("--out", default=None, help="write the table (.safetensors key 'routing_table', or .npy)")
    build.add_argument("--force", action="store_true", help="replace an existing --out file")
    build.set_defaults(func=run_build)


def load_counts(path: str):
    import numpy as np

    p = Path(path)
    if p.is_dir():
        from complexity.data.manifest import read_token_counts

        return read_token_counts(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such counts file")
    try:
        counts = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{p}: not a .npy counts array: {err}") from None
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{p}: counts must be a 1-D integer array, got {counts.dtype} {list(counts.shape)}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"{p}: counts must be >= 0, got {int(counts.min())} at id {int(counts.argmin())}")
    return counts.astype(np.int64)


def _check_flags(args) -> None:
    """The flags, before any counts are read."""
    if args.experts < 1:
        raise ValueError(f"--experts: must be a positive integer, got {args.experts}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size: must be a positive integer, got {args.vocab_size}")
    if args.out is not None and Path(args.out).suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {args.out}: expected a .safetensors or .npy file name (the format follows it)")
    if args.out is not None and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"--out {args.out}: already exists (--force replaces it)")


def run_build(args) -> int:
    import numpy as np

    from complexity.routing import STRATEGIES, balance_report, build_routing_table

    _check_flags(args)
    counts = load_counts(args.counts)
    vocab = len(counts) if args.vocab_size is None else args.vocab_size
    if vocab < len(counts):
        raise ValueError(f"--vocab-size {vocab} is smaller than the counts ({len(counts)} ids)")
    if args.experts > vocab:
        raise ValueError(f"--experts {args.experts} exceeds the vocabulary ({vocab} ids): some experts would get no id")
    counts = np.concatenate([counts, np.zeros(vocab - len(counts), dtype=np.int64)])
    print(f"{len(counts)} ids, {int(counts.sum()):,} counted tokens, {args.experts} experts")
    print(f"{'strategy':<8} {'max/mean mass':>14} {'min share':>10} {'max share':>10} {'ids max/mean':>13}")
    chosen = None
    for strategy in STRATEGIES:
        table = build_routing_table(strategy, vocab, args.experts, counts)
        rep = balance_report(table, counts, args.experts)
        mark = " <-" if strategy == args.strategy else ""
        print(
            f"{strategy:<8} {rep['max_over_mean']:>14.4f} {min(rep['mass_share']):>10.4f} "
            f"{max(rep['mass_share']):>10.4f} {rep['ids_max_over_mean']:>13.4f}{mark}"
        )
        if strategy == args.strategy:
            chosen = table
    if args.out:
        from complexity.data.files import save_npy_atomic, write_bytes_atomic

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npy":
            save_npy_atomic(out, chosen.numpy())
        else:  # .safetensors
            from safetensors.torch import save

            write_bytes_atomic(
                out,
                save(
                    {"routing_table": chosen.contiguous()},
                    metadata={"strategy": args.strategy, "num_experts": str(args.experts)},
                ),
            )
        print(f"wrote {args.strategy} table [{vocab}] to {out}")
    return 0
