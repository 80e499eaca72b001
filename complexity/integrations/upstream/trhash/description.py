"""The neutral description of a TR-Hash model: its config in this project's terms (`TRHashConfig`),
every tensor under a neutral name with its shape, and the name each layout gives that tensor.

Weights are floats in upstream's conventions: nn.Linear [out, in] for attention and the shared
expert, x @ W for the experts; route tables are int64 [k, V].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ....hash_routing import layer_scales, slot_weights
from ..formats import TRHASH_DEEP, TRHASH_HF, TRHASH_MLX, TRHASH_NATIVE

NATIVE, HF, DEEP, MLX = "native", "hf", "deep", "mlx"
# layout -> the design name `detect_upstream` reports (formats.DESIGNS describes each)
DESIGN_OF_LAYOUT = {NATIVE: TRHASH_NATIVE, HF: TRHASH_HF, DEEP: TRHASH_DEEP, MLX: TRHASH_MLX}
# Upstream routing_strategy -> ours. Upstream accepts other names in its config, but its MLP
# cannot be built with them.
OUR_STRATEGY = {
    "modulo": "modulo_cyclic",
    "modulo_cyclic": "modulo_cyclic",
    "token_id_balanced_hash": "balanced_hash",
    "token_id_multi_hash": "multi_hash",
    "token_id_hierarchical_hash": "hierarchical_hash",
}
UPSTREAM_STRATEGY = {
    "modulo_cyclic": "modulo_cyclic",
    "balanced_hash": "token_id_balanced_hash",
    "multi_hash": "token_id_multi_hash",
    "hierarchical_hash": "token_id_hierarchical_hash",
}
QK_NORM_EPS = 1e-6  # upstream's QK-norm ignores norm_eps


@dataclass(frozen=True)
class TRHashConfig:
    """A TR-Hash model in this project's terms: every null resolved, every field meaningful."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int  # upstream `top_k` (architecture, not sampling)
    expert_width: int  # W, one expert's SwiGLU width (upstream intermediate_size / E)
    shared_expert_width: int | None  # S, or None without a shared expert
    route_strategy: str  # how the tables were built (documentation: tables are copied)
    route_hash_count: int | None  # multi_hash channels; None for the other strategies
    route_primary_weight: float  # slot 0's weight, resolved (1.0 when k = 1)
    shared_output_scale: float
    routed_output_scale: float
    shared_output_scale_first_layer: float | None = None
    shared_output_scale_last_layer: float | None = None
    routed_output_scale_first_layer: float | None = None
    routed_output_scale_last_layer: float | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-6
    qk_norm_eps: float = QK_NORM_EPS
    tie_word_embeddings: bool = True
    rope_fraction: float = 1.0  # RoPE on the first floor(head_dim * f / 2) * 2 dims of each head
    attention_multiplier: float | None = None  # the softmax scale; None: head_dim ** -0.5
    logits_scaling: float = 1.0  # the logits are divided by it
    bos_token_id: int | None = 2
    eos_token_id: int | None = 0
    pad_token_id: int | None = 1
    unk_token_id: int | None = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_fraction // 2) * 2

    @property
    def shared_expert(self) -> bool:
        return self.shared_expert_width is not None

    @property
    def slot_weights(self) -> tuple[float, ...]:
        return slot_weights(self.num_experts_per_tok, self.route_primary_weight)

    def shared_scale(self, layer_idx: int) -> float:
        return layer_scales(self, layer_idx)[0]

    def routed_scale(self, layer_idx: int) -> float:
        return layer_scales(self, layer_idx)[1]


def neutral_tensor_shapes(config: TRHashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model under its neutral name, with its shape (the experts: gate/up
    [E, H, W], down [E, W, H])."""
    c = config
    h, d, e, w = c.hidden_size, c.head_dim, c.num_experts, c.expert_width
    shapes = {"embed_tokens.weight": (c.vocab_size, h), "norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            p + "mlp.route_table": (c.num_experts_per_tok, c.vocab_size),
            p + "mlp.experts.gate": (e, h, w),
            p + "mlp.experts.up": (e, h, w),
            p + "mlp.experts.down": (e, w, h),
        }
        if c.use_qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if c.shared_expert:
            s = c.shared_expert_width
            shapes |= {
                p + "mlp.shared_expert.gate_proj.weight": (s, h),
                p + "mlp.shared_expert.up_proj.weight": (s, h),
                p + "mlp.shared_expert.down_proj.weight": (h, s),
            }
    return shapes


# Neutral per-layer suffix -> each layout's (the rest of the names are the same in all four, MLX under "model.").
_LAYER_RENAMES = {
    NATIVE: {
        "mlp.route_table": "mlp.engine.route_table",
        "mlp.experts.gate": "mlp.engine.expert_gate",
        "mlp.experts.up": "mlp.engine.expert_up",
        "mlp.experts.down": "mlp.engine.expert_down",
        "mlp.shared_expert.gate_proj.weight": "mlp.engine.shared_gate.weight",
        "mlp.shared_expert.up_proj.weight": "mlp.engine.shared_up.weight",
        "mlp.shared_expert.down_proj.weight": "mlp.engine.shared_down.weight",
    },
    DEEP: {
        "mlp.route_table": "mlp.topk_token_to_expert",
        "mlp.experts.gate": "mlp.gate_proj_w",
        "mlp.experts.up": "mlp.up_proj_w",
        "mlp.experts.down": "mlp.down_proj_w",
        "mlp.shared_expert.gate_proj.weight": "mlp.shared_gate.weight",
        "mlp.shared_expert.up_proj.weight": "mlp.shared_up.weight",
        "mlp.shared_expert.down_proj.weight": "mlp.shared_down.weight",
    },
}
_LAYER_RENAMES[HF] = _LAYER_RENAMES[NATIVE]
_LAYER_RENAMES[MLX] = _LAYER_RENAMES[DEEP]  # and every name under "model."


def layout_name(neutral: str, layout: str) -> str:
    """The name a neutral tensor has in `layout`."""
    name = neutral
    if neutral.startswith("layers."):
        _, i, rest = neutral.split(".", 2)
        name = f"layers.{i}.{_LAYER_RENAMES[layout].get(rest, rest)}"
    return "model." + name if layout == MLX else name


@dataclass
class TRHashCheckpoint:
    """A validated upstream TR-Hash checkpoint in neutral form."""

    layout: str
    src: Path
    weights_file: Path
    raw_config: dict
    config: TRHashConfig
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)  # the layout and why, resolved nulls, ignored fields
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (stored key, why it is not needed)
