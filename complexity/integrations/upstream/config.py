"""Upstream config.json -> `ComplexityConfig` keyword arguments.

Every upstream field is either mapped to ours (same meaning), accepted as without effect on the
computation (with the values allowed), or an error. Structural flags (QK-norm, shared expert,
mu guidance) are decided by the weights; a config value that disagrees is an error. What the
weights add or contradict beyond that is checked by `keys.reconcile_with_weights`.
"""

from __future__ import annotations

from .formats import INL
from .keys import WeightStructure

# Upstream fields with no default we could trust: the weights' shapes depend on them.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Upstream field -> (our field, upstream default when absent). Same meaning on both sides.
MAPPED_FIELDS = {
    "max_position_embeddings": ("max_position_embeddings", 2048),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "rope_theta": ("rope_theta", 10000.0),
    "tie_word_embeddings": ("tie_word_embeddings", True),
    "initializer_range": ("initializer_range", 0.02),
    "attention_dropout": ("attention_dropout", 0.0),  # training only
    "pad_token_id": ("pad_token_id", 1),
    "bos_token_id": ("bos_token_id", 2),
    "eos_token_id": ("eos_token_id", 0),
    "sliding_window": ("sliding_window", None),
    "num_experts": ("num_experts", 4),
    "head_dim": ("head_dim", None),
}
# INL design only. alpha/beta/gate only set the controller's bias at init (the file's biases win);
# dt and the controller width enter the computation.
DYNAMICS_FIELDS = {
    "dynamics_alpha": 0.9,
    "dynamics_beta": 0.1,
    "dynamics_gate": 0.5,
    "dynamics_dt": 0.1,
    "dynamics_controller_hidden": 64,
}
# Upstream constants of each design, written out so our config states them.
INL_CONSTANTS = {
    "dynamics_beta_max": 2.0,
    "dynamics_velocity_clamp": 10.0,
    "mu_highway_scale": 0.1,
    "mu_router_bias": 10.0,
}
MU_GUIDANCE_CONSTANTS = {"mu_clamp_min": 0.0, "mu_clamp_max": 2.0, "mu_prev_clamp": 2.0}
# Structural flags: checked against the weights.
FLAG_FIELDS = ("use_token_routed_mlp", "use_qk_norm", "shared_expert", "use_mu_guidance")
# Fields that do not change what the checkpoint computes: (accepted values or None for any, why).
HARMLESS_FIELDS = {
    "use_sdpa": (None, "attention kernel choice (SDPA or eager): same math"),
    "hidden_act": ({"silu"}, "the SwiGLU activation, which Complexity uses"),
    "attention_bias": ({False}, "bias-free projections, as here"),
    "mlp_bias": ({False}, "bias-free projections, as here"),
    "rope_scaling": ({None}, "plain RoPE, as here"),
    "num_experts_per_tok": ({1}, "token routing sends each token to exactly one expert"),
    "use_cache": (None, "inference setting"),
    "torch_dtype": (None, "storage dtype: the weights keep theirs unless a dtype is asked for"),
    "dtype": (None, "storage dtype: the weights keep theirs unless a dtype is asked for"),
    "model_type": ({"complexity-deep", "complexity"}, "metadata (cross-checked)"),
    "architecture": ({"DeepForCausalLM", "ComplexityForCausalLM"}, "metadata (cross-checked)"),
    "architectures": (None, "metadata (cross-checked)"),
    "version": (None, "metadata"),
    "transformers_version": (None, "metadata"),
    "_name_or_path": (None, "metadata"),
    "parameters": (None, "metadata (a description)"),
    "innovations": (None, "metadata (a description)"),
    "auto_map": (None, "points at upstream's code, which is not used"),
}
KNOWN_ARCHITECTURES = {"DeepForCausalLM", "ComplexityForCausalLM"}
# Fields only this project's config.json has: such a folder is not an upstream checkpoint.
OUR_FIELDS = {"mlp_type", "mu_mode", "routing", "expert_intermediate_size", "mu_router_bias"}
KNOWN_FIELDS = {*REQUIRED_FIELDS, *MAPPED_FIELDS, *DYNAMICS_FIELDS, *FLAG_FIELDS, *HARMLESS_FIELDS}


def is_our_own_config(ucfg: dict) -> bool:
    """True for a config.json this project wrote (load it directly: nothing to convert)."""
    return bool(OUR_FIELDS & set(ucfg))


