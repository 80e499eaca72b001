"""`complexity convert SRC DST`: bring an upstream checkpoint over, exactly (complexity-deep 0.13 /
1.0, TR-Hash MoE in its native, hf, deep or MLX layout); `--to deep` writes TR-Hash's deep export."""

from __future__ import annotations


def run(args) -> int:
    from ..integrations.upstream import convert_upstream, export_deep, inspect_upstream

    if args.to == "deep":
        if args.dry_run or args.no_verify:
            raise ValueError("--to deep: --dry-run and --no-verify apply to conversions into this project's format")
        out = export_deep(args.src, args.dst, dtype=args.dtype or "bfloat16", overwrite=args.overwrite)
        print(f"wrote {out} (TR-Hash deep layout, for upstream's vLLM engine; read back and compared)")
        return 0
    if args.dry_run:
        print(inspect_upstream(args.src, dtype=args.dtype))
        print("dry run: nothing written")
        return 0
    print(convert_upstream(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, verify=not args.no_verify))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an upstream checkpoint (complexity-deep 0.13 / 1.0, TR-Hash MoE) to a Complexity folder, "
        "or a hash_routed model to TR-Hash's deep export",
        description=(
            "Read an upstream checkpoint folder (config.json + model.safetensors or model.pt): complexity-deep "
            "0.13 (INL) or 1.0 (mu guidance), or TR-Hash MoE in its native, hf, deep or MLX layout. Detect which "
            "(the report says what was found and why, and every convention applied: resolved nulls, aliases, "
            "reconstructed route slots), map every tensor (or drop it for a stated reason) and write a "
            "Hugging Face folder that ComplexityForCausalLM / AutoModelForCausalLM.from_pretrained load with "
            "identical outputs. With --to deep, write TR-Hash's deep export (upstream's vLLM engine reads it) of "
            "one of our hash_routed folders or of any TR-Hash folder."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="upstream checkpoint folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument(
        "--to",
        choices=["complexity", "deep"],
        default="complexity",
        help="complexity (default): our Hugging Face folder; deep: TR-Hash's deep export",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast floating tensors (default: keep the file's dtypes; --to deep: bfloat16, as upstream's exporter)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the written folder back to compare")
    parser.add_argument("--dry-run", action="store_true", help="detect, validate and map, but write nothing")
    parser.set_defaults(func=run)
