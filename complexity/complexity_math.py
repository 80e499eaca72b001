"""The Complexity equations, once, as pure functions of tensors and config values.

Both runtimes call these: the Hugging Face model (`modeling_complexity.py`) and the native vLLM
model (`integrations/vllm/model.py`), so the two cannot disagree on the math. Shapes are free:
[B, S, H] (Hugging Face) or [num_tokens, H] (vLLM). Self-contained (torch only): a checkpoint
saved with `save_pretrained` carries this file beside the model file for `trust_remote_code`.
Section numbers refer to the project's design document, docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- which layers carry mu


def layer_takes_mu(config, layer_idx: int) -> bool:
    """Layer `layer_idx`'s q/k/v take a mu term (it owns mu_to_q/k/v): every mu-guidance layer
    (layer 0 gets mu_init, §3a); INL layers after the first (layer 0 has no mu_prev, §3b)."""
    return config.mu_mode == "guidance" or (config.mu_mode == "inl" and layer_idx > 0)


def layer_gives_mu(config, layer_idx: int) -> bool:
    """Layer `layer_idx` computes a guidance mu from its output for the next layer (it owns a
    mu_guidance block, §3a). Not the last layer: its mu would feed nothing (no dead weights).
    INL layers give mu_c through their dynamics instead (§3b)."""
    return config.mu_mode == "guidance" and layer_idx < config.num_hidden_layers - 1


def initial_mu_state(config, mu_init: torch.Tensor | None, hidden_states: torch.Tensor):
    """(mu_prev, velocity) entering layer 0: guidance, mu_init broadcast to every token (§3a);
    INL, no mu and a zero velocity (§3b); otherwise neither (§3c)."""
    if config.mu_mode == "guidance":
        return mu_init.to(hidden_states.dtype).expand_as(hidden_states), None
    if config.mu_mode == "inl":
        return None, torch.zeros_like(hidden_states)
    return None, None


def next_layer_mu(config, mu: torch.Tensor | None, mu_sum: torch.Tensor | None):
    """(mu_prev for the next layer, running sum) from the mu a layer gave.

    INL, the mu highway (§3b): every layer's mu_c accumulates and leaks into the next layer's
    mu, mu_prev = mu_c + scale * sum_{l' <= l} mu_c(l'). Guidance passes mu on as it is (§3a).
    """
    if config.mu_mode != "inl":
        return mu, mu_sum
    mu_sum = mu if mu_sum is None else mu_sum + mu
    return mu + config.mu_highway_scale * mu_sum, mu_sum


# ----------------------------------------------------------------------------- mu guidance and INL dynamics


def mu_guidance(mu_param: torch.Tensor, mu_proj_out: torch.Tensor, config) -> torch.Tensor:
    """§3a: mu = clamp(mu_param, lo, hi) + mu_proj(x'), passed on as clamp(mu, -c, c)."""
    mu = mu_param.clamp(config.mu_clamp_min, config.mu_clamp_max) + mu_proj_out
    return mu.clamp(-config.mu_prev_clamp, config.mu_prev_clamp)


def inl_dynamics(a: torch.Tensor, velocity: torch.Tensor, controls: torch.Tensor, mu_c: torch.Tensor, config):
    """§3b: the controller's outputs [.., 3H] set alpha, beta, gate; the velocity pulls the
    attention output `a` toward mu_c. -> (a', v')."""
    alpha, beta, gate = controls.split(config.hidden_size, dim=-1)
    alpha = torch.sigmoid(alpha)
    beta = F.softplus(beta).clamp(max=config.dynamics_beta_max)
    gate = torch.sigmoid(gate)
    clamp = config.dynamics_velocity_clamp
    velocity = (alpha * velocity - beta * (a - mu_c)).clamp(-clamp, clamp)
    return a + config.dynamics_dt * gate * velocity, velocity


# ----------------------------------------------------------------------------- routing


def mu_router_override(expert_ids: torch.Tensor, mu_router_logits: torch.Tensor, bias: float) -> torch.Tensor:
    """§3b, the INL hard override: e = argmax(bias * one_hot(table[id]) + mu_router(mu_c)).

    Summed in float32 whatever the activations' dtype, so a bf16 model routes as an fp32 one
    does. argmax carries no gradient.
    """
    table = F.one_hot(expert_ids, mu_router_logits.shape[-1]).to(torch.float32)
    return (mu_router_logits.float() + bias * table).argmax(dim=-1)


def learned_topk(router_logits: torch.Tensor, k: int):
    """§2, the learned router: softmax, top-k. -> (probs f32 [N, E], weights [N, k], experts [N, k]).

    Weights are the router probabilities of the chosen experts; with k > 1 they are renormalised
    over the k (Mixtral), with k = 1 they are the raw probability (Switch: otherwise the weight
    would be 1 and the router would get no gradient from the LM loss).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, experts


def mix_topk_experts(run_experts: Callable, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
    """sum_j weights[:, j] * Expert_{experts[:, j]}(x) for x [N, H], experts/weights [N, k].

    `run_experts(rows, expert_ids)` runs row i through expert expert_ids[i]; with k > 1 each
    token goes in once per chosen expert.
    """
    n, k = experts.shape
    y = run_experts(x if k == 1 else x.repeat_interleave(k, dim=0), experts.reshape(-1))
    return (y.view(n, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def switch_aux_loss(
    probs: torch.Tensor, experts: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """§2, the Switch load-balancing loss E * sum_e f_e P_e: f_e the share of assignments to
    expert e, P_e its mean router probability, over the tokens where `token_mask` is 1 (padding
    does not count). probs [N, E], experts [N, k]; >= 1, equal to 1 when balanced."""
    k = experts.shape[-1]
    assigned = F.one_hot(experts, num_experts).sum(1).float()  # [N, E]
    if token_mask is not None:
        w = token_mask.reshape(-1, 1).float()
        denom = w.sum().clamp(min=1.0)
        f = (assigned * w).sum(0) / (denom * k)
        p = (probs * w).sum(0) / denom
    else:
        f = assigned.mean(0) / k
        p = probs.mean(0)
    return num_experts * (f * p).sum()


def add_router_aux_loss(loss: torch.Tensor, aux_loss: torch.Tensor | None, config) -> torch.Tensor:
    """loss + router_aux_loss_coef * aux_loss (§2): the one place the coefficient is applied.
    The causal LM's forward(labels=...) and the trainer both call it."""
    coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if aux_loss is None or not coef:
        return loss
    return loss + coef * aux_loss.to(loss.dtype)


__all__ = [
    "add_router_aux_loss",
    "initial_mu_state",
    "inl_dynamics",
    "layer_gives_mu",
    "layer_takes_mu",
    "learned_topk",
    "mix_topk_experts",
    "mu_guidance",
    "mu_router_override",
    "next_layer_mu",
    "switch_aux_loss",
]
