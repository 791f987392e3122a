"""The eval stage at scale: re-asks with their own seeds, predictions saved per batch and resumed
after a kill, failed requests recorded as failed rows, and the shard merge run on its own."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from visionr1_jobs.config import Benchmark, EvalParams, InputLocation, ResolvedStageConfig
from visionr1_jobs.contract import InvalidInput, read_manifest
from visionr1_jobs.generation import Generation, GenerationBackend
from visionr1_jobs.shards import ShardsIncomplete
from visionr1_jobs.stages import eval as eval_stage

N_BENCH = 10


class SeededBackend(GenerationBackend):
    """Deterministic for a given (prompt, image, seed), like vLLM or a seeded API server: the
    same request with the same seed always gets the same reply. About half the replies are cut
    before ``</answer>``. Logs every request's seed."""

    kind = "seeded"
    supports_row_errors = True

    def __init__(self, answers: dict[tuple[str, str], str], fail: set[str] = frozenset()) -> None:
        self.answers, self.fail = answers, fail
        self.seeds: dict[tuple[str, str], list[int | None]] = {}
        self.calls = 0  # prompts asked (re-asks included)
        self.batches = 0

    def _generate(self, requests, sampling, row_errors=False):  # type: ignore[no-untyped-def]
        self.batches += 1
        out = []
        for req in requests:
            q = (req.messages[0]["content"], req.images[0])
            self.calls += 1
            self.seeds.setdefault(q, []).append(sampling.seed)
            if any(f in req.images[0] for f in self.fail):
                assert row_errors, "the eval stage must ask for per-request failures"
                out.append(Generation(text="", finish_reason="error", error="HTTP 400: too long"))
                continue
            cut = random.Random(f"{q}|{sampling.seed}").random() < 0.5
            text = (
                "<think> looking and looking"
                if cut
                else (f"<think> looking </think><answer> Final Answer:{self.answers[q]} </answer>")
            )
            out.append(Generation(text=text, completion_tokens=len(text) // 4))
        return out


class Killed(Exception):
    """Stands in for the pod being killed mid-shard."""


class KilledAfter(SeededBackend):
    def __init__(self, answers: dict[tuple[str, str], str], batches: int) -> None:
        super().__init__(answers)
        self.limit = batches

    def _generate(self, requests, sampling, row_errors=False):  # type: ignore[no-untyped-def]
        if self.batches >= self.limit:
            raise Killed
        return super()._generate(requests, sampling, row_errors)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=N_BENCH, seed=5)
    return tmp_path


@pytest.fixture
def answers(workspace: Path) -> dict[tuple[str, str], str]:
    from visionr1_jobs.eval.readers import read_benchmark

    rows = read_benchmark("toy", workspace / "toy" / "bench").rows
    return {(r["question"], r["images"][0]): r["answer"] for r in rows}


def _cfg(ws: Path, **params: object) -> ResolvedStageConfig:
    p = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base"],
        max_new_tokens=64,
        **{"retries_missing_answer": 0, "batch_size": 3, **params},  # type: ignore[arg-type]
    )
    return ResolvedStageConfig(
        stage="eval",
        workspace=str(ws),
        output_dir="eval",
        base_model="models/base",
        inputs={"checkpoint:base": InputLocation(path="models/base", format="model")},
        params=p.dump(),
    )


def _verdicts(ws: Path) -> list[dict]:
    path = ws / "eval" / "base" / "toy.verdicts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_each_reask_has_its_own_seed_so_a_seeded_backend_can_answer_differently(
    workspace: Path, answers: dict[tuple[str, str], str]
) -> None:
    backend = SeededBackend(answers)
    eval_stage.run(_cfg(workspace, retries_missing_answer=4, seed=7), lambda m, p: backend)
    rows = _verdicts(workspace)
    first_cut = [r for r in rows if "</answer>" not in r["responses"][0]]
    assert first_cut, "the scripted replies cut some first answers"
    for r in rows:
        seeds = backend.seeds[(r["question"], r["images"][0])]
        assert seeds == list(range(7, 7 + r["attempts"]))  # seed + attempt, never repeated
    # Re-asked with the same seed, a seeded backend would return the same cut reply every time;
    # with its own seed per attempt most cut answers are completed.
    still_cut = [r for r in rows if "</answer>" not in r["response"]]
    assert len(still_cut) < len(first_cut)
    assert all(r["attempts"] > 1 for r in first_cut)


