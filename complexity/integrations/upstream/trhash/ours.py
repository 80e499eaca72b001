"""A TR-Hash model as ours: `ComplexityConfig` <-> `TRHashConfig`, and the tensor names between the
neutral description and our `hash_routed` model (`TRHashStateDictAdapter`)."""

from __future__ import annotations

import torch

from ....configuration_complexity import ComplexityConfig
from ....hash_routing import slot_weights
from .description import QK_NORM_EPS, TRHashConfig, neutral_tensor_shapes


def complexity_config(config: TRHashConfig) -> ComplexityConfig:
    """The `hash_routed` ComplexityConfig computing what `config` computes. Every field is
    written out, upstream's resolved nulls included, so no reader has to know upstream's defaults."""
    return ComplexityConfig(
        partial_rotary_factor=config.rope_fraction,
        attention_multiplier=config.attention_multiplier,
        logits_scaling=config.logits_scaling,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.num_experts * config.expert_width,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        qk_norm_eps=None if config.qk_norm_eps == config.rms_norm_eps else config.qk_norm_eps,
        rope_theta=config.rope_theta,
        use_qk_norm=config.use_qk_norm,
        tie_word_embeddings=config.tie_word_embeddings,
        mlp_type="hash_routed",
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        shared_expert=config.shared_expert,
        shared_expert_intermediate_size=config.shared_expert_width,
        route_strategy=config.route_strategy,
        route_hash_count=config.route_hash_count or 2,  # builds only a fresh model's tables; these are loaded
        route_primary_weight=config.route_primary_weight,
        shared_output_scale=config.shared_output_scale,
        routed_output_scale=config.routed_output_scale,
        shared_output_scale_first_layer=config.shared_output_scale_first_layer,
        shared_output_scale_last_layer=config.shared_output_scale_last_layer,
        routed_output_scale_first_layer=config.routed_output_scale_first_layer,
        routed_output_scale_last_layer=config.routed_output_scale_last_layer,
        mu_mode="none",
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def trhash_config(config: ComplexityConfig) -> TRHashConfig:
    """The neutral description of one of our `hash_routed` models, for an upstream export;
    ValueError naming the field for anything upstream's format cannot say."""
    c = config
    _check_expressible(c)
    return TRHashConfig(
        **_knobs_of(c),
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        expert_width=c.expert_width,
        shared_expert_width=c.shared_expert_width if c.shared_expert else None,
        route_strategy=c.route_strategy,
        route_hash_count=c.route_hash_count if c.route_strategy == "multi_hash" else None,
        route_primary_weight=slot_weights(c.num_experts_per_tok, c.route_primary_weight)[0],
        shared_output_scale=float(c.shared_output_scale),
        routed_output_scale=float(c.routed_output_scale),
        shared_output_scale_first_layer=c.shared_output_scale_first_layer,
        shared_output_scale_last_layer=c.shared_output_scale_last_layer,
        routed_output_scale_first_layer=c.routed_output_scale_first_layer,
        routed_output_scale_last_layer=c.routed_output_scale_last_layer,
        rope_theta=float(c.rope_theta),
        max_position_embeddings=c.max_position_embeddings,
        use_qk_norm=c.use_qk_norm,
        rms_norm_eps=float(c.rms_norm_eps),
        qk_norm_eps=QK_NORM_EPS,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def _check_expressible(c: ComplexityConfig) -> None:
    """ValueError naming the first of our fields that upstream's TR-Hash cannot state."""
    refusals = [
        (
            c.mlp_type != "hash_routed",
            "mlp_type",
            f"is {c.mlp_type!r}; only hash_routed models have an upstream TR-Hash form",
        ),
        (c.mu_mode != "none", "mu_mode", f"is {c.mu_mode!r}; TR-Hash has no mu"),
        (c.sliding_window is not None, "sliding_window", "is set; upstream applies a window only to long prefills"),
        (
            c.head_dim * c.num_attention_heads != c.hidden_size,
            "head_dim",
            f"{c.head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}; upstream derives head_dim",
        ),
        (
            c.use_qk_norm and (c.qk_norm_eps if c.qk_norm_eps is not None else c.rms_norm_eps) != QK_NORM_EPS,
            "qk_norm_eps",
            f"upstream's QK-norm epsilon is fixed at {QK_NORM_EPS}",
        ),
    ]
    for bad, name, why in refusals:
        if bad:
            raise ValueError(f"{name}: {why}")


def _knobs_of(c: ComplexityConfig) -> dict:
    """Our RoPE fraction and µP knobs as the neutral fields (each maps to one upstream field);
    ValueError naming our field for a value upstream's format cannot state."""
    fraction = float(c.partial_rotary_factor)
    multiplier = c.attention_multiplier
    scaling = float(c.logits_scaling)
    if multiplier is not None and float(multiplier) == c.head_dim**-0.5:
        multiplier = None  # the default scale, written out
    if multiplier is not None and float(multiplier) != 1.0 / c.head_dim:
        raise ValueError(
            f"attention_multiplier: {multiplier} is neither 1/head_dim (upstream's use_mup_attn_scale) nor "
            "head_dim**-0.5, the two scales upstream's format can state"
        )
    if scaling != 1.0:
        base = round(c.hidden_size / scaling) if scaling > 0 else 0
        if base < 1 or c.hidden_size / base != scaling:
            raise ValueError(
                f"logits_scaling: {scaling} is not hidden_size / an integer width, which is all upstream's "
                "use_mup_output_mult with mup_base_width can state"
            )
    return {
        "rope_fraction": fraction,
        "attention_multiplier": None if multiplier is None else float(multiplier),
        "logits_scaling": scaling,
    }


_GATE, _UP, _DOWN, _FUSED = "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down", "mlp.experts.gate_up_proj"


def _ours(neutral: str) -> str:
    return neutral if neutral == "lm_head.weight" else f"model.{neutral}"


class TRHashStateDictAdapter:
    """Neutral TR-Hash tensor names <-> ours. The one difference beyond the `model.` prefix: our
    experts store gate and up as one tensor, `experts.gate_up_proj [E, H, 2W]` (gate first), and
    `experts.down_proj`; the layouts' renames are `layout_name`'s."""

    def __init__(self, config: TRHashConfig, dropped: list[tuple[str, str]] = ()):
        self.config = config
        self.dropped = list(dropped)

    def to_complexity(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if name.endswith((_GATE, _UP)):
                if name.endswith(_GATE):
                    prefix = name.removesuffix(_GATE)
                    out[_ours(prefix + _FUSED)] = torch.cat([t, tensors[prefix + _UP]], dim=-1)
            elif name.endswith(_DOWN):
                out[_ours(name + "_proj")] = t
            else:
                out[_ours(name)] = t
        return out

    def from_complexity(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> the neutral tensors (a tied lm_head is left out)."""
        out = {}
        for name in neutral_tensor_shapes(self.config):
            if name.endswith(_UP):
                continue
            if name.endswith(_GATE):
                prefix = name.removesuffix(_GATE)
                out[name], out[prefix + _UP] = state_dict[_ours(prefix + _FUSED)].chunk(2, dim=-1)
            elif name.endswith(_DOWN):
                out[name] = state_dict[_ours(name + "_proj")]
            else:
                out[name] = state_dict[_ours(name)]
        return {k: v.contiguous() for k, v in out.items()}
