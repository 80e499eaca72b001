"""OpenAI-compatible serving of Complexity checkpoints (FastAPI + uvicorn).

    from complexity.serve import create_app
    app = create_app(Engine.from_pretrained(path), model_name="my-model", api_key="secret")
"""

from .app import APIError, create_app, render_metrics

__all__ = ["APIError", "create_app", "render_metrics"]
