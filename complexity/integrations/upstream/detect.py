"""Detection: read an upstream checkpoint folder, decide its design, validate it, in short checks.

Each check appends what it finds to one list of problems, so a bad source is refused with every
problem named at once (`UpstreamFormatError`), before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...configuration_complexity import ComplexityConfig
from .config import is_our_own_config, translate_config
from .formats import DESIGNS, TRHASH_DESIGNS, UpstreamFormatError
from .keys import UpstreamStateDictAdapter, WeightStructure, detect_design, normalize_keys, reconcile_with_weights
from .readers import WEIGHT_FILES, find_weights, peek_tensor_names, read_config_json, read_weights
from .trhash import (
    DESIGN_OF_LAYOUT,
    TRHashCheckpoint,
    TRHashStateDictAdapter,
    complexity_config,
    read_trhash,
    trhash_layout,
)


@dataclass
class UpstreamCheckpoint:
    """A validated upstream checkpoint: which design (for TR-Hash: which layout), its config
    (upstream's and ours) and its state dict under canonical upstream names (wrappers, stray
    prefixes and old names removed; TR-Hash: the neutral names of `trhash.neutral_tensor_shapes`).
    `notes[0]` says what was detected and why."""

    design: str
    src: Path
    weights_file: Path
    upstream_config: dict
    config: ComplexityConfig
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    ignored_config_fields: list[str] = field(default_factory=list)
    trhash: TRHashCheckpoint | None = None  # the neutral TR-Hash description, for TR-Hash designs

    @property
    def description(self) -> str:
        return DESIGNS[self.design]

    def adapter(self):
        """The state-dict adapter of this design: `to_complexity(state_dict)`, `dropped`."""
        if self.design in TRHASH_DESIGNS:
            return TRHashStateDictAdapter(self.trhash.config, self.trhash.dropped)
        return UpstreamStateDictAdapter(self.design, self.config)


def detect_upstream(src) -> UpstreamCheckpoint:
    """Read and validate an upstream checkpoint folder; raise `UpstreamFormatError` listing every
    problem (not a checkpoint, unknown/missing keys, shape mismatches, contradicting config).

    One path for every upstream format: a TR-Hash layout is told by config.json (which names it;
    the MLX export, whose model_type is ours, also by its table names), a complexity-deep design
    by its tensor names (its configs do not tell the designs apart)."""
    src = Path(src)
    notes: list[str] = []
    raw = _config_if_readable(src)
    if raw is not None and trhash_layout(raw, peek_tensor_names(src)) is not None:
        return _trhash_checkpoint(read_trhash(src))
    ucfg, weights_file = _read_folder(src, notes)
    sd, problems = normalize_keys(read_weights(weights_file, notes))
    design = _design_of(sd, weights_file, problems, notes, src)

    ignored: list[str] = []
    kwargs = translate_config(ucfg, design, WeightStructure.of(sd), problems, ignored)
    if kwargs is None:
        raise UpstreamFormatError(src, problems)
    reconcile_with_weights(kwargs, sd, problems, notes)
    config = _build_config(kwargs, problems, src)
    problems += UpstreamStateDictAdapter(design, config).layout_problems(sd)
    if problems:
        raise UpstreamFormatError(src, problems)
    return UpstreamCheckpoint(design, src, weights_file, ucfg, config, sd, notes, ignored)


def _config_if_readable(src: Path) -> dict | None:
    """SRC/config.json when it is a readable JSON object (the checks below report the rest)."""
    problems: list[str] = []
    return read_config_json(src, problems) if src.is_dir() else None


def _trhash_checkpoint(ckpt: TRHashCheckpoint) -> UpstreamCheckpoint:
    design = DESIGN_OF_LAYOUT[ckpt.layout]
    try:
        config = complexity_config(ckpt.config)
    except ValueError as err:  # a combination our hash_routed model cannot build (named by the field)
        raise UpstreamFormatError(ckpt.src, [f"config.json translates to an invalid Complexity config: {err}"]) from err
    notes = [f"{DESIGNS[design]} — from {ckpt.notes[0].split(': ', 1)[1]}", *ckpt.notes[1:]]
    return UpstreamCheckpoint(
        design, ckpt.src, ckpt.weights_file, ckpt.raw_config, config, ckpt.tensors, notes, trhash=ckpt
    )


def _read_folder(src: Path, notes: list[str]) -> tuple[dict, Path]:
    """(upstream config.json, the weights file to read): a folder with both, not one of ours."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder")
    if not src.is_dir():
        raise UpstreamFormatError(
            src, ["SRC must be a checkpoint folder (config.json + model.safetensors or model.pt)"]
        )
    problems: list[str] = []
    ucfg = read_config_json(src, problems)
    found = find_weights(src)
    if not found:
        problems.append(f"no weights: none of {', '.join(WEIGHT_FILES)}")
    if ucfg is not None and is_our_own_config(ucfg):
        problems.append(
            "config.json is this project's own format (mlp_type/mu_mode...): load it directly, no conversion needed"
        )
    if problems:
        raise UpstreamFormatError(src, problems)
    if len(found) > 1:
        notes.append(
            f"weights read from {found[0].name} (also present, not read: {', '.join(p.name for p in found[1:])})"
        )
    return ucfg, found[0]


def _design_of(sd: dict, weights_file: Path, problems: list[str], notes: list[str], src: Path) -> str:
    """The design the key names show; the first note says which and why."""
    design, why = detect_design(sd)
    if design is None:
        sample = ", ".join(list(sd)[:6])
        problems.append(f"{weights_file.name}: not an upstream complexity-deep checkpoint: {why}; first keys: {sample}")
        raise UpstreamFormatError(src, problems)
    notes.insert(0, f"{DESIGNS[design]} — from {why}")
    return design


def _build_config(kwargs: dict, problems: list[str], src: Path) -> ComplexityConfig:
    try:
        return ComplexityConfig(**kwargs)
    except (ValueError, TypeError) as err:
        problems.append(f"config.json translates to an invalid Complexity config: {err}")
        raise UpstreamFormatError(src, problems) from err
