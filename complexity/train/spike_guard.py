"""The loss-spike guard: a step whose loss or gradient norm is not finite, or whose loss exceeds
`spike.factor` times the mean of the last `spike.window` good losses (after `min_history` good
steps), is skipped.

The test runs on the device and reaches fused AdamW as its `found_inf`: a spike step leaves the
weights, the Adam moments and the Adam step count untouched, while the scheduler advances and the
data loader has consumed the batch (the step counter, the LR schedule and the data order stay
those of the planned run). The trainer reads the verdicts back when it next waits for the device
and, after `spike.max_consecutive` spikes in a row, restores the model and optimizer from the
last checkpoint before the next step updates anything. Events go to metrics.jsonl as
{"event": "spike_skipped" | "restored"}.
"""

from __future__ import annotations

import torch


class SpikeGuard:
    """The test above on the device, so that no step waits for the host. Good losses enter a ring
    buffer of the last `window` (the running mean); `consecutive` is host bookkeeping, updated
    when the verdicts are read back."""

    REASONS = {1: "non-finite loss", 2: "non-finite grad norm", 3: "loss above factor x running mean"}

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.history = torch.zeros(cfg.window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # losses held (<= window)
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # where the next good loss goes
        self._slots = torch.arange(cfg.window, device=device)
        self.consecutive = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (code, running mean) as device scalars; code 0 is a good step (its loss enters the
        history), else a key of REASONS. With the guard disabled every step is good."""
        loss, grad_norm = loss.double(), grad_norm.double()
        mean = self.history.sum() / self.count.clamp(min=1)
        if not self.cfg.enabled:
            return torch.zeros((), dtype=torch.long, device=loss.device), mean
        above = (self.count >= self.cfg.min_history) & (loss > self.cfg.factor * mean)
        code = torch.where(
            ~torch.isfinite(loss), 1, torch.where(~torch.isfinite(grad_norm), 2, torch.where(above, 3, 0))
        )
        good = code == 0
        write = good & (self._slots == self.slot)
        self.history.copy_(torch.where(write, loss, self.history))
        self.slot.copy_((self.slot + good) % self.cfg.window)
        self.count.copy_((self.count + good).clamp(max=self.cfg.window))
        return code, mean

    def verdict(self, step: int, loss: float, grad_norm: float, code: int, mean: float) -> dict | None:
        """Host side, for a step read back: None for a good step, else the spike_skipped event."""
        if not code:
            self.consecutive = 0
            return None
        self.consecutive += 1
        reason = self.REASONS[code]
        if code == 3:
            reason = f"loss {loss:.4f} > {self.cfg.factor} x running mean {mean:.4f}"
        return {"loss": loss, "grad_norm": grad_norm, "reason": reason, "consecutive": self.consecutive}

    @property
    def must_restore(self) -> bool:
        return self.consecutive >= self.cfg.max_consecutive

    def state_dict(self) -> dict:
        n, slot, values = int(self.count), int(self.slot), self.history.tolist()
        return {
            "history": values[:n] if n < self.cfg.window else values[slot:] + values[:slot],
            "consecutive": self.consecutive,
        }

    def load_state_dict(self, state: dict) -> None:
        values = list(state.get("history", []))[-self.cfg.window :]
        self.history.zero_()
        self.history[: len(values)] = torch.tensor(values, dtype=torch.float64)
        self.count.fill_(len(values))
        self.slot.fill_(len(values) % self.cfg.window)
        self.consecutive = int(state.get("consecutive", 0))
