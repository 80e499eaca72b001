"""`complexity train`: a thin shell over `complexity.train.train`.

complexity train --config recipes/tiny.toml --data data/builtin --out runs/tiny
complexity train --preset tiny --data DIR --out DIR training.max_steps=200 optim.lr=1e-3
torchrun --nproc-per-node 8 -m complexity.cli train --config recipes/tmlr-187m.toml training.dp=fsdp
"""

from __future__ import annotations

import signal


def run(args) -> int:
    import torch.distributed as dist

    from ..train import load_config, train

    if args.config is None and args.preset is None and not any(o.startswith("model.preset=") for o in args.overrides):
        raise ValueError("give --config RECIPE.toml or --preset NAME")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={_toml_str(args.data)}")
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    config = load_config(args.config, overrides, preset=args.preset)
    if args.out is not None:
        config.out = args.out
    if config.out is None:
        raise ValueError("no output folder: give --out DIR (or `out = ...` in the recipe)")
    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result.interrupted and args.stop_after is None:
        return signalled_status(result.signal)
    return 0


def signalled_status(sig: int | None) -> int:
    """The exit status of a run a signal stopped, as a shell reports it: 128 + the signal's number
    (SIGTERM's when this process did not receive it: under torchrun, another rank did)."""
    return 128 + int(sig or signal.SIGTERM)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def register(subparsers) -> None:
    from ..inference.args import positive_int

    p = subparsers.add_parser(
        "train",
        help="train a model from a recipe or preset (one CPU, one GPU, or torchrun)",
        description="Train a Complexity model. Overrides are section.key=value (TOML values), e.g. "
        "training.max_steps=100 optim.lr=1e-3 model.hidden_size=64 training.dp=fsdp.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="RECIPE", help="TOML recipe (see recipes/)")
    src.add_argument("--preset", metavar="NAME", help="model preset with default training settings")
    p.add_argument("--data", metavar="DIR", help="prepared data folder (`complexity data prepare`)")
    p.add_argument("--out", metavar="DIR", help="run folder (checkpoints, metrics, final export)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (also the LR schedule length)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest whole checkpoint (start it if there is none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--stop-after",
        type=positive_int,
        metavar="N",
        help="checkpoint and stop after step N, as if preempted (resume later with --resume)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, section.key=value")
    p.set_defaults(func=run)
