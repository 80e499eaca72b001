"""Training: recipes, the loop, optimizer + schedule, checkpoints, distributed wrapping, metrics.

    from complexity.train import load_config, train
    result = train(load_config("recipes/tiny.toml", ["training.max_steps=50"]), out_dir="runs/tiny")

Submodules: config (recipes), trainer (the loop), optimizer, parallelize (DDP / FSDP2 / compile /
AC from outside the model), checkpoint (atomic DCP, verification), run_folder, export, durable
(atomic writes, fault points), spike_guard, callbacks (experiment hooks), metrics (log, reader,
MFU), eval, plot. The public names below are imported on first use (PEP 562): the ablation
command's parser reads `callbacks` and `durable` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule defining it.
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "ConfigError": "config",
    "RunConfig": "config",
    "load_config": "config",
    "RunResult": "trainer",
    "Trainer": "trainer",
    "train": "trainer",
    "SpikeInjection": "callbacks",
    "TrainerCallbacks": "callbacks",
    "spike_injection": "callbacks",
}

if TYPE_CHECKING:
    from .callbacks import SpikeInjection, TrainerCallbacks, spike_injection
    from .checkpoint import CheckpointError
    from .config import ConfigError, RunConfig, load_config
    from .trainer import RunResult, Trainer, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "RunConfig",
    "RunResult",
    "SpikeInjection",
    "Trainer",
    "TrainerCallbacks",
    "load_config",
    "spike_injection",
    "train",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
