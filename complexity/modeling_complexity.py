"""The Complexity architecture as a Hugging Face model.

Self-contained (imports only torch, transformers and the config file beside it), so a saved
checkpoint carries this file for `trust_remote_code=True` loading. Reads top to bottom:
routing tables, norm, rotary, attention, MLPs (dense / token-routed / learned), mu guidance and
INL dynamics, decoder layer, model, causal LM. SPEC.md states the equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_complexity import ComplexityConfig


# ----------------------------------------------------------------------------- routing tables


def default_routing_table(vocab_size: int, num_experts: int, strategy: str) -> torch.Tensor:
    """The token -> expert table for the strategies that need no corpus statistics.

    range:  contiguous id ranges, e = id * E // V.   modulo: e = id % E.
    zipf tables are built from token counts (`complexity.routing`); until one is installed the
    model holds the modulo table, so a fresh zipf model is still perfectly balanced by id count.
    """
    ids = torch.arange(vocab_size, dtype=torch.long)
    if strategy == "range":
        return ids * num_experts // vocab_size
    if strategy in ("modulo", "zipf"):
        return ids % num_experts
    raise ValueError(f"unknown routing strategy {strategy!r}")


# ----------------------------------------------------------------------------- norm and rotary


class ComplexityRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _opaque_rope_tables():
    """`_rope_tables` as a custom op, which torch.compile keeps as one call.

    Left to itself, the compiler inlines the (cheap-looking) table computation into every layer's
    q/k kernels, and recomputing pow/sin/cos per element of q and k made those kernels several
    times slower than their memory traffic. As an op, the tables are computed once per forward
    and every layer reads them. A trust_remote_code copy of this file, imported where this
    package is loaded too, reuses the package's op rather than redefine it.
    """
    try:
        return torch.ops.complexity.rope_tables.default
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("complexity::rope_tables", mutates_args=())(_rope_tables)

    @op.register_fake
    def _(position_ids, head_dim, theta):
        table = position_ids.new_empty((*position_ids.shape, head_dim), dtype=torch.float32)
        return table, torch.empty_like(table)

    return op


_ROPE_TABLES = _opaque_rope_tables()


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, S, head_dim] for NeoX-style (rotate_half) RoPE over the full head_dim.

    Computed from the positions on the fly (a few hundred flops per position): no buffer that
    could go stale on load, and positions from left padding / packing / caching are honoured.
    """
    # The op only matters to the compiler; eager, its dispatch would cost more than the tables.
    tables = _ROPE_TABLES if torch.compiler.is_compiling() else _rope_tables
    cos, sin = tables(position_ids, head_dim, float(theta))
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: [B, 1, S, d]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------- attention


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv, S, d] -> [B, n_kv * n_rep, S, d] (GQA for the eager path)."""
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class ComplexityAttention(nn.Module):
    """GQA with optional QK-norm (before RoPE) and optional mu guidance of q/k/v.

    With mu: q = x W_q + mu_prev W_muq (likewise k, v). `mu_to_*` have the output widths of
    `q/k/v_proj`, so tensor parallelism shards them with the same column split.
    """

    def __init__(self, config: ComplexityConfig, layer_idx: int, with_mu: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=False)
        self.o_proj.is_residual_output = True
        if config.use_qk_norm:
            self.q_norm = ComplexityRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = ComplexityRMSNorm(self.head_dim, config.rms_norm_eps)
        if with_mu:
            self.mu_to_q = nn.Linear(config.hidden_size, q_out, bias=False)
            self.mu_to_k = nn.Linear(config.hidden_size, kv_out, bias=False)
            self.mu_to_v = nn.Linear(config.hidden_size, kv_out, bias=False)
            for proj in (self.mu_to_q, self.mu_to_k, self.mu_to_v):
                proj.zero_init = True

    # Below this many rows the projections are bound by reading their weights, and concatenating
    # the weights per call (see `project_qkv`) would copy every one of them: keep them apart.
    fuse_min_rows = 1024

    def project_qkv(self, x: torch.Tensor, mu_prev: torch.Tensor | None):
        """q, k, v = x W_{q,k,v} (+ mu_prev W_mu{q,k,v}).

        For training batches and long prefills the up-to-six projections run as ONE matmul,
        [x | mu_prev] @ [[W_q W_k W_v] ; [W_muq W_muk W_muv]]: a single well-shaped GEMM (K = 2H)
        instead of six thin ones (the k/v outputs are only kv_heads x head_dim wide) and three adds.
        The parameters stay separate (checkpoint layout unchanged); the concatenation is a copy of
        the weights per call, small next to the GEMM at these row counts.
        """
        if x.numel() // x.shape[-1] < self.fuse_min_rows:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if mu_prev is not None:
                q, k, v = q + self.mu_to_q(mu_prev), k + self.mu_to_k(mu_prev), v + self.mu_to_v(mu_prev)
            return q, k, v
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        if mu_prev is not None:
            mu_weight = torch.cat([self.mu_to_q.weight, self.mu_to_k.weight, self.mu_to_v.weight])
            weight = torch.cat([weight, mu_weight], dim=1)
            x = torch.cat([x, mu_prev.to(x.dtype).expand_as(x)], dim=-1)
        qkv = F.linear(x, weight)
        return qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)

    def forward(self, hidden_states, mu_prev, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.project_qkv(hidden_states, mu_prev)
        q, k, v = (t.reshape(hidden_shape) for t in (q, k, v))
        if self.config.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


# ----------------------------------------------------------------------------- MLPs


class ComplexityMLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.down_proj.is_residual_output = True

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


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
    # The grouped kernels need 16-byte aligned rows (e.g. fp32 widths divisible by 4).
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (weight.shape[-1] * weight.element_size()) % 16 == 0
    if _GROUPED_MM is not None and aligned and (
        x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())
    ):
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class ComplexityExperts(nn.Module):
    """E SwiGLU experts stored stacked, [E, in, out], run as grouped GEMMs over rows sorted by expert.

    Static shapes throughout (counting sort, grouped GEMM, unsort), so the dispatch compiles
    with fullgraph and replays under CUDA graphs; every expert receives gradients.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * expert_size))  # gate | up
        self.down_proj = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        dispatch: ExpertDispatch | None = None,
        shared: ComplexityMLP | None = None,
    ) -> torch.Tensor:
        """x [N, H]; expert_idx [N] -> [N, H], row i through expert expert_idx[i].

        `dispatch`: `dispatch_by_expert(expert_idx)` when the caller already has it (the model
        computes it once for all layers). `shared`: a dense SwiGLU every row also goes through,
        added to the output. For large batches its weights are concatenated onto every expert's,
        so one grouped GEMM per projection computes both: h = [h_shared | h_expert], and the down
        projection sums the two, at the cost of a dense SwiGLU of the combined width. That copies
        the shared weights E times per call, which only pays once there are at least as many rows
        as E x its width (training batches, long prefills); a decode step of a few rows runs the
        shared expert as its own dense pass instead.
        """
        if dispatch is None:
            dispatch = dispatch_by_expert(expert_idx, self.num_experts)
        fuse = shared is not None and x.shape[0] >= self.num_experts * shared.down_proj.in_features
        gate_up, down = self._with_shared(shared, _compute_dtype(x)) if fuse else (self.gate_up_proj, self.down_proj)
        xs = _PermuteRows.apply(x, dispatch.order, dispatch.inverse)
        gate, up = grouped_matmul(xs, gate_up, dispatch.offsets).chunk(2, dim=-1)
        ys = grouped_matmul(F.silu(gate) * up, down, dispatch.offsets)
        out = _PermuteRows.apply(ys, dispatch.inverse, dispatch.order)
        return out + shared(x) if shared is not None and not fuse else out

    def _with_shared(self, shared: ComplexityMLP, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, H, 2(Is+Ie)] = [gate_s | gate_e | up_s | up_e] and [E, Is+Ie, H] = [down_s ; down_e]."""
        e, width = self.num_experts, self.gate_up_proj.shape[-1] // 2
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)

        def stacked(linear: nn.Linear) -> torch.Tensor:  # [out, in] -> E copies of [in, out]
            return linear.weight.to(dtype).T.expand(e, -1, -1)

        gate_up = torch.cat(
            [stacked(shared.gate_proj), gate_up[..., :width], stacked(shared.up_proj), gate_up[..., width:]], dim=-1
        )
        return gate_up, torch.cat([stacked(shared.down_proj), down], dim=1)


class ComplexityTokenRoutedMLP(nn.Module):
    """Each token goes to ONE expert chosen from its id (the model passes `token_to_expert[ids]`).

    With mu_mode "inl" the January design's hard override applies:
    e = argmax(bias * one_hot(table[id]) + mu_router(mu)); argmax carries no gradient.
    """

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.experts = ComplexityExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width) if config.shared_expert else None
        )
        self.mu_router = nn.Linear(config.hidden_size, config.num_experts, bias=False) if config.mu_mode == "inl" else None
        self.mu_router_bias = config.mu_router_bias

    def route(self, expert_ids: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
        if mu is None or self.mu_router is None:
            return expert_ids
        logits = self.mu_router(mu) + self.mu_router_bias * F.one_hot(expert_ids, self.num_experts).to(mu.dtype)
        return logits.argmax(dim=-1)

    def forward(self, x, expert_ids, mu=None, dispatch: ExpertDispatch | None = None):
        """`dispatch`: the rows grouped by `expert_ids` (the table's choice), when the caller has it."""
        shape = x.shape
        if self.mu_router is not None and mu is not None:
            expert_ids, dispatch = self.route(expert_ids, mu), None  # mu moved tokens: group again
        out = self.experts(x.reshape(-1, shape[-1]), expert_ids.reshape(-1), dispatch, shared=self.shared_expert)
        return out.view(shape), None


class ComplexityLearnedMoE(nn.Module):
    """The Mixtral/Switch-style baseline: softmax router, top-k, probability-weighted experts.

    Weights are the router probabilities of the chosen experts; with k > 1 they are renormalised
    over the k (Mixtral), with k = 1 they are the raw probability (Switch: otherwise the weight
    would be 1 and the router would get no gradient from the LM loss). Returns the Switch
    load-balancing loss E * sum_e f_e P_e over the non-padding tokens.
    """

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ComplexityExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width) if config.shared_expert else None
        )

    def forward(self, x, expert_ids=None, mu=None, token_mask=None):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        n = flat.shape[0]
        if self.top_k > 1:  # one row per (token, chosen expert)
            flat_in = flat[torch.arange(n, device=x.device).repeat_interleave(self.top_k)]
        else:
            flat_in = flat
        y = self.experts(flat_in, top_e.reshape(-1))
        out = (y.view(n, self.top_k, -1) * top_p.unsqueeze(-1).to(y.dtype)).sum(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)

        # Switch load balancing: f_e = share of assignments to e, P_e = mean router prob of e.
        assigned = F.one_hot(top_e, self.num_experts).sum(1).float()  # [N, E]
        if token_mask is not None:
            w = token_mask.reshape(-1, 1).float()
            denom = w.sum().clamp(min=1.0)
            f = (assigned * w).sum(0) / (denom * self.top_k)
            p = (probs * w).sum(0) / denom
        else:
            f = assigned.mean(0) / self.top_k
            p = probs.mean(0)
        aux = self.num_experts * (f * p).sum()
        return out.view(shape), aux


