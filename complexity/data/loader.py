"""Training and evaluation batches from a prepared folder (``complexity data prepare``).

A sample is ``seq_len + 1`` consecutive tokens of a shard's packed stream: sample ``k`` of a shard
is ``tokens[k * seq_len : k * seq_len + seq_len + 1]``; ``input_ids`` are its first ``seq_len``
tokens and ``labels`` its last ``seq_len`` (shifted by one; no -100 masking: the model learns to
predict ``</s>`` and the first token of the next document). Samples never span two shards.

``TrainLoader``: each epoch draws a permutation of all samples from ``(seed, epoch)``; rank ``r``
of ``w`` takes ``perm[r::w]`` of the first ``batches_per_epoch * batch_size * w`` entries, so ranks
never overlap and all ranks see the same number of batches. ``state_dict()`` holds (epoch,
position); a loader restored with it yields exactly the batches an uninterrupted one would.

``EvalLoader``: every sample of a split once, in order, unshuffled (last batch may be smaller).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .manifest import check_compatible, read_prepared_manifest


class PackedTokens:
    """The memory-mapped shards of one split of a prepared folder."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        *,
        tokenizer: str | os.PathLike | None = None,
        vocab_size: int | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = manifest = read_prepared_manifest(self.data_dir)
        check_compatible(manifest, self.data_dir, tokenizer=tokenizer, vocab_size=vocab_size)
        if split not in manifest["splits"]:
            raise ValueError(f"{self.data_dir}: no split {split!r} (have {sorted(manifest['splits'])})")
        self.split = split
        self.eos_id = int(manifest["eos_id"])
        self.vocab_size = int(manifest["vocab_size"])
        self.dtype = np.dtype(manifest["dtype"])
        self.paths: list[Path] = []
        self.shards: list[np.ndarray] = []
        for shard in manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path}: missing token shard (named by {self.data_dir / 'manifest.json'})"
                ) from None
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"{path}: unreadable token shard (truncated or not a .npy file): {err}") from None
            if arr.shape != (shard["tokens"],) or arr.dtype != self.dtype:
                raise ValueError(
                    f"{path}: holds {list(arr.shape)} {arr.dtype}, manifest.json says [{shard['tokens']}] {self.dtype}"
                )
            self.paths.append(path)
            self.shards.append(arr)
        self.num_tokens = int(sum(a.size for a in self.shards))
        self.text_bytes = int(manifest["splits"][split].get("text_bytes", 0))

    def samples_per_shard(self, seq_len: int) -> np.ndarray:
        return np.array([max(0, (a.size - 1) // seq_len) for a in self.shards], dtype=np.int64)

    def num_samples(self, seq_len: int) -> int:
        return int(self.samples_per_shard(seq_len).sum())

    def gather(self, sample_ids: np.ndarray, seq_len: int) -> np.ndarray:
        """[len(sample_ids), seq_len + 1] int64 token windows. Every id is checked against the
        manifest's vocab_size (which `check_compatible` holds to the model's): a damaged shard is
        an error naming it, never an index out of range inside the model."""
        out = np.empty((len(sample_ids), seq_len + 1), dtype=np.int64)
        which, starts = self._locate(np.asarray(sample_ids, dtype=np.int64), seq_len)
        for row, (s, start) in enumerate(zip(which, starts)):
            out[row] = self.shards[s][start : start + seq_len + 1]
        if out.size and out.max() >= self.vocab_size:
            row, col = np.argwhere(out >= self.vocab_size)[0]
            self._out_of_vocabulary(which[row], int(starts[row]) + int(col))
        return out

    def _locate(self, sample_ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset of the first token) of each sample."""
        if len(self.shards) == 1:
            return np.zeros(len(sample_ids), dtype=np.int64), sample_ids * seq_len
        bounds = np.cumsum(self.samples_per_shard(seq_len))
        which = np.searchsorted(bounds, sample_ids, side="right")
        before = np.where(which > 0, bounds[which - 1], 0)
        return which, (sample_ids - before) * seq_len

    def check_token_ids(self, chunk: int = 1 << 24) -> None:
        """Read every token of the split once; raise ValueError at the first id outside the vocabulary."""
        for s, shard in enumerate(self.shards):
            for start in range(0, shard.size, chunk):
                part = np.asarray(shard[start : start + chunk])
                if part.max() >= self.vocab_size:
                    self._out_of_vocabulary(s, start + int(np.argmax(part >= self.vocab_size)))

    def _out_of_vocabulary(self, shard: int, index: int):
        value = int(self.shards[shard][index])
        raise ValueError(
            f"{self.paths[shard]}: token id {value} at index {index} is outside the vocabulary [0, {self.vocab_size}) "
            f"of {self.data_dir / 'manifest.json'}: the shard is damaged (prepare the data again with --force)"
        )


def position_ids_for(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions that restart at 0 on the token after each ``eos_id`` (per row)."""
    b, n = input_ids.shape
    ar = np.arange(n, dtype=np.int64)
    starts = np.zeros((b, n), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    last = np.maximum.accumulate(np.where(starts, ar, 0), axis=1)
    return ar - last


def _make_batch(tokens: np.ndarray, eos_id: int, with_positions: bool) -> dict:
    import torch  # here, not at the top: `complexity data inspect` reads shards without torch

    t = torch.from_numpy(tokens)
    batch = {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
    if with_positions:
        batch["position_ids"] = torch.from_numpy(position_ids_for(tokens[:, :-1], eos_id))
    return batch


class TrainLoader:
    """Endless (or ``epochs``-bounded) shuffled batches for one data-parallel rank."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        position_ids: bool = False,
        epochs: int | None = None,
        tokenizer: str | os.PathLike | None = None,
        vocab_size: int | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data = PackedTokens(data_dir, split, tokenizer=tokenizer, vocab_size=vocab_size)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.with_positions = position_ids
        self.epochs = epochs
        self.num_samples = self.data.num_samples(seq_len)
        self.batches_per_epoch = self.num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{data_dir}: split {split!r} has {self.data.num_tokens} tokens = {self.num_samples} samples of "
                f"{seq_len}+1 tokens, fewer than one batch ({batch_size} x {world_size} rank(s))"
            )
        self.epoch = 0
        self.position = 0  # batches of this rank already yielded in the current epoch
        self._perm_epoch = None
        self._perm = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch``, in the order they are yielded."""
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_samples)
            used = self.batches_per_epoch * self.batch_size * self.world_size
            self._perm = perm[:used][self.rank :: self.world_size]
            self._perm_epoch = epoch
        return self._perm

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len", "world_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[dict]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.position >= self.batches_per_epoch:
                self.epoch += 1
                self.position = 0
                continue
            ids = self.epoch_samples(self.epoch)
            b = self.position * self.batch_size
            tokens = self.data.gather(ids[b : b + self.batch_size], self.seq_len)
            self.position += 1
            yield _make_batch(tokens, self.data.eos_id, self.with_positions)


class EvalLoader:
    """Every sample of a split once, in stream order (for validation loss / bits per byte)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        batch_size: int,
        seq_len: int,
        split: str = "val",
        rank: int = 0,
        world_size: int = 1,
        position_ids: bool = False,
        max_batches: int | None = None,
        tokenizer: str | os.PathLike | None = None,
        vocab_size: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data = PackedTokens(data_dir, split, tokenizer=tokenizer, vocab_size=vocab_size)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.with_positions = position_ids
        self.num_samples = self.data.num_samples(seq_len)
        if self.num_samples == 0:
            raise ValueError(
                f"{data_dir}: split {split!r} has {self.data.num_tokens} tokens, fewer than one sample of "
                f"{seq_len}+1 (prepare with a larger --val-fraction or use a shorter sequence)"
            )
        self.sample_ids = np.arange(self.num_samples)[rank::world_size]
        self.max_batches = max_batches

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the split's documents (for bits per byte)."""
        return self.data.text_bytes

    def __len__(self) -> int:
        n = -(-len(self.sample_ids) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            ids = self.sample_ids[i * self.batch_size : (i + 1) * self.batch_size]
            yield _make_batch(self.data.gather(ids, self.seq_len), self.data.eos_id, self.with_positions)
