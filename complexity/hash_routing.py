"""Hash routing with top-k: persisted per-layer route tables and the routed-expert computation.

Each token goes to `k` experts read from its layer's route table `R_l` ([k, V] int64, row j = route
slot j, slot 0 the primary), with fixed slot weights `(p, (1-p)/(k-1), ...)`, plus an optional
shared expert; the two branches are multiplied by fixed scales that may vary linearly over depth:

    out = s_shared(l) * Shared(b) + s_routed(l) * sum_j w_j * Expert_{R_l[j, id]}(b)
    Expert_e(b) = (silu(b @ G_e) * (b @ U_e)) @ D_e

This file holds the four table builders (`build_route_table`), the fixed weights and scales
(`slot_weights`, `branch_scale`), and that computation as a function of tensors
(`hash_routed_mlp`), fast on the GPU; the counting sort and the grouped GEMM it dispatches with
are `complexity_kernels`'. It imports only torch and the file beside it: the model file imports
it relatively, and `save_pretrained` ships it with trust_remote_code checkpoints.

Tables are buffers saved with the weights and always copied from a checkpoint, never rebuilt on
load: three of the four builders draw `torch.randperm` from a seeded CPU generator, so a rebuild
is tied to torch's random number generator, and a model must keep the table it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .complexity_kernels import (
    DECODE_MAX_ROWS,
    FUSE_WEIGHTS_MIN_ROWS,
    compute_dtype,
    decode_kernels_serve,
    decode_rows,
    dispatch_by_expert,
    grouped_matmul,
    grouped_mm_supported,
    rows_swiglu,
)
from .configuration_complexity import ROUTE_HASH_COUNTS, ROUTE_STRATEGIES

# ----------------------------------------------------------------------------- route tables


ROUTE_SEED = 0x71D5A17  # a constant of the format: every published model uses it
_LAYER_STEP = 0x9E3779B1  # per-layer salt increment
_PERM_STEP = 104729  # per-layer increment of the randperm seeds
_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32): split so no int64 product overflows."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 0x10000) & _MASK32


def h32(x):
    """The 32-bit integer finaliser known as "lowbias32", on int64 tensors (or Python ints)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def layer_salt(layer_idx: int) -> int:
    return (ROUTE_SEED + layer_idx * _LAYER_STEP) & _MASK32


def _randperm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))


def cyclic_slots(primary: torch.Tensor, num_experts: int, num_experts_per_tok: int) -> torch.Tensor:
    """[k, V] table from the primary experts [V]: slot j is (primary + j) mod E."""
    return (primary.to(torch.int64) + torch.arange(num_experts_per_tok).unsqueeze(1)) % num_experts


def modulo_cyclic_table(vocab_size: int, num_experts: int, num_experts_per_tok: int, layer_idx: int) -> torch.Tensor:
    """Primary expert pi[t mod E] for a permutation pi of the experts, then the next k-1 experts
    cyclically. pi is `torch.randperm` of a seeded CPU generator: tied to torch's RNG."""
    pi = _randperm(num_experts, (ROUTE_SEED ^ 0xC0DE) + _PERM_STEP * layer_idx)
    return cyclic_slots(pi[torch.arange(vocab_size) % num_experts], num_experts, num_experts_per_tok)


