"""Upstream's config.json, in any layout, resolved into `TRHashConfig` fields.

Every field is one this reader knows: mapped, known to be without effect on this model (named in
the notes), or refused by name. Where upstream's own runtimes disagree, the training framework
(which wrote the checkpoints and their references) decides:
- `top_k_primary_weight: null` is 1/k (vllm-i64 reads 0.95 for a deep folder);
- `shared_intermediate_size: null` is `intermediate_size` (vllm-i64 reads intermediate_size / E);
- per-layer branch scales (`*_output_scale_{first,last}_layer`) apply (the HF adapter ignores
  them, and the deep export drops them: a deep folder can only say the base scales);
- the architectural `top_k` is `num_experts_per_tok` here, a field no generation config reads.
A deep folder without `source_mlp_type: tr_hash_engine` and with either null is refused: which
convention wrote it cannot be told.

Mapped onto our attention knobs: `rope_fraction` -> `partial_rotary_factor`, `use_mup_attn_scale`
-> `attention_multiplier` = 1/head_dim, `use_mup_output_mult` -> `logits_scaling` =
hidden_size / mup_base_width.

Refused rather than computed differently: a sliding window (upstream applies it only to prefills
longer than the window), the runtime expert shrink (`active_num_experts` / `active_expert_width`,
whose tables are not persisted), attention types other than gqa/mha/mqa, norms other than
RMSNorm, static expert capacity and non-causal models. Each refusal names the field.
"""

from __future__ import annotations

import math

from ....hash_routing import ROUTE_HASH_COUNTS, branch_scale, slot_weights
from .description import DEEP, HF, MLX, OUR_STRATEGY, QK_NORM_EPS

