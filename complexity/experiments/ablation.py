"""The ablation runner of docs/architecture.md §8: every arm x seed trained, resumed after an
interruption, summarised, then the report written. The arms and their parameter matching live in
`arms`, what an ablation folder holds and how it is read in `run_files`, the report in `report`.

**Same data, order and seed.** Every arm x seed is one `complexity.train.Trainer` run with the
same recipe except the model fields: the data slots are seeded by `training.seed` only, so for a
given seed every arm sees the same batches in the same order (each run records the sha1 of every
micro-batch in `batches.jsonl`; the tests compare them), and the model is initialised from the
same seed.

**Resume.** Run folders are `OUT/runs/<arm>-s<seed>`. A folder with `done.json` is finished
and skipped; one with a `resolved.json` but no `done.json` was interrupted and is continued
through the trainer's own resume (last checkpoint; the trainer refuses a changed config). The
plan (`OUT/ablation.json`) must match a rerun's: a different preset, recipe, step count, spike
or arm definition is refused rather than mixed into old results. A signal (SIGINT/SIGTERM)
checkpoints the current run and stops the ablation; rerunning the same command continues it.
A time limit (`time_limit`, for jobs that may run so long) is kept between runs: a run is not
started when it could not finish in the time left (its length: `run_seconds`, or the longest
run of this process; the first run always starts), so no work is cut off with the job.
A damaged ablation.json, done.json (a value of the wrong type or not finite included) or
metrics.jsonl is a `FileFormatError` naming the file, what is wrong and what to do (`PLAN_REMEDY`,
`read_done`, `read_run_metrics`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.files import read_json_object
from ..train.callbacks import TrainerCallbacks, spike_injection
from ..train.durable import drop_torn_tail, write_json
from .arms import DEFAULT_ARMS, REFERENCE_ARM, TOLERANCE, ArmPlan, plan_arms
from .expert_map import write_expert_map
from .report import write_report
from .run_files import PLAN_REMEDY, read_done, read_run_metrics, run_name, summarise_run
from .spike import plan_spike, spike_metrics


@dataclass
class AblationResult:
    out: Path
    plan: dict[str, ArmPlan]
    runs: dict[str, dict] = field(default_factory=dict)  # "<arm>-s<seed>" -> done.json content
    interrupted: bool = False
    signal: int | None = None  # the signal that interrupted it, if one did
    out_of_time: bool = False  # stopped before a run that could not finish within time_limit
    report: Path | None = None
    figures: list[Path] = field(default_factory=list)


def default_avg_steps(steps: int) -> int:
    """Upstream averaged the training loss over its first 700 of ~954 steps: about 73%."""
    return max(1, round(0.73 * steps))


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def base_run_config(
    *,
    preset: str | None,
    data: str | Path,
    steps: int,
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    spike: dict | None = None,
):
    """The RunConfig shared by all arms (before the arm's model fields and the seed).

    Ablation defaults, each replaced by an explicit `section.key=value` override: per-step loss
    logging (logging.every=1: the "first K steps" average needs every step), ten held-out
    evaluations (eval.every = steps // 10), a checkpoint at mid-run and at the end (resume),
    no TensorBoard. With a spike, the trainer's spike guard is OFF (it would skip the batch)."""
    from ..train import load_config

    overrides = list(overrides)
    forced = [f"data.path={json.dumps(str(data))}", f"training.max_steps={int(steps)}"]
    defaults = {
        "logging.every": "1",
        "eval.every": str(max(1, steps // 10)),
        "checkpoint.every": str(max(1, steps // 2)),
        "logging.tensorboard": "false",
    }
    pre = [f"{k}={v}" for k, v in defaults.items() if not _has_override(overrides, k)]
    post = []
    if spike is not None:
        if _has_override(overrides, "spike.enabled") and any(
            o.replace(" ", "") == "spike.enabled=true" for o in overrides
        ):
            raise ValueError(
                "--spike: the trainer's spike guard must be off (it would skip the injected batch); "
                "drop spike.enabled=true"
            )
        post.append("spike.enabled=false")
    if recipe is None and preset is None:
        raise ValueError("give --preset NAME or --config RECIPE")
    config = load_config(recipe, pre + overrides + forced + post, preset=preset)
    if config.logging.every != 1:
        raise ValueError("logging.every: the ablation needs every step's loss (logging.every = 1)")
    return config


def _run_config(base, plan: ArmPlan, seed: int, out_dir: Path):
    from ..train.config import RunConfig

    d = base.to_dict()
    d["model"] = {"preset": d["model"]["preset"], **plan.model}
    d["training"]["seed"] = int(seed)
    d["out"] = str(out_dir)
    return RunConfig.from_dict(d, where=f"ablation arm {plan.name}")


def _corpus_identity(data: str) -> dict | None:
    """What the prepared data was made from: its sources' sha256, the tokenizer's hash and the
    token count (None: not a prepared folder). An ablation continued on another machine rebuilds
    its data there; this is how a corpus that came out different is caught."""
    from ..data.manifest import read_prepared_manifest

    if not data:
        return None
    try:
        manifest = read_prepared_manifest(data)
    except (FileNotFoundError, ValueError):
        return None
    return {
        "sources": {s["name"]: s.get("sha256") for s in manifest.get("sources", [])},
        "tokenizer": manifest.get("tokenizer", {}).get("hash"),
        "tokens": manifest.get("tokens"),
    }


def _plan_identity(base, plans: dict[str, ArmPlan], spike: dict | None) -> dict:
    d = base.to_dict()
    ident = {k: d[k] for k in ("model", "data", "optim", "schedule")}
    ident["corpus"] = _corpus_identity(d["data"]["path"])
    ident["training"] = {k: d["training"][k] for k in ("max_steps", "micro_batch_size", "seq_len", "tokens_per_step")}
    ident["spike"] = spike
    ident["arms"] = {n: p.model for n, p in plans.items()}
    return ident


def _check_plan(out: Path, identity: dict) -> None:
    path = out / "ablation.json"
    if not path.is_file():
        return
    old = read_json_object(path, PLAN_REMEDY, {"identity": dict})["identity"]
    diffs = []
    for key in ("model", "data", "corpus", "optim", "schedule", "training", "spike"):
        if key == "corpus" and old.get(key) is None:
            continue  # a plan written before the corpus was recorded
        if old.get(key) != identity.get(key):
            diffs.append(f"{key}: was {json.dumps(old.get(key))}, now {json.dumps(identity.get(key))}")
    for arm, model in identity["arms"].items():
        if arm in old.get("arms", {}) and old["arms"][arm] != model:
            diffs.append(f"arm {arm}: was {json.dumps(old['arms'][arm])}, now {json.dumps(model)}")
    if diffs:
        raise ValueError(f"{out} holds an ablation with a different plan (use another --out):\n  " + "\n  ".join(diffs))


def _batch_hash(batch: dict) -> str:
    ids = batch["input_ids"]
    return hashlib.sha1(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class _Recorder(TrainerCallbacks):
    """The run's trainer callbacks: records each micro-batch's sha1 (before any corruption) in
    RUN/batches.jsonl, then applies the spike fault (if any) and logs it in metrics.jsonl.

    batches.jsonl is a log like metrics.jsonl: appended to; a resumed run appends a
    {"resumed": step} line, after which the lines of later steps are superseded (`read_batches`)."""

    def __init__(self, run_dir: Path, spike: dict | None, vocab_size: int):
        self.path = run_dir / "batches.jsonl"
        self.spike = spike
        self.fault = spike_injection(spike["step"], vocab_size, spike["lr_mult"], seed=spike["seed"]) if spike else None
        self.micro: dict[int, int] = {}
        self.file = self.trainer = None

    def on_start(self, trainer) -> None:
        self.trainer = trainer
        resumed = self.path.exists()
        if resumed:
            drop_torn_tail(self.path)
        self.file = open(self.path, "a", buffering=1)
        if resumed:
            self.file.write(json.dumps({"resumed": trainer.step}) + "\n")

    def transform_batch(self, step: int, batch: dict) -> dict:
        m = self.micro.get(step, 0)
        self.micro[step] = m + 1
        self.file.write(json.dumps({"step": step, "micro": m, "sha1": _batch_hash(batch)}) + "\n")
        if self.fault is not None and step == self.spike["step"]:
            batch = self.fault.transform_batch(step, batch)
            if m == 0:
                self.trainer.logger.log(
                    {
                        "step": step,
                        "event": "spike_injected",
                        "lr_mult": self.spike["lr_mult"],
                        "fault": "uniform random input_ids and labels",
                    }
                )
        return batch

    def lr_multiplier(self, step: int) -> float:
        return self.fault.lr_multiplier(step) if self.fault is not None else 1.0

    def on_end(self, trainer, result) -> None:
        self.file.close()


def build_command(
    *, preset, data, steps, out, seeds, arms, recipe=None, overrides=(), avg_k=None, spike=None, tolerance=TOLERANCE
) -> str:
    """The `complexity ablate` command line equivalent to these arguments."""
    cmd = ["complexity", "ablate"]
    if recipe is not None:
        cmd += ["--config", str(recipe)]
    if preset is not None:
        cmd += ["--preset", preset]
    cmd += [
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--seeds",
        str(len(seeds)) if list(seeds) == list(range(len(seeds))) else ",".join(map(str, seeds)),
        "--arms",
        *arms,
        "--out",
        str(out),
    ]
    if avg_k is not None:
        cmd += ["--avg-steps", str(avg_k)]
    if spike is not None:
        cmd += [
            "--spike",
            str(spike["step"]),
            "--spike-lr-mult",
            str(spike["lr_mult"]),
            "--spike-window",
            str(spike["window"]),
        ]
    if tolerance != TOLERANCE:
        cmd += ["--tolerance", str(tolerance)]
    cmd += list(overrides)
    return shlex.join(cmd)


def run_ablation(
    *,
    data: str | Path,
    steps: int,
    out: str | Path,
    preset: str | None = None,
    seeds: int | Iterable[int] = 1,
    arms: Iterable[str] = DEFAULT_ARMS,
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    avg_k: int | None = None,
    spike_step: int | None = None,
    spike_lr_mult: float = 10.0,
    spike_window: int = 20,
    tolerance: float = TOLERANCE,
    stop_after: int | None = None,
    command: str | None = None,
    progress: bool | None = None,
    report: bool = True,
    on_run_end: Callable[[str, int, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    time_limit: float | None = None,
    run_seconds: float | None = None,
) -> AblationResult:
    """Run (or continue) the ablation in `out`, then write the report. See the module docstring.

    seeds: a count N (seeds 0..N-1) or explicit seeds. stop_after: checkpoint and stop every run
    still to train after that step (simulates a preemption; rerun to continue). on_run_end(arm,
    seed, summary) is called after each finished run. time_limit: seconds from now within which
    every run started must finish (a run takes run_seconds, or as long as the longest run this
    call has trained; unknown before the first): the ablation stops, `out_of_time`, before a run
    that could not."""
    log = log or _to_stderr
    for name, value in (("time_limit", time_limit), ("run_seconds", run_seconds)):
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be a positive number of seconds, got {value}")
    deadline = None if time_limit is None else time.monotonic() + time_limit
    run_length = run_seconds or 0.0
    args = _Arguments(
        preset=preset,
        recipe=recipe,
        data=data,
        steps=steps,
        out=Path(out),
        seeds=seed_list(seeds),
        arms=list(arms),
        overrides=list(overrides),
        avg_k=check_avg_steps(steps, avg_k),
        spike=plan_spike(steps, spike_step, spike_lr_mult, spike_window),
        tolerance=tolerance,
    )
    base = base_run_config(
        preset=args.preset,
        data=args.data,
        steps=args.steps,
        recipe=args.recipe,
        overrides=args.overrides,
        spike=args.spike,
    )
    plans = plan_arms(base.model.preset, args.arms, base.model.overrides, tolerance)
    identity = _plan_identity(base, plans, args.spike)
    args.out.mkdir(parents=True, exist_ok=True)
    _check_plan(args.out, identity)  # a different plan is refused, not mixed into the old results
    meta = _ablation_meta(args, base, plans, identity, command or build_command(**asdict(args)))
    write_json(args.out / "ablation.json", meta, indent=2)
    for p in plans.values():
        log(f"ablate: {p.summary()}")

    result = AblationResult(out=args.out, plan=plans)
    (args.out / "runs").mkdir(exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = args.out / "runs" / run_name(arm, seed)
            if (run_dir / "done.json").is_file():
                result.runs[run_dir.name] = read_done(run_dir)
                log(f"ablate: {run_dir.name} finished earlier: skipped")
                continue
            if deadline is not None and run_length and run_length > deadline - time.monotonic():
                left = max(0.0, deadline - time.monotonic())
                log(
                    f"ablate: not starting {run_dir.name}: a run takes about {run_length:.0f} s and {left:.0f} s"
                    " of --time-limit are left; rerun the same command to continue"
                )
                result.interrupted = result.out_of_time = True
                return result
            started = time.perf_counter()
            trained = _train_run(
                base, plans[arm], seed, run_dir, args.spike, stop_after=stop_after, progress=progress, log=log
            )
            if trained.interrupted:
                result.interrupted, result.signal = True, trained.signal
                log(f"ablate: {run_dir.name} stopped at step {trained.step}; rerun the same command to continue")
                write_json(args.out / "ablation.json", meta, indent=2)
                return result
            result.runs[run_dir.name] = summary = _write_summary(run_dir, plans[arm], seed, args, base.training.seq_len)
            # the whole run's time (compilation, evaluations, checkpoints, export, expert map): what a
            # split ablation's jobs are planned with; summary.json's tokens/s counts the steps only
            took = time.perf_counter() - started
            log(f"ablate: {run_dir.name} finished in {took:.0f} s")
            if run_seconds is None:
                run_length = max(run_length, took)
            if on_run_end is not None:
                on_run_end(arm, seed, summary)
    if report:
        result.report, result.figures = write_report(args.out, log=log)
    return result


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Arguments:
    """run_ablation's arguments, checked (a bad flag is a ValueError naming it, raised before
    anything is written); the fields are `build_command`'s arguments."""

    preset: str | None
    recipe: str | Path | None
    data: str | Path
    steps: int
    out: Path
    seeds: list[int]
    arms: list[str]
    overrides: list[str]
    avg_k: int
    spike: dict | None  # `plan_spike`
    tolerance: float


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """--seeds: a count N (seeds 0..N-1) or the seeds themselves: at least one, distinct and >= 0
    (each is one run folder, `<arm>-s<seed>`, and a data order)."""
    given = seeds
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError(f"--seeds: need at least one seed, got {given!r}")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: seeds must be distinct and >= 0 (each is one run), got {seeds}")
    return seeds


def check_avg_steps(steps: int, avg_k: int | None) -> int:
    """--steps and --avg-steps checked -> K, the first steps whose training loss is averaged."""
    if steps <= 0:
        raise ValueError(f"--steps: must be positive, got {steps}")
    avg_k = int(avg_k) if avg_k is not None else default_avg_steps(steps)
    if not 1 <= avg_k <= steps:
        raise ValueError(f"--avg-steps: must lie in [1, --steps={steps}], got {avg_k}")
    return avg_k


def _ablation_meta(args: _Arguments, base, plans: dict[str, ArmPlan], identity: dict, command: str) -> dict:
    """ablation.json: how the ablation was made (the command, its settings, each arm's plan) and
    the plan identity a rerun must match (`_check_plan`); the report is written from it."""
    return {
        "command": command,
        "preset": base.model.preset,
        "recipe": str(args.recipe) if args.recipe else None,
        "data": str(args.data),
        "steps": args.steps,
        "seeds": args.seeds,
        "arms": args.arms,
        "avg_k": args.avg_k,
        "tolerance": args.tolerance,
        "reference_arm": REFERENCE_ARM,
        "spike": args.spike,
        "identity": identity,
        "tokens_per_step": base.training.tokens_per_step or base.training.micro_batch_size * base.training.seq_len,
        "seq_len": base.training.seq_len,
        "precision": base.training.precision,
        "compile": base.training.compile,
        "plan": {n: asdict(p) for n, p in plans.items()},
    }


def _train_run(base, plan: ArmPlan, seed: int, run_dir: Path, spike: dict | None, *, stop_after, progress, log):
    """Train one arm x seed in `run_dir` (continued from its last checkpoint when it has a
    resolved.json) -> the trainer's RunResult."""
    from ..train import Trainer

    resume = (run_dir / "resolved.json").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # started but never got as far as writing its config
    config = _run_config(base, plan, seed, run_dir)
    log(f"ablate: {'resuming' if resume else 'training'} {run_dir.name} ({plan.label})")
    recorder = _Recorder(run_dir, spike, config.model.build().vocab_size)
    trainer = Trainer(
        config, out_dir=run_dir, resume=resume, callbacks=recorder, stop_after=stop_after, progress=progress
    )
    trained = trainer.run()
    del trainer
    _free_memory(config.training.compile)
    return trained


def _write_summary(run_dir: Path, plan: ArmPlan, seed: int, args: _Arguments, seq_len: int) -> dict:
    """A trained run's done.json (see `read_done`): its metrics summarised, its parameter counts,
    the command that trains it alone and, with a spike, the spike's metrics. Written last: it is
    what marks the run finished. A routed arm's expert_map.npz is written first, while its
    weights are at hand: the report draws experts.png from it, the weights need not stay."""
    if plan.model.get("mlp_type") != "dense":
        write_expert_map(run_dir, str(args.data), seq_len)
    records = read_run_metrics(run_dir)
    summary = summarise_run(records, plan.name, seed, args.avg_k)
    summary.update(
        {
            "total_params": plan.total,
            "active_params": plan.active,
            "train_command": f"complexity train --config {shlex.quote(str(run_dir / 'resolved.json'))} "
            f"--out {shlex.quote(str(run_dir))} --overwrite",
        }
    )
    if args.spike is not None:
        summary["spike"] = spike_metrics(records, args.spike["step"], args.spike["window"])
    write_json(run_dir / "done.json", summary, indent=2)
    return summary


def _free_memory(compiled: bool) -> None:
    import torch

    gc.collect()
    if compiled:
        torch._dynamo.reset()  # each arm compiles its own layers; do not pile up caches/recompiles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
