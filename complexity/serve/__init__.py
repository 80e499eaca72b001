"""OpenAI-compatible serving of Complexity checkpoints (FastAPI + uvicorn).

from complexity.serve import create_app
app = create_app(Engine.from_pretrained(path), model_name="my-model", api_key="secret")
"""

from .app import create_app
from .errors import APIError

__all__ = ["APIError", "create_app"]
