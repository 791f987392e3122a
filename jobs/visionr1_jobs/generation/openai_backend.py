"""Any OpenAI-compatible chat-completions endpoint (vLLM or SGLang servers, hosted APIs).

* At most ``max_concurrency`` requests in flight.
* Retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors,
  honouring ``Retry-After``; up to ``max_retries`` retries per request.
* Any other 4xx is permanent: a 401/403 stops the whole batch at once (a bad key would fail
  every request the same way, so nothing more is sent) and raises :class:`APIError` naming the
  environment variable the key came from.
* Images are sent inline as ``data:`` URLs; the key is read from the environment variable
  ``api_key_env`` (fill it from a Kubernetes Secret), never from the config.
"""

from __future__ import annotations

import asyncio
import os
import random
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

RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class APIError(RuntimeError):
    """A request failed for good (permanent status, or retries exhausted)."""


class _Abort(Exception):
    """Another request already failed permanently; do not send this one."""


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # some servers return content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class OpenAIBackend(GenerationBackend):
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = extra_body or {}
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise InvalidInput(
                    f"backend.apiKeyEnv: environment variable {api_key_env} is empty or unset; "
                    "fill it from a Secret with the stage's env (valueFrom.secretKeyRef)"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        #: requests sent, including retries (for logs and tests)
        self.requests_sent = 0

    # ----------------------------------------------------------------- one request

    def _body(self, req: ChatRequest, sampling: Sampling) -> dict[str, Any]:
        messages = content_parts(
            req, lambda p: {"type": "image_url", "image_url": {"url": data_url(p)}}
        )
        # Text-only turns as plain strings: some servers (and reasoning APIs) refuse part lists.
        for m in messages:
            parts = m["content"]
            if isinstance(parts, list) and all(p.get("type") == "text" for p in parts):
                m["content"] = "".join(p["text"] for p in parts)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            **self.extra_body,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max_s)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(self.backoff_base_s * 2**attempt, self.backoff_max_s)
        return base * (0.5 + random.random() / 2)

    async def _one(
        self,
        client: Any,
        sem: asyncio.Semaphore,
        abort: asyncio.Event,
        body: dict[str, Any],
        index: int,
    ) -> Generation:
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            async with sem:
                if abort.is_set():
                    raise _Abort
                self.requests_sent += 1
                try:
                    resp = await client.post(self.url, json=body, headers=self.headers)
                except httpx.TimeoutException:
                    last, retry_after = f"timed out after {self.timeout_s:g} s", None
                except httpx.TransportError as exc:
                    last, retry_after = f"connection error ({type(exc).__name__}: {exc})", None
                else:
                    if resp.status_code == 200:
                        return self._parse(resp, index)
                    detail = resp.text[:300].strip()
                    if resp.status_code in (401, 403):
                        abort.set()
                        where = (
                            f" (read from ${self.api_key_env})"
                            if self.api_key_env
                            else (" (no key sent: set backend.apiKeyEnv)")
                        )
                        raise APIError(
                            f"{self.url}: HTTP {resp.status_code}: the API key{where} was refused; "
                            f"no retries. Server said: {detail}"
                        )
                    if resp.status_code not in RETRY_STATUS:
                        abort.set()
                        raise APIError(
                            f"{self.url}: HTTP {resp.status_code} for request {index} "
                            f"(not retryable): {detail}"
                        )
                    last, retry_after = (
                        f"HTTP {resp.status_code}: {detail}",
                        resp.headers.get("retry-after"),
                    )
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise APIError(
            f"{self.url}: request {index} failed after {self.max_retries + 1} attempts; last: {last}"
        )

    def _parse(self, resp: Any, index: int) -> Generation:
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise APIError(f"{self.url}: request {index}: not a chat completion ({exc})") from exc
        usage = data.get("usage") or {}
        return Generation(
            text=_text_of(message.get("content")),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            reasoning=message.get("reasoning_content") or message.get("reasoning") or None,
            model=str(data["model"]) if data.get("model") else None,
        )

    # ----------------------------------------------------------------- a batch

    async def agenerate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        """The async form, for callers that already run an event loop."""
        import httpx

        bodies = [self._body(r, sampling) for r in requests]
        sem = asyncio.Semaphore(self.max_concurrency)
        abort = asyncio.Event()
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            tasks = [
                asyncio.create_task(self._one(client, sem, abort, b, i))
                for i, b in enumerate(bodies)
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

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests, sampling))
        # Called from inside an event loop (e.g. a notebook): run ours on a helper thread.
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = asyncio.run(self.agenerate(requests, sampling))
            except BaseException as exc:  # re-raised in the caller's thread
                box["err"] = exc

        th = threading.Thread(target=run)
        th.start()
        th.join()
        if "err" in box:
            raise box["err"]
        return box["out"]
