"""The trainer's view of the data: prepared folders, data slots, synthetic tokens.

**Data slots.** A run with global batch `tokens_per_step` is `num_slots = tokens_per_step /
(micro_batch_size * seq_len)` micro-batches per optimizer step. Each micro-batch position is a
*slot*, served by its own loader instance sharded as (rank = slot, world_size = num_slots).
Rank r of a world of size W with `accum` micro-steps owns slots `r*accum ... r*accum+accum-1`.
So the set of sequences in each optimizer step depends only on (seed, tokens_per_step,
micro_batch_size, seq_len), never on how many processes share the work: one process with
accumulation 2 and two processes without accumulation see the same data, and a checkpoint (which
stores every slot's position) resumes on any world size that divides `num_slots`.
"""

from __future__ import annotations

import numpy as np
import torch


class SlotLoader:
    """One data slot: a `complexity.data.loader.TrainLoader` (rank = slot, world = num_slots)
    with `next()` and exact-resume state."""

    def __init__(self, path, batch_size: int, seq_len: int, seed: int, slot: int, num_slots: int, vocab_size: int):
        from ..data.loader import TrainLoader

        self.loader = TrainLoader(
            path,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            rank=slot,
            world_size=num_slots,
            vocab_size=vocab_size,
        )
        self._it = None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def make_val_loader(
    path,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    vocab_size: int | None = None,
):
    """Every val sample once, in order (`complexity.data.loader.EvalLoader`); rank r takes r::world."""
    from ..data.loader import EvalLoader

    return EvalLoader(
        path,
        batch_size=batch_size,
        seq_len=seq_len,
        split="val",
        rank=rank,
        world_size=world_size,
        max_batches=max_batches,
        vocab_size=vocab_size,
    )


def zipf_counts(path, manifest: dict, vocab_size: int, rank: int, world_size: int) -> tuple[np.ndarray, bool]:
    """Per-id train-split frequencies, padded to the model's vocab_size. From the prepared folder's
    counts file when it has one (already global: returns (counts, False)); otherwise counted over
    this rank's share of the shards (returns (counts, True): the caller must all-reduce)."""
    from ..data.manifest import read_token_counts, token_counts_path

    out = np.zeros(vocab_size, dtype=np.int64)
    counts_file = token_counts_path(path, manifest)
    if counts_file is not None and counts_file.is_file():
        c = read_token_counts(path, manifest)
        out[: len(c)] = c
        return out, False
    from ..data.loader import PackedTokens
    from ..routing import count_token_frequencies

    tokens = PackedTokens(path, "train")
    for i, shard in enumerate(tokens.shards):
        if i % world_size == rank:
            for start in range(0, shard.size, 1 << 24):
                out += count_token_frequencies(np.asarray(shard[start : start + (1 << 24)]), vocab_size)
    return out, True


class SyntheticLoader:
    """Uniform random tokens (throughput benchmarks), deterministic in (seed, slot, batch)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.seed, self.rank, self.batch = seed, rank, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.batch)) & 0x7FFFFFFF)
        self.batch += 1
        t = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=g)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch = int(state["batch"])
