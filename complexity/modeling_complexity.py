"""The Complexity architecture as a Hugging Face model.

Reads top to bottom: routing tables, norm, rotary, attention, MLPs (dense / token-routed /
learned / hash-routed, one interface), mu guidance and INL dynamics, decoder layer, model, causal
LM. The equations are pure functions in `complexity_math.py` (shared with the vLLM model); how
they run fast (the RoPE op, fused q/k/v, grouped-GEMM expert dispatch) is in
`complexity_kernels.py`; the hash-routed MLP's tables and computation are in `hash_routing.py`.
The design, with the section numbers cited here, is in the project's docs/architecture.md.

Self-contained (torch, transformers and the files beside it, imported relatively: the three
above, the configuration and the Triton decode kernels), so a saved checkpoint carries all six
for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
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

from .complexity_kernels import (
    FUSE_WEIGHTS_MIN_ROWS,
    ExpertDispatch,
    decode_attention,
    decode_attention_applies,
    decode_rows,
    decode_rows_for,
    dispatch_by_expert,
    experts_swiglu,
    linear,
    rotary_cos_sin,
    rows_projections,
    rows_swiglu,
    summed_projections,
    swiglu_weights,
)
from .complexity_math import (
    add_router_aux_loss,
    initial_mu_state,
    inl_dynamics,
    layer_gives_mu,
    layer_takes_mu,
    learned_topk,
    mix_topk_experts,
    mu_guidance,
    mu_router_override,
    next_layer_mu,
    switch_aux_loss,
)
from .configuration_complexity import ComplexityConfig
from .hash_routing import (
    build_route_table,
    check_route_table,
    hash_routed_mlp,
    layer_scales,
    slot_weights,
    token_routes,
)

# ----------------------------------------------------------------------------- routing tables


def default_routing_table(vocab_size: int, num_experts: int, strategy: str) -> torch.Tensor:
    """The token -> expert table for the strategies that need no corpus statistics (§2).

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


