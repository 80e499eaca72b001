"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule.

No weight decay (unless asked) on: norms (`*layernorm.weight`, `norm.weight`, `q_norm.weight`,
`k_norm.weight`), biases, the mu base/init vectors (`mu_init`, `mu_guidance.mu`, `dynamics.mu`)
and the token embedding (tied to the LM head). Everything else (projections, stacked experts,
routers, mu projections) decays.

The schedule is a pure function of the step: linear warmup from 0 to `lr` over `warmup_steps`,
then cosine or WSD (constant, then linear decay over the last `decay_fraction` of training) down
to the floor `min_lr`, reached at `max_steps`. It is installed as a `LambdaLR`, whose state
is checkpointed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimSection, ScheduleSection

_NO_DECAY_SUFFIXES = (
    "layernorm.weight",
    "norm.weight",
    "q_norm.weight",
    "k_norm.weight",
    ".bias",
    "mu_init",
    "mu_guidance.mu",
    "dynamics.mu",
)
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_positions.weight")


def _clean(name: str) -> str:
    # Wrappers (DDP, compile, checkpoint wrappers) prefix names; the suffix rules ignore them.
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def is_norm_bias_or_mu(name: str, param: torch.Tensor) -> bool:
    name = _clean(name)
    return name.endswith(_NO_DECAY_SUFFIXES) or param.ndim < 2


def is_embedding(name: str) -> bool:
    return _clean(name).endswith(_EMBEDDING_SUFFIXES)


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """Two groups: {"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}.
    Tied parameters appear once (named_parameters deduplicates)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (is_norm_bias_or_mu(name, p) and not optim.decay_norms_and_biases) or (
            is_embedding(name) and not optim.decay_embeddings
        )
        (no_decay if skip else decay).append(p)
        (no_decay_names if skip else decay_names).append(name)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    groups = param_groups(model, optim)
    for g in groups:
        g.pop("names")
    # The fused kernel, on every device: one launch per step instead of a dozen foreach passes
    # per group, and it honours `found_inf`, which the spike guard sets to skip a step on the
    # device without the host ever reading the loss.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)


def lr_at(step: int, optim: OptimSection, schedule: ScheduleSection, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    lr, floor, warm = optim.lr, optim.min_lr, schedule.warmup_steps
    if warm and step < warm:
        return lr * (step + 1) / warm
    if schedule.kind == "constant":
        return lr
    if schedule.kind == "cosine":
        span = max(1, max_steps - warm)
        progress = min(1.0, (step - warm) / span)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: stable at lr, then linear decay to the floor over the last decay_fraction of the run.
    decay_steps = max(1, int(round(schedule.decay_fraction * max_steps)))
    decay_start = max(warm, max_steps - decay_steps)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return lr + (floor - lr) * progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSection, schedule: ScheduleSection, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    base = optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, schedule, max_steps) / base)


def clip_divisor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clipping the global gradient norm to `max_norm` as a divisor, max(1, norm / max_norm), for
    fused AdamW's `grad_scale`: the kernel divides every gradient by it as it reads them, which
    is `clip_grads_with_norm_` without a pass over the gradients of its own."""
    return ((grad_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
