"""`read_trhash`: a TR-Hash folder in any of its four layouts -> a validated `TRHashCheckpoint`."""

from __future__ import annotations

from pathlib import Path

from ..formats import UpstreamFormatError
from ..readers import WEIGHT_FILES, find_weights, peek_tensor_names, read_config_json, read_weights
from .description import HF, TRHashCheckpoint, TRHashConfig
from .fields import resolve_config
from .layouts import trhash_layout
from .tensors import map_tensors, table_provenance


def read_trhash(src) -> TRHashCheckpoint:
    """Read an upstream TR-Hash folder in any of the four layouts; `UpstreamFormatError` listing
    every problem (not a TR-Hash layout, missing or misshapen tensors, unsupported or garbage
    config fields) otherwise."""
    src = Path(src)
    raw, weights, layout, why = _open(src)
    problems: list[str] = []
    notes = [f"layout {layout}: {why}"]
    dropped: list[tuple[str, str]] = []
    fields = resolve_config(raw, layout, notes, problems)
    if fields is None:
        raise UpstreamFormatError(src, problems)
    config = TRHashConfig(**fields)
    read_notes: list[str] = []
    sd = read_weights(weights[0], read_notes)
    tensors = map_tensors(sd, layout, config, dropped, problems, read_notes)
    if problems:
        raise UpstreamFormatError(src, problems)
    notes += read_notes
    _note_files_not_read(src, layout, weights, notes)
    config = table_provenance(config, tensors, layout, notes)
    return TRHashCheckpoint(layout, src, weights[0], raw, config, tensors, notes, dropped)


def _open(src: Path) -> tuple[dict, list[Path], str, str]:
    """(config.json, the weight files, the layout, why) of a TR-Hash folder; `UpstreamFormatError`
    naming every problem when it is not one."""
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
    return raw, weights, *found


def _note_files_not_read(src: Path, layout: str, weights: list[Path], notes: list[str]) -> None:
    """Further weight files, and the hf bundle's adapter modules: present, and never read or run."""
    if len(weights) > 1:
        notes.append(
            f"weights read from {weights[0].name} (also present, not read: {', '.join(p.name for p in weights[1:])})"
        )
    if layout == HF:
        adapters = [n for n in ("configuration_tr_hash_moe.py", "modeling_tr_hash_moe.py") if (src / n).is_file()]
        if adapters:
            notes.append(f"upstream's adapter modules {', '.join(adapters)} are present and not used (no code is run)")