def expert_ids_outside(table: torch.Tensor, num_experts: int) -> str | None:
    """What is wrong with a stored token -> expert table whose ids are not all experts, or None."""
    if not table.numel():
        return None
    low, high = int(table.min()), int(table.max())
    if low < 0 or high >= num_experts:
        return f"holds expert ids in [{low}, {high}], outside [0, num_experts={num_experts})"
    return None


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """RoPE on q, k [B, heads, S, d] with tables cos, sin [B, S, r]: the first r dims of each
    head are turned (rotate-half within them), the other d - r pass through (partial RoPE)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: [B, 1, S, r]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


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
    """GQA with optional QK-norm (before RoPE), RoPE over the first `rotary_dim` dims of each head,
    the softmax scale `attention_scale`, and optional mu guidance of q/k/v (§1, §3a).

    With mu: q = x W_q + mu_prev W_muq (likewise k, v). `mu_to_*` have the output widths of
    `q/k/v_proj`, so tensor parallelism shards them with the same column split.
    """

    # Batches of at least this many rows run the up-to-six projections as one GEMM.
    fuse_min_rows = FUSE_WEIGHTS_MIN_ROWS

    def __init__(self, config: ComplexityConfig, layer_idx: int, with_mu: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.attention_scale
        self.is_causal = True
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=False)
        self.o_proj.is_residual_output = True
        if config.use_qk_norm:
            eps = config.qk_norm_eps if config.qk_norm_eps is not None else config.rms_norm_eps
            self.q_norm = ComplexityRMSNorm(self.head_dim, eps)
            self.k_norm = ComplexityRMSNorm(self.head_dim, eps)
        if with_mu:
            self.mu_to_q = nn.Linear(config.hidden_size, q_out, bias=False)
            self.mu_to_k = nn.Linear(config.hidden_size, kv_out, bias=False)
            self.mu_to_v = nn.Linear(config.hidden_size, kv_out, bias=False)
            for proj in (self.mu_to_q, self.mu_to_k, self.mu_to_v):
                proj.zero_init = True

    def project_qkv(self, x: torch.Tensor, mu_prev: torch.Tensor | None):
        """q, k, v = x W_{q,k,v} (+ mu_prev W_mu{q,k,v})."""
        mu_projections = (self.mu_to_q, self.mu_to_k, self.mu_to_v) if mu_prev is not None else ()
        return summed_projections(
            x,
            (self.q_proj, self.k_proj, self.v_proj),
            mu_prev,
            mu_projections,
            fuse=x.numel() // x.shape[-1] >= self.fuse_min_rows,
        )

    def forward(self, hidden_states, mu_prev, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (t.reshape(hidden_shape) for t in self.project_qkv(hidden_states, mu_prev))
        if self.config.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation == "sdpa" and decode_attention_applies(q, self.num_key_value_groups):
            attention_interface = decode_attention  # one query: the groups attend to their K/V in place
        elif self.config._attn_implementation != "eager":
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
        return linear(out.reshape(*input_shape, -1).contiguous(), self.o_proj)


# ----------------------------------------------------------------------------- MLPs


class Routing(NamedTuple):
    """What an MLP may route by, beyond its input: built once per forward by the model.

    Every MLP kind is built `kind(config, layer_idx)` and called `mlp(hidden_states, routing) ->
    (out, aux_loss or None)`, and takes what it needs: the dense MLP nothing, the token-routed
    MLP the table's experts and their dispatch (and, INL, the layer's mu_c), the learned router
    the padding mask for its load-balancing statistics, the hash-routed MLP the token ids (its
    tables are per layer). A new kind is one class, added to `MLP_KINDS`.
    """

    token_ids: torch.Tensor | None  # the input ids, shaped like the hidden states without H
    expert_ids: torch.Tensor | None = None  # token_to_expert[token_ids] (token_routed)
    dispatch: ExpertDispatch | None = None  # the rows grouped by expert_ids, computed once
    token_mask: torch.Tensor | None = None  # 1 for real tokens, 0 for padding
    mu: torch.Tensor | None = None  # this layer's INL mu_c (the mu-router override)

    @classmethod
    def for_tokens(cls, token_ids, token_to_expert, num_experts: int, token_mask=None) -> Routing:
        """Every layer routes by the same table: group the tokens by expert once, not per layer
        (a decode step's few rows need no grouping: `experts_swiglu`)."""
        if token_to_expert is None:
            return cls(token_ids, token_mask=token_mask)
        expert_ids = token_to_expert[token_ids]
        if decode_rows_for(token_ids):
            return cls(token_ids, expert_ids, None, token_mask)
        return cls(token_ids, expert_ids, dispatch_by_expert(expert_ids.reshape(-1), num_experts), token_mask)


class ComplexityMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense MLP and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.down_proj.is_residual_output = True

    def forward(self, x):
        if decode_rows(x):
            return rows_swiglu(x, None, None, None, swiglu_weights(self))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ComplexityDenseMLP(ComplexityMLP):
    """mlp_type "dense" (§2): one SwiGLU of width I for every token."""

    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__(config.hidden_size, config.intermediate_size)

    def forward(self, x, routing: Routing | None = None):
        return super().forward(x), None


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

        `dispatch`: `dispatch_by_expert(expert_idx)` when the caller already has it. `shared`: a
        SwiGLU every row also goes through, added to the output (`experts_swiglu` says how).
        """
        return experts_swiglu(x, expert_idx, self.gate_up_proj, self.down_proj, dispatch, shared)


class ComplexityTokenRoutedMLP(nn.Module):
    """mlp_type "token_routed" (§2): each token goes to ONE expert chosen from its id by the
    model's table, plus an optional shared expert. With mu_mode "inl" the January design's hard
    override re-routes by mu_c (§3b)."""

    num_experts_per_tok = 1  # experts a token visits

    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.experts = ComplexityExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width) if config.shared_expert else None
        )
        self.mu_router = (
            nn.Linear(config.hidden_size, config.num_experts, bias=False) if config.mu_mode == "inl" else None
        )
        self.mu_router_bias = config.mu_router_bias

    def forward(self, x, routing: Routing):
        expert_ids, dispatch = routing.expert_ids, routing.dispatch
        if self.mu_router is not None:  # mu moved tokens: group them again
            logits = linear(routing.mu, self.mu_router)
            expert_ids, dispatch = mu_router_override(expert_ids, logits, self.mu_router_bias), None
        out = self.experts(x.reshape(-1, x.shape[-1]), expert_ids.reshape(-1), dispatch, shared=self.shared_expert)
        return out.view(x.shape), None


class ComplexityLearnedMoE(nn.Module):
    """mlp_type "learned_moe" (§2), the Mixtral/Switch-style baseline: softmax router, top-k,
    probability-weighted experts, plus an optional shared expert. Returns the Switch
    load-balancing loss over the non-padding tokens."""

    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ComplexityExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width) if config.shared_expert else None
        )

    def forward(self, x, routing: Routing | None = None):
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, experts = learned_topk(linear(flat, self.router), self.num_experts_per_tok)
        out = mix_topk_experts(self.experts, flat, experts, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        token_mask = routing.token_mask if routing is not None else None
        return out.view(x.shape), switch_aux_loss(probs, experts, self.num_experts, token_mask)


class ComplexityHashExperts(ComplexityExperts):
    """The hash-routed MLP's expert bank: the same stacked parameters as `ComplexityExperts`
    (initialisation, parameter counts and the evaluation's expert-share hooks treat them alike),
    each row run through its k routed experts (`hash_routed_mlp`)."""

    def forward(self, x, routes, weights, shared=None, shared_scale: float = 1.0, routed_scale: float = 1.0):
        """x [N, H]; routes [N, k] expert ids; weights: k floats; shared: a `ComplexityMLP` or None."""
        shared = (
            (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight) if shared is not None else None
        )
        return hash_routed_mlp(
            x, routes, weights, self.gate_up_proj, self.down_proj, shared, shared_scale, routed_scale
        )


class ComplexityHashRoutedMLP(nn.Module):
    """mlp_type "hash_routed" (§2e): each token goes to k experts read from this layer's route
    table by its id (slot 0 the primary), weighted by fixed slot weights, plus an optional shared
    expert; both branches are multiplied by fixed, per-layer scales:

        out = s_shared(l) Shared(x) + s_routed(l) sum_j w_j Expert_{route_table[j, id]}(x)

    The table ([k, V] int64) is built at initialisation from the config and this layer's index,
    and is a buffer saved with the weights: a loaded checkpoint always overwrites it (three of
    the four builders depend on torch's random number generator)."""

    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = k = config.num_experts_per_tok
        self.experts = ComplexityHashExperts(config.num_experts, config.hidden_size, config.expert_width)
        self.shared_expert = (
            ComplexityMLP(config.hidden_size, config.shared_expert_width) if config.shared_expert else None
        )
        # Filled by `_init_weights` (built from the config) or by a checkpoint's table.
        self.register_buffer("route_table", torch.empty(k, config.vocab_size, dtype=torch.long))
        self.slot_weights = slot_weights(k, config.route_primary_weight)
        self.shared_scale, self.routed_scale = layer_scales(config, layer_idx)
        self.layer_idx = layer_idx

    @staticmethod
    def build_route_table(config: ComplexityConfig, layer_idx: int) -> torch.Tensor:
        return build_route_table(
            config.route_strategy,
            vocab_size=config.vocab_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            layer_idx=layer_idx,
            route_hash_count=config.route_hash_count,
        )

    def forward(self, x, routing: Routing):
        flat = x.reshape(-1, x.shape[-1])
        routes = token_routes(self.route_table, routing.token_ids.reshape(-1))  # [N, k], slot order
        out = self.experts(flat, routes, self.slot_weights, self.shared_expert, self.shared_scale, self.routed_scale)
        return out.view(x.shape), None

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, slot_weights={self.slot_weights}, shared_scale={self.shared_scale}, "
            f"routed_scale={self.routed_scale}"
        )


# config.mlp_type -> the MLP class; each is built (config, layer_idx) and called (hidden_states, routing).
MLP_KINDS: dict[str, type[nn.Module]] = {
    "dense": ComplexityDenseMLP,
    "token_routed": ComplexityTokenRoutedMLP,
    "learned_moe": ComplexityLearnedMoE,
    "hash_routed": ComplexityHashRoutedMLP,
}


# ----------------------------------------------------------------------------- mu


class ComplexityMuGuidance(nn.Module):
    """docs/architecture.md §3a: mu = clamp(mu_param, lo, hi) + mu_proj(x'); passed on as
    clamp(mu, -c, c) (`mu_guidance`)."""

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        self.config = config
        self.mu = nn.Parameter(torch.ones(config.hidden_size))
        self.mu_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mu_proj.zero_init = True

    def forward(self, hidden_states):
        return mu_guidance(self.mu, linear(hidden_states, self.mu_proj), self.config)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class ComplexityINLDynamics(nn.Module):
    """docs/architecture.md §3b: a controller over [a, v] sets alpha, beta, gate; velocity pulls
    a toward mu_c (`inl_dynamics`)."""

    def __init__(self, config: ComplexityConfig):
        super().__init__()
        h, c = config.hidden_size, config.dynamics_controller_hidden
        self.config = config
        self.hidden_size = h
        self.mu = nn.Parameter(torch.zeros(h))
        self.mu_proj = nn.Linear(h, h, bias=False)
        self.mu_proj.zero_init = True
        self.controller_in = nn.Linear(2 * h, c)
        self.controller_out = nn.Linear(c, 3 * h)
        self.init_bias = (
            _logit(config.dynamics_alpha),
            _inverse_softplus(config.dynamics_beta),
            _logit(config.dynamics_gate),
        )

    def forward(self, a, velocity):
        """a: attention output; velocity: carried from the previous layer -> (a', v', mu_c)."""
        if decode_rows(a):  # two kernels: mu_proj(a) and controller_in([a, v]) (no copy of [a, v]); the rest
            h, w, out = self.hidden_size, self.controller_in.weight, self.controller_out
            segments = [(self.mu_proj.weight, None, None), (w[:, :h], w[:, h:], self.controller_in.bias)]
            mu_out, hidden = rows_projections(a, velocity, segments)
            [controls] = rows_projections(hidden, None, [(out.weight, None, out.bias)], silu_a=True)
        else:
            mu_out = self.mu_proj(a)
            controls = self.controller_out(F.silu(self.controller_in(torch.cat([a, velocity], dim=-1))))
        mu_c = self.mu + mu_out
        a, velocity = inl_dynamics(a, velocity, controls, mu_c, self.config)
        return a, velocity, mu_c


# ----------------------------------------------------------------------------- decoder layer


class ComplexityDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ComplexityConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ComplexityAttention(config, layer_idx, with_mu=layer_takes_mu(config, layer_idx))
        self.input_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP_KINDS[config.mlp_type](config, layer_idx)
        self.mu_guidance = ComplexityMuGuidance(config) if layer_gives_mu(config, layer_idx) else None
        self.dynamics = ComplexityINLDynamics(config) if config.mu_mode == "inl" else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        mu_prev: torch.Tensor | None,
        velocity: torch.Tensor | None,
        routing: Routing,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        """-> (hidden_states, the mu this layer gives (guidance mu or INL mu_c), velocity, MLP aux loss)."""
        attn = self.self_attn(
            self.input_layernorm(hidden_states), mu_prev, position_embeddings, attention_mask, past_key_values, **kwargs
        )
        mu = None
        if self.dynamics is not None:
            attn, velocity, mu = self.dynamics(attn, velocity)
            routing = routing._replace(mu=mu)
        hidden_states = hidden_states + attn
        mlp_out, aux = self.mlp(self.post_attention_layernorm(hidden_states), routing)
        hidden_states = hidden_states + mlp_out
        if self.mu_guidance is not None:
            mu = self.mu_guidance(hidden_states)
        return hidden_states, mu, velocity, aux


# ----------------------------------------------------------------------------- models


@dataclass
class ComplexityModelOutputWithPast(MoeModelOutputWithPast):
    """The base model's outputs; `aux_loss` is the learned router's load-balancing loss (mean over
    the layers), None for the MLPs that have none."""

    aux_loss: torch.FloatTensor | None = None


# The mask builders' name for the KV cache (`past_key_values` up to transformers 5.23, `cache` later).
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The KV cache under either of its names: transformers up to 5.23 passes `past_key_values`,
    later versions pass `cache` (and read it back from the output's `cache` field, which their
    output classes fill from `past_key_values=`)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache as `past_key_values` or as `cache`, not both")
    return cache


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

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers loads stored buffers unchecked: a table naming an expert that does not exist
        # would surface only as an index error deep in the MLP at the first forward
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).check_routing_tables()
        return loaded

    @torch.no_grad()
    def check_routing_tables(self) -> None:
        """ValueError naming the table unless every routing table holds ids of existing experts
        (and a hash-routed table k distinct ones per token)."""
        cfg = self.config
        for name, table in self.named_buffers():
            if table.is_meta or not table.numel():
                continue
            if name.split(".")[-1] == "token_to_expert":
                problem = expert_ids_outside(table, cfg.num_experts)
                if problem is not None:
                    raise ValueError(f"{name}: {problem}")
            elif name.endswith("mlp.route_table"):
                check_route_table(table, cfg.num_experts, cfg.vocab_size, cfg.num_experts_per_tok, name=name)

    @torch.no_grad()
    def _init_weights(self, module):
        """docs/architecture.md §4: N(0, std) weights, zero biases, unit norms, residual outputs
        scaled by 1/sqrt(2L); then the zero-inits (mu projections) and the INL controller's biases win.
        Children are initialised before their parents, so the composite cases below override."""
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(
                    module.weight, mean=0.0, std=out_std if getattr(module, "is_residual_output", False) else std
                )
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
        elif isinstance(module, ComplexityHashRoutedMLP) and not module.route_table.is_meta:
            init.copy_(module.route_table, module.build_route_table(cfg, module.layer_idx))


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

    def causal_without_mask(self, attention_mask, past_key_values, position_ids, seq_len: int) -> bool:
        """Whether a forward with these arguments runs the attention kernel's own causal mode, no
        mask built: sequences from position 0 with nothing cached before them (training, scoring,
        an inference engine's prefill into a cache that says `fresh_prompts`); right padding
        changes nothing for the real tokens before it. transformers' mask builder reaches the same
        answer eagerly, but under torch.compile some versions materialise a [B, 1, S, S] mask
        instead, and SDPA then runs 2-3x slower kernels than its causal flash path."""
        return (
            attention_mask is None
            and (past_key_values is None or getattr(past_key_values, "fresh_prompts", False))
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
        cache: Cache | None = None,
        **kwargs,
    ) -> ComplexityModelOutputWithPast:
        past_key_values = _one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.config.mlp_type in ("token_routed", "hash_routed"):
            raise ValueError(
                f"{self.config.mlp_type.replace('_', '-')} models need input_ids: each token's experts are chosen "
                "from its id, so a call with only inputs_embeds cannot be routed"
            )
        if input_ids is not None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        plain_causal = self.causal_without_mask(attention_mask, past_key_values, position_ids, inputs_embeds.shape[1])
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
                position_ids=position_ids,
                **{_MASK_CACHE_ARG: past_key_values},
            )
        position_embeddings = rotary_cos_sin(
            position_ids, self.config.rotary_dim, self.config.rope_theta, inputs_embeds.dtype
        )
        # Padding tokens do not count in the router's load-balancing statistics.
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :]
        routing = Routing.for_tokens(input_ids, self.token_to_expert, self.config.num_experts, token_mask)

        hidden_states = inputs_embeds
        mu_prev, velocity = initial_mu_state(self.config, self.mu_init, hidden_states)
        mu_sum = None
        aux_losses = []
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, mu, velocity, aux = layer(
                hidden_states,
                mu_prev,
                velocity,
                routing,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                **kwargs,
            )
            if aux is not None:
                aux_losses.append(aux)
            mu_prev, mu_sum = next_layer_mu(self.config, mu, mu_sum)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return ComplexityModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
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

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """LMHead(h) / logits_scaling (§1): the forward and the inference engine both take the
        logits from here, so the output scale is applied in one place."""
        logits = self.lm_head(hidden_states)
        scale = self.config.logits_scaling
        return logits if scale == 1.0 else logits / scale

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
        cache: Cache | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Standard causal-LM forward. `loss` is the next-token cross-entropy plus, for learned_moe,
        `router_aux_loss_coef` times the load-balancing loss (`add_router_aux_loss`; the loss
        itself is returned as `aux_loss`)."""
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.compute_logits(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = add_router_aux_loss(loss, outputs.aux_loss, self.config)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "ComplexityForCausalLM",
    "ComplexityModel",
    "ComplexityPreTrainedModel",
    "add_router_aux_loss",
    "default_routing_table",
]
