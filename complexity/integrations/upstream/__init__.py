"""Load checkpoints written by upstream complexity-deep, exactly, and convert them to our format.

    >>> from complexity.integrations.upstream import convert_upstream
    >>> report = convert_upstream("pacific-prime/", "pacific-prime-hf/")
    >>> print(report)

The package, in the order a conversion runs (docs/architecture.md §6 describes the layouts,
docs/convert.md the command):

- `readers`  config.json and the weights: safetensors (single or sharded), ``.pt`` /
             ``pytorch_model.bin`` read with ``weights_only=True``, training-checkpoint wrappers.
- `formats`  the upstream designs by name, and `UpstreamFormatError`.
- `keys`     the key adapter, the only place that knows upstream tensor names: design detection
             from the names, the mapping both ways (`UpstreamStateDictAdapter`), why each
             dropped key is unused, and what the weights say about the config.
- `config`   upstream config.json fields -> `ComplexityConfig` arguments.
- `detect`   `detect_upstream`: the short checks, in order, collecting every problem.
- `convert`  `load_upstream`, `inspect_upstream`, `convert_upstream`: build the model, write the
             folder atomically, load it back and compare.

Another upstream format is added beside these: its name in `formats`, a key adapter and config
translation of its own (new modules when its names have nothing in common with these), and a
branch in `detect`; `readers` and `convert` serve every format unchanged.
"""

from .convert import ConversionReport, convert_upstream, inspect_upstream, load_upstream
from .detect import UpstreamCheckpoint, detect_upstream
from .formats import DESIGNS, INL, MU_GUIDANCE, UpstreamFormatError
from .keys import UpstreamStateDictAdapter, detect_design, normalize_keys

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