# ----------------------------------------------------------------------------- mu


class ComplexityMuGuidance(nn.Module):
    """SPEC 3a: mu = clamp(mu_param, lo, hi) + mu_proj(x'); passed on as clamp(mu, -c, c)."""

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        self.mu = nn.Parameter(torch.ones(config.hidden_size))
        self.mu_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mu_proj.zero_init = True
        self.lo, self.hi, self.out_clamp = config.mu_clamp_min, config.mu_clamp_max, config.mu_prev_clamp

    def forward(self, hidden_states):
        mu = self.mu.clamp(self.lo, self.hi) + self.mu_proj(hidden_states)
        return mu.clamp(-self.out_clamp, self.out_clamp)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class ComplexityINLDynamics(nn.Module):
    """SPEC 3b: a controller over [a, v] sets alpha, beta, gate; velocity pulls a toward mu_c."""

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        h, c = config.hidden_size, config.dynamics_controller_hidden
        self.hidden_size = h
        self.mu = nn.Parameter(torch.zeros(h))
        self.mu_proj = nn.Linear(h, h, bias=False)
        self.mu_proj.zero_init = True
        self.controller_in = nn.Linear(2 * h, c)
        self.controller_out = nn.Linear(c, 3 * h)
        self.dt = config.dynamics_dt
        self.beta_max = config.dynamics_beta_max
        self.v_clamp = config.dynamics_velocity_clamp
        self.init_bias = (_logit(config.dynamics_alpha), _inverse_softplus(config.dynamics_beta), _logit(config.dynamics_gate))

    def forward(self, a, velocity):
        """a: attention output; velocity: carried from the previous layer -> (a', v', mu_c)."""
        c = self.controller_out(F.silu(self.controller_in(torch.cat([a, velocity], dim=-1))))
        alpha, beta, gate = c.split(self.hidden_size, dim=-1)
        alpha = torch.sigmoid(alpha)
        beta = F.softplus(beta).clamp(max=self.beta_max)
        gate = torch.sigmoid(gate)
        mu_c = self.mu + self.mu_proj(a)
        velocity = (alpha * velocity - beta * (a - mu_c)).clamp(-self.v_clamp, self.v_clamp)
        return a + self.dt * gate * velocity, velocity, mu_c


