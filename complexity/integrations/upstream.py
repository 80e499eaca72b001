"""Load checkpoints written by upstream complexity-deep, exactly, and convert them to this format.

Two upstream designs exist (SPEC section 6):

- ``complexity-deep 0.13`` (INL dynamics; the 1.5B "pacific-prime"): keys under ``model.``,
  ``layers.{i}.dynamics.*`` (older files: ``dynamics.controller.0/2.*``), fused
  ``mlp.gate_up_proj``, ``mlp.mu_router``, a routing table per layer.
- ``complexity-deep 1.0`` (mu-guidance): bare keys, ``mu_init [1,1,H]``,
  ``layers.{i}.mu_guidance.*``, split ``mlp.gate_proj_w`` / ``mlp.up_proj_w``, ``mlp.shared_*``.

Every key of the source is either mapped or dropped for a stated reason that makes it provably
unused by upstream's computation; anything else is an error. The key mapping lives in one place,
`UpstreamStateDictAdapter`, which maps both ways (``to_complexity`` / ``from_complexity``).
Nothing executes code from a checkpoint: ``.pt`` files are read with ``weights_only=True``.

    >>> from complexity.integrations.upstream import convert_upstream
    >>> report = convert_upstream("pacific-prime/", "pacific-prime-hf/")
    >>> print(report)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_complexity import ComplexityConfig
from ..modeling_complexity import ComplexityForCausalLM, default_routing_table
from ..params import ParameterCount, count_parameters

INL = "complexity-deep-0.13-inl"
MU_GUIDANCE = "complexity-deep-1.0-mu"
DESIGNS = {
    INL: "complexity-deep 0.13 (INL dynamics, mu-guided q/k/v, token routing with mu override)",
    MU_GUIDANCE: "complexity-deep 1.0 (mu-guidance, token-routed MLP)",
}

# Weight files, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model.pt", "pytorch_model.bin")
# Copied to DST when SRC has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Wrappers of a state dict inside a .pt file, and prefixes that wrap every key.
PT_WRAPPERS = ("model_state_dict", "model", "state_dict")
STRAY_PREFIXES = ("model.", "module.", "_orig_mod.")


class UpstreamFormatError(ValueError):
    """The source is not a checkpoint this converter can load exactly. ``problems`` lists every
    issue found (not just the first)."""

    def __init__(self, src, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{src}: cannot convert this upstream checkpoint ({len(self.problems)} problem(s)):\n{lines}")


# ----------------------------------------------------------------------------- config translation

# Upstream fields with no default we could trust: the weights' shapes depend on them.
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Upstream field -> (our field, upstream default when absent). Same meaning on both sides.
_MAPPED_FIELDS = {
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
_DYNAMICS_FIELDS = {
    "dynamics_alpha": 0.9,
    "dynamics_beta": 0.1,
    "dynamics_gate": 0.5,
    "dynamics_dt": 0.1,
    "dynamics_controller_hidden": 64,
}
# Structural flags: checked against the weights.
_FLAG_FIELDS = ("use_token_routed_mlp", "use_qk_norm", "shared_expert", "use_mu_guidance")
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
_KNOWN_ARCHITECTURES = {"DeepForCausalLM", "ComplexityForCausalLM"}
# Fields only this project's config.json has: such a folder is not an upstream checkpoint.
_OUR_FIELDS = {"mlp_type", "mu_mode", "routing", "expert_intermediate_size", "mu_router_bias"}


def _translate_config(ucfg: dict, design: str, keys: set[str], problems: list[str], ignored: list[str]) -> dict | None:
    """Upstream config.json -> our ComplexityConfig kwargs (None when a required field is missing)."""
    known = set(_REQUIRED_FIELDS) | set(_MAPPED_FIELDS) | set(_DYNAMICS_FIELDS) | set(_FLAG_FIELDS) | set(HARMLESS_FIELDS)
    unknown = sorted(k for k in ucfg if k not in known)
    if unknown:
        problems.append(
            "config.json: field(s) with no counterpart in Complexity: "
            + ", ".join(f"{k}={ucfg[k]!r}" for k in unknown)
        )
    for name, (accepted, why) in HARMLESS_FIELDS.items():
        if name not in ucfg:
            continue
        value = ucfg[name]
        if accepted is not None and value not in accepted:
            problems.append(f"config.json: {name}={value!r} is not supported (only {sorted(accepted, key=repr)}: {why})")
        else:
            ignored.append(f"{name}={value!r}: {why}")
    archs = ucfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not set(archs) <= _KNOWN_ARCHITECTURES):
        problems.append(f"config.json: architectures={archs!r} is not an upstream complexity-deep model")

    missing = [k for k in _REQUIRED_FIELDS if k not in ucfg]
    if missing:
        problems.append(f"config.json: missing required field(s): {', '.join(missing)}")
    kwargs: dict = {k: ucfg[k] for k in _REQUIRED_FIELDS if k in ucfg}
    for name, (ours, default) in _MAPPED_FIELDS.items():
        value = ucfg.get(name, default)
        if value is not None or name in ucfg:
            kwargs[ours] = value

    def flag(name, from_weights):
        """A structural flag: the weights decide; a config value that disagrees is an error."""
        if name in ucfg and ucfg[name] is not None and bool(ucfg[name]) != from_weights:
            problems.append(
                f"config.json: {name}={ucfg[name]!r} contradicts the weights "
                f"({'they have' if from_weights else 'they have no'} {name.removeprefix('use_')} tensors)"
            )
        return from_weights

    if "use_token_routed_mlp" in ucfg and ucfg["use_token_routed_mlp"] is not True:
        problems.append(
            f"config.json: use_token_routed_mlp={ucfg['use_token_routed_mlp']!r}: upstream dense-MLP checkpoints are not "
            "supported (both upstream designs this converter reproduces are token-routed)"
        )
    kwargs["mlp_type"] = "token_routed"
    kwargs["use_qk_norm"] = flag("use_qk_norm", any(k.endswith("self_attn.q_norm.weight") for k in keys))
    has_shared = any(".mlp.shared_" in k for k in keys)
    has_mu_guidance = "mu_init" in keys or any(".mu_guidance." in k for k in keys)
    if design == INL:
        kwargs["mu_mode"] = "inl"
        kwargs["shared_expert"] = flag("shared_expert", has_shared)
        flag("use_mu_guidance", has_mu_guidance)
        for name, default in _DYNAMICS_FIELDS.items():
            kwargs[name] = ucfg.get(name, default)
        # Upstream constants of the INL design, written out so the config states them.
        kwargs.update(dynamics_beta_max=2.0, dynamics_velocity_clamp=10.0, mu_highway_scale=0.1, mu_router_bias=10.0)
    else:
        kwargs["mu_mode"] = "guidance" if flag("use_mu_guidance", has_mu_guidance) else "none"
        kwargs["shared_expert"] = flag("shared_expert", has_shared)
        dyn = sorted(k for k in ucfg if k in _DYNAMICS_FIELDS)
        if dyn:
            problems.append(
                f"config.json: {', '.join(dyn)} describe the INL design, but the weights are the 1.0 mu-guidance design"
            )
        kwargs.update(mu_clamp_min=0.0, mu_clamp_max=2.0, mu_prev_clamp=2.0)
    return None if missing else kwargs


# ----------------------------------------------------------------------------- the key mapping


def _same(*names):
    return {n: n for n in names}


# Per-layer renames (upstream suffix after "layers.{i}." -> ours after "model.layers.{i}.").
_ATTN_RENAMES = {
    **_same(*(f"self_attn.{p}_proj.weight" for p in "qkvo")),
    **_same("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    **_same(*(f"self_attn.mu_to_{p}.weight" for p in "qkv")),
    **_same("input_layernorm.weight", "post_attention_layernorm.weight"),
}
_INL_RENAMES = {
    **_ATTN_RENAMES,
    **_same("dynamics.mu", "dynamics.mu_proj.weight"),
    **_same(*(f"dynamics.controller_{s}.{p}" for s in ("in", "out") for p in ("weight", "bias"))),
    "mlp.gate_up_proj": "mlp.experts.gate_up_proj",
    "mlp.down_proj": "mlp.experts.down_proj",
    "mlp.mu_router.weight": "mlp.mu_router.weight",
}
# Older INL files named the controller as an nn.Sequential (Linear, SiLU, Linear).
_INL_LEGACY = {
    "dynamics.controller.0.weight": "dynamics.controller_in.weight",
    "dynamics.controller.0.bias": "dynamics.controller_in.bias",
    "dynamics.controller.2.weight": "dynamics.controller_out.weight",
    "dynamics.controller.2.bias": "dynamics.controller_out.bias",
}
_MU_RENAMES = {
    **_ATTN_RENAMES,
    "mlp.down_proj_w": "mlp.experts.down_proj",
    "mlp.shared_gate.weight": "mlp.shared_expert.gate_proj.weight",
    "mlp.shared_up.weight": "mlp.shared_expert.up_proj.weight",
    "mlp.shared_down.weight": "mlp.shared_expert.down_proj.weight",
    **_same("mu_guidance.mu", "mu_guidance.mu_proj.weight"),
}
_TOP_RENAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_GATE, _UP, _FUSED = "mlp.gate_proj_w", "mlp.up_proj_w", "mlp.experts.gate_up_proj"
_TABLE = "mlp.token_to_expert"
_INV_FREQ = "self_attn.rotary_emb.inv_freq"

# Why each dropped key is provably unused by upstream's computation.
DROP_REASONS = {
    "inv_freq": "rotary inv_freq buffer: recomputed from rope_theta and head_dim (checked equal)",
    "inl_mu_to": "INL layer 0 has no mu_prev (upstream passes None), so its mu_to_q/k/v never enter the computation",
    "last_mu_guidance": "the last layer's mu feeds no later layer (the final norm and lm_head read only the hidden state)",
    "tied_lm_head": "lm_head.weight is a stored copy of the tied embedding (checked equal)",
}


def _split_layer(name: str):
    """'layers.3.mlp.x' -> (3, 'mlp.x'); anything else -> (None, name)."""
    if name.startswith("layers."):
        idx, _, rest = name[len("layers."):].partition(".")
        if idx.isdigit() and rest:
            return int(idx), rest
    return None, name


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class UpstreamStateDictAdapter:
    """Maps state dicts between upstream complexity-deep names and ours (torchtitan-style).

    ``to_complexity`` takes upstream names (wrappers already removed; stray ``model.`` prefixes
    are stripped here) and returns our names; it raises `UpstreamFormatError` on any key it does
    not know. ``dropped`` then lists ``(upstream key, reason)`` for each key left out.
    ``from_complexity`` is the inverse: it writes upstream's layout, filling the keys upstream
    stores but never reads (dropped ones) with their unused values.
    """

    def __init__(self, design: str, config: ComplexityConfig):
        if design not in DESIGNS:
            raise ValueError(f"unknown upstream design {design!r}; expected one of {list(DESIGNS)}")
        self.design = design
        self.config = config
        self.renames = _INL_RENAMES if design == INL else _MU_RENAMES
        self.dropped: list[tuple[str, str]] = []

    # -- upstream -> ours
    def drop_reason(self, name: str) -> str | None:
        """Why an upstream key (canonical name) is dropped, or None when it is mapped."""
        layer, rest = _split_layer(name)
        if rest == _INV_FREQ and layer is not None:
            return DROP_REASONS["inv_freq"]
        if self.design == INL and layer == 0 and rest.startswith("self_attn.mu_to_"):
            return DROP_REASONS["inl_mu_to"]
        if (self.design == MU_GUIDANCE and layer == self.config.num_hidden_layers - 1
                and rest.startswith("mu_guidance.")):
            return DROP_REASONS["last_mu_guidance"]
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return DROP_REASONS["tied_lm_head"]
        return None

    def to_complexity(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd, problems = normalize_keys(state_dict, self.design)
        if problems:
            raise UpstreamFormatError("state dict", problems)
        L = self.config.num_hidden_layers
        out: dict[str, torch.Tensor] = {}
        self.dropped = []
        unknown, tables = [], {}
        for name, tensor in sd.items():
            reason = self.drop_reason(name)
            if reason is not None:
                self.dropped.append((name, reason))
                continue
            layer, rest = _split_layer(name)
            if layer is not None and layer < L:
                if rest in self.renames:
                    out[f"model.layers.{layer}.{self.renames[rest]}"] = tensor
                elif rest == _TABLE:
                    tables[layer] = tensor
                elif self.design == MU_GUIDANCE and rest == _GATE:
                    up = sd.get(f"layers.{layer}.{_UP}")
                    if up is None:
                        unknown.append(f"{name} (its {_UP} is missing)")
                    else:
                        out[f"model.layers.{layer}.{_FUSED}"] = torch.cat([tensor, up], dim=-1)
                elif self.design == MU_GUIDANCE and rest == _UP:
                    if f"layers.{layer}.{_GATE}" not in sd:
                        unknown.append(f"{name} (its {_GATE} is missing)")
                else:
                    unknown.append(name)
            elif name in _TOP_RENAMES:
                out[_TOP_RENAMES[name]] = tensor
            elif name == "lm_head.weight":
                out[name] = tensor
            elif name == "mu_init" and self.design == MU_GUIDANCE:
                out["model.mu_init"] = tensor.reshape(-1)
            else:
                unknown.append(name)
        if tables:
            first = min(tables)
            differing = [i for i in sorted(tables) if not torch.equal(tables[i], tables[first])]
            if differing:
                unknown.append(
                    f"layers.{differing}.{_TABLE}: the per-layer routing tables differ from layer {first}'s; "
                    "Complexity routes every layer with one table"
                )
            out["model.token_to_expert"] = tables[first].to(torch.long)
        if unknown:
            raise UpstreamFormatError("state dict", [f"unknown key(s) for the {self.design} design: {', '.join(unknown)}"])
        return out

    # -- ours -> upstream
    def from_complexity(self, state_dict: dict[str, torch.Tensor], *, canonical: bool = False) -> dict[str, torch.Tensor]:
        """Our names -> upstream's (INL files put all but lm_head under "model."; ``canonical``
        leaves that prefix out, as `normalize_keys` does)."""
        cfg = self.config
        inverse = {v: k for k, v in self.renames.items()}
        prefix = "model." if self.design == INL and not canonical else ""
        out: dict[str, torch.Tensor] = {}
        table = state_dict.get("model.token_to_expert")
        embed = state_dict["model.embed_tokens.weight"]
        for name, tensor in state_dict.items():
            if name == "model.token_to_expert":
                continue
            if name.startswith("model.layers."):
                idx, _, rest = name[len("model.layers."):].partition(".")
                if rest in inverse:
                    out[f"{prefix}layers.{idx}.{inverse[rest]}"] = tensor
                elif rest == _FUSED and self.design == MU_GUIDANCE:
                    gate, up = tensor.chunk(2, dim=-1)
                    out[f"layers.{idx}.{_GATE}"], out[f"layers.{idx}.{_UP}"] = gate, up
                else:
                    raise KeyError(f"{name}: no upstream counterpart in the {self.design} design")
            elif name in _TOP_RENAMES.values():
                out[prefix + name.removeprefix("model.")] = tensor
            elif name == "model.mu_init" and self.design == MU_GUIDANCE:
                out["mu_init"] = tensor.reshape(1, 1, -1)
            elif name == "lm_head.weight":
                out[name] = tensor
            else:
                raise KeyError(f"{name}: no upstream counterpart in the {self.design} design")
        out.setdefault("lm_head.weight", embed)  # upstream stores the tied copy
        h, d = cfg.hidden_size, cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            lp = f"{prefix}layers.{i}."
            if table is not None:
                out[lp + _TABLE] = table
            out[lp + _INV_FREQ] = rope_inv_freq(d, cfg.rope_theta).to(embed.device)
        # Keys upstream stores but never reads: zeros (or upstream's init for the mu base).
        like = dict(device=embed.device, dtype=embed.dtype)
        if self.design == INL:
            lp = f"{prefix}layers.0.self_attn."
            out[lp + "mu_to_q.weight"] = torch.zeros(cfg.num_attention_heads * d, h, **like)
            out[lp + "mu_to_k.weight"] = torch.zeros(cfg.num_key_value_heads * d, h, **like)
            out[lp + "mu_to_v.weight"] = torch.zeros(cfg.num_key_value_heads * d, h, **like)
        elif cfg.mu_mode == "guidance":
            lp = f"layers.{cfg.num_hidden_layers - 1}.mu_guidance."
            out[lp + "mu"] = torch.ones(h, **like)
            out[lp + "mu_proj.weight"] = torch.zeros(h, h, **like)
        return out


def normalize_keys(state_dict: dict, design: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip stray wrapping prefixes ("model.", "module.", "_orig_mod.") and rename the older INL
    controller keys -> (canonical upstream names, problems)."""
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        name = key
        while name.startswith(STRAY_PREFIXES):
            name = name.partition(".")[2]
        layer, rest = _split_layer(name)
        if layer is not None and rest in _INL_LEGACY and design in (None, INL):
            name = f"layers.{layer}.{_INL_LEGACY[rest]}"
        if name in out:
            problems.append(f"{key}: duplicates another key once prefixes and old names are normalised ({name})")
            continue
        out[name] = value
    return out, problems


