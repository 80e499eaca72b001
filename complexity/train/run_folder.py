"""The run folder: what a new, resumed or replaced run may do with it, and its small files.

    OUT/resolved.json   the resolved config (written once, at the start of a new run)
    OUT/run.json        this process's machine, batch layout, compile choice, MFU peak
    OUT/metrics.jsonl   the log (metrics.py)        OUT/tensorboard/
    OUT/wandb.json      the id of the run's wandb run (with logging.wandb), and wandb's own OUT/wandb/
    OUT/tokenizer/      the data's tokenizer, checked against the data manifest and copied at the
                        start: the export ships this copy, whatever happens to the original
    OUT/checkpoints/    step_XXXXXXXX/ (checkpoint.py)
    OUT/final/          the Hugging Face export (export.py)
    OUT/summary.json    throughput, MFU and memory of the process that finished the run

Rules. A folder holding another run is refused unless `--resume` (same trajectory: the
differences are listed) or `--overwrite`; a non-empty folder that is not a run is never
overwritten. `--resume` of a folder with no run in it starts one. A resumed run continues from
the newest checkpoint that is whole (checkpoint.find_resume_checkpoint), or from step 0 when the
run was stopped before its first checkpoint. Every file is written atomically (durable.py), and
a resumed run that had finished changes nothing on disk. While `train` runs, its folder is held
(`in_use`): a second run into it is refused before it touches anything.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..data.files import check_parent_folders, held, read_json_object
from . import checkpoint as ckpt_mod
from .config import RunConfig
from .durable import recover_dir, replace_dir, write_json
from .metrics import METRICS, WANDB_RUN, read_metrics
from .parallelize import barrier

RUN_FILES = (
    "resolved.json",
    "run.json",
    METRICS,
    "summary.json",
    "tensorboard",
    WANDB_RUN,
    "wandb",
    "tokenizer",
    "checkpoints",
    "final",
)


@contextmanager
def in_use(out) -> Iterator[None]:
    """Hold the run folder `out` while the block runs (rank 0 under torchrun, or the one process),
    so that a second run started into it, say `--resume` while the first is in fact still
    running, is refused before it removes or writes anything. A folder created here for a run
    that then fails before writing anything is removed again."""
    out = None if out is None else Path(out)
    if out is not None:
        check_parent_folders(out)
    if out is None or int(os.environ.get("RANK", "0")) != 0 or out.is_file():  # the run names a file
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    hold = ExitStack()
    try:
        hold.enter_context(held(out))
    except FileExistsError:
        raise FileExistsError(
            f"output folder {out} is being written by another training run that is still running: "
            "wait for it to end, stop it, or choose another --out"
        ) from None
    try:
        with hold:
            yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _own_temporary(name: str) -> bool:
    """The temporary names of the run's writes: AtomicFile's `*.partial`, the export's and the
    tokenizer copy's `.*.tmp` folders, `.replaced-*` (durable.replace_dir)."""
    return (
        name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp")) or name.startswith(".replaced-")
    )


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs now {vb!r}")
    return out


def check_same_run(saved: dict, config: RunConfig, where) -> None:
    """Raise ValueError listing what differs between a saved run's identity and `config`'s."""
    diffs = _diff(saved, config.identity())
    if diffs:
        raise ValueError(f"{where} was started with a different config:\n  " + "\n  ".join(diffs))


@dataclass
class Start:
    """How a run starts in its folder: `checkpoint` to resume from (None: step 0), and whether the
    folder already holds this run's log (`resumed`)."""

    checkpoint: Path | None = None
    resumed: bool = False