def test_killed_eval_resumes_mid_shard_without_asking_again(
    workspace: Path, answers: dict[tuple[str, str], str]
) -> None:
    cfg = _cfg(workspace)
    with pytest.raises(Killed):
        eval_stage.run(cfg, lambda m, p: KilledAfter(answers, batches=2))
    folder = workspace / "eval" / "base"
    parts = sorted(p.name for p in folder.glob("toy.shard-*.part-*.jsonl"))
    assert parts == [
        "toy.shard-00000-of-00001.part-00000.jsonl",
        "toy.shard-00000-of-00001.part-00001.jsonl",
    ]
    saved = [json.loads(x) for p in parts for x in (folder / p).read_text().splitlines()]
    assert len(saved) == 6 and read_manifest(workspace, "eval") is None
    # A temp file of the batch the kill interrupted: the replacement pod deletes it.
    stale = folder / ".toy.shard-00000-of-00001.part-00002.jsonl.x1y2.tmp"
    stale.write_text('{"row_index": 99}\n')

    resumed = SeededBackend(answers)
    man = eval_stage.run(cfg, lambda m, p: resumed)
    assert man is not None and read_manifest(workspace, "eval") == man
    assert resumed.calls == N_BENCH - 6  # only the unsaved prompts were asked
    assert not stale.exists() and not list(folder.glob("toy.shard-*.part-*"))
    rows = _verdicts(workspace)
    assert [r["row_index"] for r in rows] == list(range(N_BENCH))
    # The saved rows are the ones scored, unchanged.
    by_index = {r["row_index"]: r for r in rows}
    assert all(by_index[s["row_index"]]["response"] == s["response"] for s in saved)


def test_a_request_that_fails_for_good_is_a_failed_row_not_a_lost_batch(
    workspace: Path, answers: dict[tuple[str, str], str]
) -> None:
    bad_image = sorted(img for _, img in answers)[3]
    backend = SeededBackend(answers, fail={Path(bad_image).name})
    man = eval_stage.run(_cfg(workspace, retries_missing_answer=2), lambda m, p: backend)
    assert man is not None
    rows = _verdicts(workspace)
    failed = [r for r in rows if r.get("failed")]
    assert len(failed) == 1 and failed[0]["images"][0] == bad_image
    assert failed[0]["error"] == "HTTP 400: too long" and failed[0]["attempts"] == 1
    assert failed[0]["verdict"]["correct"] is False
    assert len(rows) == N_BENCH
    summary = json.loads((workspace / "eval" / "base" / "toy.json").read_text())
    assert summary["failed"] == 1 and summary["n"] == N_BENCH
    assert man.metrics["base.toy.failed_rows"] == 1.0
    md = (workspace / "eval" / "report.md").read_text()
    assert "| failed |" in md and f"| base | toy | {N_BENCH} |" in md
    assert md.split(f"| base | toy | {N_BENCH} |")[1].split("\n")[0].endswith("| 1 |")


def test_a_reask_that_fails_keeps_the_answered_attempt() -> None:
    class ThenFail(GenerationBackend):
        kind = "then-fail"
        supports_row_errors = True

        def _generate(self, requests, sampling, row_errors=False):  # type: ignore[no-untyped-def]
            if sampling.seed == 0:
                return [Generation(text="<think> cut") for _ in requests]
            return [Generation(text="", finish_reason="error", error="429") for _ in requests]

    (row,) = eval_stage.generate_with_retries(
        ThenFail(), [("q", [])], {"temperature": 0.6, "seed": 0, "max_tokens": 8}, retries=3
    )
    assert row["response"] == "<think> cut" and "failed" not in row
    assert row["attempts"] == 2 and row["errors"] == ["429"]


