"""Pick a backend from a :class:`Backend` config. Heavy libraries load only for the kind chosen.

Other packages add kinds with :func:`register_backend`. The ``toy`` kind (the toy-world teacher
stand-ins) lives in ``visionr1_jobs.synthesis.toy_teachers``: that module is imported on first
use of kind ``toy`` and must call ``register_backend("toy", factory)`` at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from visionr1_jobs.config import DEFAULT_TIMEOUT_S, Backend
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation.base import GenerationBackend

BackendFactory = Callable[[Backend, str | None], GenerationBackend]

_REGISTRY: dict[str, BackendFactory] = {}
#: kinds whose factory lives in a module that registers it when imported
_LAZY_MODULES: dict[str, str] = {"toy": "visionr1_jobs.synthesis.toy_teachers"}


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Make ``get_backend`` build ``kind`` with ``factory(backend_cfg, default_model)``."""
    _REGISTRY[kind] = factory


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA device is visible (what kind ``auto`` picks vLLM on)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_kind(kind: str) -> str:
    return ("vllm" if vllm_usable() else "transformers") if kind == "auto" else kind


def _model(backend: Backend, default_model: str | None) -> str:
    model = backend.model or default_model
    if not model:
        raise InvalidInput(f"backend kind {backend.kind!r} needs a model (set backend.model)")
    return model


def _transformers(backend: Backend, default_model: str | None) -> GenerationBackend:
    from visionr1_jobs.generation.transformers_backend import TransformersBackend

    return TransformersBackend(
        _model(backend, default_model), batch_size=backend.batch_size, dtype=backend.dtype
    )


def _vllm(backend: Backend, default_model: str | None) -> GenerationBackend:
    from visionr1_jobs.generation.vllm_backend import VLLMBackend

    return VLLMBackend(_model(backend, default_model), **vllm_options(backend))


def vllm_options(backend: Backend) -> dict[str, Any]:
    """The VLLMBackend options a Backend config sets (all of them: a field left out here would
    be silently ignored on the GPU)."""
    return {
        "tensor_parallel_size": backend.tensor_parallel_size,
        "data_parallel_size": backend.data_parallel_size,
        "gpu_memory_utilization": backend.gpu_memory_utilization,
        "dtype": backend.dtype,
        "max_model_len": backend.max_model_len,
        "max_images_per_prompt": backend.max_images_per_prompt,
    }


def _openai(backend: Backend, default_model: str | None) -> GenerationBackend:
    from visionr1_jobs.generation.openai_backend import OpenAIBackend

    if not backend.base_url:
        raise InvalidInput("backend kind 'openai' needs baseUrl (e.g. http://vllm:8000/v1)")
    return OpenAIBackend(
        base_url=backend.base_url,
        model=_model(backend, default_model),
        api_key_env=backend.api_key_env,
        max_concurrency=backend.max_concurrency,
        timeout_s=backend.timeout_s or DEFAULT_TIMEOUT_S,
        max_retries=backend.max_retries,
    )


register_backend("transformers", _transformers)
register_backend("vllm", _vllm)
register_backend("openai", _openai)


def get_backend(backend: Backend, default_model: str | None = None) -> GenerationBackend:
    """The backend ``backend.kind`` describes; ``default_model`` fills an unset ``backend.model``
    (the stage's own model: the run's base model or the checkpoint under test)."""
    kind = resolve_kind(backend.kind)
    if kind not in _REGISTRY and kind in _LAZY_MODULES:
        try:
            importlib.import_module(_LAZY_MODULES[kind])
        except ModuleNotFoundError as exc:
            raise InvalidInput(
                f"backend kind {kind!r} is not available ({_LAZY_MODULES[kind]}: {exc})"
            ) from exc
    if kind not in _REGISTRY:
        raise InvalidInput(f"unknown backend kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](backend, default_model)
