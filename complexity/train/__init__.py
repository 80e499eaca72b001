"""Training: recipes, the loop, optimizer + schedule, checkpoints, distributed wrapping, metrics.

    from complexity.train import load_config, train
    result = train(load_config("recipes/tiny.toml", ["training.max_steps=50"]), out_dir="runs/tiny")

Submodules: config (recipes), optimizer, parallelize (DDP / FSDP2 / compile / AC from outside
the model), checkpoint (atomic DCP), trainer (the loop), metrics, eval, plot.
"""

from .config import ConfigError, RunConfig, load_config
from .trainer import RunResult, Trainer, spike_injection, train

__all__ = ["ConfigError", "RunConfig", "RunResult", "Trainer", "load_config", "spike_injection", "train"]