def detect_design(keys) -> tuple[str | None, str]:
    """(design or None, explanation) from canonical upstream key names."""
    inl, mu = [], []
    for k in keys:
        layer, rest = _split_layer(k)
        if rest.startswith("dynamics.") or rest in ("mlp.gate_up_proj", "mlp.mu_router.weight"):
            inl.append(k)
        if k == "mu_init" or rest.startswith("mu_guidance.") or rest in (_GATE, _UP, "mlp.down_proj_w") or rest.startswith("mlp.shared_"):
            mu.append(k)
    if inl and mu:
        return None, f"the keys mix both upstream designs (INL: {inl[0]}, ...; 1.0: {mu[0]}, ...)"
    if inl:
        return INL, f"{len(inl)} INL keys (dynamics.*, mlp.gate_up_proj, mlp.mu_router)"
    if mu:
        return MU_GUIDANCE, f"{len(mu)} 1.0 keys (mu_init, mu_guidance.*, mlp.gate_proj_w/up_proj_w/down_proj_w, mlp.shared_*)"
    return None, (
        "no key of either upstream design (0.13 INL: layers.*.dynamics.*, layers.*.mlp.gate_up_proj; "
        "1.0: mu_init, layers.*.mu_guidance.*, layers.*.mlp.gate_proj_w)"
    )


