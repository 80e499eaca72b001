"""`complexity info PRESET|CKPT`: the resolved config and exact parameter counts of a preset, or of
a checkpoint folder (every file of which is checked, without loading the weights)."""

from __future__ import annotations

import json


def _parse_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"override {text!r}: expected key=value")
    if not key.strip():
        raise ValueError(f"override {text!r}: no field name before '='")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as mlp_type=dense


def _print(title: str, config, extra: dict, as_json: bool) -> None:
    from ..params import count_parameters

    counts = count_parameters(config)
    if as_json:
        print(
            json.dumps(
                {
                    "config": config.to_diff_dict(),
                    "parameters": {"total": counts.total, "active": counts.active},
                    **extra,
                },
                indent=2,
            )
        )
        return
    print(title)
    for key, value in sorted(config.to_diff_dict().items()):
        print(f"  {key} = {value}")
    print(f"parameters: {counts}")
    for key, value in extra.items():
        print(f"{key}: {value}")


def run_folder(args, presets) -> int:
    from ..checkpoint_folder import check_tokenizer_fits, inspect_checkpoint_folder, load_folder_tokenizer

    if args.overrides:
        raise ValueError("KEY=VALUE overrides apply to presets, not to a checkpoint folder")
    try:
        found = inspect_checkpoint_folder(args.target)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (nor a preset: {', '.join(presets)})") from None
    extra = {"weights": ", ".join(p.name for p in found.weight_files), "stored dtypes": ", ".join(found.stored_dtypes)}
    if found.has_tokenizer:
        tok = load_folder_tokenizer(found.path)
        check_tokenizer_fits(tok, found.config, found.path)
        extra["tokenizer"] = f"{len(tok)} tokens"
    else:
        extra["tokenizer"] = "none"
    _print(f"checkpoint {found.path}", found.config, extra, args.json)
    return 0


def run(args) -> int:
    from ..configuration_complexity import PRESETS, ComplexityConfig

    if args.target not in PRESETS:
        return run_folder(args, PRESETS)
    overrides = dict(_parse_override(o) for o in args.overrides)
    config = ComplexityConfig.from_preset(args.target, **overrides)
    unknown = sorted(k for k in overrides if k not in ComplexityConfig().to_dict())
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    _print(f"preset {args.target}", config, {}, args.json)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print the config and exact parameter counts of a preset or a checkpoint folder",
        description="PRESET: one of the presets (KEY=VALUE overrides its fields). CKPT: a checkpoint folder, whose "
        "config, weights (headers, names, shapes, dtypes) and tokenizer are checked without loading it.",
    )
    # The preset names live beside ComplexityConfig, whose import `complexity --help` avoids.
    parser.add_argument(
        "target",
        metavar="PRESET|CKPT",
        help="a preset (tiny ... 7b: the README's table; a wrong name lists them) or a checkpoint folder",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config fields to override (JSON values)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
