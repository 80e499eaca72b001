"""Fast inference for Complexity models: a slot-cache engine with continuous batching.

    from complexity.inference import Engine, SamplingParams
    engine = Engine.from_pretrained("path/to/ckpt")
    [out] = engine.generate(["Hello"], SamplingParams(max_new_tokens=32, temperature=0))
    print(out.text)

`AsyncEngine` runs an Engine in a background thread for the server (complexity.serve).
"""

from .async_engine import AsyncEngine, RequestGroup, RequestOutput
from .errors import EngineOverloaded, EngineStopped, InvalidRequest
from .cache import SlotKVCache
from .engine import Completion, Engine, StepOutput, TokenLogprob
from .sampling import SamplingParams

__all__ = ["AsyncEngine", "Completion", "Engine", "EngineOverloaded", "EngineStopped", "InvalidRequest", "RequestGroup",
           "RequestOutput", "SamplingParams", "SlotKVCache", "StepOutput",
           "TokenLogprob"]
