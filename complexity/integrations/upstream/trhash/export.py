"""Writing upstream's TR-Hash "deep" export (the layout upstream's vLLM engine, vllm-i64, serves),
from a neutral description (`write_deep`) or from a folder: one of our `hash_routed` models or any
TR-Hash layout (`export_deep`).

The deep layout records less than the model: one scale per branch for every layer, no
route_hash_count, no sliding window, no RoPE fraction, no µP flags (upstream's exporter drops them
silently). What it cannot say is refused by name rather than written wrong. Unlike upstream's own
exporter, the primary weight and the shared width are always numbers (never null, which
upstream's runtimes read differently), and `generation_config.json` holds only the token ids:
never a sampling default, never the architectural top_k.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ....data.files import check_output_folder, new_folder
from ..readers import TOKENIZER_FILES, peek_tensor_names, read_config_json
from .description import DEEP, UPSTREAM_STRATEGY, TRHashConfig, layout_name, neutral_tensor_shapes
from .layouts import trhash_layout
from .ours import TRHashStateDictAdapter, trhash_config
from .read import read_trhash

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _constant_scale(config: TRHashConfig, branch: str) -> float:
    """The single scale the deep layout can hold for `branch`; refuses scales that vary by layer."""
    scale = config.shared_scale if branch == "shared" else config.routed_scale
    values = [scale(i) for i in range(config.num_hidden_layers)]
    if any(v != values[0] for v in values):
        raise ValueError(
            f"{branch}_output_scale_first_layer/_last_layer: the scale varies over layers ({values[0]} to {values[-1]}), "
            "which the deep layout cannot record (its consumer, vllm-i64, applies one scale to every layer)"
        )
    return values[0]


# Neutral fields upstream's deep export drops: (the default it is then read as, our field, upstream's).
_NOT_RECORDED = {
    "rope_fraction": (1.0, "partial_rotary_factor", "rope_fraction"),
    "attention_multiplier": (None, "attention_multiplier", "use_mup_attn_scale"),
    "logits_scaling": (1.0, "logits_scaling", "use_mup_output_mult"),
}


def _check_recordable(config: TRHashConfig) -> None:
    for neutral, (default, ours, upstream) in _NOT_RECORDED.items():
        value = getattr(config, neutral)
        if value != default:
            raise ValueError(
                f"{ours}: {value!r} (upstream's {upstream}) cannot be recorded in the deep layout: upstream's "
                "deep export drops the field, and its consumer, vllm-i64, would compute without it"
            )


def deep_config(config: TRHashConfig, dtype: torch.dtype) -> dict:
    """config.json of the deep export. Unlike upstream's exporter, the primary weight and the
    shared width are always written as numbers, so no reader has to guess what null means."""
    name = {v: k for k, v in _DTYPES.items()}[dtype]
    _check_recordable(config)
    return {
        "architectures": ["DeepForCausalLM"],
        "model_type": "deep",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.expert_width * config.num_experts,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_type": "gqa",
        "use_qk_norm": config.use_qk_norm,
        "rope_theta": config.rope_theta,
        "mlp_type": "token_routed",
        "num_experts": config.num_experts,
        "shared_expert": config.shared_expert,
        "shared_intermediate_size": config.shared_expert_width,
        "use_shared_routed_gates": False,
        "shared_gate_init": 1.0,
        "routed_gate_init": 1.0,
        "shared_output_scale": _constant_scale(config, "shared"),
        "routed_output_scale": _constant_scale(config, "routed"),
        "top_k": config.num_experts_per_tok,
        "top_k_primary_weight": config.route_primary_weight,
        "routing_strategy": UPSTREAM_STRATEGY[config.route_strategy],
        "learn_hash_channel_modulation": False,
        "hash_channel_scale_init": 0.0,
        "norm_type": "rmsnorm",
        "norm_eps": config.rms_norm_eps,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": name,
        "source_mlp_type": "tr_hash_engine",
    }


def write_deep(
    config: TRHashConfig,
    tensors: dict[str, torch.Tensor],
    dst,
    *,
    dtype="bfloat16",
    overwrite: bool = False,
    extra_files: tuple[Path, ...] = (),
    verify=None,
) -> Path:
    """Write the deep export (upstream's vLLM / TR-Hash-i64 layout) of a neutral description.

    Floats are cast to `dtype` ("float32", "bfloat16" (upstream's default) or "float16"); route
    tables stay int64. Reading the folder back gives the same config and, at the source's dtype,
    the same tensors. DST is written beside itself and renamed at the end (a failure leaves no
    partial folder); a non-empty DST is refused unless `overwrite`. `generation_config.json`
    holds only the token ids: no sampling defaults, and never the architectural top_k.
    `extra_files` (e.g. the tokenizer's) are copied in beside the weights; `verify(folder)` may
    check the written folder before it is renamed to DST.
    Not expressible in this layout, and refused by name: branch scales that vary over layers, a
    RoPE fraction, µP attention or output scaling. Note that vllm-i64 ignores `lm_head.weight`
    (it serves tied models only).
    """
    dst = Path(dst)
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype: must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if config.route_strategy not in UPSTREAM_STRATEGY:
        raise ValueError(f"route_strategy: {config.route_strategy!r} has no upstream name")
    cfg = deep_config(config, dtype)
    _check_tensors(config, tensors)
    check_output_folder(dst, replace=overwrite, how_to_replace="overwrite=True / --overwrite")
    weights = {
        layout_name(neutral, DEEP): (t.to(torch.int64) if neutral.endswith("route_table") else t.to(dtype)).contiguous()
        for neutral, t in tensors.items()
    }
    generation = {
        k: getattr(config, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, k) is not None
    }
    _write_folder(dst, {"config.json": cfg, "generation_config.json": generation}, weights, extra_files, verify)
    return dst


def _check_tensors(config: TRHashConfig, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming every tensor missing, unexpected or misshapen for `config`."""
    shapes = neutral_tensor_shapes(config)
    problems = [f"missing tensor {k}" for k in shapes if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in shapes]
    problems += [
        f"{k} has shape {list(v.shape)}, expected {list(shapes[k])}"
        for k, v in tensors.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    if problems:
        raise ValueError("write_deep: tensors do not match the config: " + "; ".join(problems))


def _write_folder(dst: Path, json_files: dict[str, dict], weights: dict, extra_files, verify=None) -> None:
    """DST with these files, written in a temporary folder beside it, checked by `verify(folder)`
    if given, and renamed to DST at the end: a failure leaves no partial folder and the old DST
    in place."""
    from safetensors.torch import save_file

    with new_folder(dst) as tmp:
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for path in extra_files:
            shutil.copy2(path, tmp / Path(path).name)
        if verify is not None:
            verify(tmp)


def export_deep(src, dst, *, dtype="bfloat16", overwrite: bool = False) -> Path:
    """Write the deep export of SRC to DST: one of our `hash_routed` checkpoint folders (every file
    checked first, `complexity.checkpoint_folder`) or an upstream TR-Hash folder in any of its
    four layouts.
    The written folder is read back and compared with what was meant (at `dtype`) before it is
    renamed to DST; on a mismatch nothing is written. ValueError naming the field for a model the deep layout
    cannot describe (another MLP, mu, a sliding window, per-layer branch scales, partial RoPE, µP
    scales, a QK-norm epsilon other than upstream's fixed 1e-6)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: DST must differ from SRC")
    # before the weights are read
    check_output_folder(dst, replace=overwrite, how_to_replace="overwrite=True / --overwrite")
    raw = read_config_json(src, []) if src.is_dir() else None
    if raw is not None and trhash_layout(raw, peek_tensor_names(src)) is not None:
        ckpt = read_trhash(src)
        config, tensors = ckpt.config, ckpt.tensors
    else:
        config, tensors = _ours(src, raw)
    tokenizer = tuple(src / n for n in TOKENIZER_FILES if (src / n).is_file())
    cast = _DTYPES.get(dtype, dtype)

    def reads_back_as_written(folder: Path) -> None:
        back = read_trhash(folder)
        differ = [
            k
            for k, t in tensors.items()
            if not torch.equal(back.tensors[k], t if k.endswith("route_table") else t.to(cast))
        ]
        if differ or back.config != _with_recorded_fields(config, back.config):
            raise RuntimeError(f"{dst}: the deep export does not read back as written (tensors {differ}); not written")

    return write_deep(
        config, tensors, dst, dtype=dtype, overwrite=overwrite, extra_files=tokenizer, verify=reads_back_as_written
    )


def _ours(src: Path, raw: dict | None) -> tuple[TRHashConfig, dict[str, torch.Tensor]]:
    """The neutral description of one of our hash_routed folders, its config checked before its
    weights are read."""
    from ....checkpoint_folder import UPSTREAM_DEEP, load_checkpoint_folder, read_checkpoint_config, upstream_kind

    if raw is not None and upstream_kind(raw) == UPSTREAM_DEEP:
        # its token-routed MLP has no TR-Hash form, converted or not: say so, not "convert it first"
        raise ValueError(f"{src}: {UPSTREAM_DEEP} (token-routed); only TR-Hash (hash_routed) models have a deep export")
    try:
        deep_config(trhash_config(read_checkpoint_config(src)), torch.float32)  # what it cannot say
    except ValueError as err:
        raise ValueError(f"{src / 'config.json'}: {err}") from None
    model, _ = load_checkpoint_folder(src, dtype=None, tokenizer=False)
    config = trhash_config(model.config)
    return config, TRHashStateDictAdapter(config).from_complexity(model.state_dict())


def _with_recorded_fields(config: TRHashConfig, back: TRHashConfig) -> TRHashConfig:
    """`config` as the deep layout records it: one scale per branch (the per-layer forms, when
    constant over the layers, become that constant), route_hash_count recovered from the tables."""
    scales = {f"{b}_output_scale{end}": None for b in ("shared", "routed") for end in ("_first_layer", "_last_layer")}
    scales |= {
        "shared_output_scale": _constant_scale(config, "shared"),
        "routed_output_scale": _constant_scale(config, "routed"),
    }
    return dataclasses.replace(config, **scales, route_hash_count=back.route_hash_count)
