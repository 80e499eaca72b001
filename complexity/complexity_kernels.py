"""How the Complexity model runs fast: the kernel strategy, apart from the architecture.

Nothing here changes what the model computes (`modeling_complexity.py` says that); it decides
how: the RoPE tables as one opaque op under torch.compile, q/k/v (and mu's q/k/v) as one GEMM for
large batches, experts as grouped GEMMs over rows sorted by a counting sort, and the shared
expert folded into those GEMMs when that pays. A decode step of a few rows is different: it is
bound by reading the weights and by the number of kernels, so there the projections and experts
run as the Triton kernels of `complexity_triton.py` (see "Decode rows" below). Self-contained
(torch, and triton where it is installed): a checkpoint saved with `save_pretrained` carries
this file and the Triton one beside the model file for `trust_remote_code` loading.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

# ----------------------------------------------------------------------------- RoPE tables


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies theta^(-2i/d), i < d/2, in float32 (what checkpoints that store them hold)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))


def _rope_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(rotary_dim, theta, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _opaque_rope_tables():
    """`_rope_tables` as a custom op, which torch.compile keeps as one call.

    Left to itself, the compiler inlines the (cheap-looking) table computation into every layer's
    q/k kernels, and recomputing pow/sin/cos per element of q and k made those kernels several
    times slower than their memory traffic. As an op, the tables are computed once per forward
    and every layer reads them. A trust_remote_code copy of this file, imported where this
    package is loaded too, reuses the package's op rather than redefine it (so the op's
    arguments never change: a partial RoPE asks for tables of its rotary width).
    """
    try:
        return torch.ops.complexity.rope_tables.default
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("complexity::rope_tables", mutates_args=())(_rope_tables)

    @op.register_fake
    def _(position_ids, rotary_dim, theta):
        table = position_ids.new_empty((*position_ids.shape, rotary_dim), dtype=torch.float32)
        return table, torch.empty_like(table)

    return op


_ROPE_TABLES = _opaque_rope_tables()


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, S, rotary_dim] for NeoX-style (rotate_half) RoPE over the first
    `rotary_dim` dims of a head (all of it unless partial_rotary_factor < 1):
    inv_freq_i = theta^(-2i / rotary_dim).

    Computed from the positions on the fly (a few hundred flops per position): no buffer that
    could go stale on load, and positions from left padding / packing / caching are honoured.
    """
    # The op only matters to the compiler; eager, its dispatch would cost more than the tables.
    tables = _ROPE_TABLES if torch.compiler.is_compiling() else _rope_tables
    cos, sin = tables(position_ids, rotary_dim, float(theta))
    return cos.to(dtype), sin.to(dtype)


# ----------------------------------------------------------------------------- decode attention


def decode_attention_applies(query: torch.Tensor, groups: int) -> bool:
    """Whether SDPA over `query` [B, heads, S, d] takes `decode_attention`: one position, GQA,
    with the Triton decode kernels on or off (off, it is SDPA on grouped views): otherwise a
    compiled decode step copies the attended cache to every query head, twice per layer."""
    return query.shape[2] == 1 and groups > 1


def decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SDPA for ONE query position under GQA, without repeating K/V: [B, heads, 1, d] is viewed as
    [B, kv_heads, group, d], the group's query heads as `group` queries of their shared K/V head.

    transformers' SDPA path does the same eagerly but, under torch.compile, copies K and V to
    every query head first (repeat_kv): at decode that is two copies of the whole cache per
    layer per step, more bytes than the layer's weights at batch 128. The mask [B, 1, 1, L] (or
    None) broadcasts over the group. A decode step's few rows run as the Triton decode kernels
    where they apply (`_attend_in_kernel`), the rest as SDPA. Same call convention as
    transformers' attention functions: -> ([B, 1, heads, d], None).
    """
    b, heads, _, d = query.shape
    grouped = query.reshape(b, key.shape[1], heads // key.shape[1], d)
    if _attend_in_kernel(query, key, value, attention_mask, dropout):
        # [B, L] (a mask of one row broadcasts over the batch)
        mask = None if attention_mask is None else attention_mask[:, 0, 0, :].expand(b, -1)
        out = attend_one_position(grouped, key, value, mask, d**-0.5 if scaling is None else scaling)
    else:
        out = F.scaled_dot_product_attention(
            grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
    return out.reshape(b, heads, 1, d).transpose(1, 2), None


# The decode attention kernels are on with the decode kernels unless COMPLEXITY_DECODE_ATTENTION=0
# (or this flag is cleared): exact on the CPU (triton's interpreter) and against float64 on an
# H100, where they took 1.1-2.5x less time than the SDPA they replace at 1-16 rows and 512-2,048
# keys, and made pacific-prime's whole decode step 1.11x as fast at batch 1 and 1.07x at 8
# (BENCHMARKS.md, seventh GPU run).
_DECODE_ATTENTION_ENV = os.environ.get("COMPLEXITY_DECODE_ATTENTION", "1")
if _DECODE_ATTENTION_ENV not in ("0", "1"):
    raise ValueError(f"COMPLEXITY_DECODE_ATTENTION={_DECODE_ATTENTION_ENV!r}: expected 0 (off) or 1 (on)")
DECODE_ATTENTION = _DECODE_ATTENTION_ENV == "1"


def _attend_in_kernel(query, key, value, attention_mask, dropout) -> bool:
    """Whether `decode_attention` runs as the Triton decode kernels (`attend_one_position`): they
    are switched on (`DECODE_ATTENTION`), a decode step's few rows (`decode_rows`), a power-of-two
    head size, K/V and a [B, 1, 1, L] mask (additive or boolean, or none) with contiguous last dims."""
    d, length = query.shape[-1], key.shape[2]
    return (
        DECODE_ATTENTION
        and decode_rows(query[:, 0, 0, :])
        and dropout == 0.0
        and d == 1 << (d.bit_length() - 1)
        and d <= 256
        and length > 0
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and (
            attention_mask is None
            or (
                attention_mask.dim() == 4
                and attention_mask.shape[0] in (1, query.shape[0])
                and attention_mask.shape[1] == attention_mask.shape[2] == 1
                and attention_mask.shape[3] == length
                and attention_mask.stride(-1) == 1
            )
        )
    )


# ----------------------------------------------------------------------------- fused q/k/v

# From this many rows on, projections that read the same input have their weights concatenated
# per call (q/k/v with mu's in `summed_projections`, the hash-routed MLP's shared expert with
# the experts) so each is one GEMM; below it (decode steps) a GEMM is bound by reading its
# weights, and copying them would cost more than the launches it saves.
FUSE_WEIGHTS_MIN_ROWS = 1024


def summed_projections(
    x: torch.Tensor,
    projections: Sequence[nn.Linear],
    extra: torch.Tensor | None = None,
    extra_projections: Sequence[nn.Linear] = (),
    *,
    fuse: bool,
) -> list[torch.Tensor]:
    """[x W_i (+ extra W'_i) (+ b_i) for each i]: q, k, v (plus mu_prev's q, k, v under mu
    guidance); the gate and up projections of a SwiGLU.

    Fused (training batches, long prefills) the up-to-six projections run as ONE matmul,
    [x | extra] @ [[W_1 W_2 W_3] ; [W'_1 W'_2 W'_3]]: a single well-shaped GEMM (K = 2H) instead
    of six thin ones (the k/v outputs are only kv_heads x head_dim wide) and three adds. The
    parameters stay separate (checkpoint layout unchanged); the concatenation is a copy of the
    weights per call, small next to the GEMM at these row counts. A decode step (`decode_rows`)
    runs them as one kernel that reads every weight in place.
    """
    if decode_rows(x) and len(projections) <= 3:
        segments = [
            (proj.weight, extra_projections[i].weight if extra is not None else None, proj.bias)
            for i, proj in enumerate(projections)
        ]
        return rows_projections(x, extra, segments)
    if not fuse:
        outs = [proj(x) for proj in projections]
        if extra is not None:
            outs = [out + proj(extra) for out, proj in zip(outs, extra_projections)]
        return outs
    weight = torch.cat([proj.weight for proj in projections])
    if extra is not None:
        weight = torch.cat([weight, torch.cat([proj.weight for proj in extra_projections])], dim=1)
        x = torch.cat([x, extra.to(x.dtype).expand_as(x)], dim=-1)
    return list(F.linear(x, weight).split([proj.out_features for proj in projections], dim=-1))


# ----------------------------------------------------------------------------- expert dispatch

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *row_widths: int) -> bool:
    """Whether torch has a grouped GEMM for this device and dtype, with rows of these widths
    (the kernels need 16-byte aligned rows, e.g. fp32 widths divisible by 4): bf16 everywhere;
    fp32 and fp16 in the eager CPU kernels."""
    size = dtype.itemsize
    return (
        _GROUPED_MM is not None
        and all(w * size % 16 == 0 for w in row_widths)
        and (
            dtype == torch.bfloat16
            or (device.type == "cpu" and dtype in (torch.float32, torch.float16) and not torch.compiler.is_compiling())
        )
    )


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` sorted by group, times that group's matrix: x[o_{e-1}:o_e] @ weight[e].

    x [N, K], weight [E, K, M], offsets [E] int32 cumulative row ends -> [N, M]. One grouped
    GEMM where torch has one for this dtype and alignment (bf16 everywhere; other dtypes in
    eager CPU kernels). Elsewhere (fp32 on CUDA or under the compiler, or widths that break the
    kernels' 16-byte alignment) a static-shape fallback computes
    each group's product for every row and keeps that group's rows: exact and graph-friendly,
    at E times the FLOPs.
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not cover grouped GEMMs: cast to its dtype as it would for a matmul.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    if grouped_mm_supported(x.device, x.dtype, x.shape[-1], weight.shape[-1]):
        return _GROUPED_MM(x, weight, offs=offsets)
    rows = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
    group = torch.searchsorted(offsets, rows, right=True)
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    for e in range(weight.shape[0]):
        out = torch.where((group == e).unsqueeze(-1), x @ weight[e], out)
    return out


class _PermuteRows(torch.autograd.Function):
    """rows = x[index] where `index` is a permutation with inverse `inverse`.

    Plain indexing would back-propagate through a scatter-add (index_put with accumulate),
    which sorts again on the GPU; a permutation's gradient is just the inverse gather.
    """

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class ExpertDispatch(NamedTuple):
    """Rows grouped by expert, stably (rows keep their order within an expert)."""

    order: torch.Tensor  # [N] slot -> row
    inverse: torch.Tensor  # [N] row -> slot
    offsets: torch.Tensor  # [E] int32 cumulative group ends, as the grouped GEMM takes them


def dispatch_by_expert(expert_idx: torch.Tensor, num_experts: int) -> ExpertDispatch:
    """A counting sort: a row's slot is its expert's start plus its rank among that expert's rows.

    One scan over an [E, N] indicator instead of a radix sort, with the inverse permutation for
    free and no host sync, so it stays inside CUDA graphs and compiled graphs.
    """
    member = torch.arange(num_experts, device=expert_idx.device).unsqueeze(1) == expert_idx  # [E, N]
    counts = member.sum(1)
    ends = counts.cumsum(0)
    # Scan along the contiguous dim: on the GPU a scan across rows is far slower.
    rank = member.cumsum(1).gather(0, expert_idx.unsqueeze(0)).squeeze(0)  # 1-based
    slot = (ends - counts)[expert_idx] + rank - 1
    order = torch.empty_like(slot).scatter_(0, slot, torch.arange(slot.numel(), device=slot.device))
    return ExpertDispatch(order, slot, ends.to(torch.int32))


def grouped_swiglu(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, dispatch: ExpertDispatch
) -> torch.Tensor:
    """Row i of x [N, H] through its expert's SwiGLU (weights [E, H, 2I] gate | up, [E, I, H]):
    sort the rows by expert, one grouped GEMM per projection, unsort."""
    xs = _PermuteRows.apply(x, dispatch.order, dispatch.inverse)
    gate, up = grouped_matmul(xs, gate_up, dispatch.offsets).chunk(2, dim=-1)
    ys = grouped_matmul(F.silu(gate) * up, down, dispatch.offsets)
    return _PermuteRows.apply(ys, dispatch.inverse, dispatch.order)


def experts_swiglu(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    dispatch: ExpertDispatch | None,
    shared: nn.Module | None,
) -> torch.Tensor:
    """Row i of x [N, H] through expert expert_idx[i]'s SwiGLU (banks [E, H, 2I], [E, I, H]),
    plus the shared SwiGLU `shared` when given.

    A decode step (`decode_rows`) runs two kernels that read only the chosen experts' weights
    (and the shared expert's) in place; otherwise the rows are grouped by expert (`dispatch`,
    computed here when not given) for grouped GEMMs, with the shared expert folded into them
    once the batch is large enough (`fuse_shared_expert`) and run as its own pass before that.
    """
    if decode_rows(x) and gate_up.dtype == x.dtype:
        return rows_swiglu(x, expert_idx, gate_up, down, swiglu_weights(shared))
    if dispatch is None:
        dispatch = dispatch_by_expert(expert_idx, gate_up.shape[0])
    if shared is not None and fuse_shared_expert(x.shape[0], gate_up.shape[0], shared.down_proj.in_features):
        gate_up, down = with_shared_expert(gate_up, down, shared, compute_dtype(x))
        return grouped_swiglu(x, gate_up, down, dispatch)
    out = grouped_swiglu(x, gate_up, down, dispatch)
    return out if shared is None else out + shared(x)


# ----------------------------------------------------------------------------- shared expert fusion


def fuse_shared_expert(rows: int, num_experts: int, shared_width: int) -> bool:
    """Whether to fold the shared expert into the experts' grouped GEMMs (`with_shared_expert`).

    That copies the shared weights E times per call, which only pays once there are at least as
    many rows as E x its width (training batches, long prefills); a decode step of a few rows
    runs the shared expert as its own dense pass instead.
    """
    return rows >= num_experts * shared_width


def with_shared_expert(
    gate_up: torch.Tensor, down: torch.Tensor, shared: nn.Module, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights widened by the shared SwiGLU (`gate_proj` / `up_proj` / `down_proj`
    nn.Linear): [E, H, 2(Is+Ie)] = [gate_s | gate_e | up_s | up_e] and [E, Is+Ie, H] =
    [down_s ; down_e], so h = [h_shared | h_expert] and the down projection sums the two."""
    e, width = gate_up.shape[0], gate_up.shape[-1] // 2
    gate_up, down = gate_up.to(dtype), down.to(dtype)

    def stacked(linear: nn.Linear) -> torch.Tensor:  # [out, in] -> E copies of [in, out]
        return linear.weight.to(dtype).T.expand(e, -1, -1)

    gate_up = torch.cat(
        [stacked(shared.gate_proj), gate_up[..., :width], stacked(shared.up_proj), gate_up[..., width:]], dim=-1
    )
    return gate_up, torch.cat([stacked(shared.down_proj), down], dim=1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in (autocast's, when it is on)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# ----------------------------------------------------------------------------- decode rows
#
# A decode step of a few rows reads every weight once and does almost no arithmetic, so its
# time is the bytes it reads plus a few microseconds per kernel. The generic paths above spend
# kernels where it hurts: q/k/v and mu's q/k/v as six GEMVs and three adds (concatenating the
# weights would copy them all), and the experts as a counting sort, permutations and two grouped
# GEMMs for a single row. Here those become one kernel per fused projection and two per MLP
# (`complexity_triton.py`), each reading its weights in place: only the experts the rows chose,
# and the shared expert in the same launches. For inference only (no autograd through them).

# The most rows the model sends to the decode kernels (every program holds all of them). The
# kernels take up to complexity_triton.MAX_ROWS (64) and made a 32-row step 1.13-1.16x as fast on
# an H100 (bench_inference.py's `steps_rows64`); the hash-routed MLP, which this limit switches to
# them too, has not been timed there yet (`bench_moe.py --decode-max-rows`), so 16 it stays.
DECODE_MAX_ROWS = 16
# The most routes per row the expert kernels take (top-k hash routing; more take the generic
# paths): the kernels' own limit where they are imported below, none without them.
DECODE_MAX_SLOTS = 0
# The decode kernels are on unless COMPLEXITY_DECODE_KERNELS=0 (or this flag is cleared): exact on
# the CPU (triton's interpreter) and on an H100 for all 13 variants, and measured there side by
# side with the generic paths (BENCHMARKS.md, fourth GPU run): base's step 1.49x as fast at batch
# 1 and 1.22x at 8, the same at 32 and 128 (past DECODE_MAX_ROWS they do not run); the hash-routed
# MLP at one token 0.92-1.25x a dense MLP of equal FLOPs instead of 3.7-7.3x. Benchmarks and the
# GPU suite switch them on and off to measure them.
DECODE_KERNELS = os.environ.get("COMPLEXITY_DECODE_KERNELS", "1") != "0"
_DECODE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Where the kernels run: CUDA with triton installed, or triton's CPU interpreter
# (TRITON_INTERPRET=1, for tests). Decided once, at import; elsewhere the generic paths serve.
_DECODE_DEVICES: tuple[str, ...] = ()
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    try:
        from .complexity_triton import MAX_SLOTS, attend_one_position, down_rows, linear_rows, swiglu_rows
    except ImportError:
        pass
    else:
        _DECODE_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
        DECODE_MAX_SLOTS = MAX_SLOTS


def _few_rows(rows) -> bool:
    """1 <= rows <= DECODE_MAX_ROWS, decided without adding a guard. Under torch.compile with a
    dynamic batch the answer must hold for every size the graph serves: true when the caller
    declared a range within the bound (`torch._dynamo.mark_dynamic(t, 0, min=2, max=16)`), false
    (the generic paths) for an unbounded one, never a recompile or a violated `mark_dynamic`."""
    return statically_known_true(rows >= 1) and statically_known_true(rows <= DECODE_MAX_ROWS)


def decode_rows(x: torch.Tensor, slots: int = 0) -> bool:
    """Whether a call over x [..., features] (routed to `slots` experts per row) runs the decode
    kernels: they are switched on (`DECODE_KERNELS`) and can take it (`decode_kernels_serve`)."""
    return DECODE_KERNELS and decode_kernels_serve(x, slots)


def decode_kernels_serve(x: torch.Tensor, slots: int = 0) -> bool:
    """Whether the decode kernels can take a call over x [..., features] with `slots` routed
    experts per row, switched on or not: at most `DECODE_MAX_ROWS` rows (`_few_rows`) and
    `DECODE_MAX_SLOTS` slots, on a device the kernels serve, without autograd or autocast (whose
    casts and gradients the kernels do not do)."""
    return (
        x.device.type in _DECODE_DEVICES
        and slots <= DECODE_MAX_SLOTS
        and x.shape[-1] > 0
        and _few_rows(x.numel() // x.shape[-1])
        and x.dtype in _DECODE_DTYPES
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
    )


def decode_rows_for(ids: torch.Tensor) -> bool:
    """Whether hidden states with the rows of `ids` (token ids) will take the decode kernels,
    as far as the ids tell: the model skips grouping the tokens by expert then."""
    return (
        DECODE_KERNELS and ids.device.type in _DECODE_DEVICES and _few_rows(ids.numel()) and not torch.is_grad_enabled()
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., K] as [rows, K] with a contiguous last dim (a view where it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_projections(
    a: torch.Tensor,
    b: torch.Tensor | None,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    *,
    silu_a: bool = False,
) -> list[torch.Tensor]:
    """Decode rows: [a W_a^T (+ b W_b^T) (+ bias) for each (W_a, W_b, bias) of up to three
    segments] in one kernel, each shaped like `a` with the segment's width; with `silu_a`,
    F.silu(a) in place of a. `b` may be an expanded view (a broadcast mu) and the weights column
    slices of a wider weight."""
    dtype = a.dtype
    segments = [
        (w_a.to(dtype), None if w_b is None else w_b.to(dtype), None if bias is None else bias.to(dtype))
        for w_a, w_b, bias in segments
    ]
    b_rows = None if b is None else _rows(b.to(dtype).expand(*a.shape[:-1], b.shape[-1]))
    out = linear_rows(_rows(a), b_rows, segments, silu_a)
    widths = [w_a.shape[0] for w_a, _, _ in segments]
    return [part.view(*a.shape[:-1], part.shape[-1]) for part in out.split(widths, dim=-1)]


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x), as one decode kernel for a few rows."""
    if decode_rows(x):
        return rows_projections(x, None, [(layer.weight, None, layer.bias)])[0]
    return layer(x)


def swiglu_weights(mlp: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A SwiGLU module's (gate, up, down) weights in nn.Linear layout ([I, H], [I, H], [H, I])."""
    return None if mlp is None else (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


def rows_swiglu(
    x: torch.Tensor,
    routes: torch.Tensor | None,
    gate_up: torch.Tensor | None,
    down: torch.Tensor | None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    slot_scales: Sequence[float] = (1.0,),
    shared_scale: float = 1.0,
) -> torch.Tensor:
    """Decode rows: each row's routed experts, routes [...] (one per row) or [..., k] (k per row,
    k <= DECODE_MAX_SLOTS), banks [E, H, 2I] and [E, I, H], slot j's SwiGLU times slot_scales[j];
    plus the SwiGLU `shared` ((gate, up, down) weights in nn.Linear layout: the shared expert, or
    a dense MLP alone) times shared_scale. Two kernels: gate/up with the activation and the
    scales, then down with every slot and the shared expert summed in one float32 accumulator."""
    dtype, flat = x.dtype, _rows(x)
    ids = None if routes is None else routes.reshape(flat.shape[0], -1).contiguous()
    gate, up, shared_down = (None, None, None) if shared is None else (w.to(dtype) for w in shared)
    bank_up, bank_down = (None, None) if gate_up is None else (gate_up.to(dtype), down.to(dtype))
    h = swiglu_rows(flat, ids, bank_up, gate, up, slot_scales, shared_scale)
    return down_rows(h, x.shape[-1], ids, bank_down, shared_down).view(x.shape)


__all__ = [
    "DECODE_MAX_ROWS",
    "DECODE_MAX_SLOTS",
    "ExpertDispatch",
    "FUSE_WEIGHTS_MIN_ROWS",
    "compute_dtype",
    "decode_attention",
    "decode_attention_applies",
    "decode_kernels_serve",
    "decode_rows",
    "decode_rows_for",
    "dispatch_by_expert",
    "experts_swiglu",
    "fuse_shared_expert",
    "grouped_matmul",
    "grouped_mm_supported",
    "grouped_swiglu",
    "linear",
    "rotary_cos_sin",
    "rows_projections",
    "rows_swiglu",
    "summed_projections",
    "swiglu_weights",
    "with_shared_expert",
]
