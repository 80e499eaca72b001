"""The trainer's evaluation and metrics sinks (CPU, tiny model): the validation loader is built
once and every evaluation sees the same batches, with the numbers a freshly built loader gives;
on a resume, TensorBoard purges what the stopped run logged after its checkpoint and wandb
continues the same run (a fake wandb module: wandb is not a dependency), --overwrite starts anew."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, tiny_config  # noqa: E402

from complexity.data import manifest as data_manifest  # noqa: E402
from complexity.data.files import FileFormatError  # noqa: E402
from complexity.train import Trainer, TrainerCallbacks, train  # noqa: E402
from complexity.train import data as data_mod  # noqa: E402
from complexity.train.eval import evaluate  # noqa: E402
from complexity.train.metrics import read_metrics, train_losses  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("telemetry-data"))[1]


def _eval_with_a_new_loader(trainer: Trainer) -> dict:
    """The trainer's evaluation as it was before the loader was kept: a loader built for this call."""
    t, path = trainer.config.training, trainer.config.data.path
    loader = data_mod.make_val_loader(path, t.micro_batch_size, t.seq_len, vocab_size=trainer.model_config.vocab_size)
    manifest = data_manifest.read_prepared_manifest(path)
    return evaluate(
        trainer.model,
        iter(loader),
        device=trainer.device,
        vocab_size=trainer.model_config.vocab_size,
        max_batches=min(len(loader), trainer.config.eval.max_batches),
        split_tokens=data_manifest.split_tokens(manifest, "val"),
        split_bytes=data_manifest.split_bytes(manifest, "val"),
        forward=trainer.forward_module,
    )


def test_validation_loader_is_built_once_and_evaluations_repeat_exactly(data, tmp_path, monkeypatch):
    built = []
    make = data_mod.make_val_loader
    monkeypatch.setattr(data_mod, "make_val_loader", lambda *a, **k: built.append(a) or make(*a, **k))
    cfg = tiny_config(data, **{"training.max_steps": 6, "eval.every": 2, "eval.max_batches": 3})
    trainer = Trainer(cfg, out_dir=tmp_path / "run")
    trainer.run()
    evals = {r["step"]: r for r in read_metrics(tmp_path / "run") if "val_loss" in r}
    assert sorted(evals) == [2, 4, 6]  # three evaluations (every 2 steps, and at the end)
    assert len(built) == 1  # one loader for all of them
    assert trainer.val_batches == 3

    first, second = trainer.run_eval(), trainer.run_eval()
    assert first == second  # the same batches, the same numbers, bit for bit
    assert first["val_tokens"] == 3 * cfg.training.micro_batch_size * cfg.training.seq_len
    assert first["val_loss"] == evals[6]["val_loss"]  # = the evaluation logged at the end of the run
    monkeypatch.undo()
    assert first == _eval_with_a_new_loader(trainer)


# ----------------------------------------------------------------------------- sinks on resume


class _Crash(TrainerCallbacks):
    """Stops the run with an exception at step `at` (a crash after the earlier steps were logged)."""

    def __init__(self, at: int):
        self.at = at

    def transform_batch(self, step: int, batch: dict) -> dict:
        if step == self.at:
            raise RuntimeError(f"crash at step {step}")
        return batch


def _tensorboard_events(run: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [
        ev for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")) for ev in EventFileLoader(str(f)).Load()
    ]


@pytest.mark.parametrize(
    "checkpoint_every,crash_at,resume_step", [(10, 4, 0), (2, 4, 2)], ids=["no-checkpoint", "step-2"]
)
def test_tensorboard_purges_what_the_stopped_run_logged_after_its_checkpoint(
    data, tmp_path, checkpoint_every, crash_at, resume_step
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto.event_pb2 import SessionLog

    cfg = tiny_config(
        data, **{"training.max_steps": 6, "checkpoint.every": checkpoint_every, "logging.tensorboard": True}
    )
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=f"crash at step {crash_at}"):
        train(cfg, out_dir=run, callbacks=_Crash(crash_at))
    stopped = {ev.step for ev in _tensorboard_events(run) if ev.summary.value}
    assert stopped == set(range(1, crash_at))  # steps after the checkpoint are among them

    result = train(cfg, out_dir=run, resume=True)
    assert min(result.losses) == resume_step + 1
    starts = [ev.step for ev in _tensorboard_events(run) if ev.session_log.status == SessionLog.START]
    assert starts == [resume_step + 1]  # purge_step: readers drop the events of steps >= S + 1 before it

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))  # each step once
    losses = train_losses(read_metrics(run))
    assert logged == pytest.approx(losses, rel=1e-6)  # float32 in the event file


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package (not a dependency): records every init() and log()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[int] = []
        self.util = types.SimpleNamespace(generate_id=lambda: f"run{len(self.inits)}x")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda scalars, step: self.logged.append(step), finish=lambda: None)


def test_wandb_resumes_the_same_run_and_overwrite_starts_a_new_one(data, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(data, **{"training.max_steps": 6, "checkpoint.every": 2, "logging.wandb": True})
    run = tmp_path / "run"
    record = run / "wandb.json"

    train(cfg, out_dir=run, stop_after=3)
    (first,) = fake.inits
    assert first["id"] == "run0x" and first["resume"] == "allow" and first["dir"] == str(run)
    assert json.loads(record.read_text())["id"] == "run0x"

    train(cfg, out_dir=run, resume=True)
    assert fake.inits[1]["id"] == "run0x" and fake.inits[1]["resume"] == "allow"  # the same wandb run
    assert fake.logged == [1, 2, 3, 4, 5, 6, 6]  # (step 6: the loss, then the evaluation at the end)

    (run / "wandb").mkdir()  # wandb's own files
    train(cfg, out_dir=run, overwrite=True, stop_after=1)
    assert fake.inits[2]["id"] == "run2x" and json.loads(record.read_text())["id"] == "run2x"

    record.write_text('{"id": ')
    with pytest.raises(FileFormatError) as info:
        train(cfg, out_dir=run, resume=True)
    assert str(record) in str(info.value) and "delete it to log to a new wandb run" in str(info.value)
    record.unlink()
    train(cfg, out_dir=run, resume=True)
    assert fake.inits[-1]["id"] == "run3x" and json.loads(record.read_text())["id"] == "run3x"


def test_overwrite_removes_the_wandb_files(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb())
    run = tmp_path / "run"
    train(tiny_config(data, **{"training.max_steps": 2, "logging.wandb": True}), out_dir=run)
    (run / "wandb" / "run-1").mkdir(parents=True)
    train(tiny_config(data, **{"training.max_steps": 2}), out_dir=run, overwrite=True)
    assert not (run / "wandb").exists() and not (run / "wandb.json").exists()
