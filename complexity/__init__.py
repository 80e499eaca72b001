"""Complexity: token-routed MLP, mu guidance and INL dynamics as a Hugging Face-native model.

Importing the package registers the model type with transformers' Auto classes, so
`AutoConfig` / `AutoModelForCausalLM` resolve "complexity" without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_complexity import PRESETS, ComplexityConfig
from .modeling_complexity import ComplexityForCausalLM, ComplexityModel, default_routing_table
from .params import ParameterCount, count_parameters

__version__ = "0.1.0"

AutoConfig.register("complexity", ComplexityConfig, exist_ok=True)
AutoModel.register(ComplexityConfig, ComplexityModel, exist_ok=True)
AutoModelForCausalLM.register(ComplexityConfig, ComplexityForCausalLM, exist_ok=True)
# save_pretrained copies the two self-contained model files next to the weights and writes
# `auto_map`, so the folder loads with trust_remote_code where this package is absent.
ComplexityConfig.register_for_auto_class()
ComplexityForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def create_complexity_model(preset: str, routing_table=None, **overrides) -> ComplexityForCausalLM:
    """A freshly initialised model from a preset of SPEC section 5, e.g.
    `create_complexity_model("tiny", mu_mode="guidance", vocab_size=1000)`."""
    model = ComplexityForCausalLM(ComplexityConfig.from_preset(preset, **overrides))
    if routing_table is not None:
        model.set_routing_table(routing_table)
    return model


__all__ = [
    "PRESETS",
    "ComplexityConfig",
    "ComplexityForCausalLM",
    "ComplexityModel",
    "ParameterCount",
    "count_parameters",
    "create_complexity_model",
    "default_routing_table",
]
