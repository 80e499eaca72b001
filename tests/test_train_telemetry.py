"""The trainer's evaluation and metrics sinks (CPU, tiny model): the validation loader is built
once and every evaluation sees the same batches, with the numbers a freshly built loader gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, tiny_config  # noqa: E402

from complexity.data import manifest as data_manifest  # noqa: E402
from complexity.train import Trainer  # noqa: E402
from complexity.train import data as data_mod  # noqa: E402
from complexity.train.eval import evaluate  # noqa: E402
from complexity.train.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
