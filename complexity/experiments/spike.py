"""The loss-spike experiment: one corrupted step injected into every arm, and how each recovers.

The fault (`complexity ablate --spike STEP [--spike-lr-mult 10]`), the trainer callbacks built by
`complexity.train.spike_injection`: at optimizer step STEP (1-based) every micro-batch's
`input_ids` and `labels` are replaced by uniform random token ids (one fixed draw, seed 1234,
identical for every arm and seed), and that step's learning rate is multiplied by the factor.
The trainer's spike GUARD is switched off for these runs (`spike.enabled = false`): it would
recognise the step as a spike and skip the update, and there would be nothing to measure.
Each run logs `{"event": "spike_injected"}` in its metrics.jsonl at STEP.

Metrics per run, from the per-step training losses:

    pre          mean training loss of the `window` steps before STEP (STEP-window .. STEP-1)
    fault_loss   the loss on the corrupted batch itself (step STEP): random targets, ~ln V or more
    peak         the highest training loss on real data after the fault (steps > STEP): the damage
    peak_ratio   peak / pre
    recovery     steps after STEP until the training loss is first back within 5% of `pre`
                 (loss <= 1.05 * pre); None when it never is before the run ends
"""

from __future__ import annotations

import math

from ..train.metrics import train_losses

THRESHOLD = 0.05
FAULT_SEED = 1234  # the one draw of random token ids: the same in every arm and seed


def plan_spike(steps: int, step: int | None, lr_mult: float, window: int) -> dict | None:
    """The fault every run of the ablation gets, as ablation.json records it (None without
    --spike); a bad flag is a ValueError naming it."""
    if step is None:
        return None
    if not 2 <= step <= steps:
        raise ValueError(f"--spike: the step must lie in [2, --steps={steps}], got {step}")
    if not 0 < lr_mult < math.inf:  # nan too: it used to run every arm, then fail in the report
        raise ValueError(f"--spike-lr-mult: must be a finite positive number, got {lr_mult}")
    if window < 1:
        raise ValueError(f"--spike-window: must be at least 1, got {window}")
    return {
        "step": int(step),
        "lr_mult": float(lr_mult),
        "window": int(max(1, min(window, step - 1))),  # `pre` needs steps before STEP: there are STEP - 1
        "seed": FAULT_SEED,
        "fault": f"uniform random input_ids and labels (one fixed draw, seed {FAULT_SEED}) in every micro-batch "
        "of that step, and that step's LR multiplied by lr_mult; spike guard off",
    }


def injected_steps(records: list[dict]) -> list[int]:
    return sorted({r["step"] for r in records if r.get("event") == "spike_injected"})


def spike_metrics(records: list[dict], step: int, window: int, threshold: float = THRESHOLD) -> dict:
    losses = train_losses(records)
    before = [losses[s] for s in range(step - window, step) if s in losses]
    after = sorted(s for s in losses if s > step)
    pre = sum(before) / len(before) if before else None
    out = {
        "step": step,
        "window": window,
        "threshold": threshold,
        "pre": pre,
        "fault_loss": losses.get(step),
        "injected_at": injected_steps(records),
        "peak": None,
        "peak_step": None,
        "peak_ratio": None,
        "recovery": None,
    }
    if after:
        peak_step = max(after, key=lambda s: losses[s])
        out["peak"], out["peak_step"] = losses[peak_step], peak_step
        if pre:
            out["peak_ratio"] = losses[peak_step] / pre
            for s in after:
                if losses[s] <= (1 + threshold) * pre:
                    out["recovery"] = s - step
                    break
    return out
