"""`complexity ablate`: the parameter-matched ablation of docs/architecture.md §8 (and the spike experiment).

complexity ablate --preset tmlr-187m --data DIR --steps 1000 --seeds 3 --out runs/ablation
complexity ablate --preset tiny --data DIR --steps 300 --arms dense routed_mu --out DIR training.seq_len=256
complexity ablate --preset tiny --data DIR --steps 300 --spike 150 --out runs/spike
complexity ablate --preset tmlr-187m --dry-run            # the arms' widths and parameter counts only
complexity ablate --config recipes/tiny.toml --out DIR     # the recipe's data.path and training.max_steps
"""

from __future__ import annotations

import shlex
import sys

from .train import signalled_status

OUT_OF_TIME = 75  # sysexits' EX_TEMPFAIL: stopped by --time-limit, rerun to continue


def _seeds(text: str) -> list[int]:
    """--seeds as written (a count, or seeds separated by commas), checked as run_ablation checks it."""
    from ..experiments.ablation import seed_list

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise ValueError(f"--seeds: expected a count or a comma-separated list of integers, got {text!r}") from None
    return seed_list(seeds)


def run(args) -> int:
    _move_overrides_out_of_arms(args)
    if args.dry_run:
        return _print_plans(args)
    if args.report_only:
        return _rewrite_report(args)
    return _train_and_report(args)


def _move_overrides_out_of_arms(args) -> None:
    # `--arms a b KEY=VALUE`: argparse gives the trailing overrides to --arms (nargs="+" is greedy).
    args.overrides = [a for a in args.arms if "=" in a] + list(args.overrides)
    args.arms = [a for a in args.arms if "=" not in a]


def _print_plans(args) -> int:
    from ..experiments.arms import plan_arms

    _take_data_and_steps_from_the_recipe(args)
    _check_run_values(args)  # a dry run refuses what the run it plans would refuse
    preset, base = _base_model(args)
    for p in plan_arms(preset, args.arms, base, args.tolerance).values():
        print(f"{p.summary()}  {p.label}")
    return 0


def _base_model(args) -> tuple[str, dict]:
    """(preset, model fields) every arm starts from: the recipe's with every override applied (the
    recipe is checked as a run checks it: a training.* override can be what makes it valid), or
    --preset with the model.* overrides."""
    from ..train import load_config
    from ..train.config import parse_override

    if args.config is not None:
        config = load_config(args.config, list(args.overrides), preset=args.preset)
        return config.model.preset, dict(config.model.overrides)
    preset, base = args.preset, {}
    for key, value in map(parse_override, args.overrides):
        if key == "model.preset":
            preset = value
        elif key.startswith("model."):
            base[key[len("model.") :]] = value
    if preset is None:
        raise ValueError("give --preset NAME or --config RECIPE")
    return preset, base


def _rewrite_report(args) -> int:
    from ..experiments.report import write_report

    if args.out is None:
        raise ValueError("--report-only needs --out DIR (an ablation folder)")
    path, figures = write_report(args.out)
    print(path, *figures, sep="\n")
    return 0


def _train_and_report(args) -> int:
    from ..experiments.ablation import run_ablation

    _take_data_and_steps_from_the_recipe(args)
    _check_training_flags(args)
    result = run_ablation(
        preset=args.preset,
        recipe=args.config,
        data=args.data,
        steps=args.steps,
        out=args.out,
        seeds=_check_run_values(args),
        arms=args.arms,
        overrides=args.overrides,
        avg_k=args.avg_steps,
        spike_step=args.spike,
        spike_lr_mult=args.spike_lr_mult,
        spike_window=args.spike_window,
        tolerance=args.tolerance,
        stop_after=args.stop_after,
        command=_command_as_typed(),
        time_limit=args.time_limit,
        run_seconds=args.run_seconds,
    )
    if result.interrupted:
        print(f"ablation stopped before the end; rerun the same command to continue ({args.out})", file=sys.stderr)
        # A stop --stop-after asked for is a success; --time-limit's is EX_TEMPFAIL (75: try again),
        # so a job script can tell it from the end; one a signal caused exits as `complexity train` does.
        if result.out_of_time:
            return OUT_OF_TIME
        return 0 if args.stop_after is not None else signalled_status(result.signal)
    print(result.report, *result.figures, sep="\n")
    return 0


def _take_data_and_steps_from_the_recipe(args) -> None:
    """With --config, --data and --steps default to the recipe's data.path and training.max_steps
    (read with every override and --steps, as the run will read it: a dry run refuses what the run
    would); flags given win."""
    if args.config is None:
        return
    from ..train import load_config

    given = [] if args.steps is None else [f"training.max_steps={args.steps}"]
    config = load_config(args.config, [*args.overrides, *given])
    if args.data is None:
        args.data = config.data.path
    if args.steps is None:
        args.steps = config.training.max_steps