# ----------------------------------------------------------------------------- decoder layer


class ComplexityDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__()
        self.mu_mode = config.mu_mode
        last = layer_idx == config.num_hidden_layers - 1
        # Mu-guided q/k/v exist wherever a mu arrives: every guidance layer (layer 0 gets mu_init),
        # INL layers after the first (layer 0 has no mu_prev).
        with_mu = config.mu_mode == "guidance" or (config.mu_mode == "inl" and layer_idx > 0)
        self.self_attn = ComplexityAttention(config, layer_idx, with_mu=with_mu)
        self.input_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.mlp_type == "dense":
            self.mlp = ComplexityMLP(config.hidden_size, config.intermediate_size)
        elif config.mlp_type == "token_routed":
            self.mlp = ComplexityTokenRoutedMLP(config)
        else:
            self.mlp = ComplexityLearnedMoE(config)
        # The last guidance layer's mu would feed nothing: it is not allocated (no dead weights).
        self.mu_guidance = ComplexityMuGuidance(config) if config.mu_mode == "guidance" and not last else None
        self.dynamics = ComplexityINLDynamics(config) if config.mu_mode == "inl" else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor | None,
        mu_prev: torch.Tensor | None,
        velocity: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        expert_dispatch: ExpertDispatch | None = None,
        **kwargs,
    ):
        """-> (hidden_states, mu for the next layer (or INL mu_c), velocity, router aux loss)."""
        attn = self.self_attn(
            self.input_layernorm(hidden_states), mu_prev, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        mu_out = None
        if self.dynamics is not None:
            attn, velocity, mu_out = self.dynamics(attn, velocity)
        hidden_states = hidden_states + attn

        mlp_in = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, ComplexityMLP):
            mlp_out, aux = self.mlp(mlp_in), None
        elif isinstance(self.mlp, ComplexityLearnedMoE):
            mlp_out, aux = self.mlp(mlp_in, token_mask=token_mask)
        else:
            mlp_out, aux = self.mlp(mlp_in, expert_ids, mu=mu_out, dispatch=expert_dispatch)
        hidden_states = hidden_states + mlp_out

        if self.mu_guidance is not None:
            mu_out = self.mu_guidance(hidden_states)
        return hidden_states, mu_out, velocity, aux


