"""Fast inference for Complexity models: a slot-cache engine with continuous batching.

    from complexity.inference import Engine, SamplingParams
    engine = Engine.from_pretrained("path/to/ckpt")
    [out] = engine.generate(["Hello"], SamplingParams(max_new_tokens=32, temperature=0))
    print(out.text)

`AsyncEngine` is the server's client of an engine core running in its own process (or a thread).
Names are imported on first use, so the CLI can read `complexity.inference.args` without torch.
"""

from importlib import import_module

_EXPORTS = {
    "AsyncEngine": "async_engine",
    "RequestGroup": "async_engine",
    "RequestOutput": "outputs",
    "Engine": "engine",
    "SlotKVCache": "cache",
    "SamplingParams": "sampling",
    "Completion": "outputs",
    "StepOutput": "outputs",
    "TokenLogprob": "outputs",
    "EngineOverloaded": "errors",
    "EngineStopped": "errors",
    "InvalidRequest": "errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
