"""The OpenAI-compatible backend (the official ``openai`` client) against a small
chat-completions server started by the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Reply, chat_completion
from PIL import Image

from visionr1_jobs.config import Backend
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation import get_backend, user
from visionr1_jobs.generation.openai_backend import APIError, OpenAIBackend

KEY = "sk-test-123"


class FakeServer:
    """Speaks POST /v1/chat/completions. ``script`` lists what the next requests get:
    "ok", "429" (Retry-After 1.2 s), "500", "400" (context too long), "sleep" (longer than the
    client timeout); then "ok". A wrong key gets 401; a user text containing "too long" gets 400."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        self.http = ChatServer(self.respond)
        self.url = self.http.url

    def respond(self, path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Reply:
        with self.lock:
            self.bodies.append(body)
            self.auth.append(headers.get("Authorization"))
            action = self.script.pop(0) if self.script else "ok"
        if path != "/v1/chat/completions":
            return 404, {"error": "not found"}, {}
        if headers.get("Authorization") != f"Bearer {KEY}":
            return 401, {"error": {"message": "Incorrect API key provided"}}, {}
        if action == "sleep":
            time.sleep(1.0)
            action = "ok"
        if action == "429":
            return 429, {"error": "rate limited"}, {"Retry-After": "1.2"}
        if action == "500":
            return 500, {"error": "boom"}, {}
        user_text = body["messages"][-1]["content"]
        if isinstance(user_text, list):
            user_text = next(p["text"] for p in user_text if p["type"] == "text")
        if action == "400" or "too long" in user_text:
            return 400, {"error": {"message": "maximum context length is 8 tokens"}}, {}
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        reasoning = "thinking" if "reason" in user_text else None
        completion = chat_completion(
            body["model"], f"echo: {user_text}", usage, reasoning_content=reasoning
        )
        return 200, completion, {}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.http.close()


def _backend(server: FakeServer, monkeypatch: pytest.MonkeyPatch, **kw: object) -> OpenAIBackend:
    monkeypatch.setenv("TEST_KEY", kw.pop("key", KEY))  # type: ignore[arg-type]
    opts = {
        "api_key_env": "TEST_KEY",
        "max_concurrency": 2,
        "timeout_s": 5.0,
        "max_retries": 3,
    }
    opts.update(kw)
    return OpenAIBackend(server.url, "served-model", **opts)  # type: ignore[arg-type]


def test_success_sends_images_as_data_urls_and_reads_usage(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    gen = _backend(server, monkeypatch)
    outs = gen.generate(
        [user("What is shown?", [str(tmp_path / "a.png")]), user("reason about it")],
        temperature=0.6,
        top_p=0.95,
        max_tokens=32,
        seed=1,
    )
    assert [o.text for o in outs] == ["echo: What is shown?", "echo: reason about it"]
    assert (outs[0].prompt_tokens, outs[0].completion_tokens, outs[0].finish_reason) == (
        7,
        3,
        "stop",
    )
    assert outs[1].reasoning == "thinking" and outs[0].reasoning is None
    first = next(b for b in server.bodies if isinstance(b["messages"][-1]["content"], list))
    parts = first["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    assert parts[1] == {"type": "text", "text": "What is shown?"}
    assert {b["model"] for b in server.bodies} == {"served-model"}
    assert (first["temperature"], first["top_p"], first["max_tokens"], first["seed"]) == (
        0.6,
        0.95,
        32,
        1,
    )
    assert set(server.auth) == {f"Bearer {KEY}"}
    text_only = next(b for b in server.bodies if isinstance(b["messages"][-1]["content"], str))
    assert text_only["messages"] == [{"role": "user", "content": "reason about it"}]


def test_retries_then_succeeds(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.script = ["500", "500"]
    gen = _backend(server, monkeypatch, max_concurrency=1)
    (out,) = gen.generate([user("hi")], max_tokens=8)
    assert out.text == "echo: hi"
    assert len(server.bodies) == 3


def test_rate_limit_waits_as_long_as_retry_after_says(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script = ["429"]
    gen = _backend(server, monkeypatch, max_concurrency=1)
    t0 = time.monotonic()
    (out,) = gen.generate([user("hi")], max_tokens=8)
    # The client's own first backoff is at most 0.5 s; the server asked for 1.2 s.
    assert out.text == "echo: hi" and len(server.bodies) == 2
    assert time.monotonic() - t0 >= 1.15


def test_timeout_is_retried_then_reported(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script = ["sleep"]
    gen = _backend(server, monkeypatch, timeout_s=0.3, max_concurrency=1)
    (out,) = gen.generate([user("slow")], max_tokens=8)
    assert out.text == "echo: slow" and len(server.bodies) == 2
    server.bodies.clear()
    server.script = ["sleep", "sleep"]
    gen = _backend(server, monkeypatch, timeout_s=0.3, max_retries=1)
    with pytest.raises(APIError, match=r"failed after 2 attempts; last: timed out after 0.3 s"):
        gen.generate([user("slow")], max_tokens=8)
    assert len(server.bodies) == 2


def test_row_errors_fail_one_request_not_the_batch(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = _backend(server, monkeypatch, max_concurrency=2, max_retries=1)
    batch = [user("a"), user("this is too long"), user("c")]
    with pytest.raises(APIError, match=r"HTTP 400 for request 1 \(not retryable\)"):
        gen.generate(batch, max_tokens=8)
    server.bodies.clear()
    outs = gen.generate(batch, max_tokens=8, row_errors=True)
    assert [o.text for o in outs] == ["echo: a", "", "echo: c"]
    assert [o.error is None for o in outs] == [True, False, True]
    assert outs[1].finish_reason == "error" and "maximum context length" in str(outs[1].error)
    assert len(server.bodies) == 3  # a 400 is permanent: not retried
    # Retries spent on a 5xx: the row fails, the others still answer.
    server.script = ["500", "500"]
    gen1 = _backend(server, monkeypatch, max_concurrency=1, max_retries=1)
    outs = gen1.generate([user("x"), user("y")], max_tokens=8, row_errors=True)
    assert outs[0].error and "failed after 2 attempts; last: HTTP 500" in outs[0].error
    assert outs[1].text == "echo: y"


def test_bad_key_is_a_clear_error_without_a_retry_storm(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = _backend(server, monkeypatch, key="sk-wrong", max_concurrency=2, max_retries=5)
    with pytest.raises(
        APIError, match=r"HTTP 401: the API key \(read from \$TEST_KEY\) was refused"
    ):
        gen.generate([user(f"q{i}") for i in range(20)], max_tokens=8, row_errors=True)
    # At most the requests already in flight when the first 401 came back; none retried.
    assert 1 <= len(server.bodies) <= 2


def test_missing_key_env_and_factory(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cfg = Backend(kind="openai", base_url=server.url, api_key_env="NO_SUCH_KEY", model="m")
    with pytest.raises(InvalidInput, match="NO_SUCH_KEY is empty or unset"):
        get_backend(cfg)
    monkeypatch.setenv("NO_SUCH_KEY", KEY)
    gen = get_backend(cfg.model_copy(update={"model": None}), "default-model")
    assert isinstance(gen, OpenAIBackend) and gen.model == "default-model"
    # The eval stage's call shape: dict requests, sampling as keywords.
    (out,) = gen.generate(
        [{"messages": [{"role": "user", "content": "x"}], "images": []}],
        temperature=0.0,
        max_tokens=4,
    )
    assert out.text == "echo: x"