def _check_training_flags(args) -> None:
    from ..experiments.arms import ARMS

    missing = [f for f, v in (("--data", args.data), ("--steps", args.steps), ("--out", args.out)) if v is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")


def _check_run_values(args) -> list[int]:
    """The seeds, once --seeds, --steps, --avg-steps and the --spike flags are checked as
    run_ablation checks them (by the same functions): the one check of a run and a dry run."""
    from ..experiments.ablation import check_avg_steps
    from ..experiments.spike import plan_spike

    seeds = _seeds(args.seeds)
    if args.steps is None:  # a dry run without --steps: the flags that count steps cannot be judged
        given = [f for f, v in (("--avg-steps", args.avg_steps), ("--spike", args.spike)) if v is not None]
        if given:
            raise ValueError(f"missing --steps ({given[0]} is checked against it)")
        return seeds
    check_avg_steps(args.steps, args.avg_steps)
    plan_spike(args.steps, args.spike, args.spike_lr_mult, args.spike_window)
    return seeds


def _command_as_typed() -> str | None:
    """For results.md; None outside the `complexity ablate` CLI: run_ablation then rebuilds it."""
    return shlex.join(["complexity", "ablate", *sys.argv[2:]]) if sys.argv[1:2] == ["ablate"] else None


def register(subparsers) -> None:
    from ..experiments.arms import ARMS, DEFAULT_ARMS, TOLERANCE
    from ..inference.args import positive_int, positive_seconds

    arm_help = "; ".join(f"{a.name}: {a.label}" for a in ARMS.values())
    p = subparsers.add_parser(
        "ablate",
        help="parameter-matched ablation of the MLP / mu variants (docs/architecture.md §8), optional loss-spike test",
        description="Train every arm x seed on the same data, order and seed, with live parameter totals matched "
        "to arm (2) (the MLP of the smaller arms is widened), then write OUT/results.md, loss.png, "
        "experts.png (and spike.png). Resumable: rerun the same command after an interruption. "
        "Overrides are recipe section.key=value, as for `complexity train`. Arms: " + arm_help,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="model preset (the arms change only the MLP / mu fields)")
    src.add_argument("--config", metavar="RECIPE", help="TOML recipe (its model section is the base of every arm)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="prepared data folder (`complexity data prepare`; default: the recipe's data.path)",
    )
    p.add_argument(
        "--steps", type=int, metavar="N", help="optimizer steps per run (default: the recipe's training.max_steps)"
    )
    p.add_argument(
        "--seeds",
        default="1",
        metavar="N|S,S,..",
        help="number of seeds (0..N-1), or a comma-separated list (default 1)",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_ARMS),
        metavar="ARM",
        help=f"arms to run (default: {' '.join(DEFAULT_ARMS)}; extras: "
        f"{' '.join(a for a in ARMS if a not in DEFAULT_ARMS)})",
    )
    p.add_argument("--out", metavar="DIR", help="ablation folder (runs/, results.md, figures)")
    p.add_argument(
        "--avg-steps",
        type=int,
        default=None,
        metavar="K",
        help="average the training loss over the first K steps (default: 73%% of --steps, as upstream's 700 of ~954)",
    )
    p.add_argument(
        "--spike",
        type=int,
        default=None,
        metavar="STEP",
        help="inject a corrupted batch (uniform random tokens) at STEP in every run, LR x --spike-lr-mult "
        "for that step; the trainer's spike guard is turned off",
    )
    p.add_argument("--spike-lr-mult", type=float, default=10.0, metavar="X", help="LR factor at the spike step (10)")
    p.add_argument(
        "--spike-window", type=int, default=20, metavar="K", help="pre-spike loss = mean of the K steps before it (20)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        metavar="R",
        help=f"max relative mismatch of an arm's live total against arm (2) (default {TOLERANCE})",
    )
    p.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        metavar="N",
        help="checkpoint and stop the current run after step N, as if preempted (rerun to continue)",
    )
    p.add_argument(
        "--time-limit",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="for a job with a time limit: start no run that could not finish within SECONDS from now (its "
        "length: --run-seconds, or the longest run so far); stop there with exit status 75, rerun to continue",
    )
    p.add_argument(
        "--run-seconds",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="how long a run takes, for --time-limit (default: the longest run this call has trained; the first "
        "run always starts)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the arms' widths and parameter counts, train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the figures from --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, section.key=value")
    p.set_defaults(func=run)
