"""Generation backends behind one interface: transformers, vLLM offline, OpenAI-compatible APIs.

    from visionr1_jobs.generation import get_backend, user
    with get_backend(Backend(kind="transformers"), "models/tiny-qwen25vl") as gen:
        outs = gen.generate([user("How many circles?", ["a.png"])], temperature=0, max_tokens=64)

Importing this package is cheap: torch, transformers, vLLM and openai load with the kind chosen.
"""

from visionr1_jobs.generation.base import (
    ChatRequest,
    Generation,
    GenerationBackend,
    resolve_sampling,
    user,
)
from visionr1_jobs.generation.factory import get_backend, register_backend, resolve_kind

__all__ = [
    "ChatRequest",
    "Generation",
    "GenerationBackend",
    "get_backend",
    "register_backend",
    "resolve_kind",
    "resolve_sampling",
    "user",
]
