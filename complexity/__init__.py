"""Complexity: token-routed MLP, mu guidance and INL dynamics as a Hugging Face-native model.

Importing the package registers the model type with transformers' Auto classes, so
`AutoConfig` / `AutoModelForCausalLM` resolve "complexity" without `trust_remote_code`.

The one exception is the `complexity` command's own process: registering needs transformers,
and so torch (seconds to import), which `complexity --help` has no use for. There the command
registers once it has parsed its arguments (`complexity.cli.main`). The public names below are
imported on first use (PEP 562), as transformers and vLLM do for theirs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the submodule defining it.
_EXPORTS = {
    "PRESETS": "configuration_complexity",
    "ComplexityConfig": "configuration_complexity",
    "ComplexityForCausalLM": "modeling_complexity",
    "ComplexityModel": "modeling_complexity",
    "default_routing_table": "modeling_complexity",
    "ParameterCount": "params",
    "count_parameters": "params",
}

if TYPE_CHECKING:
    from .configuration_complexity import PRESETS, ComplexityConfig
    from .modeling_complexity import ComplexityForCausalLM, ComplexityModel, default_routing_table
    from .params import ParameterCount, count_parameters


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def register_auto_classes() -> None:
    """Register "complexity" with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent).

    Also makes `save_pretrained` copy the two self-contained model files next to the weights and
    write `auto_map`, so a saved folder loads with trust_remote_code where this package is absent.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_complexity import ComplexityConfig
    from .modeling_complexity import ComplexityForCausalLM, ComplexityModel

    AutoConfig.register("complexity", ComplexityConfig, exist_ok=True)
    AutoModel.register(ComplexityConfig, ComplexityModel, exist_ok=True)
    AutoModelForCausalLM.register(ComplexityConfig, ComplexityForCausalLM, exist_ok=True)
    ComplexityConfig.register_for_auto_class()
    ComplexityForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def create_complexity_model(preset: str, routing_table=None, **overrides) -> ComplexityForCausalLM:
    """A freshly initialised model from a preset (docs/architecture.md §5), e.g.
    `create_complexity_model("tiny", mu_mode="guidance", vocab_size=1000)`."""
    from .configuration_complexity import ComplexityConfig
    from .modeling_complexity import ComplexityForCausalLM

    model = ComplexityForCausalLM(ComplexityConfig.from_preset(preset, **overrides))
    if routing_table is not None:
        model.set_routing_table(routing_table)
    return model


def _is_the_complexity_command() -> bool:
    """True when this process is the `complexity` console script (its `__main__` is that script),
    which imports this package before it parses `--help`."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.splitext(os.path.basename(main_file))[0] in ("complexity", "complexity-script")


if not _is_the_complexity_command():
    register_auto_classes()


__all__ = [
    "PRESETS",
    "ComplexityConfig",
    "ComplexityForCausalLM",
    "ComplexityModel",
    "ParameterCount",
    "count_parameters",
    "create_complexity_model",
    "default_routing_table",
    "register_auto_classes",
]
