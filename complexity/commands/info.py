"""`complexity info PRESET`: the resolved config and exact parameter counts."""

from __future__ import annotations

import json
from collections.abc import Sequence


class _Presets(Sequence):
    """The preset names, read when argparse needs them (parsing `info`, rendering its help):
    they live beside ComplexityConfig, whose import costs torch, which `complexity --help` avoids."""

    def _names(self) -> tuple[str, ...]:
        from ..configuration_complexity import PRESETS

        return PRESETS

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


def _parse_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"override {text!r}: expected key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as mlp_type=dense


def run(args) -> int:
    from ..configuration_complexity import ComplexityConfig
    from ..params import count_parameters

    overrides = dict(_parse_override(o) for o in args.overrides)
    config = ComplexityConfig.from_preset(args.preset, **overrides)
    unknown = sorted(k for k in overrides if k not in ComplexityConfig().to_dict())
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    counts = count_parameters(config)
    if args.json:
        print(json.dumps({"config": config.to_diff_dict(), "parameters": {"total": counts.total, "active": counts.active}}, indent=2))
    else:
        print(f"preset {args.preset}")
        for key, value in sorted(config.to_diff_dict().items()):
            print(f"  {key} = {value}")
        print(f"parameters: {counts}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print a preset's config and exact parameter counts")
    parser.add_argument("preset", choices=_Presets(), metavar="PRESET", help="one of: %(choices)s")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config fields to override (JSON values)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
