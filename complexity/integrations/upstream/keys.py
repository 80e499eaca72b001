"""The key adapter: the only place that knows upstream's tensor names.

Two upstream layouts (docs/architecture.md §6):

- ``complexity-deep 0.13`` (INL dynamics; the 1.5B "pacific-prime"): keys under ``model.``,
  ``layers.{i}.dynamics.*`` (older files: ``dynamics.controller.0/2.*``), fused
  ``mlp.gate_up_proj``, ``mlp.mu_router``, a routing table per layer.
- ``complexity-deep 1.0`` (mu-guidance): bare keys, ``mu_init [1,1,H]``,
  ``layers.{i}.mu_guidance.*``, split ``mlp.gate_proj_w`` / ``mlp.up_proj_w``, ``mlp.shared_*``.

Every key of the source is either mapped or dropped for a stated reason that makes it provably
unused by upstream's computation; anything else is an error. Besides the mapping both ways
(`UpstreamStateDictAdapter`), this module reads what the weights say about the model
(`WeightStructure`, `reconcile_with_weights`) and checks a state dict against the layout a config
implies (`UpstreamStateDictAdapter.layout_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...complexity_kernels import rope_inv_freq
from ...configuration_complexity import ComplexityConfig
from ...modeling_complexity import ComplexityForCausalLM, default_routing_table
from .formats import DESIGNS, INL, MU_GUIDANCE, UpstreamFormatError

# Prefixes that wrap every key in some files (DDP's module., torch.compile's _orig_mod.).
STRAY_PREFIXES = ("model.", "module.", "_orig_mod.")


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
_EMBED, _HEAD, _MU_INIT = "embed_tokens.weight", "lm_head.weight", "mu_init"
_GATE, _UP, _FUSED = "mlp.gate_proj_w", "mlp.up_proj_w", "mlp.experts.gate_up_proj"
_SHARED_GATE = "mlp.shared_gate.weight"
_TABLE = "mlp.token_to_expert"
_INV_FREQ = "self_attn.rotary_emb.inv_freq"

# Why each dropped key is provably unused by upstream's computation.
DROP_REASONS = {
    "inv_freq": "rotary inv_freq buffer: recomputed from rope_theta and head_dim (checked equal)",
    "inl_mu_to": "INL layer 0 has no mu_prev (upstream passes None), so its mu_to_q/k/v never enter the computation",
    "last_mu_guidance": "the last layer's mu feeds no later layer (the final norm and lm_head read only the hidden state)",
    "tied_lm_head": "lm_head.weight is a stored copy of the tied embedding (checked equal)",
}


def split_layer(name: str) -> tuple[int | None, str]:
    """'layers.3.mlp.x' -> (3, 'mlp.x'); anything else -> (None, name)."""
    if name.startswith("layers."):
        idx, _, rest = name[len("layers.") :].partition(".")
        if idx.isdigit() and rest:
            return int(idx), rest
    return None, name


# ----------------------------------------------------------------------------- names


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
        layer, rest = split_layer(name)
        if layer is not None and rest in _INL_LEGACY and design in (None, INL):
            name = f"layers.{layer}.{_INL_LEGACY[rest]}"
        if name in out:
            problems.append(f"{key}: duplicates another key once prefixes and old names are normalised ({name})")
            continue
        out[name] = value
    return out, problems


def _is_inl_key(name: str) -> bool:
    _, rest = split_layer(name)
    return rest.startswith("dynamics.") or rest in ("mlp.gate_up_proj", "mlp.mu_router.weight")


def _is_mu_guidance_key(name: str) -> bool:
    _, rest = split_layer(name)
    return (
        name == _MU_INIT or rest.startswith(("mu_guidance.", "mlp.shared_")) or rest in (_GATE, _UP, "mlp.down_proj_w")
    )


def detect_design(keys) -> tuple[str | None, str]:
    """(design or None, explanation) from canonical upstream key names."""
    keys = list(keys)
    inl = [k for k in keys if _is_inl_key(k)]
    mu = [k for k in keys if _is_mu_guidance_key(k)]
    if inl and mu:
        return None, f"the keys mix both upstream designs (INL: {inl[0]}, ...; 1.0: {mu[0]}, ...)"
    if inl:
        return INL, f"{len(inl)} INL keys (dynamics.*, mlp.gate_up_proj, mlp.mu_router)"
    if mu:
        return (
            MU_GUIDANCE,
            f"{len(mu)} 1.0 keys (mu_init, mu_guidance.*, mlp.gate_proj_w/up_proj_w/down_proj_w, mlp.shared_*)",
        )
    return None, (
        "no key of either upstream design (0.13 INL: layers.*.dynamics.*, layers.*.mlp.gate_up_proj; "
        "1.0: mu_init, layers.*.mu_guidance.*, layers.*.mlp.gate_proj_w)"
    )


# ----------------------------------------------------------------------------- what the weights say


@dataclass(frozen=True)
class WeightStructure:
    """The structural flags the weights decide (the config's values are checked against them)."""

    qk_norm: bool
    shared_expert: bool
    mu_guidance: bool

    @classmethod
    def of(cls, keys) -> WeightStructure:
        keys = set(keys)
        return cls(
            qk_norm=any(k.endswith("self_attn.q_norm.weight") for k in keys),
            shared_expert=any(".mlp.shared_" in k for k in keys),
            mu_guidance=_MU_INIT in keys or any(".mu_guidance." in k for k in keys),
        )


def reconcile_with_weights(kwargs: dict, sd: dict[str, torch.Tensor], problems: list[str], notes: list[str]) -> None:
    """Check the translated config against the weights and complete what only they carry.

    Errors: vocab/hidden size against the embedding, the layer count, the experts the routing
    tables name. Completed: expert and shared-expert widths upstream derives differently, an
    untied head where the stored head differs from the embedding, and the routing table's name.
    """
    _check_sizes(kwargs, sd, problems)
    tables = {k: v for k, v in sd.items() if split_layer(k)[1] == _TABLE}
    _check_tables(kwargs, tables, problems)
    _widths_from_weights(kwargs, sd)
    embed, head = sd.get(_EMBED), sd.get(_HEAD)
    if kwargs["tie_word_embeddings"] and head is not None and embed is not None:
        if head.shape != embed.shape or not torch.equal(head, embed):
            kwargs["tie_word_embeddings"] = False
            notes.append(f"{_HEAD} differs from the embedding although tie_word_embeddings=true: kept untied")
    if tables:
        kwargs["routing"] = _routing_name(next(iter(tables.values())), kwargs["vocab_size"], kwargs.get("num_experts"))
        notes.append(f"routing table taken from the file (matches: {kwargs['routing']})")


def _check_sizes(kwargs: dict, sd: dict[str, torch.Tensor], problems: list[str]) -> None:
    embed = sd.get(_EMBED)
    if embed is not None and embed.dim() == 2:
        if embed.shape[0] != kwargs["vocab_size"]:
            problems.append(
                f"config.json: vocab_size={kwargs['vocab_size']} contradicts {_EMBED} with {embed.shape[0]} rows"
            )
        if embed.shape[1] != kwargs["hidden_size"]:
            problems.append(
                f"config.json: hidden_size={kwargs['hidden_size']} contradicts {_EMBED} of width {embed.shape[1]}"
            )
    layers = {layer for layer, _ in map(split_layer, sd) if layer is not None}
    n = kwargs["num_hidden_layers"]
    if layers and layers != set(range(n)):
        problems.append(
            f"config.json: num_hidden_layers={n} contradicts the weights, which hold layers {min(layers)}..{max(layers)} "
            f"({len(layers)} distinct)"
        )


def _check_tables(kwargs: dict, tables: dict[str, torch.Tensor], problems: list[str]) -> None:
    experts = kwargs.get("num_experts")
    for name, table in tables.items():
        if table.dtype.is_floating_point or table.dtype == torch.bool:
            problems.append(f"{name}: routing table has dtype {table.dtype}, expected integers")
        elif table.numel() and isinstance(experts, int) and (int(table.min()) < 0 or int(table.max()) >= experts):
            problems.append(
                f"config.json: num_experts={experts} contradicts {name}, whose expert ids span "
                f"[{int(table.min())}, {int(table.max())}]"
            )


def _widths_from_weights(kwargs: dict, sd: dict[str, torch.Tensor]) -> None:
    """Widths the upstream config does not carry: taken from the weights."""
    experts, width = kwargs.get("num_experts"), kwargs.get("intermediate_size")
    if not (isinstance(experts, int) and experts > 0 and isinstance(width, int)):
        return
    if width % experts:
        kwargs["expert_intermediate_size"] = width // experts  # upstream's floor division
    shared = sd.get(f"layers.0.{_SHARED_GATE}")
    if kwargs.get("shared_expert") and shared is not None and shared.dim() == 2 and shared.shape[0] != width // experts:
        kwargs["shared_expert_intermediate_size"] = shared.shape[0]


def _routing_name(table: torch.Tensor, vocab_size: int, num_experts) -> str:
    """The strategy a table matches, for the record (the table itself is always the file's)."""
    if (
        isinstance(num_experts, int)
        and num_experts > 0
        and table.shape == (vocab_size,)
        and not table.dtype.is_floating_point
    ):
        for strategy in ("modulo", "range"):
            if torch.equal(table.long(), default_routing_table(vocab_size, num_experts, strategy)):
                return strategy
    return "zipf"


# ----------------------------------------------------------------------------- the adapter


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
        layer, rest = split_layer(name)
        if rest == _INV_FREQ and layer is not None:
            return DROP_REASONS["inv_freq"]
        if self.design == INL and layer == 0 and rest.startswith("self_attn.mu_to_"):
            return DROP_REASONS["inl_mu_to"]
        last = self.config.num_hidden_layers - 1
        if self.design == MU_GUIDANCE and layer == last and rest.startswith("mu_guidance."):
            return DROP_REASONS["last_mu_guidance"]
        if name == _HEAD and self.config.tie_word_embeddings:
            return DROP_REASONS["tied_lm_head"]
        return None

    def to_complexity(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd, problems = normalize_keys(state_dict, self.design)
        if problems:
            raise UpstreamFormatError("state dict", problems)
        out: dict[str, torch.Tensor] = {}
        self.dropped = []
        unknown: list[str] = []
        tables: dict[int, torch.Tensor] = {}
        for name, tensor in sd.items():
            reason = self.drop_reason(name)
            if reason is not None:
                self.dropped.append((name, reason))
                continue
            layer, rest = split_layer(name)
            if layer is not None and layer < self.config.num_hidden_layers:
                if rest == _TABLE:
                    tables[layer] = tensor
                else:
                    self._map_layer_key(sd, layer, rest, tensor, out, unknown)
            elif name in _TOP_RENAMES:
                out[_TOP_RENAMES[name]] = tensor
            elif name == _HEAD:
                out[name] = tensor
            elif name == _MU_INIT and self.design == MU_GUIDANCE:
                out["model.mu_init"] = tensor.reshape(-1)  # upstream stores [1, 1, H]
            else:
                unknown.append(name)
        if tables:
            table = self._one_table(tables, unknown)
            out["model.token_to_expert"] = table.to(torch.long)
        if unknown:
            raise UpstreamFormatError(
                "state dict", [f"unknown key(s) for the {self.design} design: {', '.join(unknown)}"]
            )
        return out

    def _map_layer_key(self, sd, layer: int, rest: str, tensor, out: dict, unknown: list[str]) -> None:
        if rest in self.renames:
            out[f"model.layers.{layer}.{self.renames[rest]}"] = tensor
        elif self.design == MU_GUIDANCE and rest == _GATE:  # gate and up are fused, gate first
            up = sd.get(f"layers.{layer}.{_UP}")
            if up is None:
                unknown.append(f"layers.{layer}.{rest} (its {_UP} is missing)")
            else:
                out[f"model.layers.{layer}.{_FUSED}"] = torch.cat([tensor, up], dim=-1)
        elif self.design == MU_GUIDANCE and rest == _UP:
            if f"layers.{layer}.{_GATE}" not in sd:
                unknown.append(f"layers.{layer}.{rest} (its {_GATE} is missing)")
        else:
            unknown.append(f"layers.{layer}.{rest}")

    @staticmethod
    def _one_table(tables: dict[int, torch.Tensor], unknown: list[str]) -> torch.Tensor:
        """Upstream stores one table per layer; Complexity routes every layer with one."""
        first = min(tables)
        differing = [i for i in sorted(tables) if not torch.equal(tables[i], tables[first])]
        if differing:
            unknown.append(
                f"layers.{differing}.{_TABLE}: the per-layer routing tables differ from layer {first}'s; "
                "Complexity routes every layer with one table"
            )
        return tables[first]

    # -- ours -> upstream
    def from_complexity(
        self, state_dict: dict[str, torch.Tensor], *, canonical: bool = False
    ) -> dict[str, torch.Tensor]:
        """Our names -> upstream's (INL files put all but lm_head under "model."; ``canonical``
        leaves that prefix out, as `normalize_keys` does)."""
        inverse = {v: k for k, v in self.renames.items()}
        prefix = "model." if self.design == INL and not canonical else ""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if name == "model.token_to_expert":
                continue
            if name.startswith("model.layers."):
                idx, _, rest = name[len("model.layers.") :].partition(".")
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
                out[_MU_INIT] = tensor.reshape(1, 1, -1)
            elif name == _HEAD:
                out[name] = tensor
            else:
                raise KeyError(f"{name}: no upstream counterpart in the {self.design} design")
        embed = state_dict["model.embed_tokens.weight"]
        out.setdefault(_HEAD, embed)  # upstream stores the tied copy
        out.update(self._stored_but_unread(state_dict.get("model.token_to_expert"), embed, prefix))
        return out

    def _stored_but_unread(self, table, embed: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Keys upstream stores but never reads: per-layer tables and rotary buffers, and zeros (or
        upstream's init for the mu base) where our model allocates nothing."""
        cfg, out = self.config, {}
        h, d = cfg.hidden_size, cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            lp = f"{prefix}layers.{i}."
            if table is not None:
                out[lp + _TABLE] = table
            out[lp + _INV_FREQ] = rope_inv_freq(d, cfg.rope_theta).to(embed.device)
        like = {"device": embed.device, "dtype": embed.dtype}
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

    # -- checking a source against the layout the config implies
    def layout_problems(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Unknown, missing and mis-shaped keys of `sd` (canonical names), and stored rotary
        frequencies that differ from the config's: one message per kind, listing every key."""
        cfg = self.config
        with torch.device("meta"):
            skeleton = ComplexityForCausalLM(cfg)
        expected = self.from_complexity(skeleton.state_dict(), canonical=True)
        optional = {k for k in expected if self.drop_reason(k) is not None}
        problems = []
        unknown = sorted(k for k in sd if k not in expected)
        missing = sorted(k for k in expected if k not in sd and k not in optional)
        if unknown:
            problems.append(f"unknown key(s) for the {self.design} design: {', '.join(unknown)}")
        if missing:
            problems.append(f"missing key(s): {', '.join(missing)}")
        mismatched = [m for k in sorted(set(sd) & set(expected)) if (m := self._mismatch(k, sd[k], expected[k]))]
        if mismatched:
            problems.append(
                "shape mismatch(es) against config.json "
                f"(H={cfg.hidden_size}, heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
                f"E={cfg.num_experts}, expert width={cfg.expert_width}): " + "; ".join(mismatched)
            )
        ref = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        bad_freq = [
            k
            for k in sd
            if split_layer(k)[1] == _INV_FREQ
            and sd[k].shape == ref.shape
            and not torch.allclose(sd[k].float(), ref, rtol=1e-5, atol=0)
        ]
        if bad_freq:
            problems.append(
                f"{', '.join(bad_freq)}: rotary frequencies differ from rope_theta={cfg.rope_theta}, "
                f"head_dim={cfg.head_dim} (config contradicts the weights)"
            )
        return problems

    def _mismatch(self, name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
        """Why `got` cannot stand for `want` (shape, or integer against floating), else None."""
        h = self.config.hidden_size
        if name == _MU_INIT and got.numel() == h and list(got.shape) in ([h], [1, h]):
            return None  # [1, 1, H] as written, or already squeezed
        if list(got.shape) != list(want.shape):
            return f"{name} {list(got.shape)} (expected {list(want.shape)})"
        if got.is_floating_point() != want.is_floating_point() and name != _HEAD:
            return f"{name} has dtype {got.dtype}"
        return None


__all__ = [
    "DROP_REASONS",
    "UpstreamStateDictAdapter",
    "WeightStructure",
    "detect_design",
    "normalize_keys",
    "reconcile_with_weights",
    "split_layer",
]