# ----------------------------------------------------------------------------- models


class ComplexityPreTrainedModel(PreTrainedModel):
    config_class = ComplexityConfig
    config: ComplexityConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ComplexityDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        """SPEC 4: N(0, std) weights, zero biases, unit norms, residual outputs scaled by
        1/sqrt(2L); then the zero-inits (mu projections) and the INL controller's biases win.
        Children are initialised before their parents, so the composite cases below override."""
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=out_std if getattr(module, "is_residual_output", False) else std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ComplexityRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ComplexityExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=out_std)
        elif isinstance(module, ComplexityMuGuidance):
            init.ones_(module.mu)
        elif isinstance(module, ComplexityINLDynamics):
            init.zeros_(module.mu)
            init.normal_(module.controller_out.weight, mean=0.0, std=0.01)
            h = module.hidden_size
            bias = torch.cat([torch.full((h,), b) for b in module.init_bias])
            init.copy_(module.controller_out.bias, bias)
        elif isinstance(module, ComplexityModel):
            if module.mu_init is not None:
                init.zeros_(module.mu_init)
            if module.token_to_expert is not None:
                init.copy_(module.token_to_expert, default_routing_table(cfg.vocab_size, cfg.num_experts, cfg.routing))


class ComplexityModel(ComplexityPreTrainedModel):
    def __init__(self, config: ComplexityConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ComplexityDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        # One table for every layer; saved with the weights, never rebuilt on load.
        if config.mlp_type == "token_routed":
            self.register_buffer(
                "token_to_expert", default_routing_table(config.vocab_size, config.num_experts, config.routing)
            )
        else:
            self.token_to_expert = None
        self.mu_init = nn.Parameter(torch.zeros(config.hidden_size)) if config.mu_mode == "guidance" else None
        # Out-of-vocabulary ids raise a clear error. The check reads the ids back (a device sync on
        # GPU); callers that validate ids before they reach the model (the inference engine on
        # admission, the trainer against the data manifest) switch it off.
        self.validate_token_ids = True
        self.gradient_checkpointing = False
        self.post_init()

    def set_routing_table(self, table) -> None:
        """Install a token -> expert table (e.g. a zipf table from `complexity.routing`)."""
        if self.token_to_expert is None:
            raise ValueError(f"routing table: mlp_type={self.config.mlp_type!r} has no token routing")
        table = torch.as_tensor(table)
        if table.dtype.is_floating_point or table.dtype == torch.bool:
            raise ValueError(f"routing table: must hold integer expert ids, got dtype {table.dtype}")
        if table.shape != (self.config.vocab_size,):
            raise ValueError(
                f"routing table: has shape {tuple(table.shape)}, expected ({self.config.vocab_size},) (vocab_size)"
            )
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= self.config.num_experts):
            raise ValueError(
                f"routing table: expert ids must lie in [0, {self.config.num_experts}) (num_experts), "
                f"got range [{int(table.min())}, {int(table.max())}]"
            )
        self.token_to_expert.copy_(table.to(self.token_to_expert))

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        # A bad id would otherwise index the embedding and the routing table out of range.
        # Skipped while compiling (the engine and the data loader validate ids before that).
        if not self.validate_token_ids or torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bool(bad.any()):
            value = int(input_ids[bad][0])
            raise ValueError(f"input_ids: token id {value} is outside the vocabulary [0, {self.config.vocab_size})")

    def _plain_causal(self, attention_mask, past_key_values, position_ids, seq_len: int) -> bool:
        """True for a batch of whole, unpadded sequences without a cache (training, scoring): a
        kernel with a causal mode needs no mask then. transformers' mask builder reaches the same
        answer eagerly, but under torch.compile some versions materialise a [B, 1, S, S] mask
        instead, and SDPA then runs 2-3x slower kernels than its causal flash path."""
        return (
            attention_mask is None
            and past_key_values is None
            and position_ids is None  # caller positions may describe packed sequences
            and self.config._attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3")
            and (self.config.sliding_window is None or seq_len <= self.config.sliding_window)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.token_to_expert is not None:
            raise ValueError(
                "token-routed models need input_ids: each token's expert is chosen from its id, "
                "so a call with only inputs_embeds cannot be routed"
            )
        if input_ids is not None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        plain_causal = self._plain_causal(attention_mask, past_key_values, position_ids, inputs_embeds.shape[1])
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        if plain_causal:
            causal_mask = None  # the kernels' own causal mode (SDPA is_causal, flash causal)
        else:
            mask_fn = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
            causal_mask = mask_fn(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        position_embeddings = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        expert_ids = expert_dispatch = None
        if self.token_to_expert is not None:
            # Every layer routes by the same table: group the tokens by expert once, not per layer.
            expert_ids = self.token_to_expert[input_ids]
            expert_dispatch = dispatch_by_expert(expert_ids.reshape(-1), self.config.num_experts)
        # Padding tokens do not count in the router's load-balancing statistics.
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1]:]

        hidden_states = inputs_embeds
        mode = self.config.mu_mode
        mu_prev = self.mu_init.to(hidden_states.dtype).expand_as(hidden_states) if mode == "guidance" else None
        velocity = torch.zeros_like(hidden_states) if mode == "inl" else None
        mu_sum = None
        aux_losses = []
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, mu, velocity, aux = layer(
                hidden_states,
                expert_ids,
                mu_prev,
                velocity,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                token_mask=token_mask,
                expert_dispatch=expert_dispatch,
                **kwargs,
            )
            if aux is not None:
                aux_losses.append(aux)
            if mode == "inl":
                # The mu highway: every layer's mu_c accumulates and leaks into the next layer's mu.
                mu_sum = mu if mu_sum is None else mu_sum + mu
                mu_prev = mu + self.config.mu_highway_scale * mu_sum
            else:
                mu_prev = mu
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            router_logits=(aux_loss,) if aux_loss is not None else None,
        )


class ComplexityForCausalLM(ComplexityPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ComplexityConfig):
        super().__init__(config)
        self.model = ComplexityModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_routing_table(self, table) -> None:
        self.model.set_routing_table(table)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Standard causal-LM forward. `loss` is the next-token cross-entropy plus, for learned_moe,
        `router_aux_loss_coef` times the load-balancing loss (also returned as `aux_loss`)."""
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        aux_loss = outputs.router_logits[0] if outputs.router_logits is not None else None

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.dtype)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "ComplexityForCausalLM",
    "ComplexityModel",
    "ComplexityPreTrainedModel",
    "default_routing_table",
]