def test_merge_runs_again_on_its_own_and_names_missing_shards(
    workspace: Path, answers: dict[tuple[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(workspace)
    monkeypatch.setenv("VISIONR1_SHARDS", "2")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert eval_stage.run(cfg, lambda m, p: SeededBackend(answers)) is None
    with pytest.raises(ShardsIncomplete, match=r"shard\(s\) \[0\] of 2"):
        eval_stage.merge(cfg)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    first = eval_stage.run(cfg, lambda m, p: SeededBackend(answers))
    assert first is not None
    report = (workspace / "eval" / "report.json").read_bytes()
    # The merging pod "died" before the manifest: merge again without generating anything.
    (workspace / "eval" / "_manifest.json").unlink()
    (workspace / "eval" / "report.json").unlink()
    again = eval_stage.merge(cfg)
    assert read_manifest(workspace, "eval") == again
    assert (workspace / "eval" / "report.json").read_bytes() == report
    assert again.rows == first.rows and again.hashes == first.hashes
    # A shard count other than the one the shards ran with is refused, not mixed in.
    monkeypatch.setenv("VISIONR1_SHARDS", "3")
    with pytest.raises(InvalidInput, match="different layout"):
        eval_stage.run(cfg, lambda m, p: pytest.fail("must not generate"))


@pytest.mark.slow  # a real subprocess killed with SIGKILL (imports MLflow, ~20 s on 2 cores)
def test_sigkilled_eval_pod_resumes_and_asks_the_server_only_for_unsaved_rows(
    workspace: Path, answers: dict[tuple[str, str], str]
) -> None:
    """``python -m visionr1_jobs eval`` against an OpenAI-compatible server, killed mid-shard:
    the server's request log shows the restarted pod asks only for the rows not yet saved."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from collections.abc import Mapping
    from typing import Any

    from chat_server import ChatServer, Reply, chat_completion

    from visionr1_jobs.config import Backend, MlflowRef

    gold = {q: a for (q, _), a in answers.items()}  # right or wrong does not matter here
    asked: list[str] = []
    delay = {"s": 0.3}

    def respond(path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Reply:
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        asked.append(text)
        time.sleep(delay["s"])
        reply = f"<think> x </think><answer> Final Answer:{gold.get(text, '0')} </answer>"
        usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        return 200, chat_completion(body["model"], reply, usage), {}

    server = ChatServer(respond)
    url = server.url
    backend = Backend(kind="openai", base_url=url, model="served", max_concurrency=2)
    cfg = _cfg(workspace, backend=backend, batch_size=2)
    cfg.mlflow = MlflowRef(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}", experiment="kill")
    cfg_file = workspace / "eval.json"
    cfg_file.write_text(cfg.model_dump_json(by_alias=True))
    folder = workspace / "eval" / "base"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JOB_COMPLETION_INDEX="0", VISIONR1_SHARDS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "jobs"), str(repo / "operator")])
    cmd = [sys.executable, "-m", "visionr1_jobs", "eval", "--config", str(cfg_file)]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            while len(list(folder.glob("toy.shard-*.part-*.jsonl"))) < 2:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "no saved batch after 180 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # batch 3 is in flight (2 requests × 0.3 s)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        saved = [
            json.loads(x)
            for p in folder.glob("toy.shard-*.part-*.jsonl")
            for x in p.read_text().splitlines()
        ]
        assert 4 <= len(saved) < N_BENCH and read_manifest(workspace, "eval") is None
        before = len(asked)
        delay["s"] = 0.0
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        server.close()
    man = read_manifest(workspace, "eval")
    assert man is not None and man.rows == {"base/toy": N_BENCH}
    from collections import Counter

    # Asked again: exactly the rows no saved batch held (the in-flight batch included).
    saved_rows = {s["row_index"] for s in saved}
    unsaved = [r["prompt"] for r in _verdicts(workspace) if r["row_index"] not in saved_rows]
    assert len(unsaved) == N_BENCH - len(saved)
    assert Counter(asked[before:]) == Counter(unsaved)
