"""The optional LLM judge: verdict parsing, re-asks, fallback, what is recorded, and the eval
stage with ``judge: llm`` against a small chat-completions server started by the test."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Reply, chat_completion

from visionr1_jobs.config import (
    Backend,
    Benchmark,
    EvalParams,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    Sampling,
    Teacher,
)
from visionr1_jobs.eval import llm_judge
from visionr1_jobs.generation import Generation, GenerationBackend, get_backend
from visionr1_jobs.stages import eval as eval_stage

SERVED = "judge-model-2025-01-31"  # what the endpoint says answered (the version we record)
REQUESTED = "judge-model"


def naive_judge(prompt: str) -> str:
    """Says 1 when the reference answer appears as a word anywhere in the model response
    (reasoning included): deliberately unlike the rule-based scorer, so the two can differ."""
    gold = re.search(r"### Reference answer\n(.*?)\n", prompt).group(1).strip()
    resp = re.search(r"### Model response[^\n]*\n(.*?)\n### ", prompt, re.S).group(1)
    hit = re.search(rf"(?<![\w.]){re.escape(gold)}(?![\w.])", resp)
    return f"The reference is {gold}.\nVerdict: {1 if hit else 0}"


class JudgeServer:
    """POST /v1/chat/completions; the reply text is the next of ``script`` if any is queued,
    else ``answer(user_prompt)``; every request body is kept."""

    def __init__(self, answer: Callable[[str], str] = naive_judge) -> None:
        self.answer = answer
        # fail(user prompt, requests served so far) -> an HTTP error status, or None to answer
        self.fail: Callable[[str, int], int | None] = lambda prompt, served: None
        self.script: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.http = ChatServer(self.respond)
        self.base_url = self.http.url

    def respond(self, path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        with self.lock:
            status = self.fail(prompt, len(self.bodies))
            self.bodies.append(body)
            if status is not None:
                error = {"message": f"refused by the test ({status})", "type": "invalid_request"}
                return status, {"error": error}, {}
            text = self.script.pop(0) if self.script else self.answer(prompt)
        usage = {"prompt_tokens": 50, "completion_tokens": 8}
        return 200, chat_completion(SERVED, text, usage), {}


def _settle(srv: JudgeServer, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
    """Wait until the server has recorded no new request for ``quiet_s``."""
    deadline, seen = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        with srv.lock:
            now = len(srv.bodies)
        if now == seen:
            return
        seen = now
        time.sleep(quiet_s)


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    srv = JudgeServer()
    yield srv
    srv.http.close()


def _teacher(srv: JudgeServer) -> Teacher:
    return Teacher(
        backend=Backend(kind="openai", base_url=srv.base_url, model=REQUESTED, max_retries=0),
        sampling=Sampling(max_tokens=128, temperature=1.0, seed=7),
    )


def _judge(srv: JudgeServer, rows: list[dict], rules: list[dict]) -> list[dict]:
    teacher = _teacher(srv)
    with get_backend(teacher.backend) as backend:
        return llm_judge.judge_rows(
            backend,
            rows,
            rules,
            prompt=llm_judge.load_prompt(),
            max_tokens=teacher.sampling.max_tokens,
            seed=teacher.sampling.seed,
            model_name=REQUESTED,
        )


ROWS = [
    {"id": "a", "question": "How many circles?", "answer": "3", "response": "I count 3 circles."},
    {"id": "b", "question": "Sum?", "answer": "21", "response": "<answer> 12 </answer>"},
]
RULES = [  # the rule scorer missed the first (no answer tag) and got the second right
    {"id": "a", "extracted": None, "correct": False},
    {"id": "b", "extracted": "12", "correct": True},
]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Verdict: 1", True),
        ("the answer matches.\nverdict: 0\n", False),
        ("**Verdict:** 1", True),
        ("Verdict: 1.", True),
        ("I think it is 1", None),
        ("Verdict: 1\nVerdict: 0", None),  # conflicting
        ("Verdict: 10", None),
        ("", None),
    ],
)
def test_parse_verdict_is_strict(reply: str, expected: bool | None) -> None:
    assert llm_judge.parse_verdict(reply) is expected


def test_prompt_file_has_the_judge_placeholders_and_renders_every_field() -> None:
    p = llm_judge.load_prompt("v1")
    text = llm_judge.build_prompt(
        p,
        question="Which bar?",
        gold="A",
        choices=["red", "blue"],
        response="x" * 10_000 + " so A",
        extracted=None,
    )
    assert "{{" not in text and "(A) red\n(B) blue" in text and "(nothing extracted)" in text
    assert text.count("x") < 10_000 and "so A" in text  # only the response's end is sent
    with pytest.raises(Exception, match="prompts/judge/v9.txt"):
        llm_judge.load_prompt("v9")


def test_judge_verdicts_parsed_and_recorded(server: JudgeServer) -> None:
    out = _judge(server, ROWS, RULES)
    assert [o["llm_correct"] for o in out] == [True, False]
    assert [o["correct"] for o in out] == [True, False]  # the judge's verdict is the headline
    assert all(o["judge_status"] == "ok" and o["judge_attempts"] == 1 for o in out)
    assert out[0]["judge_raw"].endswith("Verdict: 1")
    # The served id (the endpoint's `model` field) is the version recorded, not the request name.
    assert {o["judge_model"] for o in out} == {SERVED}
    sha = hashlib.sha256(
        (Path(llm_judge.__file__).parent.parent / "prompts/judge/v1.txt").read_bytes()
    ).hexdigest()
    assert {(o["judge_prompt_version"], o["judge_prompt_sha256"]) for o in out} == {("v1", sha)}
    # Greedy regardless of the teacher's sampling temperature; max tokens and seed are its own.
    assert {(b["temperature"], b["max_tokens"], b["seed"]) for b in server.bodies} == {(0, 128, 7)}
    assert {b["model"] for b in server.bodies} == {REQUESTED}
    # One request per row; they are sent concurrently, so they arrive in any order: each row's
    # request is found by its question, and carries that row's own fields (not another's).
    assert len(server.bodies) == len(ROWS)
    prompts = [b["messages"][-1]["content"] for b in server.bodies]
    for row, rule in zip(ROWS, RULES, strict=True):
        [text] = [t for t in prompts if f"### Question\n{row['question']}\n" in t]
        assert f"### Reference answer\n{row['answer']}\n" in text
        assert row["response"] in text
        extracted = rule["extracted"] or "(nothing extracted)"
        assert f"### Answer extracted by rules\n{extracted}\n" in text
        others = [r for r in ROWS if r is not row]
        assert not any(o["response"] in text for o in others)


def test_unparseable_reply_is_asked_again(server: JudgeServer) -> None:
    server.script = ["Hmm, hard to say.", "Hmm, hard to say."]  # both rows' first replies
    out = _judge(server, ROWS, RULES)
    assert [o["llm_correct"] for o in out] == [True, False]
    assert [o["judge_attempts"] for o in out] == [2, 2]
    assert all(o["judge_raws"][0] == "Hmm, hard to say." for o in out)
    assert len(server.bodies) == 4


def test_always_unparseable_falls_back_to_the_rule_verdict(server: JudgeServer) -> None:
    server.answer = lambda prompt: "Correct!"  # never a verdict line
    out = _judge(server, ROWS, RULES)
    assert [o["judge_status"] for o in out] == ["unparsed", "unparsed"]
    assert [o["llm_correct"] for o in out] == [None, None]
    assert [o["correct"] for o in out] == [False, True]  # the rule verdicts
    assert [o["judge_attempts"] for o in out] == [llm_judge.RETRIES + 1] * 2
    assert len(server.bodies) == 2 * (llm_judge.RETRIES + 1)


# --------------------------------------------------------------------------- the eval stage


class Scripted(GenerationBackend):
    """'good' answers right; 'base' reasons its way to the right number, then answers a wrong
    one: the rule scorer says wrong, the naive judge says right."""

    kind = "scripted"

    def __init__(self, model: str, answers: dict[tuple[str, str], str]) -> None:
        self.model, self.answers = model, answers

    def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
        out = []
        for req in requests:
            gold = self.answers[(req.messages[0]["content"], req.images[0])]
            if self.model.endswith("good"):
                text = f"<think> looking </think><answer> Final Answer:{gold} </answer>"
            else:
                text = f"<think> it is {gold} </think><answer> Final Answer:{gold}9 </answer>"
            out.append(Generation(text=text, completion_tokens=len(text) // 4))
        return out


def test_eval_stage_with_llm_judge_reports_both_accuracies(
    tmp_path: Path, server: JudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.contract import read_manifest
    from visionr1_jobs.eval.readers import read_benchmark
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=4, seed=3)
    rows = read_benchmark("toy", tmp_path / "toy" / "bench").rows
    answers = {(r["question"], r["images"][0]): r["answer"] for r in rows}
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    params = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base", "good"],
        max_new_tokens=64,
        retries_missing_answer=0,
        judge="llm",
        llm_judge=_teacher(server),
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(tmp_path),
        output_dir="eval",
        base_model="models/base",
        inputs={
            "checkpoint:base": InputLocation(path="models/base", format="model"),
            "checkpoint:good": InputLocation(path="models/good", format="model"),
        },
        params=params.dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="j"),
    )
    man = eval_stage.run(cfg, lambda model, p: Scripted(model, answers))
    assert man is not None and read_manifest(tmp_path, "eval") == man
    assert len(server.bodies) == 8  # one judge call per row and checkpoint

    out = tmp_path / "eval"
    base = json.loads((out / "base" / "toy.json").read_text())
    good = json.loads((out / "good" / "toy.json").read_text())
    assert (base["rule_accuracy"], base["llm_accuracy"], base["accuracy"]) == (0.0, 1.0, 1.0)
    assert (good["rule_accuracy"], good["llm_accuracy"]) == (1.0, 1.0)
    assert (base["judge_unparsed"], base["judge_agreement"], good["judge_agreement"]) == (0, 0, 1)
    verdicts = [
        json.loads(x)["verdict"]
        for x in (out / "base/toy.verdicts.jsonl").read_text().split("\n")
        if x
    ]
    assert all(
        v["rule_correct"] is False and v["llm_correct"] is True and v["correct"] is True
        for v in verdicts
    )
    assert all(
        v["judge_raw"].endswith("Verdict: 1") and v["judge_model"] == SERVED for v in verdicts
    )

    report = json.loads((out / "report.json").read_text())
    s = report["settings"]
    assert (s["judge"], s["judge_model_served"], s["judge_model_requested"]) == (
        "llm",
        SERVED,
        REQUESTED,
    )
    assert s["judge_prompt_sha256"] == llm_judge.load_prompt().sha256
    assert s["judge_temperature"] == 0.0
    md = (out / "report.md").read_text()
    assert "## Judge" in md and SERVED in md
    assert "| base | toy | 4 | 0.0 | 100.0 | 0.0 | 0 |" in md

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(man.mlflow_run_id)
    m, p = run.data.metrics, run.data.params
    assert (m["base.toy.accuracy"], m["base.toy.rule_accuracy"], m["base.toy.llm_accuracy"]) == (
        1.0,
        0.0,
        1.0,
    )
    assert m["base.toy.judge_unparsed"] == 0.0 and m["good.toy.judge_agreement"] == 1.0
    assert p["eval.setting.judge_model_served"] == SERVED
    assert p["eval.setting.judge_prompt_sha256"] == llm_judge.load_prompt().sha256
    assert p["eval.setting.judge_prompt_version"] == "v1"


def test_llm_judge_config_error_stops_before_generating(tmp_path: Path) -> None:
    from visionr1_jobs.contract import InvalidInput

    params = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base"],
        judge="llm",
        llm_judge=Teacher(
            backend=Backend(
                kind="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_KEY_X"
            )
        ),
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(tmp_path),
        output_dir="eval",
        base_model="m",
        inputs={"checkpoint:base": InputLocation(path="m", format="model")},
        params=params.dump(),
    )
    with pytest.raises(InvalidInput, match="NO_KEY_X"):
        eval_stage.run(cfg, lambda m, p: pytest.fail("must not generate"))


# --------------------------------------------------------------------------- judge per benchmark


def test_the_judge_is_chosen_per_benchmark_and_defaults_to_the_papers_choice() -> None:
    from pydantic import ValidationError

    teacher = Teacher(backend=Backend(kind="openai", base_url="http://127.0.0.1:9/v1", model="m"))
    names = ("mathvista", "mathverse", "mmmath", "dynamath")

    def judged(benches: list[Benchmark] | None = None, **kw: object) -> list[str]:
        p = EvalParams(benchmarks=benches or [Benchmark(name=n, path=n) for n in names], **kw)
        return [b.name for b in p.benchmarks if p.judged(b)]

    assert judged() == []  # no judge configured: every benchmark by rules
    # A judge configured: only where the paper used one (MM-Math and DynaMath by rules).
    assert judged(llm_judge=teacher) == ["mathvista", "mathverse"]
    assert judged(llm_judge=teacher, judge="paper") == ["mathvista", "mathverse"]
    assert judged(llm_judge=teacher, judge="rule") == []
    assert judged(llm_judge=teacher, judge="llm") == list(names)  # the field's old meaning
    own = [
        Benchmark(name="mathvista", path="a"),
        Benchmark(name="mathverse", path="b", judge="rule"),
        Benchmark(name="mmmath", path="c", judge="llm"),
        Benchmark(name="dynamath", path="d"),
    ]
    assert judged(own, llm_judge=teacher) == ["mathvista", "mmmath"]
    with pytest.raises(ValidationError, match="judge 'paper' needs llmJudge"):
        EvalParams(judge="paper")
    with pytest.raises(ValidationError, match=r"benchmarks\[2\]\.judge 'llm' \(mmmath\) needs"):
        EvalParams(benchmarks=own)


def test_a_failed_judge_request_is_that_rows_alone(server: JudgeServer) -> None:
    server.fail = lambda prompt, served: 400 if "Sum?" in prompt else None
    out = _judge(server, ROWS, RULES)
    assert [o["judge_status"] for o in out] == ["ok", "error"]
    assert out[0]["llm_correct"] is True
    # The failed row keeps its rule verdict, with the server's error on it; not asked again.
    assert out[1]["llm_correct"] is None and out[1]["correct"] is True
    assert "400" in out[1]["judge_error"] and "refused by the test" in out[1]["judge_error"]
    assert len(server.bodies) == 2


def test_a_refused_key_still_stops_the_judge(server: JudgeServer) -> None:
    server.fail = lambda prompt, served: 401
    with pytest.raises(Exception, match="401"):
        _judge(server, ROWS, RULES)


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "white").save(path, format="PNG")


def _real_benchmarks(realdata: Path, root: Path) -> None:
    """MathVista testmini and DynaMath rows from tests/data/realdata in their released layouts."""
    vista = json.loads((realdata / "mathvista_testmini_sample.json").read_text())
    for pid in vista:
        _png(root / "mathvista" / "images" / f"{pid}.jpg")
    (root / "mathvista" / "testmini.json").write_text(json.dumps(vista))
    for row in json.loads((realdata / "dynamath_sample.json").read_text()):
        name = row["version"].split(" ")[0]
        folder = root / "dynamath" / ("" if name == "seed" else f"10trials/{name}")
        path = folder / "dataset.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[row["qid"]] = {k: v for k, v in row.items() if k not in ("qid", "version")}
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        if not (folder / row["image"]).exists():
            _png(folder / row["image"])


class Answers(GenerationBackend):
    """Answers every problem with 'Final Answer:1' after some thinking."""

    kind = "answers"

    def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
        text = "<think> so it is 1 </think><answer> Final Answer:1 </answer>"
        return [Generation(text=text, completion_tokens=9) for _ in requests]


def test_eval_judges_only_the_papers_benchmarks_and_scores_a_failed_row_by_rules(
    tmp_path: Path, server: JudgeServer, realdata: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.eval.readers import read_benchmark

    _real_benchmarks(realdata, tmp_path)
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    vista = read_benchmark("mathvista", tmp_path / "mathvista", limit=4).rows
    failing = vista[1]["question"]  # the judge refuses this row's request with a 400
    server.fail = lambda prompt, served: 400 if failing in prompt else None
    params = EvalParams(
        benchmarks=[
            Benchmark(name="mathvista", path="mathvista", limit=4),
            Benchmark(name="dynamath", path="dynamath", limit=4),
        ],
        checkpoints=["base"],
        max_new_tokens=64,
        retries_missing_answer=0,
        llm_judge=_teacher(server),  # judge unset: the paper's choice
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(tmp_path),
        output_dir="eval",
        base_model="models/base",
        inputs={"checkpoint:base": InputLocation(path="models/base", format="model")},
        params=params.dump(),
    )
    man = eval_stage.run(cfg, lambda model, p: Answers())
    assert man is not None
    # The judge saw the four MathVista rows and no DynaMath row (the paper scored it by rules).
    prompts = [b["messages"][-1]["content"] for b in server.bodies]
    assert len(prompts) == 4
    assert all(any(r["question"] in p for r in vista) for p in prompts)
    out = tmp_path / "eval"
    vs = json.loads((out / "base" / "mathvista.json").read_text())
    dyn = json.loads((out / "base" / "dynamath.json").read_text())
    assert (vs["n"], vs["judge_errors"], vs["judge_unparsed"]) == (4, 1, 0)
    assert "llm_accuracy" not in dyn and "judge_errors" not in dyn
    rows = [
        json.loads(x) for x in (out / "base" / "mathvista.verdicts.jsonl").read_text().splitlines()
    ]
    [bad] = [r for r in rows if r["question"] == failing]
    assert bad["verdict"]["judge_status"] == "error" and "400" in bad["verdict"]["judge_error"]
    assert bad["verdict"]["correct"] == bad["verdict"]["rule_correct"]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["judge"] == "paper"
    assert report["settings"]["judged_benchmarks"] == ["mathvista"]
    md = (out / "report.md").read_text()
    assert "ours (dynamath: rule, mathvista: llm judge)" in md
    assert "| errors |" in md and "| base | mathvista | 4 |" in md
    assert man.metrics["base.mathvista.judge_errors"] == 1.0


def test_judged_parts_are_saved_as_they_finish_and_a_rerun_skips_them(
    tmp_path: Path, server: JudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.eval.readers import read_benchmark
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=6, seed=3)
    rows = read_benchmark("toy", tmp_path / "toy" / "bench").rows
    answers = {(r["question"], r["images"][0]): r["answer"] for r in rows}
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    params = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base"],
        max_new_tokens=64,
        retries_missing_answer=0,
        batch_size=2,  # judged two rows a part
        judge="llm",
        llm_judge=_teacher(server),
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(tmp_path),
        output_dir="eval",
        base_model="models/base",
        inputs={"checkpoint:base": InputLocation(path="models/base", format="model")},
        params=params.dump(),
    )
    # The judge's key is refused after four requests: the merge stops in its third part.
    server.fail = lambda prompt, served: 401 if served >= 4 else None
    with pytest.raises(Exception, match="401"):
        eval_stage.run(cfg, lambda model, p: Scripted(model, answers))
    parts = sorted((tmp_path / "eval" / "_judge" / "base").glob("toy.part-*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in parts] == [2, 2]
    assert not (tmp_path / "eval" / "_manifest.json").exists()
    asked = {b["messages"][-1]["content"] for b in server.bodies[:4]}
    # A request sent beside the refused one was cancelled by the client, but the server may
    # still be recording it: let it finish before counting the rerun's requests.
    _settle(server)

    server.fail = lambda prompt, served: None
    server.bodies.clear()
    man = eval_stage.merge(cfg)
    # Only the two rows without a saved verdict are asked again.
    assert len(server.bodies) == 2
    assert not asked & {b["messages"][-1]["content"] for b in server.bodies}
    summary = json.loads((tmp_path / "eval" / "base" / "toy.json").read_text())
    assert (summary["n"], summary["judge_reused"], summary["judge_errors"]) == (6, 4, 0)
    assert (summary["rule_accuracy"], summary["llm_accuracy"]) == (0.0, 1.0)
    assert man.metrics["base.toy.llm_accuracy"] == 1.0
