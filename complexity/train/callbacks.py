"""Hooks for experiments: a `TrainerCallbacks` object passed to `Trainer(callbacks=...)`.

Subclass it and override what you need; every method has a do-nothing default. The trainer calls
them on every rank, at these points:

    on_start(trainer)              after setup: the model is built, a resumed run is loaded
                                   (trainer.step is the step it continues from), the log is open
    transform_batch(step, batch)   every micro-batch of optimizer step `step` (1-based), before it
                                   is moved to the device -> the batch to train on
    lr_multiplier(step)            multiplies the scheduled learning rate of step `step`
    on_end(trainer, result)        after the run (finished or stopped), before the trainer returns

`spike_injection` builds the one used by the spike experiment: uniform random tokens and a
multiplied learning rate at chosen steps.
"""

from __future__ import annotations

from collections.abc import Iterable


class TrainerCallbacks:
    def on_start(self, trainer) -> None:
        pass

    def transform_batch(self, step: int, batch: dict) -> dict:
        return batch

    def lr_multiplier(self, step: int) -> float:
        return 1.0

    def on_end(self, trainer, result) -> None:
        pass


class SpikeInjection(TrainerCallbacks):
    """A fault at each of `steps`: every micro-batch's input_ids and labels replaced by uniform
    random ids (one fixed draw from `seed`: the same for every arm and seed), the LR x `lr_mult`."""

    def __init__(self, steps: Iterable[int], vocab_size: int, lr_mult: float = 10.0, seed: int = 1234):
        self.steps, self.vocab_size, self.lr_mult, self.seed = set(steps), vocab_size, lr_mult, seed

    def transform_batch(self, step: int, batch: dict) -> dict:
        if step not in self.steps:
            return batch
        import torch  # here, not at import: the ablation command's parser imports this module

        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self.vocab_size, batch["input_ids"].shape, generator=g)
        return {**batch, "input_ids": ids, "labels": torch.randint(0, self.vocab_size, ids.shape, generator=g)}

    def lr_multiplier(self, step: int) -> float:
        return self.lr_mult if step in self.steps else 1.0


def spike_injection(
    step: int | Iterable[int], vocab_size: int, lr_mult: float = 10.0, seed: int = 1234
) -> SpikeInjection:
    """The spike experiment's fault at `step` (1-based; or several steps)."""
    return SpikeInjection([step] if isinstance(step, int) else step, vocab_size, lr_mult, seed)