def balanced_hash_table(vocab_size: int, num_experts: int, num_experts_per_tok: int, layer_idx: int) -> torch.Tensor:
    """Shuffle the vocabulary; in every block of E consecutive ranks, slot j of the token at
    position p is pi[(p + j * stride) mod E], with an odd stride hashed from the block index.
    Each full block therefore uses every expert exactly once per slot. The vocabulary shuffle
    and pi are `torch.randperm` of seeded CPU generators: tied to torch's RNG."""
    e, k = num_experts, num_experts_per_tok
    if e == 1:
        return torch.zeros(k, vocab_size, dtype=torch.long)
    order = _randperm(vocab_size, ROUTE_SEED + _PERM_STEP * layer_idx)  # rank -> token
    rank = torch.arange(vocab_size)
    block, position = rank // e, rank % e
    odd = torch.arange(1, e, 2)  # e // 2 odd strides below e
    stride = odd[h32(block + ROUTE_SEED + layer_idx * _LAYER_STEP) % (e // 2)]
    pi = _randperm(e, (ROUTE_SEED ^ 0x5EC0D) + _PERM_STEP * layer_idx)
    by_rank = pi[(position + torch.arange(k).unsqueeze(1) * stride) % e]  # [k, V] in rank order
    table = torch.empty_like(by_rank)
    table[:, order] = by_rank
    return table


def multi_hash_table(
    vocab_size: int, num_experts: int, num_experts_per_tok: int, layer_idx: int, route_hash_count: int
) -> torch.Tensor:
    """Score every (token, expert) by summing `route_hash_count` independent 32-bit hashes; slot j
    is the expert with the j-th largest score. Pure integer arithmetic (no RNG)."""
    salt = layer_salt(layer_idx)
    tokens = torch.arange(vocab_size).unsqueeze(1)
    experts = torch.arange(num_experts)
    score = torch.zeros(vocab_size, num_experts, dtype=torch.long)
    for c in range(route_hash_count):
        channel = (salt + c * 0x85EBCA77) & _MASK32
        expert_salt = h32(experts + (channel ^ 0xC2B2AE3D))
        score += h32(tokens ^ expert_salt ^ channel)
    return score.topk(num_experts_per_tok, dim=1).indices.t().contiguous()


def hierarchical_hash_table(
    vocab_size: int, num_experts: int, num_experts_per_tok: int, layer_idx: int
) -> torch.Tensor:
    """The balanced table over E/2 "parents", each entry then moved to one of its two clones
    parent + c * E/2 by one hashed bit. Tied to torch's RNG through the balanced table."""
    half = num_experts // 2
    parent = balanced_hash_table(vocab_size, half, num_experts_per_tok, layer_idx)
    tokens = torch.arange(vocab_size)
    slots = torch.arange(num_experts_per_tok).unsqueeze(1)
    bit = h32(tokens ^ (parent * 0x85EBCA77) ^ (slots * 0xC2B2AE3D) ^ layer_salt(layer_idx)) % 2
    return parent + bit * half


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def build_route_table(
    route_strategy: str,
    *,
    vocab_size: int,
    num_experts: int,
    num_experts_per_tok: int,
    layer_idx: int,
    route_hash_count: int = 2,
) -> torch.Tensor:
    """Layer `layer_idx`'s route table, int64 [num_experts_per_tok, vocab_size].

    Impossible settings raise ValueError naming the field. The result is checked like a loaded
    table (`check_route_table`). Three strategies (all but multi_hash) draw `torch.randperm` from
    seeded CPU generators, so they reproduce upstream's tables only under the same torch RNG;
    models keep their tables as persisted buffers and never rebuild them on load.
    """
    with torch.device("cpu"):  # exact integer work on the CPU, whatever the ambient default device (meta, cuda)
        return _build_route_table(
            route_strategy, vocab_size, num_experts, num_experts_per_tok, layer_idx, route_hash_count
        )


def _build_route_table(route_strategy, vocab_size, num_experts, num_experts_per_tok, layer_idx, route_hash_count):
    vocab_size = _positive_int("vocab_size", vocab_size)
    num_experts = _positive_int("num_experts", num_experts)
    k = _positive_int("num_experts_per_tok", num_experts_per_tok)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx: must be a non-negative integer, got {layer_idx!r}")
    if k > num_experts:
        raise ValueError(
            f"num_experts_per_tok: {k} routes per token need at least {k} experts, got num_experts={num_experts}"
        )
    if route_strategy == "modulo_cyclic":
        table = modulo_cyclic_table(vocab_size, num_experts, k, layer_idx)
    elif route_strategy == "balanced_hash":
        table = balanced_hash_table(vocab_size, num_experts, k, layer_idx)
    elif route_strategy == "multi_hash":
        if isinstance(route_hash_count, bool) or route_hash_count not in ROUTE_HASH_COUNTS:
            raise ValueError(f"route_hash_count: must be an integer in [2, 8], got {route_hash_count!r}")
        table = multi_hash_table(vocab_size, num_experts, k, layer_idx, route_hash_count)
    elif route_strategy == "hierarchical_hash":
        if num_experts < 4 or num_experts % 2:
            raise ValueError(f"num_experts: hierarchical_hash needs an even number of experts >= 4, got {num_experts}")
        if 2 * k > num_experts:
            raise ValueError(
                f"num_experts_per_tok: hierarchical_hash routes among num_experts/2={num_experts // 2} parents, "
                f"so at most {num_experts // 2} routes per token, got {k}"
            )
        table = hierarchical_hash_table(vocab_size, num_experts, k, layer_idx)
    else:
        raise ValueError(f"route_strategy: unknown value {route_strategy!r}; expected one of {ROUTE_STRATEGIES}")
    try:
        check_route_table(table, num_experts)
    except ValueError as err:  # e.g. balanced_hash with a stride that divides E into the slots
        raise ValueError(
            f"num_experts_per_tok: {route_strategy} cannot give {k} distinct experts per token "
            f"with num_experts={num_experts} ({err})"
        ) from None
    return table


def check_route_table(
    table: torch.Tensor,
    num_experts: int,
    vocab_size: int | None = None,
    num_experts_per_tok: int | None = None,
    name: str = "route table",
) -> None:
    """Raise ValueError unless `table` is an integer [k, V] table of experts in [0, num_experts)
    with k distinct experts in every column (token)."""
    if (
        not isinstance(table, torch.Tensor)
        or table.dtype.is_floating_point
        or table.dtype.is_complex
        or table.dtype == torch.bool
    ):
        raise ValueError(f"{name}: must be an integer tensor, got {getattr(table, 'dtype', type(table).__name__)}")
    expected = (
        num_experts_per_tok if num_experts_per_tok is not None else "k",
        vocab_size if vocab_size is not None else "V",
    )
    if (
        table.dim() != 2
        or (num_experts_per_tok is not None and table.shape[0] != num_experts_per_tok)
        or (vocab_size is not None and table.shape[1] != vocab_size)
    ):
        raise ValueError(
            f"{name}: has shape {list(table.shape)}, expected [{expected[0]}, {expected[1]}] (slots, vocabulary)"
        )
    if table.numel() == 0:
        return
    lo, hi = int(table.min()), int(table.max())
    if lo < 0 or hi >= num_experts:
        bad = int(((table < 0) | (table >= num_experts)).any(0).nonzero()[0])
        raise ValueError(
            f"{name}: token {bad} is routed to expert(s) {table[:, bad].tolist()}, outside [0, {num_experts}) (num_experts)"
        )
    ranked = table.sort(dim=0).values
    repeats = (ranked[1:] == ranked[:-1]).any(0)
    if bool(repeats.any()):
        bad = int(repeats.nonzero()[0])
        raise ValueError(f"{name}: token {bad} repeats an expert across its route slots: {table[:, bad].tolist()}")


def token_routes(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token's experts, slot order kept: [k, V] table, ids [...] -> [..., k]."""
    return table.t().index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[0])


# ----------------------------------------------------------------------------- fixed weights and scales


def slot_weights(num_experts_per_tok: int, primary_weight: float | None = None) -> tuple[float, ...]:
    """(p, (1-p)/(k-1), ..., (1-p)/(k-1)): slot 0 gets p (default 1/k), the others share the rest.
    With k = 1 the only route has weight 1 whatever p is."""
    k = _positive_int("num_experts_per_tok", num_experts_per_tok)
    if k == 1:
        return (1.0,)
    p = 1.0 / k if primary_weight is None else primary_weight
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"route_primary_weight: must be None (1/k) or a number in [0, 1], got {primary_weight!r}")
    rest = (1.0 - p) / (k - 1)
    return (float(p),) + (rest,) * (k - 1)


def branch_scale(base: float, first: float | None, last: float | None, layer_idx: int, num_layers: int) -> float:
    """A branch's output scale at layer i: `base` everywhere unless `first` or `last` is set, then
    linear from first (default base) at layer 0 to last (default first) at layer L-1."""
    if first is None and last is None:
        return float(base)
    first = base if first is None else first
    last = first if last is None else last
    if num_layers <= 1:
        return float(first)
    return float(first + (last - first) * layer_idx / (num_layers - 1))


def layer_scales(config, layer_idx: int) -> tuple[float, float]:
    """(s_shared, s_routed) of layer `layer_idx` from a config's `*_output_scale` fields (a
    `ComplexityConfig`, or anything with those fields and `num_hidden_layers`)."""
    return tuple(
        branch_scale(
            getattr(config, f"{b}_output_scale"),
            getattr(config, f"{b}_output_scale_first_layer"),
            getattr(config, f"{b}_output_scale_last_layer"),
            layer_idx,
            config.num_hidden_layers,
        )
        for b in ("shared", "routed")
    )


# ----------------------------------------------------------------------------- the routed computation

STRATEGIES = ("auto", "dense", "grouped", "rows")
# "auto" computes every expert densely while that costs at most this many times the FLOPs of the
# k chosen experts plus the shared expert: the GEMMs then run at full speed with no sort or
# gather, which beats a grouped GEMM until the wasted columns cost more than the dispatch.
DENSE_MAX_FLOP_RATIO = 1.3


def pick_strategy(num_experts: int, top_k: int, expert_width: int, shared_width: int, grouped_ok: bool) -> str:
    """ "dense" (every expert, masked by a per-token column scale) when its extra FLOPs are small
    or there is no grouped GEMM for this dtype/device; "grouped" (rows sorted by expert) otherwise."""
    dense_flops = num_experts * expert_width + shared_width
    active_flops = top_k * expert_width + shared_width
    if not grouped_ok or dense_flops <= DENSE_MAX_FLOP_RATIO * active_flops:
        return "dense"
    return "grouped"


def _weight_per_slot(weights: Sequence[float], slot: torch.Tensor) -> torch.Tensor:
    """weights[slot] as float32, built from Python numbers without a host-to-device copy (which
    CUDA graph capture forbids)."""
    out = torch.full(slot.shape, float(weights[-1]), dtype=torch.float32, device=slot.device)
    for j in range(len(weights) - 1):
        out = torch.where(slot == j, float(weights[j]), out)
    return out


def _expert_weights(routes: torch.Tensor, weights: Sequence[float], num_experts: int) -> torch.Tensor:
    """[N, E] float32: each expert's summed weight in each token's routes (0 if unchosen)."""
    experts = torch.arange(num_experts, device=routes.device)
    out = torch.zeros(routes.shape[0], num_experts, dtype=torch.float32, device=routes.device)
    for j, w in enumerate(weights):
        out = out + float(w) * (routes[:, j, None] == experts)
    return out


def _shared_swiglu(x, shared, scale: float, fuse: bool) -> torch.Tensor:
    """scale * down(silu(gate x) * up x) with nn.Linear weights; `fuse`: gate and up as one GEMM."""
    gate, up, down = shared
    if fuse:
        g, u = F.linear(x, torch.cat([gate, up])).chunk(2, dim=-1)
    else:
        g, u = F.linear(x, gate), F.linear(x, up)
    return F.linear(F.silu(g) * u * scale, down)


def _dense_all(x, routes, weights, gate_up, down, shared, shared_scale, routed_scale):
    """Every expert for every token, each expert's columns scaled per token by s_routed * w_j if
    chosen and 0 if not: exact, static, one GEMM per projection, E*W/(k*W) of the routed FLOPs.

    Large batches: one SwiGLU of width S + E*W over concatenated weights, the shared columns
    scaled by s_shared. Small batches: no weight copies; the experts as one broadcast batched
    GEMM in, one GEMM with K = E*W out (it sums the experts), the shared expert on its own."""
    n, hidden = x.shape
    e, _, w2 = gate_up.shape
    width = w2 // 2
    column = _expert_weights(routes, weights, e) * routed_scale  # [N, E] float32
    if n < FUSE_WEIGHTS_MIN_ROWS:
        gate, up = torch.matmul(x, gate_up).chunk(2, dim=-1)  # [E, N, W]
        act = (F.silu(gate) * up * column.t().unsqueeze(-1)).to(x.dtype)
        out = act.transpose(0, 1).reshape(n, e * width) @ down.reshape(e * width, hidden)
        return out if shared is None else out + _shared_swiglu(x, shared, float(shared_scale), fuse=False)
    gate_e = gate_up[..., :width].transpose(1, 2).reshape(e * width, hidden)  # nn.Linear rows e*W + i
    up_e = gate_up[..., width:].transpose(1, 2).reshape(e * width, hidden)
    down_e = down.reshape(e * width, hidden).t()
    if shared is None:
        gate, up = F.linear(x, torch.cat([gate_e, up_e])).chunk(2, dim=-1)
        act = (F.silu(gate) * up).view(n, e, width) * column.unsqueeze(-1)
        return F.linear(act.to(x.dtype).view(n, e * width), down_e)
    s_gate, s_up, s_down = shared
    gate, up = F.linear(x, torch.cat([s_gate, gate_e, s_up, up_e])).chunk(2, dim=-1)
    h_shared, h_experts = (F.silu(gate) * up).split([s_gate.shape[0], e * width], dim=-1)
    h_experts = (h_experts.view(n, e, width) * column.unsqueeze(-1)).to(x.dtype)
    act = torch.cat([h_shared * float(shared_scale), h_experts.view(n, e * width)], dim=-1)
    return F.linear(act, torch.cat([s_down, down_e], dim=1))


def _sum_slots(rows: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """out[n] = sum_j rows[index[n*k + j]]."""
    return rows.index_select(0, index).unflatten(0, (-1, k)).sum(1)


class _Dispatch(torch.autograd.Function):
    """Token rows copied to their k sorted assignment rows: xs = x[token]. Its gradient sums each
    token's k rows back by gathering (no scatter-add, which is non-deterministic on the GPU)."""

    @staticmethod
    def forward(ctx, x, token, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad, inverse, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """The adjoint of `_Dispatch`: out[n] = sum over token n's k assignment rows."""

    @staticmethod
    def forward(ctx, rows, inverse, token, k):
        ctx.save_for_backward(token)
        return _sum_slots(rows, inverse, k)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None, None


def _grouped(x, routes, weights, gate_up, down, shared, shared_scale, routed_scale):
    """Each token's k assignments as rows sorted by expert (a counting sort), one grouped GEMM per
    projection, the slot weights applied before the down projection, each token's k rows summed
    on the way back; the shared expert as its own dense pass."""
    n, k = routes.shape
    order, inverse, offsets = dispatch_by_expert(routes.reshape(-1), gate_up.shape[0])
    token = order // k
    rows = _Dispatch.apply(x, token, inverse, k)
    gate, up = grouped_matmul(rows, gate_up, offsets).chunk(2, dim=-1)
    scale = _weight_per_slot([w * routed_scale for w in weights], order % k).unsqueeze(1)
    act = (F.silu(gate) * up * scale).to(x.dtype)
    out = _Combine.apply(grouped_matmul(act, down, offsets), inverse, token, k)
    if shared is not None:
        out = out + _shared_swiglu(x, shared, float(shared_scale), fuse=n >= FUSE_WEIGHTS_MIN_ROWS)
    return out


def hash_routed_mlp(
    x: torch.Tensor,
    routes: torch.Tensor,
    weights: Sequence[float],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    shared_scale: float = 1.0,
    routed_scale: float = 1.0,
    strategy: str = "auto",
) -> torch.Tensor:
    """s_shared * Shared(x) + s_routed * sum_j weights[j] * Expert_{routes[:, j]}(x).

    x [N, H]; routes [N, k] int64 expert ids (`token_routes(table, ids)`); weights: k Python
    floats (`slot_weights`); gate_up [E, H, 2W] (each expert's gate | up, x @ W convention);
    down [E, W, H]; shared: the shared expert's (gate [S, H], up [S, H], down [H, S]) in
    nn.Linear convention, or None. Returns [N, H] in the compute dtype (autocast's if active).

    Static shapes and no host syncs in every strategy, so it compiles with fullgraph and replays
    under CUDA graphs; differentiable to x and every weight but in "rows". `strategy`: "dense"
    (every expert computed, unchosen ones scaled by 0), "grouped" (a counting sort and grouped
    GEMMs: needs bf16 on the GPU, or the CPU eager), "rows" (the decode kernels: two launches
    that read only the chosen experts' weights; inference on a few rows, `decode_kernels_serve`)
    or "auto" ("rows" where the decode kernels are on and serve, else `pick_strategy`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown value {strategy!r}; expected one of {STRATEGIES}")
    if routes.dim() != 2 or routes.shape[0] != x.shape[0] or routes.shape[1] != len(weights):
        raise ValueError(
            f"routes: has shape {list(routes.shape)}, expected [{x.shape[0]}, {len(weights)}] (tokens, len(weights))"
        )
    e, _, w2 = gate_up.shape
    dtype = compute_dtype(x)
    grouped_ok = grouped_mm_supported(x.device, dtype, x.shape[1], w2, w2 // 2)
    k = routes.shape[1]
    if strategy == "auto" and decode_rows(x, slots=k):
        strategy = "rows"
    elif strategy == "auto":
        shared_width = shared[0].shape[0] if shared is not None else 0
        strategy = pick_strategy(e, k, w2 // 2, shared_width, grouped_ok)
    elif strategy == "rows" and not decode_kernels_serve(x, slots=k):
        raise ValueError(
            f"strategy: 'rows' needs the decode kernels (triton, on CUDA), at most {DECODE_MAX_ROWS} rows, at"
            f" most as many routes per row as the kernels take, no autograd and no autocast; got {x.shape[0]}"
            f" rows of {x.dtype} on {x.device.type} with {k} routes; use 'auto'"
        )
    elif strategy == "grouped" and not grouped_ok:
        raise ValueError(
            f"strategy: 'grouped' needs torch's grouped GEMM for {dtype} on {x.device.type}"
            f"{' under torch.compile' if torch.compiler.is_compiling() else ''} with 16-byte aligned widths; use 'auto'"
        )
    # Autocast does not cover grouped GEMMs, and the weights are combined before any matmul sees
    # them: cast everything to the compute dtype here, as autocast would for a matmul.
    x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    shared = tuple(t.to(dtype) for t in shared) if shared is not None else None
    if strategy == "rows":
        scales = [float(w) * routed_scale for w in weights]
        return rows_swiglu(x, routes, gate_up, down, shared, scales, float(shared_scale))
    run = _dense_all if strategy == "dense" else _grouped
    return run(x, routes, weights, gate_up, down, shared, shared_scale, routed_scale)


__all__ = [
    "ROUTE_STRATEGIES",
    "ROUTE_SEED",
    "STRATEGIES",
    "branch_scale",
    "build_route_table",
    "check_route_table",
    "hash_routed_mlp",
    "layer_scales",
    "pick_strategy",
    "slot_weights",
    "token_routes",
]
