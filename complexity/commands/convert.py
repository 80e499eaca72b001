"""`complexity convert SRC DST`: bring an upstream complexity-deep checkpoint over, exactly."""

from __future__ import annotations


def run(args) -> int:
    from ..integrations.upstream import convert_upstream, inspect_upstream

    if args.dry_run:
        print(inspect_upstream(args.src, dtype=args.dtype))
        print("dry run: nothing written")
        return 0
    print(convert_upstream(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, verify=not args.no_verify))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an upstream complexity-deep checkpoint (0.13 INL or 1.0 mu-guidance) to a Complexity folder",
        description=(
            "Read an upstream complexity-deep checkpoint folder (config.json + model.safetensors or model.pt), "
            "detect its design, map every tensor (or drop it for a stated reason) and write a Hugging Face folder "
            "that ComplexityForCausalLM / AutoModelForCausalLM.from_pretrained load with identical outputs."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="upstream checkpoint folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast floating tensors (default: keep the file's dtypes)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the written folder back to compare")
    parser.add_argument("--dry-run", action="store_true", help="detect, validate and map, but write nothing")
    parser.set_defaults(func=run)
