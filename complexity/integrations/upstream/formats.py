"""The upstream designs this package reads, and the error every check raises.

A design is named here once; the key adapter (keys.py) and the config translation (config.py)
say how each one maps onto `ComplexityConfig` and our tensors.
"""

from __future__ import annotations

INL = "complexity-deep-0.13-inl"
MU_GUIDANCE = "complexity-deep-1.0-mu"
DESIGNS = {
    INL: "complexity-deep 0.13 (INL dynamics, mu-guided q/k/v, token routing with mu override)",
    MU_GUIDANCE: "complexity-deep 1.0 (mu-guidance, token-routed MLP)",
}


class UpstreamFormatError(ValueError):
    """The source is not a checkpoint this converter can load exactly. ``problems`` lists every
    issue found (not just the first)."""

    def __init__(self, src, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{src}: cannot convert this upstream checkpoint ({len(self.problems)} problem(s)):\n{lines}")
