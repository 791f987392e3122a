"""The one small interface every generation backend implements.

A batch of :class:`ChatRequest` (chat messages + the images of the first user turn) and sampling
parameters go in; one :class:`Generation` (text + token counts) per request comes out, in order.
Plain dicts with the same keys are accepted wherever a ChatRequest is, e.g.
``{"messages": [{"role": "user", "content": "How many?"}], "images": ["/data/a.png"]}``.
"""

from __future__ import annotations

import abc
import base64
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionr1_jobs.config import Sampling


@dataclass
class ChatRequest:
    """One conversation to continue.

    ``messages``: ``{"role": "system"|"user"|"assistant", "content": str}`` in order, ending with
    a user turn. ``images``: file paths, shown before the text of the *first* user turn (the
    Vision-R1 layout ``<image>question``). ``metadata``: passed through untouched (the toy
    teacher stand-ins read the toy scene from it; real backends ignore it).
    """

    messages: list[dict[str, Any]]
    images: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: ChatRequest | dict[str, Any]) -> ChatRequest:
        if isinstance(value, ChatRequest):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
            raise TypeError(f"a chat request needs a 'messages' list, got {value!r:.200}")
        return cls(
            messages=list(value["messages"]),
            images=[str(p) for p in value.get("images") or []],
            metadata=dict(value.get("metadata") or {}),
        )


def user(text: str, images: Sequence[str] = (), **metadata: Any) -> ChatRequest:
    """A single-turn request: one user message with its images."""
    return ChatRequest([{"role": "user", "content": text}], [str(p) for p in images], metadata)


@dataclass
class Generation:
    """One result. ``text`` is the visible answer; ``reasoning`` the thinking an API returned
    separately (DeepSeek's ``reasoning_content``), else None. Token counts come from the
    tokenizer or the server's ``usage`` (0 when a server reports none). ``finish_reason``:
    ``stop`` (ended on its own) or ``length`` (hit max_tokens). ``model``: the model id the
    server says answered (an API's ``model`` field, e.g. a dated snapshot), else None.
    ``error``: set (and ``finish_reason`` ``error``, ``text`` empty) when the request failed for
    good and the caller asked for per-request failures (``generate(..., row_errors=True)``)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    reasoning: str | None = None
    model: str | None = None
    error: str | None = None


def resolve_sampling(sampling: Sampling | dict[str, Any] | None, **overrides: Any) -> Sampling:
    """A Sampling from a model, a dict (snake or camel case) and/or keyword overrides."""
    base = sampling if isinstance(sampling, Sampling) else Sampling.model_validate(sampling or {})
    update = {k: v for k, v in overrides.items() if v is not None}
    return Sampling.model_validate({**base.model_dump(), **update}) if update else base


class GenerationBackend(abc.ABC):
    """Generate continuations for a batch of chat requests."""

    #: the Backend.kind this implements
    kind: str = ""
    #: ``_generate`` takes ``row_errors`` and reports a request that failed for good as its own
    #: failed Generation (remote APIs). Local engines fail as a whole (out of memory, a dead
    #: worker): for them a failure is never one row's, so it always raises.
    supports_row_errors: bool = False
    #: ``generate`` may run on two threads at once (each call its own connections: an API).
    reentrant: bool = False
    #: Generation uses this process's own state (torch's global RNG, the pod's accelerator in
    #: this process): two such backends must not generate at the same time.
    process_bound: bool = False

    @abc.abstractmethod
    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]: ...

    def generate(
        self,
        requests: Sequence[ChatRequest | dict[str, Any]],
        sampling: Sampling | dict[str, Any] | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        row_errors: bool = False,
    ) -> list[Generation]:
        """One Generation per request, in order. Keyword arguments override ``sampling``.

        ``row_errors``: a request that fails for good comes back with ``error`` set instead of
        failing the batch (where the backend can tell one request's failure apart; see
        ``supports_row_errors``)."""
        reqs = [ChatRequest.coerce(r) for r in requests]
        if not reqs:
            return []
        params = resolve_sampling(
            sampling, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )
        if row_errors and self.supports_row_errors:
            out = self._generate(reqs, params, row_errors=True)  # type: ignore[call-arg]
        else:
            out = self._generate(reqs, params)
        if len(out) != len(reqs):
            raise RuntimeError(f"{self.kind} backend returned {len(out)} results for {len(reqs)}")
        return out

    def close(self) -> None:
        """Free the model / connections (idempotent)."""
        return None

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- message helpers


def content_parts(request: ChatRequest, image_part: Any) -> list[dict[str, Any]]:
    """The request's messages with the images as parts of the first user message.

    ``image_part(path) -> dict`` makes one image part in the target's own shape (HF chat
    template: ``{"type": "image"}``; OpenAI: ``{"type": "image_url", …}``).
    """
    out: list[dict[str, Any]] = []
    pending = list(request.images)
    for msg in request.messages:
        role, content = msg["role"], msg.get("content", "")
        if role == "user" and pending:
            parts = [image_part(p) for p in pending]
            if isinstance(content, str):
                parts.append({"type": "text", "text": content})
            else:
                parts.extend(content)
            out.append({"role": role, "content": parts})
            pending = []
        elif isinstance(content, str) and role == "user":
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
        else:
            out.append({"role": role, "content": content})
    if pending:
        raise ValueError("a request with images needs a user message to attach them to")
    return out


def data_url(path: str | Path) -> str:
    """``data:<mime>;base64,…`` for an image file (what OpenAI-compatible servers accept)."""
    p = Path(path)
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode()}"


def load_image(path: str | Path) -> Any:
    """An RGB PIL image (palette/alpha images confuse vision processors)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
