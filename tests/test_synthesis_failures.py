"""Synthesis against a local OpenAI-compatible reasoner that fails some rows for good and some
only for a while: bad rows are dropped with a reason and counted, transient errors are retried,
and the shard fails only past ``maxFailedFraction``."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Reply, chat_completion

from visionr1_jobs.config import (
    Backend,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.contract import read_manifest
from visionr1_jobs.data.io import read_records
from visionr1_jobs.synthesis import failures

N_ROWS = 40

# What the server does with a prompt, by a hash of its text (stable across runs and retries).
PERMANENT = {
    0: (
        400,
        "context_length",
        "This model's maximum context length is 8192 tokens (code: context_length_exceeded)",
    ),
    1: (
        400,
        "content_filter",
        "The response was filtered due to the prompt triggering "
        "content management policy (code: content_filter)",
    ),
    2: (422, "rejected", "Unprocessable request"),
    3: (503, "retries_exhausted", "overloaded"),  # every attempt, so the retries run out
}
TRANSIENT_BUCKETS = (4, 5, 6)  # 500 twice, then an answer


def bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 12


class Reasoner:
    """POST /v1/chat/completions; records each prompt's fate by its sample's question."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.fates: dict[str, str] = {}  # prompt text → reason it was failed for good / "ok"
        self.lock = threading.Lock()
        self.http = ChatServer(self.respond)
        self.url = self.http.url

    def respond(self, path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Reply:
        text = body["messages"][-1]["content"]
        b = bucket(text)
        with self.lock:
            n = self.attempts[text] = self.attempts.get(text, 0) + 1
        retry = {"Retry-After": "0.01"}
        if b in PERMANENT:
            status, reason, message = PERMANENT[b]
            with self.lock:
                self.fates[text] = reason
            return status, {"error": {"message": message, "code": reason}}, retry
        if b in TRANSIENT_BUCKETS and n <= 2:
            return 500, {"error": {"message": "try again"}}, retry
        with self.lock:
            self.fates[text] = "ok"
        answer = "<think> Counting. </think><answer> Final Answer:3 </answer>"
        usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
        return 200, chat_completion(body["model"], answer, usage), {}


@pytest.fixture
def reasoner() -> Iterator[Reasoner]:
    srv = Reasoner()
    yield srv
    srv.http.close()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root / "toy", n=N_ROWS, seed=9, n_rl=1, n_bench=1)
    return root / "toy" / "train"


def _cfg(ws: Path, toy: Path, url: str, **params: Any) -> ResolvedStageConfig:
    p = SynthesisParams(
        describer=Teacher(backend=Backend(kind="toy"), sampling=Sampling(seed=1)),
        reasoner=Teacher(
            backend=Backend(kind="openai", base_url=url, model="r1", max_retries=3),
            sampling=Sampling(max_tokens=64),
        ),
        rows_per_shard=16,
        **params,
    )
    return ResolvedStageConfig(
        stage="synthesis",
        workspace=str(ws),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path=str(toy), format="toy")},
        params=p.dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="failures"),
    )


