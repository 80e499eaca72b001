"""Upstream's TR-Hash MoE checkpoints: the four on-disk layouts, read into one neutral description,
mapped onto our model, and written back as the deep layout.

TR-Hash is a Llama-style GQA + QK-norm decoder whose MLP sends each token to the top-k experts of
a persisted per-layer route table over token ids, with fixed slot weights, a shared expert and
fixed branch scales: our `hash_routed` MLP (docs/architecture.md §2e; `complexity.hash_routing`
has the maths). The modules, in the order a conversion runs:

- `description`  `TRHashConfig`, whose every field has this project's meaning; the tensors'
                 neutral names and shapes (`neutral_tensor_shapes`) and each layout's names for
                 them (`layout_name`).
- `layouts`      `trhash_layout`: which layout config.json (and, for the MLX layout, whose
                 model_type is ours, the tensor names) says; `detect.detect_upstream` asks it first.
- `fields`       config.json -> `TRHashConfig` fields: upstream's nulls resolved as its training
                 framework reads them, unknown or unsupported fields refused by name.
- `tensors`      the stored tensors under the neutral names, derived buffers checked and dropped,
                 the tables compared with a rebuild.
- `read`         `read_trhash`: a folder -> a validated `TRHashCheckpoint`.
- `ours`         `complexity_config` / `trhash_config` and `TRHashStateDictAdapter`: the neutral
                 description <-> our `hash_routed` config and tensors.
- `export`       `write_deep` / `export_deep`: the deep layout again.

Everything is read from the config and the tensors; route tables are copied, never rebuilt (three
of the four builders depend on torch's RNG).
"""

from .description import (
    DEEP,
    DESIGN_OF_LAYOUT,
    HF,
    MLX,
    NATIVE,
    UPSTREAM_STRATEGY,
    TRHashCheckpoint,
    TRHashConfig,
    layout_name,
    neutral_tensor_shapes,
)
from .export import deep_config, export_deep, write_deep
from .layouts import trhash_layout
from .ours import TRHashStateDictAdapter, complexity_config, trhash_config
from .read import read_trhash
from .tensors import fused_route_metadata

__all__ = [
    "DEEP",
    "DESIGN_OF_LAYOUT",
    "HF",
    "MLX",
    "NATIVE",
    "UPSTREAM_STRATEGY",
    "TRHashCheckpoint",
    "TRHashConfig",
    "TRHashStateDictAdapter",
    "complexity_config",
    "deep_config",
    "export_deep",
    "fused_route_metadata",
    "layout_name",
    "neutral_tensor_shapes",
    "read_trhash",
    "trhash_config",
    "trhash_layout",
    "write_deep",
]
