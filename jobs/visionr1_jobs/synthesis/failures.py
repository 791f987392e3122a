"""Per-row teacher failures: which errors drop one row, and how a batch isolates its bad rows.

At the paper's scale (hundreds of thousands of teacher calls) a few requests fail for good: the
provider's content filter refuses one, a long description overflows the reasoner's context, a
server keeps timing out on one prompt after every retry. Such a row is dropped with a reason and
counted; the shard fails only when too many rows are dropped (``params.maxFailedFraction``).
Errors that would fail every row the same way (a refused key, an unknown model, a bug) are not
row failures: they stop the shard at once.

Transient errors (429, 5xx, timeouts) are retried inside the backend first; a row is dropped as
``retries_exhausted`` only when its retries ran out.

How a batch finds its bad rows: a backend that reports a failed request in-band (a
:class:`Generation` with a non-empty ``error`` attribute, or ``finish_reason == "content_filter"``)
costs nothing extra. A backend that raises for the whole batch (the first permanent error aborts
the rest) is bisected: each half is sent again until every failing request stands alone. A
permanent 4xx comes back at once, so the extra work is the in-flight requests the aborts cut
short, not whole batches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Drop reasons, in the order reports list them.
REASONS = ("content_filter", "context_length", "rejected", "retries_exhausted")

#: Statuses that mean "every request would fail the same way": bad key, no access, wrong model/URL.
FATAL_STATUS = frozenset({401, 403, 404})
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))

_STATUS = re.compile(r"\b(?:HTTP|Error code:?|status(?: code)?:?)\s*([1-5][0-9]{2})\b", re.I)
_CONTENT_FILTER = re.compile(r"content[_ ]?filter|content management policy|safety system", re.I)
_CONTEXT = re.compile(
    r"context[_ ]length|maximum context|context window|longer than the maximum model length"
    r"|too many tokens|prompt is too long",
    re.I,
)
_EXHAUSTED = re.compile(r"failed after \d+ attempts|retries exhausted|max retries", re.I)
# Exception classes (by name, so no client library is imported here) that a request raises.
_API_ERROR_NAMES = frozenset(
    {
        "APIError",
        "APIStatusError",
        "APIConnectionError",
        "APITimeoutError",
        "HTTPStatusError",
        "_Reported",
    }
)


def _clip(text: str, limit: int = 1000) -> str:
    """At most ``limit`` characters: the start (who failed) and the end (a traceback's last
    line says what failed)."""
    if len(text) <= limit:
        return text
    return text[: limit // 5] + " … " + text[-(limit - limit // 5) :]


@dataclass(frozen=True)
class RowFailure:
    """One request that failed for good: why (one of :data:`REASONS`) and what the server said."""

    reason: str
    detail: str


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def _is_api_error(exc: BaseException) -> bool:
    return any(cls.__name__ in _API_ERROR_NAMES for cls in type(exc).__mro__)


def classify(exc: BaseException) -> str | None:
    """The drop reason for an error of one request, or None when it must stop the shard."""
    text = str(exc)
    status = _status(exc)
    if status in FATAL_STATUS:
        return None
    if _CONTENT_FILTER.search(text):
        return "content_filter"
    if _CONTEXT.search(text) or status == 413:
        # Also a local engine's "prompt longer than the maximum model length" (not an API error).
        return "context_length"
    if not _is_api_error(exc):
        if _engine_refused(exc):
            return "rejected"
        return None  # a bug or a broken setup fails every row: not a row failure
    if status is not None and 400 <= status < 500 and status not in _RETRYABLE_STATUS:
        return "rejected"
    if (status is not None and status in _RETRYABLE_STATUS) or _EXHAUSTED.search(text):
        return "retries_exhausted"
    if "timeout" in type(exc).__name__.lower() or "connection" in type(exc).__name__.lower():
        return "retries_exhausted"
    return None


#: A local engine's error that says the engine itself is broken, not one request.
_ENGINE_BROKEN = re.compile(r"out of memory|CUDA error|NCCL|EngineDeadError", re.I)


def _engine_refused(exc: BaseException) -> bool:
    """A live local engine raised for its batch (``EngineBatchError``: vLLM refuses a whole
    batch for one unreadable image or prompt it cannot place), and not because it is broken
    (out of memory, a CUDA error): bisecting the batch finds the request."""
    return any(
        cls.__name__ == "EngineBatchError" for cls in type(exc).__mro__
    ) and not _ENGINE_BROKEN.search(str(exc))


def classify_any(exc: BaseException) -> str | None:
    """:func:`classify`, and also, as ``rejected``, any other error a backend reported for one
    request in its result, unless it says every request would fail (a refused key, an unknown
    model). For eval and the judge, where such a row is counted as failed or scored by rules,
    never dropped."""
    reason = classify(exc)
    if reason is not None:
        return reason
    if isinstance(exc, _Reported) and _status(exc) not in FATAL_STATUS:
        return "rejected"
    return None


Classify = Callable[[BaseException], "str | None"]


def _in_band(out: Any, classify_error: Classify = classify) -> Any:
    """A Generation, or a RowFailure when the backend reported the failure in the result."""
    error = getattr(out, "error", None)
    if error:
        reason = classify_error(_Reported(str(error), getattr(out, "status_code", None)))
        if reason is None:  # e.g. a refused key: every row would fail the same way
            raise RuntimeError(f"teacher error: {error}")
        return RowFailure(reason, _clip(str(error)))
    if getattr(out, "finish_reason", None) == "content_filter":
        return RowFailure("content_filter", "finish_reason content_filter")
    return out


class _Reported(Exception):
    """An error a backend reported in a result instead of raising it (an API error too)."""

    def __init__(self, text: str, status_code: int | None) -> None:
        super().__init__(text)
        if status_code is not None:
            self.status_code = status_code


def generate_tolerant(
    generate: Callable[[list[Any]], list[Any]],
    requests: list[Any],
    classify_error: Classify = classify,
) -> list[Any]:
    """One Generation or :class:`RowFailure` per request, in order (see the module docstring).
    ``classify_error``: the reason an error is one row's, or None when it must stop the caller
    (:func:`classify`, or :func:`classify_any` where no row may be dropped)."""
    if not requests:
        return []
    try:
        outs = generate(requests)
    except Exception as exc:
        reason = classify_error(exc)
        if reason is None:
            raise
        if len(requests) == 1:
            return [RowFailure(reason, _clip(str(exc)))]
        mid = len(requests) // 2
        return generate_tolerant(generate, requests[:mid], classify_error) + generate_tolerant(
            generate, requests[mid:], classify_error
        )
    if len(outs) != len(requests):
        raise RuntimeError(f"teacher returned {len(outs)} results for {len(requests)} requests")
    return [_in_band(o, classify_error) for o in outs]


def generate_rows(
    backend: Any,
    requests: list[Any],
    *,
    classify_error: Classify = classify,
    **sampling: Any,
) -> list[Any]:
    """:func:`generate_tolerant` over ``backend.generate(requests, **sampling)``: a backend that
    reports failed requests in-band keeps the rest of its batch; others raise for the batch,
    which is bisected to find the failing rows."""
    kwargs = {"row_errors": True} if getattr(backend, "supports_row_errors", False) else {}
    return generate_tolerant(
        lambda reqs: backend.generate(reqs, **sampling, **kwargs), requests, classify_error
    )
