"""Exact parameter counts: total, and active per token (the experts a token does not visit
are not active). Counted on the meta device, so even the 7b preset costs no memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_complexity import ComplexityConfig
from .modeling_complexity import ComplexityExperts, ComplexityForCausalLM


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int

    def __str__(self) -> str:
        return f"total {self.total:,} ({self.total / 1e6:.1f}M), active per token {self.active:,} ({self.active / 1e6:.1f}M)"


def count_parameters(model_or_config: ComplexityForCausalLM | ComplexityConfig) -> ParameterCount:
    """Live parameters (tied weights once; buffers such as the routing table excluded)."""
    if isinstance(model_or_config, ComplexityConfig):
        with torch.device("meta"):
            model = ComplexityForCausalLM(model_or_config)
    else:
        model = model_or_config
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    active = total
    for mlp in model.modules():  # a routed MLP: its expert bank, and the experts each token visits
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, ComplexityExperts):
            per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
            active -= (experts.num_experts - mlp.num_experts_per_tok) * per_expert
    return ParameterCount(total=total, active=active)
