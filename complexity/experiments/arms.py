"""The arms of the ablation (docs/architecture.md §8) and their parameter matching.

Arms (model fields set on top of the preset and the recipe's own model overrides):

    dense        (1) dense SwiGLU, no mu                                  MLP widened to match
    routed_mu    (2) token_routed + shared expert + zipf + mu guidance    the reference (its size is the target)
    routed       (3) as (2) without mu                                    experts widened to match
    learned_mu   (4) learned top-1 router + shared expert + mu guidance (+ Switch aux loss)
    extras:      routed_mu_modulo, routed_mu_range (routing tables), inl (the INL design of docs/architecture.md §3b:
                 token_routed by modulo, no shared expert, velocity/controller dynamics),
                 hash_top2 (top-2 hash routing over twice as many half-width experts, + shared
                 expert + mu guidance: equal total AND equal active parameters to (2))

**Parameter matching.** The target is the live total (`complexity.count_parameters`: tied
embedding once, no dead weights) of the reference arm (2). Every other arm solves its MLP width
so that its own live total is as close as possible: the dense arm its `intermediate_size`; a
routed arm its expert width (`expert_intermediate_size`) together with the shared expert's
width (`shared_expert_intermediate_size`, which fine-tunes what the coarser expert step cannot).
A count is affine in each width, so the solver measures the slopes on meta-device models and
rounds. The hash_top2 arm is not solved but derived: each of the reference's experts is split in
two (2E experts of width I_e / 2, the shared expert unchanged), so with k = 2 a token visits the
same number of expert parameters as a top-1 token visits in (2): its total and its active count
both equal the reference's, exactly. Expert widths are always multiples of 8 (the grouped GEMMs need 16-byte row strides,
in bf16 and fp32 alike); the dense and shared-expert widths are multiples of 8 when that matches
within `PRECISION` (0.1%), otherwise their alignment drops to 4, 2, 1. An arm whose
relative mismatch exceeds the tolerance (default 0.5%) is an error. Total and active-per-token
counts are reported for every arm.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..configuration_complexity import ComplexityConfig

REFERENCE_ARM = "routed_mu"
TOLERANCE = 0.005  # max relative mismatch of a live total against the reference arm's
PRECISION = 0.001  # the alignment of widths drops (8 -> 4 -> 2 -> 1) until within this
ALIGNMENTS = (8, 4, 2, 1)
EXPERT_ALIGN = 8  # expert widths always: grouped GEMMs need 16-byte row strides (bf16 and fp32)


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    model: dict
    widen: str | None  # None (the reference), "dense", "experts" or "split" (the reference's experts, split)


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("dense", "(1) dense SwiGLU, no mu", dict(mlp_type="dense", shared_expert=False, mu_mode="none"), "dense"),
        Arm(
            "routed_mu",
            "(2) token-routed + shared + zipf + mu guidance",
            dict(mlp_type="token_routed", shared_expert=True, routing="zipf", mu_mode="guidance"),
            None,
        ),
        Arm(
            "routed",
            "(3) token-routed + shared + zipf, no mu",
            dict(mlp_type="token_routed", shared_expert=True, routing="zipf", mu_mode="none"),
            "experts",
        ),
        Arm(
            "learned_mu",
            "(4) learned top-1 router + shared + mu guidance (+ aux loss)",
            dict(mlp_type="learned_moe", num_experts_per_tok=1, shared_expert=True, mu_mode="guidance"),
            "experts",
        ),
        Arm(
            "routed_mu_modulo",
            "(2m) as (2) with modulo routing",
            dict(mlp_type="token_routed", shared_expert=True, routing="modulo", mu_mode="guidance"),
            "experts",
        ),
        Arm(
            "routed_mu_range",
            "(2r) as (2) with range routing",
            dict(mlp_type="token_routed", shared_expert=True, routing="range", mu_mode="guidance"),
            "experts",
        ),
        Arm(
            "inl",
            "(5) INL design: token-routed by modulo, no shared expert, INL dynamics",
            dict(mlp_type="token_routed", shared_expert=False, routing="modulo", mu_mode="inl"),
            "experts",
        ),
        Arm(
            "hash_top2",
            "(6) top-2 hash routing over 2E half-width experts + shared + mu guidance",
            dict(
                mlp_type="hash_routed",
                num_experts_per_tok=2,
                route_strategy="multi_hash",
                shared_expert=True,
                mu_mode="guidance",
            ),
            "split",
        ),
    )
}
DEFAULT_ARMS = ("dense", "routed_mu", "routed", "learned_mu")

# Model fields an arm decides; a base override of these is replaced by the arm's value.
_WIDTH_FIELDS = ("intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size")


@dataclass
class ArmPlan:
    name: str
    label: str
    model: dict  # the model overrides of this arm's runs (base overrides + arm fields + widths)
    total: int
    active: int
    mismatch: float  # (total - target) / target
    align: int | None  # the width alignment used (None: the reference, not solved)
    widths: dict  # the MLP widths in effect: intermediate / expert / shared

    def summary(self) -> str:
        w = ", ".join(f"{k} {v}" for k, v in self.widths.items())
        return (
            f"{self.name:18s} total {self.total:>13,}  active {self.active:>13,}  "
            f"mismatch {100 * self.mismatch:+.3f}%  ({w})"
        )


def _config(preset: str, fields: dict) -> ComplexityConfig:
    from ..configuration_complexity import ComplexityConfig  # here, not at import: `complexity --help` skips torch

    return ComplexityConfig.from_preset(preset, **fields)


def _count(config: ComplexityConfig):
    from ..params import count_parameters

    return count_parameters(config)


_TOTALS: dict[str, int] = {}


def _total(preset: str, fields: dict) -> int:
    key = json.dumps([preset, fields], sort_keys=True, default=str)
    if key not in _TOTALS:
        _TOTALS[key] = _count(_config(preset, fields)).total
    return _TOTALS[key]


def _widths(config: ComplexityConfig) -> dict:
    if config.mlp_type == "dense":
        return {"intermediate": config.intermediate_size}
    w = {"expert": config.expert_width, "experts": config.num_experts}
    if config.num_experts_per_tok > 1 and config.mlp_type != "token_routed":
        w["per_token"] = config.num_experts_per_tok
    if config.shared_expert:
        w["shared"] = config.shared_expert_width
    return w


def _near(x: float, align: int, lo: int = 1) -> list[int]:
    base = math.floor(x / align) * align
    return sorted({max(lo, base + k * align) for k in (-2, -1, 0, 1, 2)})


def _solve_dense(preset: str, fields: dict, target: int, align: int) -> dict:
    i0 = max(align, int(fields.get("intermediate_size") or _config(preset, fields).intermediate_size))
    f0 = _total(preset, {**fields, "intermediate_size": i0})
    slope = (_total(preset, {**fields, "intermediate_size": i0 + 64}) - f0) / 64
    best = min(_near(i0 + (target - f0) / slope, align, lo=align), key=lambda i: abs(f0 + slope * (i - i0) - target))
    return {"intermediate_size": int(best)}


def _solve_experts(preset: str, fields: dict, target: int, align: int) -> dict:
    cfg = _config(preset, fields)
    w0 = max(align, cfg.expert_width)
    shared = bool(cfg.shared_expert)
    s0 = max(align, cfg.shared_expert_width) if shared else None

    def with_widths(w, s):
        f = {**fields, "expert_intermediate_size": int(w)}
        if shared:
            f["shared_expert_intermediate_size"] = int(s)
        return f

    f0 = _total(preset, with_widths(w0, s0))
    a = (_total(preset, with_widths(w0 + 64, s0)) - f0) / 64
    b = ((_total(preset, with_widths(w0, s0 + 64)) - f0) / 64) if shared else 0.0

    def predict(w, s):
        return f0 + a * (w - w0) + (b * (s - s0) if shared else 0.0)

    # Expert and shared widths grow together (the shared expert defaults to the expert width),
    # then the shared width alone takes up the remainder.
    w_star = w0 + (target - f0 - (b * (w0 - s0) if shared else 0.0)) / (a + b)
    candidates = []
    for w in _near(w_star, EXPERT_ALIGN, lo=EXPERT_ALIGN):
        if shared:
            s_star = s0 + (target - predict(w, s0)) / b
            for s in _near(s_star, align, lo=align):
                candidates.append((abs(predict(w, s) - target), abs(s - w), w, s))
        else:
            candidates.append((abs(predict(w, None) - target), 0, w, None))
    _, _, w, s = min(candidates)
    out = {"expert_intermediate_size": int(w)}
    if shared:
        out["shared_expert_intermediate_size"] = int(s)
    return out


def _split_experts(reference: ComplexityConfig, k: int) -> dict:
    """The reference's experts split k ways: k E experts of width I_e / k, the shared expert as
    the reference's. With k routes per token, total and active counts are the reference's."""
    if reference.expert_width % k:
        raise ValueError(
            f"arm hash_top2: the reference's expert width {reference.expert_width} does not split into "
            f"{k} equal experts (set expert_intermediate_size to a multiple of {k})"
        )
    out = {"num_experts": reference.num_experts * k, "expert_intermediate_size": reference.expert_width // k}
    if reference.shared_expert:
        out["shared_expert_intermediate_size"] = reference.shared_expert_width
    return out


def plan_arms(
    preset: str, arms: Iterable[str] = DEFAULT_ARMS, base_overrides: dict | None = None, tolerance: float = TOLERANCE
) -> dict[str, ArmPlan]:
    """The arms' model overrides with live totals matched to the reference arm (2)'s.

    `base_overrides` are model fields applied before the arm's (e.g. vocab_size, hidden_size).
    Raises ValueError for an unknown arm or a mismatch above `tolerance`."""
    base = {k: v for k, v in (base_overrides or {}).items() if k != "preset"}
    arms = list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms: an arm is listed twice: {' '.join(arms)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"--tolerance: must be a finite number >= 0 (a relative mismatch), got {tolerance!r}")
    ref_fields = {**base, **ARMS[REFERENCE_ARM].model}
    target = _total(preset, ref_fields)
    plans = {}
    for name in arms:
        arm = ARMS[name]
        fields = {**base, **arm.model}
        align = None
        if arm.widen == "split":
            for k in _WIDTH_FIELDS[1:]:
                fields.pop(k, None)
            fields.update(_split_experts(_config(preset, ref_fields), fields["num_experts_per_tok"]))
        elif arm.widen is not None:
            for k in _WIDTH_FIELDS:
                if k != "intermediate_size":
                    fields.pop(k, None)
            solver = _solve_dense if arm.widen == "dense" else _solve_experts
            best = None
            for al in ALIGNMENTS:
                solved = solver(preset, fields, target, al)
                total = _total(preset, {**fields, **solved})
                err = abs(total - target) / target
                if best is None or err < best[0]:
                    best = (err, al, solved)
                if err <= PRECISION:
                    break
            _, align, solved = best
            fields.update(solved)
        config = _config(preset, fields)
        count = _count(config)
        mismatch = (count.total - target) / target
        if abs(mismatch) > tolerance:
            raise ValueError(
                f"arm {name}: live total {count.total:,} differs from the reference's {target:,} by "
                f"{100 * mismatch:+.2f}%, above the tolerance {100 * tolerance:.2f}%"
            )
        plans[name] = ArmPlan(
            name=name,
            label=arm.label,
            model=fields,
            total=count.total,
            active=count.active,
            mismatch=mismatch,
            align=align,
            widths=_widths(config),
        )
    return plans
