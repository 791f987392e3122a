"""Any OpenAI-compatible chat-completions endpoint (vLLM or SGLang servers, hosted APIs).

Built on the official ``openai`` client (``AsyncOpenAI``), which owns the HTTP side: connection
pooling, the per-request ``timeout``, and ``max_retries`` retries with exponential backoff and
jitter on 408/409/429/5xx, timeouts and connection errors, honouring the server's
``Retry-After`` / ``retry-after-ms``. On top of it this backend adds:

* At most ``max_concurrency`` requests in flight (a semaphore over the batch).
* A 401/403 stops the whole batch at once (a bad key would fail every request the same way, so
  nothing more is sent) and raises :class:`APIError` naming the environment variable the key came
  from.
* A request that fails for good (any other 4xx such as a provider's content filter or a too-long
  context, or retries spent) raises :class:`APIError` for the batch, or, with
  ``generate(..., row_errors=True)``, comes back as its own failed :class:`Generation`
  (``error`` set, empty text) while the rest of the batch completes.
* Images are sent inline as ``data:`` URLs; the key is read from the environment variable
  ``api_key_env`` (fill it from a Kubernetes Secret), never from the config.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from visionr1_jobs.config import Sampling
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation.base import (
    ChatRequest,
    Generation,
    GenerationBackend,
    content_parts,
    data_url,
)

# Sent when no apiKeyEnv is set (a local vLLM/SGLang server without auth): the client insists on
# a key, and without one it would silently pick up OPENAI_API_KEY from the pod's environment.
NO_KEY = "EMPTY"


class APIError(RuntimeError):
    """A request failed for good (permanent status, or retries exhausted)."""


class _Abort(Exception):
    """Another request already failed on the key; do not send this one."""


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # some servers return content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    text = str(body if body is not None else getattr(exc, "message", exc))
    return text[:300].strip()


class OpenAIBackend(GenerationBackend):
    kind = "openai"
    supports_row_errors = True
    reentrant = True  # a fresh client and event loop per call

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.extra_body = extra_body or {}
        self.api_key = NO_KEY
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise InvalidInput(
                    f"backend.apiKeyEnv: environment variable {api_key_env} is empty or unset; "
                    "fill it from a Secret with the stage's env (valueFrom.secretKeyRef)"
                )
            self.api_key = key

    # ----------------------------------------------------------------- one request

    def _messages(self, req: ChatRequest) -> list[dict[str, Any]]:
        messages = content_parts(
            req, lambda p: {"type": "image_url", "image_url": {"url": data_url(p)}}
        )
        # Text-only turns as plain strings: some servers (and reasoning APIs) refuse part lists.
        for m in messages:
            parts = m["content"]
            if isinstance(parts, list) and all(p.get("type") == "text" for p in parts):
                m["content"] = "".join(p["text"] for p in parts)
        return messages

    async def _one(
        self,
        client: Any,
        sem: asyncio.Semaphore,
        abort: asyncio.Event,
        req: ChatRequest,
        sampling: Sampling,
        index: int,
        row_errors: bool,
    ) -> Generation:
        import openai

        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(req),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        async with sem:
            if abort.is_set():
                raise _Abort
            try:
                resp = await client.chat.completions.create(**kwargs)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                abort.set()
                where = (
                    f" (read from ${self.api_key_env})"
                    if self.api_key_env
                    else " (no key sent: set backend.apiKeyEnv)"
                )
                raise APIError(
                    f"{self.url}: HTTP {exc.status_code}: the API key{where} was refused; "
                    f"no retries. Server said: {_detail(exc)}"
                ) from exc
            except openai.APIStatusError as exc:
                retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
                msg = (
                    f"{self.url}: request {index} failed after {self.max_retries + 1} attempts; "
                    f"last: HTTP {exc.status_code}: {_detail(exc)}"
                    if retried
                    else f"{self.url}: HTTP {exc.status_code} for request {index} "
                    f"(not retryable): {_detail(exc)}"
                )
                return self._failed(msg, exc, row_errors)
            except openai.APITimeoutError as exc:
                msg = (
                    f"{self.url}: request {index} failed after {self.max_retries + 1} attempts; "
                    f"last: timed out after {self.timeout_s:g} s"
                )
                return self._failed(msg, exc, row_errors)
            except openai.APIConnectionError as exc:
                msg = (
                    f"{self.url}: request {index} failed after {self.max_retries + 1} attempts; "
                    f"last: connection error ({exc.__cause__ or exc})"
                )
                return self._failed(msg, exc, row_errors)
        return self._parse(resp, index, row_errors)

    @staticmethod
    def _failed(msg: str, exc: BaseException | None, row_errors: bool) -> Generation:
        if not row_errors:
            raise APIError(msg) from exc
        return Generation(text="", finish_reason="error", error=msg)

    def _parse(self, resp: Any, index: int, row_errors: bool) -> Generation:
        try:
            choice = resp.choices[0]
            message = choice.message
        except (AttributeError, IndexError, TypeError) as exc:
            return self._failed(
                f"{self.url}: request {index}: not a chat completion ({exc})", exc, row_errors
            )
        usage = resp.usage
        # DeepSeek's thinking comes as ``reasoning_content``; vLLM's reasoning parsers say
        # ``reasoning``: both are extra fields the client keeps on the message.
        extra = message.model_extra or {}
        return Generation(
            text=_text_of(message.content),
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            reasoning=extra.get("reasoning_content") or extra.get("reasoning") or None,
            model=str(resp.model) if resp.model else None,
        )

    # ----------------------------------------------------------------- a batch

    def client(self) -> Any:
        """A fresh ``AsyncOpenAI`` client for one event loop (its connection pool is bound to it).

        Its pool (1000 connections) is wider than any sane ``max_concurrency``, so a request
        does not wait for a connection slot while its timeout runs."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    async def agenerate(
        self, requests: list[ChatRequest], sampling: Sampling, row_errors: bool = False
    ) -> list[Generation]:
        """The async form, for callers that already run an event loop."""
        sem = asyncio.Semaphore(self.max_concurrency)
        abort = asyncio.Event()
        async with self.client() as client:
            tasks = [
                asyncio.create_task(self._one(client, sem, abort, r, sampling, i, row_errors))
                for i, r in enumerate(requests)
            ]
            try:
                return list(await asyncio.gather(*tasks))
            except _Abort:  # only raised after another task set abort; report that one's error
                for t in tasks:
                    if t.done() and not t.cancelled() and isinstance(t.exception(), APIError):
                        raise t.exception() from None
                raise
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _generate(
        self, requests: list[ChatRequest], sampling: Sampling, row_errors: bool = False
    ) -> list[Generation]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests, sampling, row_errors))
        # Called from inside an event loop (e.g. a notebook): run ours on a helper thread.
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = asyncio.run(self.agenerate(requests, sampling, row_errors))
            except BaseException as exc:  # re-raised in the caller's thread
                box["err"] = exc

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if "err" in box:
            raise box["err"]
        return box["out"]
