"""The upstream designs this package reads, and the error every check raises.

A design is named here once; the key adapter (keys.py) and the config translation (config.py)
say how each one maps onto `ComplexityConfig` and our tensors.
"""

from __future__ import annotations

INL = "complexity-deep-0.13-inl"
MU_GUIDANCE = "complexity-deep-1.0-mu"
# TR-Hash MoE (top-k hash routing, our mlp_type "hash_routed"): one model, four on-disk layouts
# (the `trhash` package reads them all into one neutral form).
TRHASH_NATIVE = "tr-hash-native"
TRHASH_HF = "tr-hash-hf"
TRHASH_DEEP = "tr-hash-deep"
TRHASH_MLX = "tr-hash-mlx"
TRHASH_DESIGNS = (TRHASH_NATIVE, TRHASH_HF, TRHASH_DEEP, TRHASH_MLX)
DESIGNS = {
    INL: "complexity-deep 0.13 (INL dynamics, mu-guided q/k/v, token routing with mu override)",
    MU_GUIDANCE: "complexity-deep 1.0 (mu-guidance, token-routed MLP)",
    TRHASH_NATIVE: "TR-Hash MoE, native layout (upstream's own save: config.json without model_type)",
    TRHASH_HF: "TR-Hash MoE, hf layout (upstream's Hugging Face bundle, model_type 'tr_hash_moe')",
    TRHASH_DEEP: "TR-Hash MoE, deep layout (upstream's export for its vLLM engine, model_type 'deep')",
    TRHASH_MLX: "TR-Hash MoE, mlx layout (upstream's MLX export, model_type 'complexity' like ours, keys under model.)",
}


class UpstreamFormatError(ValueError):
    """The source is not a checkpoint this converter can load exactly. ``problems`` lists every
    issue found (not just the first)."""

    def __init__(self, src, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{src}: cannot convert this upstream checkpoint ({len(self.problems)} problem(s)):\n{lines}")
