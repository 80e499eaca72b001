"""`complexity data ...`: prepare token shards, inspect them, describe the built-in corpus."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect tokenized training data")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    prep = sub.add_parser(
        "prepare",
        help="tokenize text into packed token shards with a manifest",
        description="Tokenize documents, pack them separated by </s> into memory-mapped shards with a held-out "
        "validation split, token counts and a manifest. Resumable and idempotent.",
    )
    prep.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files (.txt/.jsonl/.parquet), folders, globs, saved HF datasets or hf:NAME",
    )
    prep.add_argument("--builtin", action="store_true", help="also use the built-in corpus (Python's own docs)")
    prep.add_argument(
        "--builtin-site-packages",
        nargs="?",
        const=0.0,
        type=float,
        default=None,
        metavar="MB",
        help="also use the prose of the installed packages (docstrings, .md/.rst/.txt), optionally "
        "only its first MB million bytes (= --input builtin:site-packages[:MB])",
    )
    prep.add_argument("--tokenizer", required=True, help="tokenizer folder (from `complexity tokenizer train`)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    prep.add_argument("--text-field", default="text", help="jsonl field / parquet or dataset column (default: text)")
    prep.add_argument(
        "--txt-split",
        default="file",
        choices=["file", "line", "paragraph"],
        help="what a document is in .txt files (default: the whole file)",
    )
    prep.add_argument("--hf-split", default=None, help="split of a DatasetDict / hub dataset (default: train)")
    prep.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "uint16", "uint32"],
        help="token dtype (auto: uint16 when the vocabulary fits)",
    )
    prep.add_argument(
        "--workers",
        type=int,
        default=0,
        help="0: the tokenizer's own Rust threads (all cores); N>1: N worker processes",
    )
    # default None: prepare_dataset's own default (2^28), without importing it (numpy) for --help
    prep.add_argument("--shard-tokens", type=int, default=None, help="max tokens per shard (default 2^28)")
    prep.add_argument("--force", action="store_true", help="replace an existing --out folder")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=run_prepare)

    insp = sub.add_parser(
        "inspect",
        help="check a prepared folder (its manifest, every shard and every token id; and its tokenizer) and print "
        "its summary",
    )
    insp.add_argument("folder")
    insp.add_argument("--tokenizer", default=None, help="fail unless the data was prepared with this tokenizer")
    insp.add_argument("--vocab-size", type=int, default=None, help="fail unless ids fit a model with this vocab")
    insp.add_argument("--json", action="store_true", help="print the whole manifest")
    insp.set_defaults(func=run_inspect)

    bi = sub.add_parser("builtin", help="size of the built-in corpus; optionally dump it as jsonl")
    bi.add_argument("--out", default=None, help="write the documents to this .jsonl file")
    bi.set_defaults(func=run_builtin)


def run_prepare(args) -> int:
    from complexity.data.prepare import DEFAULT_SHARD_TOKENS, prepare_dataset

    inputs = list(args.input)
    if args.builtin_site_packages is not None:
        mb = args.builtin_site_packages
        inputs.append("builtin:site-packages" + (f":{mb:g}" if mb else ""))
    prepare_dataset(
        inputs,
        args.tokenizer,
        args.out,
        builtin=args.builtin,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        txt_split=args.txt_split,
        hf_split=args.hf_split,
        dtype=None if args.dtype == "auto" else args.dtype,
        shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        workers=args.workers,
        force=args.force,
        progress=not args.no_progress,
    )
    return 0


def run_inspect(args) -> int:
    from complexity.data.loader import PackedTokens

    m = PackedTokens(args.folder, "train", tokenizer=args.tokenizer, vocab_size=args.vocab_size).manifest
    for split in m["splits"]:  # opens and checks every shard against the manifest, then reads every id
        PackedTokens(args.folder, split).check_token_ids()
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(
        f"{args.folder}: {m['documents']} documents, vocab {m['vocab_size']}, {m['dtype']}, "
        f"tokenizer {m['tokenizer']['hash'][:12]}"
    )
    for split, info in m["splits"].items():
        print(
            f"  {split}: {info['tokens']:,} tokens, {info['documents']} documents, "
            f"{info['text_bytes']:,} text bytes, {len(info['shards'])} shard(s)"
        )
    return 0


def run_builtin(args) -> int:
    from complexity.data import builtin_corpus

    if args.out:
        from complexity.data.files import AtomicFile

        with AtomicFile(args.out) as f:
            for doc in builtin_corpus.iter_documents():
                f.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))
    stats = builtin_corpus.corpus_stats()
    print(
        f"{stats['name']}: {stats['documents']} documents, {stats['bytes']:,} bytes (UTF-8), "
        f"sha256 {stats['sha256'][:12]}, from {stats['stdlib']}"
    )
    return 0
