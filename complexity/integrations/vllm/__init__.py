"""vLLM plugin: serve Complexity checkpoints with stock vLLM (`pip install complexity[vllm]`).

vLLM calls `register()` in every process it starts, through the `vllm.general_plugins` entry
point declared in pyproject.toml. It registers the "complexity" config with transformers'
AutoConfig (importing `complexity` does that, so no `trust_remote_code` is needed) and the native
vLLM model `ComplexityForCausalLM` (complexity/integrations/vllm/model.py) with vLLM's
ModelRegistry, lazily: the model module, and vLLM's model code, are imported only when a
Complexity checkpoint is actually loaded.
"""

from __future__ import annotations

ARCHITECTURE = "ComplexityForCausalLM"
MODEL_PATH = "complexity.integrations.vllm.model:ComplexityForCausalLM"


def register() -> None:
    """Register the Complexity config and model with transformers and vLLM (idempotent)."""
    from vllm import ModelRegistry

    import complexity  # noqa: F401  (AutoConfig.register("complexity", ComplexityConfig))

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)


__all__ = ["register", "ARCHITECTURE", "MODEL_PATH"]