def test_bad_rows_are_dropped_with_reasons_and_transient_errors_retried(
    tmp_path: Path, toy: Path, reasoner: Reasoner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.stages import synthesis

    monkeypatch.setenv("RANK", "1")  # no MLflow: the files must tell the whole story
    man = synthesis.run(_cfg(tmp_path, toy, reasoner.url, max_failed_fraction=0.6))
    assert man is not None and read_manifest(tmp_path, "synthesis") == man

    failed_for_good = {t: r for t, r in reasoner.fates.items() if r != "ok"}
    expected = {r: list(failed_for_good.values()).count(r) for r in set(failed_for_good.values())}
    assert set(expected) == {"context_length", "content_filter", "rejected", "retries_exhausted"}
    transient = [t for t in reasoner.fates if bucket(t) in TRANSIENT_BUCKETS]
    assert transient and all(reasoner.fates[t] == "ok" for t in transient)  # retried, then kept
    assert all(reasoner.attempts[t] == 3 for t in transient)

    # Every input row is either written or listed as dropped, with the server's reason.
    kept = read_records(tmp_path / "synthesis")
    dropped = [
        row
        for f in sorted((tmp_path / "synthesis" / "_shards").glob("*.failed.json"))
        for row in json.loads(f.read_text())["rows"]
    ]
    inputs = read_records(toy)
    assert sorted([r.id for r in kept] + [d["id"] for d in dropped]) == sorted(s.id for s in inputs)
    assert len(dropped) == len(failed_for_good) and all(d["step"] == "reasoner" for d in dropped)
    by_prompt = {r.raw["reasoner_prompt"] for r in kept}
    assert not by_prompt & set(failed_for_good)  # no failed prompt slipped into the output
    assert {d["reason"] for d in dropped} == set(expected)
    assert all(d["detail"] for d in dropped)
    assert man.rows == {"data": len(kept)}
    assert man.extra["failed_rows"] == dict(sorted(expected.items()))
    assert man.metrics["failed_rows"] == len(dropped)
    assert man.extra["input_rows"] == N_ROWS


def test_the_shard_fails_past_the_fraction_and_keeps_its_chunks(
    tmp_path: Path, toy: Path, reasoner: Reasoner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.contract import run_stage
    from visionr1_jobs.stages import synthesis

    monkeypatch.setenv("RANK", "1")
    cfg = _cfg(tmp_path, toy, reasoner.url)  # default maxFailedFraction: 5%
    assert SynthesisParams.model_validate(cfg.params).max_failed_fraction == 0.05
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    with pytest.raises(RuntimeError, match=r"maxFailedFraction = 0.05"):
        synthesis.run(cfg)
    assert read_manifest(tmp_path, "synthesis") is None
    written = sorted((tmp_path / "synthesis").glob("shard-*.parquet"))
    assert written  # the chunk that crossed the line was written before the shard failed
    # A retried pod fails again at once, before asking the teachers (retryable: not exit 65).
    asked = dict(reasoner.attempts)
    with pytest.raises(RuntimeError, match="maxFailedFraction"):
        run_stage(synthesis.run, str(path))
    assert reasoner.attempts == asked

    # Raising the fraction resumes: finished chunks are not asked again.
    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    man = synthesis.run(_cfg(tmp_path, toy, reasoner.url, max_failed_fraction=0.6))
    assert man is not None and man.extra["input_rows"] == N_ROWS
    assert {p.name: p.stat().st_mtime_ns for p in written} == stamps
    finished_prompts = {r.raw["reasoner_prompt"] for p in written for r in read_records(p)}
    assert all(reasoner.attempts[t] == asked[t] for t in finished_prompts)


def test_a_refused_key_stops_the_shard_at_once() -> None:
    class Refused(Exception):
        status_code = 401

    calls: list[int] = []

    def generate(reqs: list[Any]) -> list[Any]:
        calls.append(len(reqs))
        raise Refused("Incorrect API key provided")

    with pytest.raises(Refused):
        failures.generate_tolerant(generate, list(range(8)))
    assert calls == [8]  # not bisected: every row would fail the same way


def test_classify() -> None:
    class APIError(RuntimeError):
        pass

    assert (
        failures.classify(
            APIError("HTTP 400 for request 3 (not retryable): context_length_exceeded")
        )
        == "context_length"
    )
    assert failures.classify(APIError("HTTP 400: content_filter")) == "content_filter"
    assert failures.classify(APIError("HTTP 422 for request 1 (not retryable)")) == "rejected"
    assert (
        failures.classify(APIError("request 2 failed after 4 attempts; last: HTTP 503: busy"))
        == "retries_exhausted"
    )
    assert failures.classify(APIError("HTTP 401: the API key was refused")) is None
    assert failures.classify(APIError("HTTP 404: model not found")) is None
    # A local engine's too-long prompt is a row failure; any other local error is a bug.
    assert (
        failures.classify(
            ValueError(
                "The decoder prompt (length 9000) is longer than the maximum model length of 8192"
            )
        )
        == "context_length"
    )
    assert failures.classify(ValueError("bad scene")) is None
    # A live vLLM engine that refused its batch: one request's fault, unless the engine broke.
    from visionr1_jobs.generation.vllm_backend import EngineBatchError

    refused = "vLLM engine on GPU(s) 0 failed:\nTraceback …\nPIL.UnidentifiedImageError: x.png"
    assert failures.classify(EngineBatchError(refused)) == "rejected"
    oom = "vLLM engine on GPU(s) 0 failed:\nTraceback …\ntorch.OutOfMemoryError: CUDA out of memory"
    assert failures.classify(EngineBatchError(oom)) is None
    assert failures.classify(RuntimeError(refused)) is None  # not from a live engine's batch


def test_a_raising_backend_is_bisected_to_its_bad_rows() -> None:
    class APIError(RuntimeError):
        pass

    bad = {2: "HTTP 400 (not retryable): context_length_exceeded", 5: "HTTP 400: content_filter"}
    sent: list[int] = []

    def generate(reqs: list[int]) -> list[str]:
        sent.extend(reqs)
        for r in reqs:
            if r in bad:
                raise APIError(bad[r])  # the whole batch fails, as a batch-raising backend does
        return [f"ok {r}" for r in reqs]

    out = failures.generate_tolerant(generate, list(range(8)))
    assert [o if isinstance(o, str) else o.reason for o in out] == [
        "ok 0",
        "ok 1",
        "context_length",
        "ok 3",
        "ok 4",
        "content_filter",
        "ok 6",
        "ok 7",
    ]
    assert len(sent) <= 8 * 4  # each request sent at most once per bisection level
