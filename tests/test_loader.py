"""The training/eval loader: determinism, resume, rank sharding, position ids, mismatch checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_benchmark

from complexity.data.loader import EvalLoader, PackedTokens, TrainLoader, position_ids_for
from complexity.data.manifest import DataMismatchError

pytest_plugins = ["data_fixtures"]  # shared session fixtures (tiny tokenizer, prepared data)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _stream(folder, split="train"):
    return np.concatenate([np.asarray(s) for s in PackedTokens(folder, split).shards]).astype(np.int64)


def test_batches_are_shifted_windows_of_the_stream(big_prepared):
    L = 32
    loader = TrainLoader(big_prepared, batch_size=4, seq_len=L, seed=1)
    stream = _stream(big_prepared)
    assert loader.num_samples == (stream.size - 1) // L
    (batch,) = _take(loader, 1)
    assert batch["input_ids"].shape == (4, L) and batch["labels"].shape == (4, L)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    ids = loader.epoch_samples(0)[:4]
    for row, k in enumerate(ids):
        assert batch["input_ids"][row].tolist() == stream[k * L : k * L + L].tolist()
        assert batch["labels"][row].tolist() == stream[k * L + 1 : k * L + L + 1].tolist()


def test_deterministic_and_seed_dependent(big_prepared):
    a = _take(TrainLoader(big_prepared, batch_size=2, seq_len=16, seed=3), 5)
    b = _take(TrainLoader(big_prepared, batch_size=2, seq_len=16, seed=3), 5)
    c = _take(TrainLoader(big_prepared, batch_size=2, seq_len=16, seed=4), 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_epochs_cover_samples_and_reshuffle(big_prepared):
    loader = TrainLoader(big_prepared, batch_size=8, seq_len=64, seed=0)
    e0, e1 = loader.epoch_samples(0).copy(), loader.epoch_samples(1).copy()
    assert len(set(e0.tolist())) == len(e0) == loader.batches_per_epoch * 8
    assert not np.array_equal(e0, e1)
    bounded = TrainLoader(big_prepared, batch_size=8, seq_len=64, seed=0, epochs=2)
    assert sum(1 for _ in bounded) == 2 * len(bounded)


def test_exact_resume_mid_epoch(big_prepared):
    kw = dict(batch_size=4, seq_len=32, seed=7)
    full = TrainLoader(big_prepared, **kw)
    n_per_epoch = len(full)
    total = n_per_epoch + 5  # crosses an epoch boundary
    reference = _take(full, total)

    first = TrainLoader(big_prepared, **kw)
    got = _take(first, n_per_epoch - 3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == n_per_epoch - 3
    resumed = TrainLoader(big_prepared, **kw)
    resumed.load_state_dict(state)
    got += _take(resumed, total - len(got))
    assert len(got) == total
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(reference, got)
    )
    with pytest.raises(ValueError, match="batch_size"):
        TrainLoader(big_prepared, batch_size=2, seq_len=32, seed=7).load_state_dict(state)


def test_two_ranks_disjoint_and_complete(big_prepared):
    kw = dict(batch_size=3, seq_len=32, seed=5, world_size=2)
    r0, r1 = TrainLoader(big_prepared, rank=0, **kw), TrainLoader(big_prepared, rank=1, **kw)
    assert len(r0) == len(r1)
    s0, s1 = set(r0.epoch_samples(0).tolist()), set(r1.epoch_samples(0).tolist())
    assert not s0 & s1
    used = len(r0) * 3 * 2
    assert len(s0 | s1) == used and used > r0.num_samples - 6  # every sample once (bar the < 1 batch remainder)
    # the batches actually yielded are those samples
    rows = []
    stream = _stream(big_prepared)
    for loader in (r0, r1):
        for batch in _take(loader, len(loader)):
            rows.extend(tuple(r) for r in batch["input_ids"].tolist())
    expected = [tuple(stream[k * 32 : k * 32 + 32].tolist()) for k in s0 | s1]
    assert sorted(rows) == sorted(expected)
    # eval sharding: union is all samples, no overlap
    e0 = EvalLoader(big_prepared, split="train", batch_size=5, seq_len=32, rank=0, world_size=2)
    e1 = EvalLoader(big_prepared, split="train", batch_size=5, seq_len=32, rank=1, world_size=2)
    assert sorted(e0.sample_ids.tolist() + e1.sample_ids.tolist()) == list(range(e0.num_samples))


def test_position_ids_restart_after_eos(big_prepared):
    x = np.array([[5, 6, 0, 7, 8, 9, 0, 0, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert position_ids_for(x, 0).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]]
    loader = TrainLoader(big_prepared, batch_size=4, seq_len=128, seed=0, position_ids=True)
    (batch,) = _take(loader, 1)
    ids, pos = batch["input_ids"], batch["position_ids"]
    assert pos.shape == ids.shape and pos.dtype == torch.long
    assert (ids == 0).any()
    for r in range(ids.shape[0]):
        expect, p = [], 0
        for t in ids[r].tolist():
            expect.append(p)
            p = 0 if t == 0 else p + 1
        assert pos[r].tolist() == expect


def test_eval_loader_in_order(prepared):
    ev = EvalLoader(prepared, batch_size=3, seq_len=8)
    stream = _stream(prepared, "val")
    got = torch.cat([b["input_ids"] for b in ev])
    assert got.shape[0] == ev.num_samples == (stream.size - 1) // 8
    assert got.reshape(-1).tolist() == stream[: ev.num_samples * 8].tolist()
    assert ev.text_bytes > 0
    with pytest.raises(ValueError, match="fewer than one sample"):
        EvalLoader(prepared, batch_size=1, seq_len=10**6)


def test_loader_checks_tokenizer_and_vocab(prepared, tiny_tokenizer, other_tokenizer, tmp_path):
    TrainLoader(prepared, batch_size=1, seq_len=8, tokenizer=tiny_tokenizer, vocab_size=400)
    with pytest.raises(DataMismatchError, match="different tokenizer"):
        TrainLoader(prepared, batch_size=1, seq_len=8, tokenizer=other_tokenizer)
    with pytest.raises(DataMismatchError, match="vocab size 400"):
        TrainLoader(prepared, batch_size=1, seq_len=8, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="not a complete prepared-data folder"):
        TrainLoader(tmp_path, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainLoader(prepared, batch_size=10**6, seq_len=8)


def test_bench_data_measures_every_stage(tmp_path):
    """benchmarks/bench_data.py (where the loader's speed is measured: no timed unit test) runs
    every stage on the built-in corpus and reports each figure."""
    out = tmp_path / "bench_data.json"
    proc = run_benchmark(
        "bench_data.py",
        "--vocab-size",
        "1000",
        "--repeat",
        "1",
        "--loader-batches",
        "5",
        "--seq-len",
        "64",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["vocab_size"] == 1000 and res["tokens"] > 0
    for key in ("single_s", "encode_batch_s", "prepare_rust_threads_s", "prepare_processes_s"):
        assert res[key] > 0, key
    for key in ("loader_tokens_per_s", "loader_position_ids_tokens_per_s", "eval_loader_tokens_per_s"):
        assert res[key] > 0, key
