"""Complexity: token-routed MLP, mu guidance and INL dynamics as a Hugging Face-native model.

Importing the package registers the model type with transformers' Auto classes, so
`AutoConfig` / `AutoModelForCausalLM` resolve "complexity" without `trust_remote_code`. It does
so without importing transformers or torch itself (seconds, which the data and tokenizer code and
`complexity --help` have no use for): the registration happens as soon as transformers' Auto
classes or our model classes are imported (`complexity.auto_classes`). The public names below are
imported on first use (PEP 562), as transformers and vLLM do for theirs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .auto_classes import register_auto_classes, register_on_first_use

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


def create_complexity_model(preset: str, routing_table=None, **overrides) -> ComplexityForCausalLM:
    """A freshly initialised model from a preset (docs/architecture.md §5), e.g.
    `create_complexity_model("tiny", mu_mode="guidance", vocab_size=1000)`."""
    from .configuration_complexity import ComplexityConfig
    from .modeling_complexity import ComplexityForCausalLM

    model = ComplexityForCausalLM(ComplexityConfig.from_preset(preset, **overrides))
    if routing_table is not None:
        model.set_routing_table(routing_table)
    return model


register_on_first_use()


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
