"""Token -> expert routing tables for the token-routed MLP.

Strategies (``build_routing_table``):

- ``range``:  ``e = id * E // V`` (contiguous id blocks);
- ``modulo``: ``e = id % E``;
- ``zipf``:   frequency-balanced. Ids seen in the corpus are taken by descending count (ties by
  id) and each goes to the expert with the least accumulated count mass so far (ties: lowest
  expert index), then its count is added (greedy longest-processing-time). Unseen ids (count 0)
  are then spread so the number of ids per expert stays even: each goes, in id order, to the
  expert holding the fewest ids so far (ties: lowest index).

``range`` and ``modulo`` come from ``complexity.modeling_complexity.default_routing_table`` so the
model and this module share one definition.

Counts are per-token-id frequencies (``count_token_frequencies``; ``data prepare`` writes them to
``token_counts.npy``). With data-parallel training each rank counts its own tokens and the
training code sums them with ``torch.distributed.all_reduce(counts, op=SUM)`` before building.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

STRATEGIES = ("zipf", "modulo", "range")


def count_token_frequencies(token_array, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size] occurrence counts of each id in ``token_array`` (any int array/tensor)."""
    arr = token_array.detach().cpu().numpy() if isinstance(token_array, torch.Tensor) else np.asarray(token_array)
    arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got [{arr.min()}, {arr.max()}]")
    return np.bincount(arr.astype(np.int64, copy=False), minlength=vocab_size).astype(np.int64)


def _check_counts(counts, vocab_size: int) -> np.ndarray:
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if c.ndim != 1 or c.shape[0] != vocab_size:
        raise ValueError(f"counts must have shape [{vocab_size}] (the vocabulary size), got {list(c.shape)}")
    if c.size and c.min() < 0:
        raise ValueError("counts must be non-negative")
    return c.astype(np.int64, copy=False)


def zipf_routing_table(counts, num_experts: int) -> torch.Tensor:
    """The frequency-balanced table (see module docstring). O(V log E)."""
    c = _check_counts(counts, len(counts))
    vocab_size = c.shape[0]
    table = np.empty(vocab_size, dtype=np.int64)
    seen = np.flatnonzero(c > 0)
    order = seen[np.argsort(-c[seen], kind="stable")]  # descending count, ties by id
    heap = [(0, e) for e in range(num_experts)]  # (mass, expert): least mass, then lowest index
    n_ids = [0] * num_experts
    pop, push = heapq.heappop, heapq.heappush
    for tok, cnt in zip(order.tolist(), c[order].tolist()):
        mass, e = pop(heap)
        table[tok] = e
        n_ids[e] += 1
        push(heap, (mass + cnt, e))
    unseen = np.flatnonzero(c == 0)
    if unseen.size:
        heap = [(n, e) for e, n in enumerate(n_ids)]
        heapq.heapify(heap)
        for tok in unseen.tolist():
            n, e = pop(heap)
            table[tok] = e
            push(heap, (n + 1, e))
    return torch.from_numpy(table)


def build_routing_table(strategy: str, vocab_size: int, num_experts: int, counts=None) -> torch.LongTensor:
    """int64 tensor [vocab_size]: the expert of every token id."""
    if vocab_size < 1 or num_experts < 1:
        raise ValueError(f"vocab_size and num_experts must be positive (got {vocab_size}, {num_experts})")
    if num_experts > vocab_size:
        # an expert that no token id reaches never sees a token and never trains
        raise ValueError(
            f"num_experts={num_experts} exceeds the vocabulary ({vocab_size} ids): some experts would get no token id"
        )
    if strategy == "zipf":
        if counts is None:
            raise ValueError("the zipf strategy needs token counts (--counts FILE)")
        return zipf_routing_table(_check_counts(counts, vocab_size), num_experts)
    if strategy in ("modulo", "range"):
        from .modeling_complexity import default_routing_table

        return default_routing_table(vocab_size, num_experts, strategy).to(torch.long)
    raise ValueError(f"unknown routing strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")


def balance_report(table, counts, num_experts: int) -> dict:
    """Per-expert share of the count mass and of the ids; ``max_over_mean`` = max mass / mean mass
    (1.0 is perfect balance)."""
    t = table.detach().cpu().numpy() if isinstance(table, torch.Tensor) else np.asarray(table)
    c = _check_counts(counts, t.shape[0]).astype(np.float64)
    if t.size and (t.min() < 0 or t.max() >= num_experts):
        raise ValueError(f"routing table holds experts outside [0, {num_experts})")
    mass = np.bincount(t, weights=c, minlength=num_experts)
    ids = np.bincount(t, minlength=num_experts)
    total = mass.sum()
    mean = total / num_experts
    return {
        "num_experts": num_experts,
        "vocab_size": int(t.shape[0]),
        "total_count": int(total),
        "mass_share": (mass / total).tolist() if total else [0.0] * num_experts,
        "num_ids": ids.astype(int).tolist(),
        "max_over_mean": float(mass.max() / mean) if total else 1.0,
        "ids_max_over_mean": float(ids.max() / (t.shape[0] / num_experts)),
    }