# Every config.json field falls in one of these tables (or is an error naming it).
# Fields without effect on this model's computation -> why (listed in the notes).
_INERT = {
    "attention_dropout": "training only",
    "hidden_act": "the engine always uses SiLU",
    "rope_type": "the GQA attention ignores it",
    "initializer_range": "initialisation only",
    "expert_initialization": "initialisation only",
    "use_mup_init": "initialisation only",
    "shared_gate_init": "initialisation of gates the engine does not have",
    "routed_gate_init": "initialisation of gates the engine does not have",
    "use_shared_routed_gates": "ignored by the engine",
    "token_frequencies": "used by other routing strategies only",
    "shared_expert_chunk_tokens": "memory chunking of the shared expert: same maths",
    "collect_moe_telemetry": "statistics only",
    "use_custom_kernels": "kernel choice: same maths",
    "use_cggr": "kernel choice: same maths",
    "use_sdpa": "kernel choice: same maths",
    "use_cache": "inference setting",
    "extra_config": "unused by the model",
    "hash_pair_gate_init": "research option the engine ignores",
    "hash_channel_scale_init": "research option the engine ignores",
    "tie_lexical_object_embeddings": "lexical attention research path (not gqa)",
}
# Families of fields that belong to other attention/MLP research paths than gqa + tr_hash_engine.
_INERT_PREFIXES = ("causal_", "tr_mha_", "lexical_", "micro_", "lsh_", "learn_hash_")
# Fields about the file or the tokenizer, or checked against their twin (num_experts_per_tok: top_k;
# rms_norm_eps: norm_eps).
_METADATA = {
    "model_type",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "is_decoder",
    "is_encoder_decoder",
    "num_experts_per_tok",
    "source_mlp_type",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
}
# Fields that change the computation: each is read below, mapped or refused by name.
_COMPUTE = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "attention_type",
    "use_qk_norm",
    "sliding_window",
    "max_position_embeddings",
    "rope_theta",
    "rope_fraction",
    "mlp_type",
    "num_experts",
    "routing_strategy",
    "route_hash_count",
    "shared_expert",
    "shared_intermediate_size",
    "shared_output_scale",
    "routed_output_scale",
    "shared_output_scale_first_layer",
    "shared_output_scale_last_layer",
    "routed_output_scale_first_layer",
    "routed_output_scale_last_layer",
    "top_k",
    "top_k_primary_weight",
    "active_num_experts",
    "active_expert_width",
    "norm_type",
    "norm_eps",
    "tie_word_embeddings",
    "is_causal",
    "use_mup_attn_scale",
    "use_mup_output_mult",
    "mup_base_width",
    "static_expert_capacity",
}
# The `architectures` the hf and deep layouts write.
_ARCHITECTURES = {HF: "TRHashForCausalLM", DEEP: "DeepForCausalLM"}
_MISSING = object()  # the default of a required field
# Upstream's tokenizer: </s> 0, <pad> 1, <s> 2, <unk> 3. Native and deep configs carry no ids.
_TOKEN_IDS = {"bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1, "unk_token_id": 3}


class _Fields:
    """Typed reads of upstream config fields; each bad value becomes a problem naming the field."""

    def __init__(self, raw: dict, problems: list[str]):
        self.raw, self.problems = raw, problems
        self.bad: set[str] = set()  # fields that failed

    def _fail(self, name: str, message: str) -> None:
        self.bad.add(name)
        self.problems.append(message)

    def get(self, name, default, kind, *, nullable=False, check=None, rule=""):
        value = self.raw.get(name, default)
        if value is _MISSING:
            self._fail(name, f"config.json: missing required field {name}")
            return None
        if value is None:
            if nullable:
                return None
            self._fail(name, f"config.json: {name} is null; expected {kind}")
            return None
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if ok and check is not None and not check(value):
            ok = False
        if not ok:
            self._fail(name, f"config.json: {name}={value!r} is not {rule or 'a valid ' + kind}")
            return None
        return float(value) if kind == "float" else value


def _positive(v) -> bool:
    return v > 0


_POSITIVE_INT = dict(check=_positive, rule="a positive integer")


def resolve_config(raw: dict, layout: str, notes: list[str], problems: list[str]) -> dict | None:
    """Upstream config.json (any layout) -> TRHashConfig fields, nulls resolved (framework meaning);
    None when `problems` (every bad field, named) is not empty."""
    _check_field_names(raw, layout, notes, problems)
    f = _Fields(raw, problems)
    _refuse_unsupported(f)
    fields = _attention_shapes(f, notes)
    fields |= _experts(f, fields["hidden_size"], notes)
    fields |= _slot_weights(f, fields["num_experts_per_tok"], notes)
    _refuse_ambiguous_nulls(raw, layout, problems)
    fields |= _routing_strategy(f, layout, notes)
    fields |= _branch_scales(f, fields["num_hidden_layers"], notes)
    fields |= _attention_knobs(f, fields["hidden_size"], fields["num_attention_heads"], notes)
    fields |= _norms_and_head(f, layout, notes)
    fields |= _special_tokens(f, notes)
    if problems:
        return None
    if layout == DEEP:
        notes.append(
            "deep layout: route_hash_count, rope_fraction, sliding_window, the µP flags and per-layer "
            "scales are not recorded; read as upstream's defaults"
        )
    return fields


def _check_field_names(raw: dict, layout: str, notes: list[str], problems: list[str]) -> None:
    """Every field must be one this reader knows the meaning of; the layout's markers must agree."""
    unknown = sorted(
        k
        for k in raw
        if k not in _COMPUTE and k not in _INERT and k not in _METADATA and not k.startswith(_INERT_PREFIXES)
    )
    if unknown:
        problems.append(f"config.json: field(s) this reader does not know, so cannot vouch for: {', '.join(unknown)}")
    families = sorted({p + "*" for k in raw for p in _INERT_PREFIXES if k.startswith(p)})
    ignored = sorted(k for k in raw if k in _INERT) + families
    if ignored:
        notes.append(f"ignored config fields that do not change this model's computation: {', '.join(ignored)}")
    arch = raw.get("architectures")
    if layout in _ARCHITECTURES and arch is not None and arch != [_ARCHITECTURES[layout]]:
        problems.append(f"config.json: architectures={arch!r}; the {layout} layout has [{_ARCHITECTURES[layout]!r}]")
    want_mlp = {DEEP: ("token_routed",), MLX: ("tr_hash_engine", "token_routed")}.get(layout, ("tr_hash_engine",))
    if raw.get("mlp_type", want_mlp[0]) not in want_mlp:
        problems.append(
            f"config.json: mlp_type={raw['mlp_type']!r} is not {' or '.join(map(repr, want_mlp))} "
            f"(the {layout} layout of TR-Hash)"
        )
    source = raw.get("source_mlp_type")
    if layout in (DEEP, MLX) and source is not None and source != "tr_hash_engine":
        problems.append(f"config.json: source_mlp_type={source!r}; a TR-Hash {layout} export has 'tr_hash_engine'")
    if layout == MLX:
        _require_mlx_fields(raw, problems)


# What the MLX layout's config.json must state: the format says little about it, so no field that
# changes the computation is given a default there (the other layouts are upstream's documented
# dicts, whose absent fields take upstream's defaults).
_MLX_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "num_experts",
    "top_k",
    "routing_strategy",
    "shared_expert",
    "shared_output_scale",
    "routed_output_scale",
    "shared_output_scale_first_layer",
    "shared_output_scale_last_layer",
    "routed_output_scale_first_layer",
    "routed_output_scale_last_layer",
    "rope_theta",
    "rope_fraction",
    "use_qk_norm",
    "tie_word_embeddings",
    "sliding_window",
    "use_mup_attn_scale",
    "use_mup_output_mult",
)


