"""Upstream TR-Hash MoE checkpoints: the four on-disk layouts, read into one neutral description.

TR-Hash is a Llama-style GQA + QK-norm decoder whose MLP sends each token to the top-k experts of
a persisted per-layer route table over token ids, with fixed slot weights, a shared expert and
fixed branch scales: our `hash_routed` MLP (docs/architecture.md §2e; `complexity.hash_routing`
has the maths). Upstream writes it four ways:

| layout | config.json | tensors |
|---|---|---|
| native | upstream's full model-config dict, no `model_type`, `mlp_type: tr_hash_engine` | `layers.N.mlp.engine.{expert_gate,expert_up,expert_down,route_table,shared_*}`, plus derived `rotary_emb.inv_freq`, `fused_route_codes`, `fused_expert_pairs` |
| hf | the native dict plus `model_type: tr_hash_moe`, `num_experts_per_tok`, token ids, `auto_map` (its two adapter modules may be absent) | the native tensors, same bytes |
| deep | about 30 keys, `model_type: deep`, `mlp_type: token_routed`, `source_mlp_type: tr_hash_engine` | `layers.N.mlp.{gate,up,down}_proj_w`, `mlp.topk_token_to_expert`, `mlp.shared_*`; derived buffers dropped |
| mlx | `model_type: complexity` (as ours) with upstream's fields (`routing_strategy`, `top_k`, ...) | the deep names under `model.`, the table as int32 `topk_token_to_expert` plus its row 0 as `token_to_expert`; maybe fp16 |

The older lineage of the deep and MLX layouts stores only the primary slot, `mlp.token_to_expert`
[V]: its secondaries are `(primary + j) mod E`, as upstream's converter and vllm-i64 read it.

`trhash_layout` tells the layout from config.json (and, for the MLX layout, whose model_type is
ours, the tensor names); `detect.detect_upstream` asks it first;
`read_trhash` turns a folder into a `TRHashCheckpoint`: a `TRHashConfig` whose every field has
this project's meaning, with upstream's nulls resolved as upstream's training framework reads
them, and the tensors under the neutral names of `neutral_tensor_shapes`. `complexity_config`
and `TRHashStateDictAdapter` map that onto our `hash_routed` model and back; `trhash_export`
writes the deep layout again. Everything is read from the config and the tensors; route tables
are copied, never rebuilt (three of the four builders depend on torch's RNG).

Where upstream's own runtimes disagree, the training framework (which wrote the checkpoints and
their references) decides:
- `top_k_primary_weight: null` is 1/k (vllm-i64 reads 0.95 for a deep folder);
- `shared_intermediate_size: null` is `intermediate_size` (vllm-i64 reads intermediate_size / E);
- per-layer branch scales (`*_output_scale_{first,last}_layer`) apply (the HF adapter ignores
  them, and the deep export drops them: a deep folder can only say the base scales);
- the architectural `top_k` is `num_experts_per_tok` here, a field no generation config reads.
A deep folder without `source_mlp_type: tr_hash_engine` and with either null is refused: which
convention wrote it cannot be told.

Mapped onto our attention knobs: `rope_fraction` -> `partial_rotary_factor`, `use_mup_attn_scale` -> `attention_multiplier`
= 1/head_dim, `use_mup_output_mult` -> `logits_scaling` = hidden_size / mup_base_width.

Refused rather than computed differently: a sliding window (upstream applies it only to prefills
longer than the window), the runtime expert
shrink (`active_num_experts` / `active_expert_width`, whose tables are not persisted), attention
types other than gqa/mha/mqa, norms other than RMSNorm, static expert capacity and non-causal
models. Each refusal names the field.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...configuration_complexity import ComplexityConfig
from ...hash_routing import (
    ROUTE_HASH_COUNTS,
    branch_scale,
    build_route_table,
    check_route_table,
    slot_weights,
)
from .formats import TRHASH_DEEP, TRHASH_HF, TRHASH_MLX, TRHASH_NATIVE, UpstreamFormatError
from .readers import WEIGHT_FILES, find_weights, peek_tensor_names, read_config_json, read_weights

NATIVE, HF, DEEP, MLX = "native", "hf", "deep", "mlx"
# layout -> the design name `detect_upstream` reports (formats.DESIGNS describes each)
DESIGN_OF_LAYOUT = {NATIVE: TRHASH_NATIVE, HF: TRHASH_HF, DEEP: TRHASH_DEEP, MLX: TRHASH_MLX}
# Upstream routing_strategy -> ours. Upstream accepts other names in its config, but its MLP
# cannot be built with them.
_STRATEGIES = {
    "modulo": "modulo_cyclic",
    "modulo_cyclic": "modulo_cyclic",
    "token_id_balanced_hash": "balanced_hash",
    "token_id_multi_hash": "multi_hash",
    "token_id_hierarchical_hash": "hierarchical_hash",
}
UPSTREAM_STRATEGY = {
    "modulo_cyclic": "modulo_cyclic",
    "balanced_hash": "token_id_balanced_hash",
    "multi_hash": "token_id_multi_hash",
    "hierarchical_hash": "token_id_hierarchical_hash",
}
# Upstream's tokenizer: </s> 0, <pad> 1, <s> 2, <unk> 3. Native and deep configs carry no ids.
_TOKEN_IDS = {"bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1, "unk_token_id": 3}
QK_NORM_EPS = 1e-6  # upstream's QK-norm ignores norm_eps


# ----------------------------------------------------------------------------- the neutral description


@dataclass(frozen=True)
class TRHashConfig:
    """A TR-Hash model in this project's terms: every null resolved, every field meaningful."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int  # upstream `top_k` (architecture, not sampling)
    expert_width: int  # W, one expert's SwiGLU width (upstream intermediate_size / E)
    shared_expert_width: int | None  # S, or None without a shared expert
    route_strategy: str  # how the tables were built (documentation: tables are copied)
    route_hash_count: int | None  # multi_hash channels; None for the other strategies
    route_primary_weight: float  # slot 0's weight, resolved (1.0 when k = 1)
    shared_output_scale: float
    routed_output_scale: float
    shared_output_scale_first_layer: float | None = None
    shared_output_scale_last_layer: float | None = None
    routed_output_scale_first_layer: float | None = None
    routed_output_scale_last_layer: float | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-6
    qk_norm_eps: float = QK_NORM_EPS
    tie_word_embeddings: bool = True
    rope_fraction: float = 1.0  # RoPE on the first floor(head_dim * f / 2) * 2 dims of each head
    attention_multiplier: float | None = None  # the softmax scale; None: head_dim ** -0.5
    logits_scaling: float = 1.0  # the logits are divided by it
    bos_token_id: int | None = 2
    eos_token_id: int | None = 0
    pad_token_id: int | None = 1
    unk_token_id: int | None = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_fraction // 2) * 2

    @property
    def shared_expert(self) -> bool:
        return self.shared_expert_width is not None

    @property
    def slot_weights(self) -> tuple[float, ...]:
        return slot_weights(self.num_experts_per_tok, self.route_primary_weight)

    def shared_scale(self, layer_idx: int) -> float:
        return branch_scale(
            self.shared_output_scale,
            self.shared_output_scale_first_layer,
            self.shared_output_scale_last_layer,
            layer_idx,
            self.num_hidden_layers,
        )

    def routed_scale(self, layer_idx: int) -> float:
        return branch_scale(
            self.routed_output_scale,
            self.routed_output_scale_first_layer,
            self.routed_output_scale_last_layer,
            layer_idx,
            self.num_hidden_layers,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def neutral_tensor_shapes(config: TRHashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model under its neutral name, with its shape. Weights are floats in
    upstream's conventions: nn.Linear [out, in] for attention and the shared expert, x @ W for
    the experts (gate/up [E, H, W], down [E, W, H]); route tables are int64 [k, V]."""
    c = config
    h, d, e, w = c.hidden_size, c.head_dim, c.num_experts, c.expert_width
    shapes = {"embed_tokens.weight": (c.vocab_size, h), "norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            p + "mlp.route_table": (c.num_experts_per_tok, c.vocab_size),
            p + "mlp.experts.gate": (e, h, w),
            p + "mlp.experts.up": (e, h, w),
            p + "mlp.experts.down": (e, w, h),
        }
        if c.use_qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if c.shared_expert:
            s = c.shared_expert_width
            shapes |= {
                p + "mlp.shared_expert.gate_proj.weight": (s, h),
                p + "mlp.shared_expert.up_proj.weight": (s, h),
                p + "mlp.shared_expert.down_proj.weight": (h, s),
            }
    return shapes


# Neutral per-layer suffix -> each layout's (the rest of the names are the same in all four, MLX under "model.").
_LAYER_RENAMES = {
    NATIVE: {
        "mlp.route_table": "mlp.engine.route_table",
        "mlp.experts.gate": "mlp.engine.expert_gate",
        "mlp.experts.up": "mlp.engine.expert_up",
        "mlp.experts.down": "mlp.engine.expert_down",
        "mlp.shared_expert.gate_proj.weight": "mlp.engine.shared_gate.weight",
        "mlp.shared_expert.up_proj.weight": "mlp.engine.shared_up.weight",
        "mlp.shared_expert.down_proj.weight": "mlp.engine.shared_down.weight",
    },
    DEEP: {
        "mlp.route_table": "mlp.topk_token_to_expert",
        "mlp.experts.gate": "mlp.gate_proj_w",
        "mlp.experts.up": "mlp.up_proj_w",
        "mlp.experts.down": "mlp.down_proj_w",
        "mlp.shared_expert.gate_proj.weight": "mlp.shared_gate.weight",
        "mlp.shared_expert.up_proj.weight": "mlp.shared_up.weight",
        "mlp.shared_expert.down_proj.weight": "mlp.shared_down.weight",
    },
}
_LAYER_RENAMES[HF] = _LAYER_RENAMES[NATIVE]
_LAYER_RENAMES[MLX] = _LAYER_RENAMES[DEEP]  # and every name under "model."
_PRIMARY_ONLY = "mlp.token_to_expert"  # the older lineage's table: the primary slot only, [V]
# Native/hf buffers derived from the config or the table: checked, then dropped.
_DERIVED = ("self_attn.rotary_emb.inv_freq", "mlp.engine.fused_route_codes", "mlp.engine.fused_expert_pairs")


def layout_name(neutral: str, layout: str) -> str:
    """The name a neutral tensor has in `layout`."""
    name = neutral
    if neutral.startswith("layers."):
        _, i, rest = neutral.split(".", 2)
        name = f"layers.{i}.{_LAYER_RENAMES[layout].get(rest, rest)}"
    return "model." + name if layout == MLX else name


@dataclass
class TRHashCheckpoint:
    """A validated upstream TR-Hash checkpoint in neutral form."""

    layout: str
    src: Path
    weights_file: Path
    raw_config: dict
    config: TRHashConfig
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)  # the layout and why, resolved nulls, ignored fields
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (stored key, why it is not needed)


# ----------------------------------------------------------------------------- detection


def trhash_layout(raw: dict, tensor_names=()) -> tuple[str, str] | None:
    """(layout, why) when config.json is one of the four TR-Hash layouts; None otherwise.
    `tensor_names` (the weights' names, headers only) tell the MLX layout, whose model_type is
    ours, when its config carries none of upstream's own fields."""
    model_type = raw.get("model_type")
    if model_type == "complexity":
        return _mlx_layout(raw, tensor_names)
    if model_type == "tr_hash_moe":
        return HF, "config.json has model_type 'tr_hash_moe'"
    if model_type == "deep":
        why = "config.json has model_type 'deep'"
        return DEEP, why + (
            " and source_mlp_type 'tr_hash_engine'" if raw.get("source_mlp_type") == "tr_hash_engine" else ""
        )
    if model_type is None and raw.get("mlp_type") == "tr_hash_engine":
        return NATIVE, "config.json has no model_type and mlp_type 'tr_hash_engine'"
    return None


def _mlx_layout(raw: dict, tensor_names) -> tuple[str, str] | None:
    """Upstream's MLX export says model_type 'complexity', as our own folders do; upstream's
    fields in config.json (ours have none of them) or its table names tell it apart."""
    markers = [k for k in ("routing_strategy", "top_k", "source_mlp_type") if k in raw]
    if raw.get("mlp_type") == "tr_hash_engine":
        markers.insert(0, "mlp_type 'tr_hash_engine'")
    if markers:
        return MLX, f"config.json has model_type 'complexity' with upstream's TR-Hash field(s) {', '.join(markers)}"
    tables = [n for n in tensor_names if n.endswith("mlp.topk_token_to_expert")]
    if tables:
        return MLX, f"config.json has model_type 'complexity' and the weights hold TR-Hash route tables ({tables[0]})"
    return None


# ----------------------------------------------------------------------------- config resolution

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
_ARCHITECTURES = {HF: "TRHashForCausalLM", DEEP: "DeepForCausalLM"}
_MISSING = object()


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


def _mup_and_rope(f: _Fields, hidden, heads, notes: list[str]) -> dict:
    """rope_fraction and the µP flags -> our partial_rotary_factor, attention_multiplier and
    logits_scaling."""
    fraction = f.get("rope_fraction", 1.0, "float", check=lambda v: 0.0 < v <= 1.0, rule="in (0, 1]")
    attn = f.get("use_mup_attn_scale", False, "bool")
    output = f.get("use_mup_output_mult", False, "bool")
    base = f.get("mup_base_width", 256, "int", check=_positive, rule="a positive integer") if output else None
    out = {}
    if fraction is not None and fraction != 1.0 and hidden and heads:
        d = hidden // heads
        out["rope_fraction"] = fraction
        notes.append(
            f"rope_fraction: {fraction} -> partial_rotary_factor {fraction} (RoPE on the first "
            f"{int(d * fraction // 2) * 2} of each head's {d} dims)"
        )
    if attn and hidden and heads:
        out["attention_multiplier"] = 1.0 / (hidden // heads)
        notes.append(f"use_mup_attn_scale: true -> attention_multiplier = 1/head_dim = {out['attention_multiplier']:g}")
    if output and base and hidden:
        out["logits_scaling"] = hidden / base
        notes.append(
            f"use_mup_output_mult: true -> logits_scaling = hidden_size / mup_base_width = {hidden}/{base} "
            f"= {out['logits_scaling']:g} (logits divided by it)"
        )
    return out


def _resolve_config(raw: dict, layout: str, notes: list[str], problems: list[str]) -> dict | None:
    """Upstream config.json (any layout) -> TRHashConfig fields, nulls resolved (framework meaning)."""
    _check_field_names(raw, layout, notes, problems)
    f = _Fields(raw, problems)
    _refuse_unsupported(f)
    pos = dict(check=_positive, rule="a positive integer")
    vocab = f.get("vocab_size", _MISSING, "int", **pos)
    hidden = f.get("hidden_size", _MISSING, "int", **pos)
    layers = f.get("num_hidden_layers", _MISSING, "int", **pos)
    heads = f.get("num_attention_heads", _MISSING, "int", **pos)
    attention = f.get(
        "attention_type",
        "gqa",
        "str",
        check=lambda v: v in ("gqa", "mha", "mqa"),
        rule="supported (only gqa and its mha/mqa forms; the lexical, conv and TR-MHA types are other research models)",
    )
    kv_heads = f.get("num_key_value_heads", None, "int", nullable=True, **pos)
    if kv_heads is None and heads and "num_key_value_heads" not in f.bad:
        kv_heads = {"mha": heads, "mqa": 1}.get(attention, max(1, heads // 4))
        notes.append(f"num_key_value_heads: null -> {kv_heads} ({attention} default)")
    if hidden and heads and hidden % heads:
        problems.append(f"config.json: num_attention_heads={heads} does not divide hidden_size={hidden}")
    elif hidden and heads and (hidden // heads) % 2:
        problems.append(
            f"config.json: head_dim hidden_size/num_attention_heads={hidden // heads} is odd (RoPE rotates pairs)"
        )
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"config.json: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")

    experts = f.get("num_experts", 1, "int", **pos)
    top_k = f.get("top_k", 1, "int", **pos)
    if "num_experts_per_tok" in raw and raw["num_experts_per_tok"] != raw.get("top_k", 1):
        problems.append(
            f"config.json: num_experts_per_tok={raw['num_experts_per_tok']!r} differs from top_k={raw.get('top_k')!r}"
        )
    if experts and top_k and top_k > experts:
        problems.append(
            f"config.json: top_k={top_k} exceeds num_experts={experts} (routes per token must be distinct experts)"
        )
    intermediate = f.get("intermediate_size", None, "int", nullable=True, **pos)
    if intermediate is None and hidden and "intermediate_size" not in f.bad:
        intermediate = (8 * hidden // 3 + 255) // 256 * 256
        notes.append(f"intermediate_size: null -> {intermediate} (round_up(8H/3, 256))")
    width = None
    if intermediate and experts:
        if intermediate % experts:
            problems.append(
                f"config.json: intermediate_size={intermediate} (all experts together) is not divisible by num_experts={experts}"
            )
        else:
            width = intermediate // experts
    shared = f.get("shared_expert", True, "bool")
    shared_width = f.get("shared_intermediate_size", None, "int", nullable=True, **pos)
    if shared and shared_width is None and intermediate:
        shared_width = intermediate
        notes.append(
            f"shared_intermediate_size: null -> {shared_width} (= intermediate_size, the framework's meaning; vllm-i64 would read intermediate_size/num_experts)"
        )
    if not shared:
        shared_width = None

    primary = f.get(
        "top_k_primary_weight",
        None,
        "float",
        nullable=True,
        check=lambda v: 0.0 <= v <= 1.0,
        rule="in [0, 1] (upstream clamps it silently; refused here)",
    )
    if layout == DEEP and raw.get("source_mlp_type") != "tr_hash_engine":
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
    resolved_primary = None
    if top_k and "top_k_primary_weight" not in f.bad:
        resolved_primary = slot_weights(top_k, primary)[0]
        if primary is None and top_k > 1:
            notes.append(
                f"top_k_primary_weight: null -> {resolved_primary} (1/top_k, the framework's meaning; vllm-i64 would read 0.95)"
            )
        elif primary is not None and top_k == 1 and primary != 1.0:
            notes.append(f"top_k_primary_weight: {primary} has no effect with top_k 1 (the one route has weight 1)")
        if top_k > 1:
            notes.append(
                f"top_k: {top_k} -> num_experts_per_tok {top_k} (the experts each token visits; never a sampling top_k)"
            )

    strategy_name = f.get(
        "routing_strategy",
        "modulo_cyclic",
        "str",
        check=lambda v: v in _STRATEGIES,
        rule=f"a strategy upstream's MLP builds ({', '.join(_STRATEGIES)})",
    )
    strategy = _STRATEGIES.get(strategy_name)
    if strategy_name == "modulo":
        notes.append("routing_strategy: 'modulo' is upstream's alias of modulo_cyclic")
    hash_count = None
    if strategy == "multi_hash" and "route_hash_count" in raw:
        hash_count = f.get(
            "route_hash_count", 2, "int", check=lambda v: v in ROUTE_HASH_COUNTS, rule="an integer in [2, 8]"
        )
    elif strategy == "multi_hash" and layout not in (DEEP, MLX):
        hash_count = 2  # upstream's default

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

    theta = f.get("rope_theta", 10000.0, "float", check=_positive, rule="a positive number")
    knobs = _mup_and_rope(f, hidden, heads, notes)
    max_pos = f.get("max_position_embeddings", 2048, "int", **pos)
    if max_pos:
        notes.append(
            f"max_position_embeddings: {max_pos} becomes the longest sequence our engine and server accept "
            "(upstream's model only sizes its RoPE cache with it, and grows the cache on demand)"
        )
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
        problems.append(
            f"config.json: rms_norm_eps={raw['rms_norm_eps']!r} differs from norm_eps={raw.get('norm_eps')!r}"
        )
    tied = f.get("tie_word_embeddings", True, "bool")
    ids = {}
    for name, default in _TOKEN_IDS.items():
        ids[name] = f.get(name, default, "int", nullable=True, check=lambda v: v >= 0, rule="a token id")
    assumed = [f"{name} {default}" for name, default in _TOKEN_IDS.items() if name not in raw]
    if assumed:
        notes.append(f"special tokens: not in config.json; upstream's tokenizer's assumed ({', '.join(assumed)})")
    if problems:
        return None
    if layout == DEEP:
        notes.append(
            "deep layout: route_hash_count, rope_fraction, sliding_window, the µP flags and per-layer "
            "scales are not recorded; read as upstream's defaults"
        )
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_experts=experts,
        num_experts_per_tok=top_k,
        expert_width=width,
        shared_expert_width=shared_width,
        route_strategy=strategy,
        route_hash_count=hash_count,
        route_primary_weight=resolved_primary,
        **scales,
        rope_theta=theta,
        max_position_embeddings=max_pos,
        use_qk_norm=qk_norm,
        rms_norm_eps=eps,
        tie_word_embeddings=tied,
        **knobs,
        **ids,
    )


# ----------------------------------------------------------------------------- tensors


def _why_shape(neutral: str) -> str:
    rest = neutral.split(".", 2)[-1]
    if rest.startswith("mlp.experts."):
        return "num_experts, hidden_size, intermediate_size / num_experts"
    if rest.startswith("mlp.shared_expert."):
        return "shared_intermediate_size (null: intermediate_size), hidden_size"
    if rest == "mlp.route_table":
        return "top_k, vocab_size"
    if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return "num_key_value_heads x head_dim, hidden_size"
    if rest.startswith("self_attn."):
        return "num_attention_heads, hidden_size"
    return "vocab_size, hidden_size"


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def fused_route_metadata(table: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's derived top-2 kernel metadata: (pairs int32 [E(E-1)/2, 2], all a < b in
    lexicographic order; codes uint8 [V], pair index | swap bit when slot 0 holds the larger
    expert). Only for k = 2 and 2 <= E <= 8; otherwise both are empty."""
    k, vocab = table.shape
    if k != 2 or not 2 <= num_experts <= 8:
        return torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8)
    pairs = torch.tensor(list(itertools.combinations(range(num_experts), 2)), dtype=torch.int32)
    lo, hi = table.min(0).values, table.max(0).values
    index = torch.full((num_experts, num_experts), -1, dtype=torch.long)
    index[pairs[:, 0].long(), pairs[:, 1].long()] = torch.arange(len(pairs))
    swap = 0x8 if num_experts <= 4 else 0x20
    codes = index[lo, hi] | torch.where(table[0] > table[1], swap, 0)
    return pairs, codes.to(torch.uint8)


_DERIVED_REASONS = {
    "self_attn.rotary_emb.inv_freq": "rotary inv_freq buffer: recomputed from rope_theta and the head size (checked equal)",
    "mlp.engine.fused_route_codes": "upstream's top-2 kernel metadata, derived from the route table (checked equal)",
    "mlp.engine.fused_expert_pairs": "upstream's top-2 kernel metadata, derived from the route table (checked equal)",
}


def _check_derived(
    sd: dict, config: TRHashConfig, tables: dict[int, torch.Tensor], used: set, dropped: list, problems: list
) -> None:
    """Native/hf buffers derived from the config or the table: must agree, then are dropped."""
    for i in range(config.num_hidden_layers):
        for suffix in _DERIVED:
            name = f"layers.{i}.{suffix}"
            if name not in sd:
                continue
            used.add(name)
            dropped.append((name, _DERIVED_REASONS[suffix]))
            t = sd[name]
            if suffix.endswith("inv_freq"):
                want = rope_inv_freq(config.rope_dim, config.rope_theta)
                if t.shape != want.shape or not torch.allclose(t.float(), want, rtol=1e-5, atol=0):
                    problems.append(
                        f"{name} disagrees with rope_theta={config.rope_theta} over the {config.rope_dim} rotated "
                        f"dims of each head (head_dim {config.head_dim} x rope_fraction {config.rope_fraction})"
                    )
            elif i in tables:
                pairs, codes = fused_route_metadata(tables[i], config.num_experts)
                want = pairs if suffix.endswith("pairs") else codes
                if t.shape != want.shape or (want.numel() and not torch.equal(t.long(), want.long())):
                    problems.append(
                        f"{name} does not match layers.{i}'s route table (derived kernel metadata out of step)"
                    )


def _primary_only_table(sd: dict, name: str, config: TRHashConfig, problems: list) -> torch.Tensor | None:
    """The older lineage's `mlp.token_to_expert` [V] (the primary slot) as a [k, V] table whose
    secondaries are (primary + j) mod E, as upstream's converter and vllm-i64 read it."""
    t = sd[name]
    if t.dim() != 1:
        problems.append(f"{name} has shape {list(t.shape)}; the primary-slot table is [vocab_size]")
        return None
    try:
        check_route_table(t.unsqueeze(0), config.num_experts, config.vocab_size, 1, name=name)
    except ValueError as err:
        problems.append(str(err))
        return None
    slots = torch.arange(config.num_experts_per_tok).unsqueeze(1)
    return (t.to(torch.int64).unsqueeze(0) + slots) % config.num_experts


def _map_tensors(
    sd: dict, layout: str, config: TRHashConfig, dropped: list, problems: list, notes: list
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    tables: dict[int, torch.Tensor] = {}
    primary_only: list[int] = []
    narrow: set[str] = set()  # integer dtypes the route tables are stored in
    for neutral, shape in neutral_tensor_shapes(config).items():
        name = layout_name(neutral, layout)
        t = sd.get(name)
        primary = name.replace("topk_token_to_expert", "token_to_expert")
        if t is None and neutral.endswith("route_table") and layout in (DEEP, MLX) and primary in sd:
            used.add(primary)
            t = _primary_only_table(sd, primary, config, problems)
            if t is None:
                continue
            primary_only.append(int(neutral.split(".")[1]))
        if t is None:
            problems.append(f"missing tensor {name} (shape {list(shape)})")
            continue
        used.add(name)
        if tuple(t.shape) != shape:
            problems.append(f"{name} has shape {list(t.shape)}; the config gives {list(shape)} ({_why_shape(neutral)})")
            continue
        if neutral.endswith("route_table"):
            try:
                check_route_table(t, config.num_experts, config.vocab_size, config.num_experts_per_tok, name=name)
            except ValueError as err:
                problems.append(str(err))
                continue
            narrow.add(str(t.dtype).removeprefix("torch."))
            t = t.to(torch.int64)
            tables[int(neutral.split(".")[1])] = t
            if primary in sd and primary not in used:  # the MLX export's copy of row 0
                used.add(primary)
                if not torch.equal(sd[primary].reshape(-1).long(), t[0]):
                    problems.append(f"{primary} is not row 0 (the primary slot) of {name}")
                else:
                    dropped.append(
                        (primary, "row 0 (the primary slot) of the route table, stored again (checked equal)")
                    )
        elif not t.dtype.is_floating_point:
            problems.append(f"{name} has dtype {t.dtype}; weights are floating point")
            continue
        out[neutral] = t
    if narrow - {"int64"}:
        notes.append(f"route tables: stored as {', '.join(sorted(narrow))}, read as int64")
    if primary_only:
        if config.num_experts_per_tok > 1:
            notes.append(
                f"route tables of layer(s) {primary_only}: only {_PRIMARY_ONLY} (the primary slot) is stored, as "
                f"in upstream's older lineage; secondary slot j is (primary + j) mod num_experts, as upstream's "
                "converter and vllm-i64 read it"
            )
        else:
            notes.append(f"route tables of layer(s) {primary_only}: stored as {_PRIMARY_ONLY} (top_k 1: one slot)")
    if layout in (NATIVE, HF):
        _check_derived(sd, config, tables, used, dropped, problems)
    head, embed_name = layout_name("lm_head.weight", layout), layout_name("embed_tokens.weight", layout)
    if config.tie_word_embeddings and head in sd:
        used.add(head)
        embed = sd.get(embed_name)
        if embed is None or not torch.equal(sd[head], embed):
            problems.append(f"{head} differs from {embed_name} but tie_word_embeddings is true")
        else:
            dropped.append((head, "a stored copy of the tied embedding (checked equal)"))
    unexpected = sorted(set(sd) - used)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        problems.append(f"unexpected tensor(s) for this config: {shown}")
    return out


def _table_provenance(config: TRHashConfig, tensors: dict, layout: str, notes: list) -> TRHashConfig:
    """Compare the stored tables with a rebuild (information only: stored tables are kept), and
    recover route_hash_count for a deep multi-hash folder, which does not record it."""
    layers = range(config.num_hidden_layers)

    def rebuilt(i: int, hash_count: int) -> torch.Tensor:
        return build_route_table(
            config.route_strategy,
            vocab_size=config.vocab_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            layer_idx=i,
            route_hash_count=hash_count,
        )

    def stored(i: int) -> torch.Tensor:
        return tensors[f"layers.{i}.mlp.route_table"]

    try:
        if config.route_strategy == "multi_hash" and config.route_hash_count is None:
            found = [c for c in ROUTE_HASH_COUNTS if torch.equal(rebuilt(0, c), stored(0))]
            if found and all(torch.equal(rebuilt(i, found[0]), stored(i)) for i in layers):
                notes.append(
                    f"route_hash_count: not recorded by the {layout} layout; {found[0]} rebuilds every stored table"
                )
                return _replace(config, route_hash_count=found[0])
            notes.append(
                f"route_hash_count: not recorded by the {layout} layout and no count in 2..8 rebuilds the stored tables"
            )
            return config
        differ = [i for i in layers if not torch.equal(rebuilt(i, config.route_hash_count or 2), stored(i))]
    except ValueError as err:
        notes.append(f"route tables: {config.route_strategy} cannot rebuild them here ({err}); kept as stored")
        return config
    if differ:
        notes.append(
            f"route tables of layer(s) {differ} differ from a rebuild with {config.route_strategy} "
            "(stored tables are authoritative and kept as stored)"
        )
    else:
        notes.append(f"route tables: every layer equals a rebuild with {config.route_strategy} (kept as stored)")
    return config


def _replace(config: TRHashConfig, **changes) -> TRHashConfig:
    return TRHashConfig(**{**config.to_dict(), **changes})


def read_trhash(src) -> TRHashCheckpoint:
    """Read an upstream TR-Hash folder in any of the four layouts; `UpstreamFormatError` listing
    every problem (not a TR-Hash layout, missing or misshapen tensors, unsupported or garbage
    config fields) otherwise."""
    src = Path(src)
    if not src.is_dir():
        raise UpstreamFormatError(
            src, ["not a folder (expected a checkpoint folder with config.json and model.safetensors)"]
        )
    problems: list[str] = []
    raw = read_config_json(src, problems)
    weights = find_weights(src)
    if not weights:
        problems.append(f"no weights: none of {', '.join(WEIGHT_FILES)}")
    found = trhash_layout(raw, peek_tensor_names(src)) if raw is not None else None
    if raw is not None and found is None:
        problems.append(
            f"config.json has model_type {raw.get('model_type')!r} and mlp_type {raw.get('mlp_type')!r}: none of the "
            "TR-Hash layouts (native: no model_type and mlp_type 'tr_hash_engine'; hf: model_type 'tr_hash_moe'; "
            "deep: model_type 'deep'; mlx: model_type 'complexity' with upstream's routing_strategy/top_k fields "
            "or mlp.topk_token_to_expert tables)"
        )
    if problems:
        raise UpstreamFormatError(src, problems)
    layout, why = found
    notes = [f"layout {layout}: {why}"]
    dropped: list[tuple[str, str]] = []
    fields = _resolve_config(raw, layout, notes, problems)
    if fields is None:
        raise UpstreamFormatError(src, problems)
    config = TRHashConfig(**fields)
    read_notes: list[str] = []
    sd = read_weights(weights[0], read_notes)
    tensors = _map_tensors(sd, layout, config, dropped, problems, read_notes)
    if problems:
        raise UpstreamFormatError(src, problems)
    notes += read_notes
    if len(weights) > 1:
        notes.append(
            f"weights read from {weights[0].name} (also present, not read: {', '.join(p.name for p in weights[1:])})"
        )
    if layout == HF:
        adapters = [n for n in ("configuration_tr_hash_moe.py", "modeling_tr_hash_moe.py") if (src / n).is_file()]
        if adapters:
            notes.append(f"upstream's adapter modules {', '.join(adapters)} are present and not used (no code is run)")
    config = _table_provenance(config, tensors, layout, notes)
    return TRHashCheckpoint(layout, src, weights[0], raw, config, tensors, notes, dropped)


# ----------------------------------------------------------------------------- our model


def complexity_config(config: TRHashConfig) -> ComplexityConfig:
    """The `hash_routed` ComplexityConfig computing what `config` computes. Every field is
    written out, upstream's resolved nulls included, so no reader has to know upstream's defaults."""
    return ComplexityConfig(
        partial_rotary_factor=config.rope_fraction,
        attention_multiplier=config.attention_multiplier,
        logits_scaling=config.logits_scaling,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.num_experts * config.expert_width,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        qk_norm_eps=None if config.qk_norm_eps == config.rms_norm_eps else config.qk_norm_eps,
        rope_theta=config.rope_theta,
        use_qk_norm=config.use_qk_norm,
        tie_word_embeddings=config.tie_word_embeddings,
        mlp_type="hash_routed",
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        shared_expert=config.shared_expert,
        shared_expert_intermediate_size=config.shared_expert_width,
        route_strategy=config.route_strategy,
        route_hash_count=config.route_hash_count or 2,  # builds only a fresh model's tables; these are loaded
        route_primary_weight=config.route_primary_weight,
        shared_output_scale=config.shared_output_scale,
        routed_output_scale=config.routed_output_scale,
        shared_output_scale_first_layer=config.shared_output_scale_first_layer,
        shared_output_scale_last_layer=config.shared_output_scale_last_layer,
        routed_output_scale_first_layer=config.routed_output_scale_first_layer,
        routed_output_scale_last_layer=config.routed_output_scale_last_layer,
        mu_mode="none",
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def trhash_config(config: ComplexityConfig) -> TRHashConfig:
    """The neutral description of one of our `hash_routed` models, for an upstream export;
    ValueError naming the field for anything upstream's format cannot say."""
    c = config
    refusals = [
        (
            c.mlp_type != "hash_routed",
            "mlp_type",
            f"is {c.mlp_type!r}; only hash_routed models have an upstream TR-Hash form",
        ),
        (c.mu_mode != "none", "mu_mode", f"is {c.mu_mode!r}; TR-Hash has no mu"),
        (c.sliding_window is not None, "sliding_window", "is set; upstream applies a window only to long prefills"),
        (
            c.head_dim * c.num_attention_heads != c.hidden_size,
            "head_dim",
            f"{c.head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}; upstream derives head_dim",
        ),
        (
            c.use_qk_norm and (c.qk_norm_eps if c.qk_norm_eps is not None else c.rms_norm_eps) != QK_NORM_EPS,
            "qk_norm_eps",
            f"upstream's QK-norm epsilon is fixed at {QK_NORM_EPS}",
        ),
    ]
    for bad, name, why in refusals:
        if bad:
            raise ValueError(f"{name}: {why}")
    return TRHashConfig(
        **_knobs_of(c),
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        expert_width=c.expert_width,
        shared_expert_width=c.shared_expert_width if c.shared_expert else None,
        route_strategy=c.route_strategy,
        route_hash_count=c.route_hash_count if c.route_strategy == "multi_hash" else None,
        route_primary_weight=slot_weights(c.num_experts_per_tok, c.route_primary_weight)[0],
        shared_output_scale=float(c.shared_output_scale),
        routed_output_scale=float(c.routed_output_scale),
        shared_output_scale_first_layer=c.shared_output_scale_first_layer,
        shared_output_scale_last_layer=c.shared_output_scale_last_layer,
        routed_output_scale_first_layer=c.routed_output_scale_first_layer,
        routed_output_scale_last_layer=c.routed_output_scale_last_layer,
        rope_theta=float(c.rope_theta),
        max_position_embeddings=c.max_position_embeddings,
        use_qk_norm=c.use_qk_norm,
        rms_norm_eps=float(c.rms_norm_eps),
        qk_norm_eps=QK_NORM_EPS,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def _knobs_of(c: ComplexityConfig) -> dict:
    """Our RoPE fraction and µP knobs as the neutral fields (each maps to one upstream field);
    ValueError naming our field for a value upstream's format cannot state."""
    fraction = float(c.partial_rotary_factor)
    multiplier = c.attention_multiplier
    scaling = float(c.logits_scaling)
    if multiplier is not None and float(multiplier) == c.head_dim**-0.5:
        multiplier = None  # the default scale, written out
    if multiplier is not None and float(multiplier) != 1.0 / c.head_dim:
        raise ValueError(
            f"attention_multiplier: {multiplier} is neither 1/head_dim (upstream's use_mup_attn_scale) nor "
            "head_dim**-0.5, the two scales upstream's format can state"
        )
    if scaling != 1.0:
        base = round(c.hidden_size / scaling) if scaling > 0 else 0
        if base < 1 or c.hidden_size / base != scaling:
            raise ValueError(
                f"logits_scaling: {scaling} is not hidden_size / an integer width, which is all upstream's "
                "use_mup_output_mult with mup_base_width can state"
            )
    return {
        "rope_fraction": fraction,
        "attention_multiplier": None if multiplier is None else float(multiplier),
        "logits_scaling": scaling,
    }


_GATE, _UP, _DOWN, _FUSED = "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down", "mlp.experts.gate_up_proj"


def _ours(neutral: str) -> str:
    return neutral if neutral == "lm_head.weight" else f"model.{neutral}"


class TRHashStateDictAdapter:
    """Neutral TR-Hash tensor names <-> ours. The one difference beyond the `model.` prefix: our
    experts store gate and up as one tensor, `experts.gate_up_proj [E, H, 2W]` (gate first), and
    `experts.down_proj`; the layouts' renames are `layout_name`'s."""

    def __init__(self, config: TRHashConfig, dropped: list[tuple[str, str]] = ()):
        self.config = config
        self.dropped = list(dropped)

    def to_complexity(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if name.endswith((_GATE, _UP)):
                if name.endswith(_GATE):
                    prefix = name.removesuffix(_GATE)
                    out[_ours(prefix + _FUSED)] = torch.cat([t, tensors[prefix + _UP]], dim=-1)
            elif name.endswith(_DOWN):
                out[_ours(name + "_proj")] = t
            else:
                out[_ours(name)] = t
        return out

    def from_complexity(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> the neutral tensors (a tied lm_head is left out)."""
        out = {}
        for name in neutral_tensor_shapes(self.config):
            if name.endswith(_UP):
                continue
            if name.endswith(_GATE):
                prefix = name.removesuffix(_GATE)
                out[name], out[prefix + _UP] = state_dict[_ours(prefix + _FUSED)].chunk(2, dim=-1)
            elif name.endswith(_DOWN):
                out[name] = state_dict[_ours(name + "_proj")]
            else:
                out[name] = state_dict[_ours(name)]
        return {k: v.contiguous() for k, v in out.items()}


__all__ = [
    "DEEP",
    "HF",
    "NATIVE",
    "UPSTREAM_STRATEGY",
    "TRHashCheckpoint",
    "TRHashConfig",
    "TRHashStateDictAdapter",
    "complexity_config",
    "fused_route_metadata",
    "layout_name",
    "neutral_tensor_shapes",
    "read_trhash",
    "rope_inv_freq",
    "trhash_config",
    "trhash_layout",
]
