"""Training loses nothing, whenever it is killed (CPU, tiny model).

- kill -9 at each write point of a run (its files, metrics.jsonl, every stage of a checkpoint, the
  export, the summary), then --resume: every step's loss equals an uninterrupted run's (bitwise),
  the evaluations are there, the exported weights are identical, the last checkpoint is whole;
- resuming a finished run changes nothing on disk;
- damaged checkpoints (truncated, altered, missing files, broken meta.json, no .metadata, an
  incomplete folder): resume falls back to the previous one, saying so; all damaged: one clear
  error and nothing moved;
- a full disk (before a checkpoint, inside DCP's writes, in metrics.jsonl, at the export): the
  run stops with the path and the bytes, the last good checkpoint intact, and resumes;
- a tokenizer replaced between `data prepare` and `train` is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, override_args, run_cli, tiny_overrides  # noqa: E402

from complexity.cli import main as cli_main  # noqa: E402
from complexity.data.files import DiskFullError  # noqa: E402
from complexity.train import (  # noqa: E402
    CheckpointError,
    TrainerCallbacks,
    durable,  # noqa: E402
    load_config,
    train,
)
from complexity.train import checkpoint as ckpt_mod  # noqa: E402
from complexity.train.metrics import read_metrics, train_losses  # noqa: E402

STEPS = 8
# Checkpoints at 3 and 6 (keep 2) and at the end; evaluations at 4 and at the end.
RUN = {
    "training.max_steps": STEPS,
    "checkpoint.every": 3,
    "checkpoint.keep_last": 2,
    "eval.every": 4,
    "eval.max_batches": 2,
}

# Every write point of a run, with the occurrence to kill at (name:N = the N-th time).
KILL_POINTS = [
    "run.resolved_json",  # before resolved.json is renamed in: nothing there yet
    "run.tokenizer.renamed",
    "run.run_json",
    "metrics.appended:4",  # in the middle of training, no checkpoint yet... after step 3's
    "checkpoint.dcp_saved:2",  # the second checkpoint (step 6), at each stage
    "checkpoint.rank_state_saved:2",
    "checkpoint.meta_written:2",
    "checkpoint.renamed:2",  # step 6 in place, step 3 not yet pruned
    "checkpoint.pruned:3",  # the last checkpoint (step 8) complete, before the export
    "export.renamed",  # final/ in place, summary.json not yet written
    "run.summary_json",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("faults")
    _, data = make_tiny_data(root / "data")
    o = tiny_overrides(data, **RUN)
    reference = root / "reference"
    train(load_config(None, o), out_dir=reference)
    yield root, o, reference


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final/model.safetensors")


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    records = read_metrics(run)
    ref_records = read_metrics(reference)
    assert train_losses(records) == train_losses(ref_records)  # bitwise, every step 1..8
    assert sorted(train_losses(records)) == list(range(1, STEPS + 1))
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert evals == {r["step"]: r["val_loss"] for r in ref_records if "val_loss" in r} and sorted(evals) == [4, 8]
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "final/tokenizer.json").is_file()
    last = ckpt_mod.latest_checkpoint(run / "checkpoints")
    assert last.name == f"step_{STEPS:08d}" and ckpt_mod.verify_checkpoint(last)["step"] == STEPS
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["interrupted"] is False


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)): "dir" for p in folder.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_each_write_point_then_resume_loses_nothing(setup, tmp_path, point):
    root, o, reference = setup
    out = tmp_path / "run"
    killed = run_cli(["train", "--out", str(out), *override_args(o)], env={durable.KILL_ENV: point})
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    result = train(load_config(None, o), out_dir=out, resume=True)
    assert result.step == STEPS and not result.interrupted
    _assert_same_as_reference(out, reference)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".partial") or p.name.startswith((".tmp", ".replaced"))]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_torn_metrics_line_is_dropped_on_resume(setup, tmp_path):
    root, o, reference = setup
    out = tmp_path / "run"
    train(load_config(None, o), out_dir=out, stop_after=5)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # a kill in the middle of a write
    train(load_config(None, o), out_dir=out, resume=True)
    _assert_same_as_reference(out, reference)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert '{"step": 5, "event": "resumed"}' in lines and all(json.loads(line) for line in lines)


def test_resuming_a_finished_run_changes_nothing_on_disk(setup, tmp_path, capsys):
    root, o, reference = setup
    out = tmp_path / "finished"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    assert cli_main(["train", "--out", str(out), "--resume", *override_args(o)]) == 0
    assert "the run finished at step 8; nothing to do" in capsys.readouterr().err
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    f = next(path.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _scribble(path: Path) -> None:
    f = next(path.glob("*.distcp"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, other content
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensor file": _truncate,
    "altered tensor file": _scribble,
    "missing rank state": lambda p: (p / "rank_00000.json").unlink(),
    "missing .metadata": lambda p: (p / ".metadata").unlink(),
    "broken meta.json": lambda p: (p / "meta.json").write_text('{"step": 7, "sched'),
    "no meta.json": lambda p: (p / "meta.json").unlink(),
}


@pytest.fixture(scope="module")
def stopped_run(setup, tmp_path_factory):
    """A run stopped after step 7: checkpoints at steps 6 and 7."""
    root, o, _ = setup
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(load_config(None, o), out_dir=out, stop_after=7)
    assert [p.name for p in ckpt_mod.list_checkpoints(out / "checkpoints")] == ["step_00000006", "step_00000007"]
    return out


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(setup, stopped_run, tmp_path, capsys, kind):
    root, o, reference = setup
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    DAMAGE[kind](out / "checkpoints/step_00000007")
    result = train(load_config(None, o), out_dir=out, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step_00000007 is damaged" in err and "resuming from the one before" in err, err
    assert sorted(result.losses) == [7, 8]  # step 7 redone from step 6's checkpoint
    _assert_same_as_reference(out, reference)
    assert (out / "checkpoints/.damaged-step_00000007").is_dir()  # set aside, never read again


def test_all_checkpoints_damaged_is_one_clear_error_and_nothing_moves(setup, stopped_run, tmp_path, capsys):
    root, o, _ = setup
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    for step in (6, 7):
        _truncate(out / f"checkpoints/step_{step:08d}")
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint; .*step_00000007/__0_0.distcp: damaged"):
        train(load_config(None, o), out_dir=out, resume=True)
    assert cli_main(["train", "--out", str(out), "--resume", *override_args(o)]) == 2
    err = capsys.readouterr().err
    assert "complexity train: error:" in err and "Traceback" not in err
    assert _snapshot(out) == before
    # `complexity eval` of a damaged checkpoint: one line naming the file.
    assert cli_main(["eval", str(out / "checkpoints/step_00000007"), "--data", str(o["data.path"])]) == 2
    assert "step_00000007/__0_0.distcp: damaged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a full disk


def test_full_disk_before_a_checkpoint(setup, tmp_path, monkeypatch, capsys):
    root, o, reference = setup
    out = tmp_path / "run"
    saves = []
    real = ckpt_mod.free_bytes

    def free_bytes(path):  # the disk fills up after the first checkpoint
        saves.append(path)
        return 1000 if len(saves) > 1 else real(path)

    monkeypatch.setattr(ckpt_mod, "free_bytes", free_bytes)
    assert cli_main(["train", "--out", str(out), *override_args(o)]) == 1
    err = capsys.readouterr().err
    assert f"complexity train: error: {out / 'checkpoints/step_00000006'}: disk full: writing it needs" in err
    assert "1,000 bytes free there; checkpoint not written; the last checkpoint" in err
    assert "step_00000003, is intact" in err and "Traceback" not in err
    assert [p.name for p in ckpt_mod.list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    ckpt_mod.verify_checkpoint(out / "checkpoints/step_00000003")
    monkeypatch.undo()
    train(load_config(None, o), out_dir=out, resume=True)
    _assert_same_as_reference(out, reference)


def test_full_disk_inside_the_checkpoint_writer(setup, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    root, o, reference = setup
    out = tmp_path / "run"
    real_write, real_free, saves, written = filesystem._write_item, ckpt_mod.free_bytes, [], []

    def free_bytes(path):  # called once at the start of every save
        saves.append(path)
        return real_free(path)

    def write_item(*args, **kwargs):
        if len(saves) == 2:  # the second checkpoint: some tensors are written, then the disk fills
            written.append(1)
            if len(written) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "free_bytes", free_bytes)
    monkeypatch.setattr(filesystem, "_write_item", write_item)
    with pytest.raises(DiskFullError, match=r"step_00000006: disk full: writing it needs .*step_00000003, is intact"):
        train(load_config(None, o), out_dir=out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003"]  # no leftovers
    monkeypatch.undo()
    train(load_config(None, o), out_dir=out, resume=True)
    _assert_same_as_reference(out, reference)


class _FullAfter(TrainerCallbacks):
    """Makes metrics.jsonl's writes fail with ENOSPC after `n` more lines."""

    def __init__(self, n):
        self.n = n

    def on_start(self, trainer):
        real, left = trainer.logger.jsonl, [self.n]

        class Full:
            def write(self, text):
                left[0] -= 1
                if left[0] < 0:
                    real.write(text[: len(text) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real.write(text)

            def __getattr__(self, name):
                return getattr(real, name)

        trainer.logger.jsonl = Full()


def test_full_disk_in_the_metrics_log(setup, tmp_path):
    root, o, reference = setup
    out = tmp_path / "run"
    with pytest.raises(
        DiskFullError, match=r"metrics.jsonl: disk full: writing it needs .*its last checkpoint is intact"
    ):
        train(load_config(None, o), out_dir=out, callbacks=_FullAfter(5))
    train(load_config(None, o), out_dir=out, resume=True)  # the torn line is dropped
    _assert_same_as_reference(out, reference)


def test_full_disk_at_the_export(setup, tmp_path, monkeypatch):
    from complexity.train import export

    root, o, reference = setup
    out = tmp_path / "run"
    monkeypatch.setattr(export, "free_bytes", lambda path: 1000)
    with pytest.raises(
        DiskFullError,
        match=r"final: disk full: writing it needs .* bytes, 1,000 bytes free there; not exported; .*checkpoints are intact",
    ):
        train(load_config(None, o), out_dir=out)
    assert not (out / "final").exists() and not (out / ".final.tmp").exists()
    monkeypatch.undo()
    result = train(load_config(None, o), out_dir=out, resume=True)
    assert result.losses == {}  # nothing retrained: only the export was missing
    _assert_same_as_reference(out, reference)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_file_and_folder_replacement(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    durable.write_json(target, {"v": 1})

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", enospc)
    with pytest.raises(DiskFullError, match=r"a.json: disk full: writing it needs at least 9 more bytes"):
        durable.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # A folder swap killed between its two renames: recover_dir puts the old copy back.
    final, new = tmp_path / "final", tmp_path / ".final.tmp"
    final.mkdir()
    (final / "x").write_text("old")
    new.mkdir()
    (new / "x").write_text("new")

    def crash(point):
        if point == "export.old_moved_aside":
            raise RuntimeError("killed")

    durable.fault_hook = crash
    try:
        with pytest.raises(RuntimeError):
            durable.replace_dir(new, final, "export")
    finally:
        durable.fault_hook = None
    assert not final.exists() and durable.recover_dir(final) and (final / "x").read_text() == "old"
    durable.replace_dir(new, final, "export")
    assert (final / "x").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "final"]


# ----------------------------------------------------------------------------- the tokenizer


def test_tokenizer_replaced_after_prepare_is_refused(tmp_path):
    from _train_fixtures import corpus_text

    from complexity.data.tokenizer import train_tokenizer

    tok, data = make_tiny_data(tmp_path / "d")
    shutil.rmtree(tok)
    train_tokenizer(corpus_text(50, seed=7), 300, tok, show_progress=False)  # another tokenizer, same place
    with pytest.raises(ValueError, match=r"tokenizer .*: changed since the data was prepared .*Restore the tokenizer"):
        train(load_config(None, tiny_overrides(data, **RUN)), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