def _require_mlx_fields(raw: dict, problems: list[str]) -> None:
    missing = [k for k in _MLX_REQUIRED if k not in raw]
    if raw.get("top_k") != 1 and "top_k_primary_weight" not in raw:
        missing.append("top_k_primary_weight")
    if raw.get("shared_expert") and "shared_intermediate_size" not in raw:
        missing.append("shared_intermediate_size")
    if raw.get("use_mup_output_mult") and "mup_base_width" not in raw:
        missing.append("mup_base_width")
    if "norm_eps" not in raw and "rms_norm_eps" not in raw:
        missing.append("norm_eps")
    for name in missing:
        problems.append(
            f"config.json: missing field {name}: the MLX layout's config must state it (it changes the "
            "computation, and nothing says which value upstream's MLX export would mean by its absence)"
        )


def _refuse_unsupported(f: _Fields) -> None:
    """Settings upstream computes in ways this project does not reproduce: refused by name."""
    f.get("norm_type", "rmsnorm", "str", check=lambda v: v == "rmsnorm", rule="supported (only 'rmsnorm')")
    f.get("is_causal", True, "bool", check=lambda v: v, rule="supported (only causal language models)")
    f.get(
        "sliding_window",
        None,
        "int",
        nullable=True,
        check=lambda v: False,
        rule="supported: upstream applies its window only to prefills longer than it, which no single attention mask reproduces",
    )
    f.get("static_expert_capacity", False, "bool", check=lambda v: not v, rule="supported (only false)")
    for name in ("active_num_experts", "active_expert_width"):
        f.get(
            name,
            None,
            "int",
            nullable=True,
            check=lambda v: False,
            rule="supported: the runtime expert shrink rebuilds a route table that is not persisted",
        )