def translate_config(
    ucfg: dict, design: str, weights: WeightStructure, problems: list[str], ignored: list[str]
) -> dict | None:
    """Upstream config.json -> our ComplexityConfig kwargs (None when a required field is missing).

    Appends to `problems` every field that cannot be honoured, to `ignored` every accepted field
    without effect (with the reason).
    """
    _check_fields(ucfg, problems, ignored)
    missing = [k for k in REQUIRED_FIELDS if k not in ucfg]
    if missing:
        problems.append(f"config.json: missing required field(s): {', '.join(missing)}")
    # the sizes are checked against the weights' shapes next: a "2" or a 2.0 cannot be
    not_sizes = [k for k in REQUIRED_FIELDS if k in ucfg and not _is_positive_int(ucfg[k])]
    problems += [f"config.json: {k}={ucfg[k]!r} is not a positive integer" for k in not_sizes]
    structure = _structure(ucfg, design, weights, problems)  # its problems are listed either way
    if missing or not_sizes:
        return None
    kwargs: dict = {k: ucfg[k] for k in REQUIRED_FIELDS}
    for name, (ours, default) in MAPPED_FIELDS.items():
        value = ucfg.get(name, default)
        if value is not None or name in ucfg:
            kwargs[ours] = value
    return {**kwargs, **structure}


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_fields(ucfg: dict, problems: list[str], ignored: list[str]) -> None:
    """Unknown fields and unsupported values of the harmless ones are errors."""
    unknown = sorted(k for k in ucfg if k not in KNOWN_FIELDS)
    if unknown:
        problems.append(
            "config.json: field(s) with no counterpart in Complexity: " + ", ".join(f"{k}={ucfg[k]!r}" for k in unknown)
        )
    for name, (accepted, why) in HARMLESS_FIELDS.items():
        if name not in ucfg:
            continue
        value = ucfg[name]
        if accepted is not None and value not in accepted:
            problems.append(
                f"config.json: {name}={value!r} is not supported (only {sorted(accepted, key=repr)}: {why})"
            )
        else:
            ignored.append(f"{name}={value!r}: {why}")
    archs = ucfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not set(archs) <= KNOWN_ARCHITECTURES):
        problems.append(f"config.json: architectures={archs!r} is not an upstream complexity-deep model")


def _structure(ucfg: dict, design: str, weights: WeightStructure, problems: list[str]) -> dict:
    """The variant fields (MLP, mu mode, shared expert, QK-norm, the design's constants)."""

    def flag(name: str, from_weights: bool) -> bool:
        """A structural flag: the weights decide; a config value that disagrees is an error."""
        if name in ucfg and not isinstance(ucfg[name], bool | None):
            problems.append(f"config.json: {name}={ucfg[name]!r} is not true, false or null")
        elif name in ucfg and ucfg[name] is not None and ucfg[name] != from_weights:
            problems.append(
                f"config.json: {name}={ucfg[name]!r} contradicts the weights "
                f"({'they have' if from_weights else 'they have no'} {name.removeprefix('use_')} tensors)"
            )
        return from_weights

    if "use_token_routed_mlp" in ucfg and ucfg["use_token_routed_mlp"] is not True:
        problems.append(
            f"config.json: use_token_routed_mlp={ucfg['use_token_routed_mlp']!r}: upstream dense-MLP checkpoints are "
            "not supported (both upstream designs this converter reproduces are token-routed)"
        )
    out = {
        "mlp_type": "token_routed",
        "use_qk_norm": flag("use_qk_norm", weights.qk_norm),
        "shared_expert": flag("shared_expert", weights.shared_expert),
    }
    if design == INL:
        flag("use_mu_guidance", weights.mu_guidance)
        out["mu_mode"] = "inl"
        out.update({name: ucfg.get(name, default) for name, default in DYNAMICS_FIELDS.items()})
        out.update(INL_CONSTANTS)
    else:
        out["mu_mode"] = "guidance" if flag("use_mu_guidance", weights.mu_guidance) else "none"
        dynamics = sorted(k for k in ucfg if k in DYNAMICS_FIELDS)
        if dynamics:
            problems.append(
                f"config.json: {', '.join(dynamics)} describe the INL design, but the weights are the 1.0 "
                "mu-guidance design"
            )
        out.update(MU_GUIDANCE_CONSTANTS)
    return out