class RunFolder:
    def __init__(self, path: Path | None, is_main: bool):
        self.path, self.is_main = path, is_main

    def log(self, message: str) -> None:
        """What the folder tells the user (fallbacks, fresh starts): always shown, by rank 0."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def start(self, config: RunConfig, *, resume: bool, overwrite: bool) -> Start:
        """Check the folder against what was asked (before any compute) and prepare it. Collective."""
        out = self.path
        if out is None:
            return Start()
        check_parent_folders(out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output folder {out} is a file, not a run folder: choose another --out")
        resolved = out / "resolved.json"
        if self.is_main and out.is_dir():  # finish or undo folder swaps a kill interrupted
            for folder in [out / "final", out / "tokenizer", *self._swapped_checkpoints()]:
                recover_dir(folder)
        barrier()
        if resume and resolved.is_file():
            saved = read_json_object(
                resolved,
                "it is the config of the run to resume: restore it, or start the run again with --overwrite "
                "instead of --resume (its checkpoints are then deleted)",
            )
            check_same_run(RunConfig.from_dict(saved, where=str(resolved)).identity(), config, f"--resume {out}")
            checkpoint = ckpt_mod.find_resume_checkpoint(self.checkpoints, self.log)
            if checkpoint is None:
                self.log(f"{out}: no checkpoint yet: the run starts again from step 0")
            return Start(checkpoint, resumed=True)
        if self._holds_files():
            if resume:
                raise FileExistsError(f"--resume {out}: this folder holds no run (no resolved.json)")
            if not overwrite:
                what = "another run" if resolved.is_file() else "other files"
                raise FileExistsError(
                    f"output folder {out} already holds {what}: use --resume to continue it, "
                    "--overwrite to replace it, or another --out"
                )
            if not resolved.is_file():
                raise FileExistsError(
                    f"output folder {out} holds files that are not a training run; "
                    "refusing to --overwrite it (choose another --out)"
                )
            barrier()  # every rank has looked at the folder before rank 0 empties it
            if self.is_main:
                self._remove_run_files()
            barrier()
        elif resume:
            self.log(f"--resume {out}: no run there yet: starting one")
        return Start()

    def _swapped_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return [self.checkpoints / p.name.removeprefix(".replaced-") for p in self.checkpoints.glob(".replaced-step_*")]

    def _holds_files(self) -> bool:
        """Anything but our own temporary files (a kill before resolved.json was written)."""
        return self.path.is_dir() and any(not _own_temporary(p.name) for p in self.path.iterdir())

    def _remove_run_files(self) -> None:
        # resolved.json last: a kill in between leaves a folder that is still recognised as a run.
        temporary = [p.name for p in self.path.iterdir() if _own_temporary(p.name)]
        for name in [*RUN_FILES[1:], *temporary, RUN_FILES[0]]:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # ------------------------------------------------------------------ files

    def write_config(self, config: RunConfig) -> None:
        if self.path is not None and self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "resolved.json", config.to_dict(), "run.resolved_json", indent=2)

    def write_run_info(self, info: dict) -> None:
        if self.path is not None and self.is_main:
            write_json(self.path / "run.json", info, "run.run_json", indent=2)

    def write_summary(self, summary: dict) -> None:
        if self.path is not None and self.is_main:
            write_json(self.path / "summary.json", summary, "run.summary_json", indent=2)

    def tokenizer_to_ship(self, source: Path | None, expected_hash: str | None, own_copy: bool) -> Path | None:
        """The tokenizer folder the export will ship: the run's copy (OUT/tokenizer) when a resumed
        run has one (`own_copy`), else the data's own, checked against the hash the data manifest
        recorded: a tokenizer replaced since `data prepare` is refused. Reads only (before the
        folder is touched); `write_tokenizer` makes the copy."""
        from ..data.tokenizer import tokenizer_hash

        if self.path is None or source is None:
            return None
        copy = self.path / "tokenizer"
        if own_copy and copy.is_dir():
            if expected_hash and tokenizer_hash(copy) != expected_hash:
                raise ValueError(
                    f"{copy}: does not match the tokenizer the data was prepared with "
                    f"(hash {expected_hash[:12]}): this run folder was changed"
                )
            return copy
        if not (source / "tokenizer.json").is_file():
            self.log(
                f"the tokenizer the data was prepared with ({source}) is gone: the export will have no tokenizer files"
            )
            return None
        found = tokenizer_hash(source)
        if expected_hash and found != expected_hash:
            raise ValueError(
                f"tokenizer {source}: changed since the data was prepared (hash {found[:12]}, the data manifest "
                f"records {expected_hash[:12]}); the exported model would ship a tokenizer that does not match "
                "its training data. Restore the tokenizer, or prepare the data again with this one"
            )
        return source

    def write_tokenizer(self, source: Path | None) -> Path | None:
        """Copy the checked tokenizer into OUT/tokenizer (once) -> the copy. Collective."""
        if self.path is None or source is None or source == self.path / "tokenizer":
            return source
        if self.is_main:
            tmp = self.path / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            replace_dir(tmp, self.path / "tokenizer", "run.tokenizer")
        barrier()
        return self.path / "tokenizer"

    # ------------------------------------------------------------------ the end of a run

    def logged_eval_at(self, step: int) -> bool:
        return any(r.get("step") == step and "val_loss" in r for r in read_metrics(self.path))

    def finished(self, step: int, max_steps: int, export: bool) -> bool:
        """Whether a run resumed at `step` has nothing left to do (its last checkpoint, export and
        the summary of its end are all there): then it changes nothing on disk."""
        summary = self.path / "summary.json" if self.path is not None else None
        if summary is None or step < max_steps or not summary.is_file():
            return False
        ended = read_json_object(
            summary,
            "it records how the run ended: delete it and resume again to redo the end of the run (its last "
            "evaluation, checkpoint and export are kept where present; no step is trained again)",
            {"interrupted": bool},
        )
        if ended["interrupted"]:
            return False
        return not export or (self.path / "final").is_dir()