# ----------------------------------------------------------------------------- reading files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError, OSError, ...
        raise UpstreamFormatError(path, [f"cannot read {path.name}: truncated or corrupt safetensors file ({err})"]) from err


def _read_sharded_safetensors(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UpstreamFormatError(index, [f"cannot read {index.name}: not a safetensors index ({err})"]) from err
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise UpstreamFormatError(index, [f"shard {shard} named by {index.name} does not exist"])
        out.update(_read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise UpstreamFormatError(index, [f"key(s) listed in {index.name} but absent from the shards: {', '.join(missing)}"])
    return out


def _read_torch(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """A .pt state dict, read with weights_only=True (no code from the file runs)."""
    err = None
    for mmap in (True, False):  # mmap needs the zip format; very old files are not
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # noqa: BLE001 - reported below with the file name
            err = e
    else:
        raise UpstreamFormatError(path, [
            f"cannot read {path.name} with torch.load(weights_only=True): truncated or corrupt file, or it holds "
            f"objects other than tensors and plain containers ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ]) from err
    if not isinstance(obj, dict):
        raise UpstreamFormatError(path, [f"{path.name} holds a {type(obj).__name__}, not a state dict"])
    for wrapper in PT_WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict):
            others = sorted(str(k) for k in obj if k != wrapper)
            notes.append(f"state dict read from {path.name}[{wrapper!r}]"
                         + (f"; training-state entries not converted: {', '.join(others)}" if others else ""))
            return inner
    return obj


def _find_weights(src: Path) -> tuple[Path | None, list[Path]]:
    found = [src / name for name in WEIGHT_FILES if (src / name).is_file()]
    return (found[0] if found else None), found


def _read_weights(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        return _read_sharded_safetensors(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path, notes)


# ----------------------------------------------------------------------------- detection


@dataclass
class UpstreamCheckpoint:
    """A validated upstream checkpoint: which design, its config (upstream's and ours) and its
    state dict under canonical upstream names (wrappers, stray prefixes and old names removed)."""

    design: str
    src: Path
    weights_file: Path
    upstream_config: dict
    config: ComplexityConfig
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    ignored_config_fields: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return DESIGNS[self.design]


def _shape(t) -> list[int]:
    return list(t.shape)


def detect_upstream(src) -> UpstreamCheckpoint:
    """Read and validate an upstream checkpoint folder; raise `UpstreamFormatError` listing every
    problem (not a checkpoint, unknown/missing keys, shape mismatches, contradicting config)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder")
    if not src.is_dir():
        raise UpstreamFormatError(src, ["SRC must be a checkpoint folder (config.json + model.safetensors or model.pt)"])
    problems: list[str] = []
    notes: list[str] = []
    config_path = src / "config.json"
    ucfg = None
    if not config_path.is_file():
        problems.append("no config.json: not an upstream checkpoint folder")
    else:
        try:
            ucfg = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"config.json: not valid JSON ({err})")
        if ucfg is not None and not isinstance(ucfg, dict):
            problems.append("config.json: not a JSON object")
            ucfg = None
    weights_file, found = _find_weights(src)
    if weights_file is None:
        problems.append(f"no weights: none of {', '.join(WEIGHT_FILES)}")
    if ucfg is not None and (_OUR_FIELDS & set(ucfg)):
        problems.append("config.json is this project's own format (mlp_type/mu_mode...): load it directly, no conversion needed")
    if problems:
        raise UpstreamFormatError(src, problems)
    if len(found) > 1:
        notes.append(f"weights read from {weights_file.name} (also present, not read: {', '.join(p.name for p in found[1:])})")

    raw = _read_weights(weights_file, notes)
    sd, key_problems = normalize_keys(raw)
    problems += key_problems
    design, why = detect_design(sd)
    if design is None:
        sample = ", ".join(list(sd)[:6])
        problems.append(f"{weights_file.name}: not an upstream complexity-deep checkpoint: {why}; first keys: {sample}")
        raise UpstreamFormatError(src, problems)
    notes.insert(0, f"design: {DESIGNS[design]} — from {why}")

    ignored: list[str] = []
    kwargs = _translate_config(ucfg, design, set(sd), problems, ignored)
    if kwargs is None:
        raise UpstreamFormatError(src, problems)

    # Config fields against the weights (the shape comparison below covers the rest).
    embed = sd.get("embed_tokens.weight")
    if embed is not None and embed.dim() == 2:
        if embed.shape[0] != kwargs["vocab_size"]:
            problems.append(f"config.json: vocab_size={kwargs['vocab_size']} contradicts embed_tokens.weight with {embed.shape[0]} rows")
        if embed.shape[1] != kwargs["hidden_size"]:
            problems.append(f"config.json: hidden_size={kwargs['hidden_size']} contradicts embed_tokens.weight of width {embed.shape[1]}")
    layers = {layer for layer, _ in map(_split_layer, sd) if layer is not None}
    L = kwargs["num_hidden_layers"]
    if layers and layers != set(range(L)):
        problems.append(
            f"config.json: num_hidden_layers={L} contradicts the weights, which hold layers {min(layers)}..{max(layers)} "
            f"({len(layers)} distinct)"
        )
    tables = {k: v for k, v in sd.items() if _split_layer(k)[1] == _TABLE}
    E = kwargs.get("num_experts")
    for name, table in tables.items():
        if table.dtype.is_floating_point or table.dtype == torch.bool:
            problems.append(f"{name}: routing table has dtype {table.dtype}, expected integers")
        elif table.numel() and isinstance(E, int) and (int(table.min()) < 0 or int(table.max()) >= E):
            problems.append(
                f"config.json: num_experts={E} contradicts {name}, whose expert ids span "
                f"[{int(table.min())}, {int(table.max())}]"
            )
    # Widths the config does not carry upstream: taken from the weights.
    if isinstance(E, int) and E > 0 and isinstance(kwargs.get("intermediate_size"), int) and kwargs["intermediate_size"] % E:
        kwargs["expert_intermediate_size"] = kwargs["intermediate_size"] // E  # upstream's floor division
    shared = sd.get("layers.0.mlp.shared_gate.weight")
    if kwargs.get("shared_expert") and shared is not None and shared.dim() == 2 and isinstance(E, int) and E > 0:
        if shared.shape[0] != kwargs["intermediate_size"] // E:
            kwargs["shared_expert_intermediate_size"] = shared.shape[0]

    # Tied head: drop the stored copy only where it equals the embedding.
    head = sd.get("lm_head.weight")
    if kwargs["tie_word_embeddings"] and head is not None and embed is not None:
        if head.shape != embed.shape or not torch.equal(head, embed):
            kwargs["tie_word_embeddings"] = False
            notes.append("lm_head.weight differs from the embedding although tie_word_embeddings=true: kept untied")

    # Routing table: taken from the file; name the strategy it matches (for the record only).
    if tables:
        t = next(iter(tables.values()))
        V = kwargs["vocab_size"]
        kwargs["routing"] = "zipf"
        if isinstance(E, int) and E > 0 and t.shape == (V,) and not t.dtype.is_floating_point:
            for strategy in ("modulo", "range"):
                if torch.equal(t.long(), default_routing_table(V, E, strategy)):
                    kwargs["routing"] = strategy
                    break
        notes.append(f"routing table taken from the file (matches: {kwargs['routing']})")

    try:
        config = ComplexityConfig(**kwargs)
    except (ValueError, TypeError) as err:
        problems.append(f"config.json translates to an invalid Complexity config: {err}")
        raise UpstreamFormatError(src, problems) from err

    # Every key, against the layout the config implies (expected keys and shapes, via the adapter).
    adapter = UpstreamStateDictAdapter(design, config)
    with torch.device("meta"):
        skeleton = ComplexityForCausalLM(config)
    expected = adapter.from_complexity(skeleton.state_dict(), canonical=True)
    optional = {k for k in expected if adapter.drop_reason(k) is not None}
    unknown = sorted(k for k in sd if k not in expected)
    missing = sorted(k for k in expected if k not in sd and k not in optional)
    if unknown:
        problems.append(f"unknown key(s) for the {design} design: {', '.join(unknown)}")
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    mismatched = []
    for k in sorted(set(sd) & set(expected)):
        got, want = _shape(sd[k]), _shape(expected[k])
        if k == "mu_init" and sd[k].numel() == config.hidden_size and got in ([config.hidden_size], [1, config.hidden_size]):
            continue
        if got != want:
            mismatched.append(f"{k} {got} (expected {want})")
        elif sd[k].is_floating_point() != expected[k].is_floating_point() and k != "lm_head.weight":
            mismatched.append(f"{k} has dtype {sd[k].dtype}")
    if mismatched:
        problems.append(
            "shape mismatch(es) against config.json "
            f"(H={config.hidden_size}, heads={config.num_attention_heads}/{config.num_key_value_heads}, "
            f"E={config.num_experts}, expert width={config.expert_width}): " + "; ".join(mismatched)
        )
    # inv_freq is dropped only where it is what we recompute.
    ref = rope_inv_freq(config.head_dim, config.rope_theta)
    bad_freq = [k for k in sd if _split_layer(k)[1] == _INV_FREQ and sd[k].shape == ref.shape
                and not torch.allclose(sd[k].float(), ref, rtol=1e-5, atol=0)]
    if bad_freq:
        problems.append(
            f"{', '.join(bad_freq)}: rotary frequencies differ from rope_theta={config.rope_theta}, "
            f"head_dim={config.head_dim} (config contradicts the weights)"
        )
    if problems:
        raise UpstreamFormatError(src, problems)
    return UpstreamCheckpoint(design, src, weights_file, ucfg, config, sd, notes, ignored)


# ----------------------------------------------------------------------------- conversion


@dataclass
class ConversionReport:
    design: str
    src: Path
    dst: Path | None
    weights_file: Path
    config: ComplexityConfig
    mapped: int
    dropped: list[tuple[str, str]]
    notes: list[str]
    ignored_config_fields: list[str]
    copied_files: list[str]
    parameters: ParameterCount
    dtype: str

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"detected: {DESIGNS[self.design]}",
            f"  source: {self.weights_file}",
            *(f"  {n}" for n in self.notes[1:]),
            f"  config: vocab {c.vocab_size}, hidden {c.hidden_size}, layers {c.num_hidden_layers}, "
            f"heads {c.num_attention_heads} (kv {c.num_key_value_heads}), experts {c.num_experts} x {c.expert_width}"
            + (f", shared expert {c.shared_expert_width}" if c.shared_expert else "")
            + f", mu_mode {c.mu_mode}, routing {c.routing}, qk_norm {c.use_qk_norm}, "
            f"tie_word_embeddings {c.tie_word_embeddings}, dtype {self.dtype}",
            f"  mapped {self.mapped} tensor(s); dropped {len(self.dropped)}:",
        ]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.dropped:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            lines.append(f"    {shown}: {reason}")
        if self.ignored_config_fields:
            lines.append("  config fields without effect on the computation: " + "; ".join(self.ignored_config_fields))
        if self.copied_files:
            lines.append(f"  copied: {', '.join(self.copied_files)}")
        lines.append(f"  parameters: {self.parameters}")
        if self.dst is not None:
            lines.append(f"wrote {self.dst}")
        return "\n".join(lines)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")


def load_upstream(src, *, dtype=None) -> tuple[ComplexityForCausalLM, UpstreamCheckpoint, list[tuple[str, str]]]:
    """An upstream checkpoint as a ready `ComplexityForCausalLM` (eval mode), with the detection
    result and the dropped keys. Strict: every parameter and buffer comes from the file."""
    dtype = _resolve_dtype(dtype)
    ckpt = detect_upstream(src)
    adapter = UpstreamStateDictAdapter(ckpt.design, ckpt.config)
    sd = adapter.to_complexity(ckpt.state_dict)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    with torch.device("meta"):
        model = ComplexityForCausalLM(ckpt.config)
    expected = set(model.state_dict())
    if ckpt.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:  # the detection step should make this impossible
        raise UpstreamFormatError(src, [f"internal mapping error: missing {missing}, unexpected {unexpected}"])
    model.load_state_dict(sd, strict=False, assign=True)
    if ckpt.config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UpstreamFormatError(src, [f"internal mapping error: not loaded: {leftover}"])
    return model.eval(), ckpt, adapter.dropped


def _make_report(model, ckpt, dropped, dst, copied, counts=None) -> ConversionReport:
    state = model.state_dict()
    return ConversionReport(
        design=ckpt.design,
        src=ckpt.src,
        dst=dst,
        weights_file=ckpt.weights_file,
        config=ckpt.config,
        mapped=len(state) - (1 if ckpt.config.tie_word_embeddings else 0),
        dropped=dropped,
        notes=ckpt.notes,
        ignored_config_fields=ckpt.ignored_config_fields,
        copied_files=copied,
        parameters=counts or count_parameters(model),
        dtype="/".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})),
    )


def inspect_upstream(src, *, dtype=None) -> ConversionReport:
    """Everything `convert_upstream` checks and reports, without writing anything (a dry run)."""
    model, ckpt, dropped = load_upstream(src, dtype=dtype)
    return _make_report(model, ckpt, dropped, None, [])


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def convert_upstream(src, dst, *, dtype=None, overwrite: bool = False, verify: bool = True) -> ConversionReport:
    """Convert an upstream complexity-deep checkpoint folder SRC into our Hugging Face folder DST.

    DST is written into a temporary folder beside it and renamed at the end, so a failure leaves
    no DST behind. An existing non-empty DST is refused unless ``overwrite``. With ``verify`` the
    written folder is loaded back with ``from_pretrained`` and compared tensor by tensor.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if _is_nonempty_dir(dst) and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    if src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: DST must differ from SRC")
    model, ckpt, dropped = load_upstream(src, dtype=dtype)
    counts = count_parameters(model)

    created = []
    parent = dst.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        copied = []
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        if verify:
            _verify_written(tmp, model)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return _make_report(model, ckpt, dropped, dst, copied, counts)


def _verify_written(folder: Path, model: ComplexityForCausalLM) -> None:
    """Load the written folder back and require every tensor to come back bit for bit."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loaded, info = ComplexityForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="auto")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise UpstreamFormatError(folder, [f"written checkpoint does not load cleanly: {bad}"])
    want, got = model.state_dict(), loaded.state_dict()
    differ = [k for k in want if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    if differ:
        raise UpstreamFormatError(folder, [f"written checkpoint differs after reloading: {differ}"])


__all__ = [
    "DESIGNS",
    "INL",
    "MU_GUIDANCE",
    "ConversionReport",
    "UpstreamCheckpoint",
    "UpstreamFormatError",
    "UpstreamStateDictAdapter",
    "convert_upstream",
    "detect_design",
    "detect_upstream",
    "inspect_upstream",
    "load_upstream",
    "normalize_keys",
]