def _attention_shapes(f: _Fields, notes: list[str]) -> dict:
    """The embedding and attention sizes; the head size must be whole and even, and the kv heads
    must divide the heads."""
    vocab = f.get("vocab_size", _MISSING, "int", **_POSITIVE_INT)
    hidden = f.get("hidden_size", _MISSING, "int", **_POSITIVE_INT)
    layers = f.get("num_hidden_layers", _MISSING, "int", **_POSITIVE_INT)
    heads = f.get("num_attention_heads", _MISSING, "int", **_POSITIVE_INT)
    attention = f.get(
        "attention_type",
        "gqa",
        "str",
        check=lambda v: v in ("gqa", "mha", "mqa"),
        rule="supported (only gqa and its mha/mqa forms; the lexical, conv and TR-MHA types are other research models)",
    )
    kv_heads = f.get("num_key_value_heads", None, "int", nullable=True, **_POSITIVE_INT)
    if kv_heads is None and heads and "num_key_value_heads" not in f.bad:
        kv_heads = {"mha": heads, "mqa": 1}.get(attention, max(1, heads // 4))
        notes.append(f"num_key_value_heads: null -> {kv_heads} ({attention} default)")
    if hidden and heads and hidden % heads:
        f.problems.append(f"config.json: num_attention_heads={heads} does not divide hidden_size={hidden}")
    elif hidden and heads and (hidden // heads) % 2:
        f.problems.append(
            f"config.json: head_dim hidden_size/num_attention_heads={hidden // heads} is odd (RoPE rotates pairs)"
        )
    if heads and kv_heads and heads % kv_heads:
        f.problems.append(f"config.json: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )


def _experts(f: _Fields, hidden: int | None, notes: list[str]) -> dict:
    """How many experts, how many per token, and their widths: `intermediate_size` is all the
    routed experts together; the shared expert's null width is all of it."""
    raw = f.raw
    experts = f.get("num_experts", 1, "int", **_POSITIVE_INT)
    top_k = f.get("top_k", 1, "int", **_POSITIVE_INT)
    if "num_experts_per_tok" in raw and raw["num_experts_per_tok"] != raw.get("top_k", 1):
        f.problems.append(
            f"config.json: num_experts_per_tok={raw['num_experts_per_tok']!r} differs from top_k={raw.get('top_k')!r}"
        )
    if experts and top_k and top_k > experts:
        f.problems.append(
            f"config.json: top_k={top_k} exceeds num_experts={experts} (routes per token must be distinct experts)"
        )
    intermediate = f.get("intermediate_size", None, "int", nullable=True, **_POSITIVE_INT)
    if intermediate is None and hidden and "intermediate_size" not in f.bad:
        intermediate = (8 * hidden // 3 + 255) // 256 * 256
        notes.append(f"intermediate_size: null -> {intermediate} (round_up(8H/3, 256))")
    width = None
    if intermediate and experts:
        if intermediate % experts:
            f.problems.append(
                f"config.json: intermediate_size={intermediate} (all experts together) is not divisible by num_experts={experts}"
            )
        else:
            width = intermediate // experts
    shared = f.get("shared_expert", True, "bool")
    shared_width = f.get("shared_intermediate_size", None, "int", nullable=True, **_POSITIVE_INT)
    if shared and shared_width is None and intermediate:
        shared_width = intermediate
        notes.append(
            f"shared_intermediate_size: null -> {shared_width} (= intermediate_size, the framework's meaning; vllm-i64 would read intermediate_size/num_experts)"
        )
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        expert_width=width,
        shared_expert_width=shared_width if shared else None,
    )


def _slot_weights(f: _Fields, top_k: int | None, notes: list[str]) -> dict:
    """Slot 0's weight, resolved (null: 1/top_k); the others share the rest equally."""
    primary = f.get(
        "top_k_primary_weight",
        None,
        "float",
        nullable=True,
        check=lambda v: 0.0 <= v <= 1.0,
        rule="in [0, 1] (upstream clamps it silently; refused here)",
    )
    if not top_k or "top_k_primary_weight" in f.bad:
        return dict(route_primary_weight=None)
    resolved = slot_weights(top_k, primary)[0]
    if primary is None and top_k > 1:
        notes.append(
            f"top_k_primary_weight: null -> {resolved} (1/top_k, the framework's meaning; vllm-i64 would read 0.95)"
        )
    elif primary is not None and top_k == 1 and primary != 1.0:
        notes.append(f"top_k_primary_weight: {primary} has no effect with top_k 1 (the one route has weight 1)")
    if top_k > 1:
        notes.append(
            f"top_k: {top_k} -> num_experts_per_tok {top_k} (the experts each token visits; never a sampling top_k)"
        )
    return dict(route_primary_weight=resolved)


def _refuse_ambiguous_nulls(raw: dict, layout: str, problems: list[str]) -> None:
    """A deep folder not marked as exported from the training framework: a null primary weight or
    shared width means different things to the framework and to vllm-i64."""
    if layout != DEEP or raw.get("source_mlp_type") == "tr_hash_engine":
        return
    shared = raw.get("shared_expert", True) is True  # a bad shared_expert is already a problem
    for name in ("top_k_primary_weight", "shared_intermediate_size"):
        if name in raw and raw[name] is None and (name != "shared_intermediate_size" or shared):
            problems.append(
                f"config.json: {name} is null in a deep config without source_mlp_type 'tr_hash_engine': the "
                "training framework reads it as "
                + ("1/top_k" if name.startswith("top_k") else "intermediate_size")
                + " and vllm-i64 as "
                + ("0.95" if name.startswith("top_k") else "intermediate_size/num_experts")
                + ", and nothing says which wrote this file"
            )


def _routing_strategy(f: _Fields, layout: str, notes: list[str]) -> dict:
    """Which builder wrote the tables (ours by name), and multi_hash's channel count: the deep and
    MLX layouts do not record it (`tensors.table_provenance` recovers it from the tables)."""
    name = f.get(
        "routing_strategy",
        "modulo_cyclic",
        "str",
        check=lambda v: v in OUR_STRATEGY,
        rule=f"a strategy upstream's MLP builds ({', '.join(OUR_STRATEGY)})",
    )
    strategy = OUR_STRATEGY.get(name)
    if name == "modulo":
        notes.append("routing_strategy: 'modulo' is upstream's alias of modulo_cyclic")
    hash_count = None
    if strategy == "multi_hash" and "route_hash_count" in f.raw:
        hash_count = f.get(
            "route_hash_count", 2, "int", check=lambda v: v in ROUTE_HASH_COUNTS, rule="an integer in [2, 8]"
        )
    elif strategy == "multi_hash" and layout not in (DEEP, MLX):
        hash_count = 2  # upstream's default
    return dict(route_strategy=strategy, route_hash_count=hash_count)


def _branch_scales(f: _Fields, layers: int | None, notes: list[str]) -> dict:
    """The shared and routed branches' fixed multipliers, each constant or linear over depth."""
    scales = {}
    for name in ("shared_output_scale", "routed_output_scale"):
        scales[name] = f.get(name, 1.0, "float")
        for end in ("first_layer", "last_layer"):
            scales[f"{name}_{end}"] = f.get(f"{name}_{end}", None, "float", nullable=True)
        ends = (scales[f"{name}_first_layer"], scales[f"{name}_last_layer"])
        if any(v is not None for v in ends) and layers and scales[name] is not None:
            per_layer = [branch_scale(scales[name], *ends, i, layers) for i in range(layers)]
            notes.append(
                f"{name}_first_layer/_last_layer: per-layer scales {', '.join(f'{v:g}' for v in per_layer)} "
                "(linear over depth, the framework's meaning; upstream's HF adapter ignores them)"
            )
    return scales


def _attention_knobs(f: _Fields, hidden: int | None, heads: int | None, notes: list[str]) -> dict:
    """RoPE (theta, the rotated fraction, the longest position) and the µP flags, as our
    partial_rotary_factor, attention_multiplier and logits_scaling."""
    theta = f.get("rope_theta", 10000.0, "float", check=_positive, rule="a positive number")
    fraction = f.get("rope_fraction", 1.0, "float", check=lambda v: 0.0 < v <= 1.0, rule="in (0, 1]")
    attn = f.get("use_mup_attn_scale", False, "bool")
    output = f.get("use_mup_output_mult", False, "bool")
    base = f.get("mup_base_width", 256, "int", **_POSITIVE_INT) if output else None
    knobs = {}
    if fraction is not None and fraction != 1.0 and hidden and heads:
        d = hidden // heads
        knobs["rope_fraction"] = fraction
        notes.append(
            f"rope_fraction: {fraction} -> partial_rotary_factor {fraction} (RoPE on the first "
            f"{int(d * fraction // 2) * 2} of each head's {d} dims)"
        )
    if attn and hidden and heads:
        knobs["attention_multiplier"] = 1.0 / (hidden // heads)
        notes.append(
            f"use_mup_attn_scale: true -> attention_multiplier = 1/head_dim = {knobs['attention_multiplier']:g}"
        )
    if output and base and hidden:
        knobs["logits_scaling"] = hidden / base
        notes.append(
            f"use_mup_output_mult: true -> logits_scaling = hidden_size / mup_base_width = {hidden}/{base} "
            f"= {knobs['logits_scaling']:g} (logits divided by it)"
        )
    max_pos = f.get("max_position_embeddings", 2048, "int", **_POSITIVE_INT)
    if max_pos:
        notes.append(
            f"max_position_embeddings: {max_pos} becomes the longest sequence our engine and server accept "
            "(upstream's model only sizes its RoPE cache with it, and grows the cache on demand)"
        )
    return dict(rope_theta=theta, max_position_embeddings=max_pos, **knobs)


def _norms_and_head(f: _Fields, layout: str, notes: list[str]) -> dict:
    """The norms' epsilons (QK-norm's is upstream's fixed one) and whether the head is tied."""
    raw = f.raw
    qk_norm = f.get("use_qk_norm", True, "bool")
    if qk_norm and raw.get("norm_eps", raw.get("rms_norm_eps", QK_NORM_EPS)) != QK_NORM_EPS:
        notes.append(f"QK-norm epsilon: upstream's fixed {QK_NORM_EPS} (norm_eps applies to the block norms only)")
    eps_name = "rms_norm_eps" if layout == MLX and "norm_eps" not in raw else "norm_eps"
    eps = f.get(eps_name, 1e-6, "float", check=_positive, rule="a positive number")
    if (
        layout in (DEEP, MLX)
        and "rms_norm_eps" in raw
        and raw["rms_norm_eps"] != raw.get("norm_eps", raw["rms_norm_eps"])
    ):
        f.problems.append(
            f"config.json: rms_norm_eps={raw['rms_norm_eps']!r} differs from norm_eps={raw.get('norm_eps')!r}"
        )
    tied = f.get("tie_word_embeddings", True, "bool")
    return dict(use_qk_norm=qk_norm, rms_norm_eps=eps, tie_word_embeddings=tied)


def _special_tokens(f: _Fields, notes: list[str]) -> dict:
    """The token ids; upstream's tokenizer's where config.json has none."""
    ids = {}
    for name, default in _TOKEN_IDS.items():
        ids[name] = f.get(name, default, "int", nullable=True, check=lambda v: v >= 0, rule="a token id")
    assumed = [f"{name} {default}" for name, default in _TOKEN_IDS.items() if name not in f.raw]
    if assumed:
        notes.append(f"special tokens: not in config.json; upstream's tokenizer's assumed ({', '.join(assumed)})")
    return ids
