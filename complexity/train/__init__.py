"""Training: recipes, the loop, optimizer + schedule, checkpoints, distributed wrapping, metrics.

    from complexity.train import load_config, train
    result = train(load_config("recipes/tiny.toml", ["training.max_steps=50"]), out_dir="runs/tiny")

Submodules: config (recipes), trainer (the loop), optimizer, parallelize (DDP / FSDP2 / compile /
AC from outside the model), checkpoint (atomic DCP, verification), run_folder, export, durable
(atomic writes, fault points), spike_guard, callbacks (experiment hooks), metrics (log, reader,
MFU), eval, plot.
"""

from .callbacks import SpikeInjection, TrainerCallbacks, spike_injection
from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig, load_config
from .durable import DiskFullError
from .trainer import RunResult, Trainer, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DiskFullError",
    "RunConfig",
    "RunResult",
    "SpikeInjection",
    "Trainer",
    "TrainerCallbacks",
    "load_config",
    "spike_injection",
    "train",
]
