"""Load checkpoints written by upstream (complexity-deep 0.13 and 1.0, TR-Hash MoE in its native,
hf, deep and MLX layouts), exactly, and convert them to our format; write TR-Hash's deep export back.

    >>> from complexity.integrations.upstream import convert_upstream, export_deep
    >>> report = convert_upstream("pacific-prime/", "pacific-prime-hf/")
    >>> print(report)
    >>> export_deep("trhash-hf-ours/", "trhash-deep/")     # for upstream's vLLM engine

The package, in the order a conversion runs (docs/architecture.md §6 and §2e describe the
layouts, docs/convert.md the command):

- `readers`  config.json and the weights: safetensors (single or sharded), ``.pt`` /
             ``pytorch_model.bin`` read with ``weights_only=True``, training-checkpoint wrappers.
- `formats`  the upstream designs by name, and `UpstreamFormatError`.
- `keys`     the key adapter, the only place that knows upstream tensor names: design detection
             from the names, the mapping both ways (`UpstreamStateDictAdapter`), why each
             dropped key is unused, and what the weights say about the config.
- `config`   upstream config.json fields -> `ComplexityConfig` arguments.
- `trhash/`  TR-Hash MoE, a package of its own: its four layouts, told apart by config.json (and
             the MLX layout, whose model_type is ours, by its table names), read into one neutral
             description (`read_trhash`), mapped onto our `hash_routed` model and back, and
             written again as the deep layout (`export_deep`, for upstream's vLLM engine).
- `detect`   `detect_upstream`: one detection path for every format (it names the design or the
             layout found and why), the short checks, in order, collecting every problem.
- `convert`  `load_upstream`, `inspect_upstream`, `convert_upstream`: build the model, write the
             folder atomically, load it back and compare.

Another upstream format is added beside these: its name in `formats`, a key adapter and config
translation of its own (new modules when its names have nothing in common with these), and a
branch in `detect`; `readers` and `convert` serve every format unchanged.
"""

from .convert import ConversionReport, convert_upstream, inspect_upstream, load_upstream
from .detect import UpstreamCheckpoint, detect_upstream
from .formats import (
    DESIGNS,
    INL,
    MU_GUIDANCE,
    TRHASH_DEEP,
    TRHASH_HF,
    TRHASH_MLX,
    TRHASH_NATIVE,
    UpstreamFormatError,
)
from .keys import UpstreamStateDictAdapter, detect_design, normalize_keys
from .trhash import TRHashStateDictAdapter, export_deep, read_trhash, write_deep

__all__ = [
    "DESIGNS",
    "INL",
    "MU_GUIDANCE",
    "TRHASH_DEEP",
    "TRHASH_HF",
    "TRHASH_MLX",
    "TRHASH_NATIVE",
    "ConversionReport",
    "TRHashStateDictAdapter",
    "UpstreamCheckpoint",
    "UpstreamFormatError",
    "UpstreamStateDictAdapter",
    "convert_upstream",
    "detect_design",
    "detect_upstream",
    "export_deep",
    "inspect_upstream",
    "load_upstream",
    "normalize_keys",
    "read_trhash",
    "write_deep",
]
