"""Each checkpoint is evaluated with the system prompt it was trained with: none for everything
the paper evaluates, the format instruction for Vision-R1-Zero (the operator fills it in)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from visionr1_jobs.config import (
    Benchmark,
    EvalParams,
    InputLocation,
    ResolvedStageConfig,
)
from visionr1_jobs.generation import Generation, GenerationBackend
from visionr1_jobs.stages import eval as eval_stage
from visionr1_operator.api import parse_run
from visionr1_operator.resolve import resolve_stage_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def _eval_params(obj: dict) -> EvalParams:
    cfg = resolve_stage_config(parse_run(obj), "eval", "/ws")
    return EvalParams.model_validate(cfg.params)


def test_zero_is_evaluated_with_its_training_system_prompt_and_the_rest_without() -> None:
    zero = _example("zero.yaml")
    trained = zero["spec"]["stages"]["grpo"]["params"]["systemPrompt"]
    params = _eval_params(zero)
    assert params.checkpoints == ["base", "grpo"]
    assert params.system_prompt("grpo") == trained
    assert params.system_prompt("base") is None  # the base model was not trained with it
    # The paper's recipe (no GRPO system prompt): no checkpoint gets one.
    recipe = _eval_params(_example("qwen25vl-7b.yaml"))
    assert recipe.system_prompts == {}
    # The same prompt reaches every PTST sub-stage checkpoint of such a run ...
    staged = copy.deepcopy(zero)
    staged["spec"]["stages"]["eval"]["params"]["checkpoints"] = ["base", "grpo/stage-1", "grpo"]
    assert _eval_params(staged).system_prompts == {"grpo/stage-1": trained, "grpo": trained}
    # ... and one set in the eval stage's own params wins.
    own = copy.deepcopy(zero)
    own["spec"]["stages"]["eval"]["params"]["systemPrompts"] = {"grpo": "Answer briefly."}
    assert _eval_params(own).system_prompts == {"grpo": "Answer briefly."}


def test_a_system_prompt_for_a_checkpoint_not_evaluated_is_refused() -> None:
    with pytest.raises(ValueError, match=r"systemPrompts has key\(s\) \['sft'\]"):
        EvalParams(checkpoints=["base", "grpo"], system_prompts={"sft": "x"})


class Recorder(GenerationBackend):
    """Answers right, and keeps every request's messages."""

    kind = "recorder"

    def __init__(self, model: str, answers: dict, seen: list) -> None:
        self.model, self.answers, self.seen = model, answers, seen

    def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
        out = []
        for req in requests:
            self.seen.append((self.model, req.messages))
            gold = self.answers[(req.messages[-1]["content"], req.images[0])]
            text = f"<think> x </think><answer> Final Answer:{gold} </answer>"
            out.append(Generation(text=text, completion_tokens=5))
        return out


def test_eval_sends_the_checkpoints_system_prompt_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.eval.readers import read_benchmark
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=3, seed=1)
    rows = read_benchmark("toy", tmp_path / "toy" / "bench").rows
    answers = {(r["question"], r["images"][0]): r["answer"] for r in rows}
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    zero = "Think inside <think> </think>, then answer inside <answer> </answer>."
    params = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base", "zero"],
        max_new_tokens=32,
        retries_missing_answer=0,
        system_prompts={"zero": zero},
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(tmp_path),
        output_dir="eval",
        base_model="models/base",
        inputs={
            "checkpoint:base": InputLocation(path="models/base", format="model"),
            "checkpoint:zero": InputLocation(path="models/zero", format="model"),
        },
        params=params.dump(),
    )
    seen: list = []
    assert eval_stage.run(cfg, lambda model, p: Recorder(model, answers, seen)) is not None
    by_model = {m: [[x["role"] for x in msgs] for mm, msgs in seen if mm == m] for m, _ in seen}
    assert by_model["models/base"] == [["user"]] * 3  # the paper's protocol: no system turn
    assert by_model["models/zero"] == [["system", "user"]] * 3
    assert {msgs[0]["content"] for m, msgs in seen if m == "models/zero"} == {zero}
    out = tmp_path / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["system_prompts"]["base"] == "none"
    assert len(report["settings"]["system_prompts"]["zero"]) == 64  # its sha256
    assert report["results"]["zero"]["toy"]["system_prompt"] == zero
    assert report["results"]["base"]["toy"]["system_prompt"] is None
    md = (out / "report.md").read_text()
    assert f"- zero: `{zero}`" in md and "- base: none" in md
    saved = [
        json.loads(x) for x in (out / "zero" / "toy.verdicts.jsonl").read_text().split("\n") if x
    ]
    assert {r["system_prompt"] for r in saved} == {zero}
    # Resuming the folder with another system prompt is refused, not mixed.
    changed = params.model_copy(update={"system_prompts": {"zero": "Be brief."}})
    cfg2 = cfg.model_copy(update={"params": changed.dump()})
    from visionr1_jobs.contract import InvalidInput

    with pytest.raises(InvalidInput, match="system_prompts_sha256"):
        eval_stage.run(cfg2, lambda model, p: pytest.fail("must not generate"))
