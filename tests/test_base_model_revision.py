"""``spec.baseModel.revision``: passed to every stage process and honoured by the loaders.

The revision is resolved for real by transformers/huggingface_hub from an offline hub cache
holding two revisions of one model id (no network): the model loaded is the revision's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifests import stage_objects
from visionr1_operator.mlflow_runs import run_tags

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "visionr1/toy-revisions"
MAIN, V2 = "a" * 40, "b" * 40


def run_with_revision(revision: str | None) -> VisionR1Run:
    obj = yaml.safe_load((REPO / "examples" / "qwen25vl-7b.yaml").read_text())
    obj["spec"]["baseModel"] = {"name": MODEL_ID, **({"revision": revision} if revision else {})}
    return VisionR1Run.model_validate(obj)


def test_every_stage_pod_gets_the_revision_and_mlflow_records_it() -> None:
    run = run_with_revision("v2")
    for stage in ("synthesis", "filter", "sft", "grpo", "eval"):
        job = next(o for o in stage_objects(run, stage, 0) if o["kind"] == "Job")
        env = {
            e["name"]: e.get("value")
            for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["VISIONR1_BASE_MODEL"] == MODEL_ID
        assert env["VISIONR1_BASE_MODEL_REVISION"] == "v2"
    assert run_tags(run)["visionr1.baseModel.revision"] == "v2"
    assert "visionr1.baseModel.revision" not in run_tags(run_with_revision(None))


LOAD = """
import sys, torch
from visionr1_jobs.training import runtime
model = runtime.load_model(sys.argv[1], False)
runtime.load_processor(sys.argv[1], None, None)
print(round(float(sum(p.double().sum() for p in model.parameters())), 6))
"""


@pytest.mark.slow
def test_the_loaders_load_the_base_models_revision(tmp_path: Path) -> None:
    from visionr1_jobs.toy.model import create_tiny_model

    repo = tmp_path / "hub" / f"models--{MODEL_ID.replace('/', '--')}"
    for commit, seed in ((MAIN, 0), (V2, 1)):
        create_tiny_model(repo / "snapshots" / commit, seed=seed, vocab_size=400)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)

    def load(revision: str | None) -> float:
        env = {
            **os.environ,
            "HF_HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "VISIONR1_BASE_MODEL": MODEL_ID,
            "VISIONR1_BASE_MODEL_REVISION": revision or "",
        }
        out = subprocess.run(
            [sys.executable, "-c", LOAD, MODEL_ID],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.split()[-1])

    default, v2, pinned = load(None), load("v2"), load(V2)
    assert default != v2, "the revision chose other weights"
    assert v2 == pinned, "refs/v2 and its commit are the same weights"


def test_vllm_engines_load_the_base_models_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    from visionr1_jobs.generation.vllm_backend import engine_args

    monkeypatch.setenv("VISIONR1_BASE_MODEL", MODEL_ID)
    monkeypatch.setenv("VISIONR1_BASE_MODEL_REVISION", "v2")
    args = engine_args(MODEL_ID, tensor_parallel_size=1)
    assert args["revision"] == args["tokenizer_revision"] == "v2"
    other = engine_args("Qwen/Qwen2.5-VL-72B-Instruct", tensor_parallel_size=8)  # a teacher
    assert "revision" not in other
