"""`complexity tokenizer train`: train a byte-level BPE tokenizer folder."""

from __future__ import annotations

import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train byte-level BPE tokenizers")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True
    train = sub.add_parser(
        "train",
        help="train a tokenizer on text files / the built-in corpus",
        description="Train a byte-level BPE tokenizer (NFC; </s>=0 <pad>=1 <s>=2 <unk>=3) and save a folder "
        "that transformers.AutoTokenizer.from_pretrained loads.",
    )
    train.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files (.txt/.jsonl/.parquet), folders, globs, saved HF datasets or hf:NAME",
    )
    train.add_argument("--builtin", action="store_true", help="also use the built-in corpus (Python's own docs)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--text-field", default="text", help="jsonl field / parquet or dataset column (default: text)")
    train.add_argument(
        "--txt-split",
        default="file",
        choices=["file", "line", "paragraph"],
        help="what a document is in .txt files (default: the whole file)",
    )
    train.add_argument("--hf-split", default=None, help="split of a DatasetDict / hub dataset (default: train)")
    train.add_argument("--model-max-length", type=int, default=2048)
    train.add_argument("--force", action="store_true", help="replace an existing --out folder")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=run_train)


def run_train(args) -> int:
    from complexity.data.sources import iter_documents, resolve_sources
    from complexity.data.tokenizer import train_tokenizer

    sources = resolve_sources(args.input, text_field=args.text_field, hf_split=args.hf_split, builtin=args.builtin)

    def texts():
        for source in sources:
            yield from iter_documents(
                source, text_field=args.text_field, txt_split=args.txt_split, hf_split=args.hf_split
            )

    t0 = time.time()
    out = train_tokenizer(
        texts(),
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        show_progress=not args.no_progress,
        model_max_length=args.model_max_length,
        overwrite=args.force,
    )
    from complexity.data.tokenizer import load_tokenizer, vocab_size_of

    got = vocab_size_of(load_tokenizer(out))
    print(f"saved tokenizer (vocab {got}) from {len(sources)} source(s) to {out} in {time.time() - t0:.1f}s")
    if got < args.vocab_size:
        print(
            f"note: the text supports only {got} tokens at --min-frequency {args.min_frequency} "
            f"(asked for {args.vocab_size}); give more text or --min-frequency 1. A model may keep "
            f"vocab_size {args.vocab_size}: the extra embeddings are simply never used."
        )
    return 0
