"""PTST verified by weights, prompts and processes, on the tiny model and toy RL data (CPU, real
TRL GRPOTrainer in the processes the stage starts).

Each sub-stage trains in a process of its own: sub-stage 2 runs under another pid than sub-stage
1 and the stage program, and its peak memory when it starts is below what sub-stage 1 reached.
The tensors each trainer actually held (probed inside the child, tests/substage_probe) are
compared with the tensors on disk: sub-stage 2's policy starts from sub-stage 1's final weights,
and the KL reference is the model the config names (the GRPO input). Sub-stage 2 takes the prompts
after sub-stage 1's last, through the whole set before the first repeat, with its own seed. A
resumed run whose PTST rows changed is refused with exit 65 naming the field, and touches
nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from visionr1_jobs.__main__ import main as stage_main
from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import read_manifest

pytestmark = pytest.mark.slow

PROBE = Path(__file__).resolve().parent / "substage_probe"
RL_PROMPTS = 5
PROMPTS_PER_STEP = 2
SEED = 7
# One rollout of 4 prompts per sub-stage, trained on as 2 steps of 2 prompts, twice (μ = 2):
# 4 steps. Sub-stage 1 takes stream positions 0-3, sub-stage 2 positions 4-7, so it finishes
# the 5-prompt set (position 4) and then wraps into a second pass (5-7).
ROLLOUT = {"promptsPerRollout": 4, "numIterations": 2}
PROMPTS_PER_SUBSTAGE = 4
PTST = [
    {"maxCompletionLength": 8, "numGenerations": 2, "steps": 4},
    {"maxCompletionLength": 12, "numGenerations": 2, "steps": 4},
]


def _grpo_config(ws: Path, model: Path, rl: Path, ptst: list[dict[str, int]], **kw: Any) -> Path:
    cfg = ResolvedStageConfig(
        stage="grpo",
        workspace=str(ws),
        output_dir="grpo",
        base_model=str(model),
        inputs={
            "model": {"path": str(model), "format": "model"},
            "data": {"path": str(rl), "format": "toy"},
        },
        params={
            "dataset": {"path": str(rl), "format": "toy"},
            "deepspeed": "none",
            "bf16": False,
            "gradientCheckpointing": False,
            "learningRate": 1e-2,
            "promptsPerStep": PROMPTS_PER_STEP,
            "maxPromptLength": 512,
            "rollout": "transformers",
            "saveSteps": 1,
            "seed": SEED,
            "ptst": ptst,
            **ROLLOUT,
            **kw,
        },
        mlflow={"experiment": "ptst", "trackingUri": f"sqlite:///{ws / 'mlflow.db'}"},
    )
    path = ws / "grpo.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def _digest(folder: Path) -> str:
    """The probe's digest of the weights saved in ``folder``, named as the model names them."""
    from transformers import AutoModelForImageTextToText

    spec = importlib.util.spec_from_file_location("substage_probe", PROBE / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)  # without VISIONR1_PROBE_DIR it only defines the digest
    return str(probe.weights_digest(AutoModelForImageTextToText.from_pretrained(folder)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One GRPO run with two PTST sub-stages; what each sub-stage's trainer held and consumed."""
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    root = tmp_path_factory.mktemp("ptst")
    model = create_tiny_model(root / "tiny")
    write_toy_dataset(root / "toy", 2, seed=3, n_rl=RL_PROMPTS, n_bench=1)
    ws = root / "ws"
    ws.mkdir()
    probe_dir = root / "probe"
    probe_dir.mkdir()
    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    mp = pytest.MonkeyPatch()
    # The children inherit this environment: the probe first on their path.
    mp.setenv("PYTHONPATH", os.pathsep.join([str(PROBE), jobs, os.environ.get("PYTHONPATH", "")]))
    mp.setenv("VISIONR1_PROBE_DIR", str(probe_dir))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        cfg = _grpo_config(ws, model, root / "toy" / "rl", PTST)
        assert stage_main(["grpo", "--config", str(cfg)]) == 0
    finally:
        mp.undo()
    probes = {}
    for path in probe_dir.glob("trainer-*.json"):
        probe = json.loads(path.read_text())
        probes[probe["pid"]] = probe
    done = [json.loads((ws / "grpo" / f"stage-{i}" / "_done.json").read_text()) for i in (1, 2)]
    # In the order the sub-stages ran.
    seen = [probes[d["process_at_start"]["pid"]] for d in done]
    ids = [r.id for r in _rl_samples(root / "toy" / "rl")]
    return {
        "ws": ws,
        "model": model,
        "rl": root / "toy" / "rl",
        "seen": seen,
        "done": done,
        "ids": ids,
    }


def _rl_samples(rl: Path) -> list[Any]:
    from visionr1_jobs.data.load import load_dataset_dir

    return list(load_dataset_dir(rl, "toy"))


def _consumed(probe: dict[str, Any], generations: int) -> list[str]:
    """The prompts a trainer generated for, in order (each batch holds a prompt's samples in a
    row)."""
    out = []
    for batch in probe["batches"]:
        assert len(batch) % generations == 0
        groups = [batch[i : i + generations] for i in range(0, len(batch), generations)]
        assert all(len(set(g)) == 1 for g in groups), batch
        out += [g[0] for g in groups]
    return out


def test_each_substage_runs_in_a_process_of_its_own(trained: dict[str, Any]) -> None:
    done = trained["done"]
    first, second = done[0]["process_at_start"]["pid"], done[1]["process_at_start"]["pid"]
    assert len({os.getpid(), first, second}) == 3
    # The trainers ran in those processes (the probe writes from inside each).
    assert [p["pid"] for p in trained["seen"]] == [first, second]
    assert done[0]["process_at_end"]["pid"] == first and done[1]["process_at_end"]["pid"] == second
    # Peak resident memory never goes down within a process: sub-stage 2 starting below sub-stage
    # 1's peak shows none of sub-stage 1's memory came along.
    peak1 = done[0]["process_at_end"]["peak_rss_mib"]
    assert done[1]["process_at_start"]["peak_rss_mib"] < peak1
    assert done[0]["process_at_start"]["peak_rss_mib"] < peak1


def test_substage_2_starts_from_substage_1_and_the_reference_is_the_input(
    trained: dict[str, Any],
) -> None:
    ws, seen = trained["ws"], trained["seen"]
    assert read_manifest(ws, "grpo") is not None and len(seen) == 2
    base = _digest(trained["model"])
    final1 = _digest(ws / "grpo" / "stage-1" / "final")
    final2 = _digest(ws / "grpo" / "stage-2" / "final")
    assert final1 != base, "sub-stage 1 must move the weights for this test to mean much"
    # Sub-stage 1: the policy and the reference are both the GRPO input.
    assert seen[0]["policy"] == base and seen[0]["reference"] == base
    # Sub-stage 2: the policy is sub-stage 1's final weights; the reference is still the input.
    assert seen[1]["policy"] == final1
    assert seen[1]["reference"] == base
    assert final2 != final1


def test_substage_2_takes_the_prompts_after_substage_1s_last(trained: dict[str, Any]) -> None:
    seen, done, ids = trained["seen"], trained["done"], trained["ids"]
    got1 = _consumed(seen[0], PTST[0]["numGenerations"])
    got2 = _consumed(seen[1], PTST[1]["numGenerations"])
    assert len(got1) == len(got2) == PROMPTS_PER_SUBSTAGE
    # Together the sub-stages walk the whole set before any prompt comes back: sub-stage 1's four
    # and sub-stage 2's first are the five prompts, each once (a replay would repeat got1).
    assert sorted(got1 + got2[:1]) == sorted(ids)
    # Only then a second pass (a wrap), again without repeats within it.
    assert len(set(got2[1:])) == len(got2[1:])
    # Each sub-stage samples with its own seed, the data in the order given.
    assert [p["seed"] for p in seen] == [SEED, SEED + 1]
    assert [p["shuffle_dataset"] for p in seen] == [False, False]
    # The recorded first and last prompts are the ones the trainers consumed.
    order1, order2 = done[0]["prompt_order"], done[1]["prompt_order"]
    assert (order1["first_prompt_id"], order1["last_prompt_id"]) == (got1[0], got1[-1])
    assert (order2["first_prompt_id"], order2["last_prompt_id"]) == (got2[0], got2[-1])
    assert [ids[order2["first_prompt"]], ids[order2["last_prompt"]]] == [got2[0], got2[-1]]
    assert order2["first_position"] == order1["last_position"] + 1 == PROMPTS_PER_SUBSTAGE
    assert (order1["first_epoch"], order1["last_epoch"]) == (0, 0)
    assert (order2["first_epoch"], order2["last_epoch"]) == (0, 1)


def test_mlflow_and_the_manifest_record_each_substages_prompts(trained: dict[str, Any]) -> None:
    import mlflow

    ws, done = trained["ws"], trained["done"]
    manifest = read_manifest(ws, "grpo")
    assert manifest is not None
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    for record in done:
        order = record["prompt_order"]
        assert manifest.extra["prompt_order"][record["name"]] == order
        params = client.get_run(record["mlflow_run_id"]).data.params
        assert params["prompts.first_prompt"] == str(order["first_prompt"])
        assert params["prompts.last_prompt"] == str(order["last_prompt"])
        assert params["prompts.first_position"] == str(order["first_position"])
        tags = client.get_run(record["mlflow_run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == manifest.mlflow_run_id
    assert client.get_run(manifest.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"ptst": [PTST[0], {**PTST[1], "steps": 8}]},
            r"params\.ptst\[1\]\.steps: grpo/stage-2 was trained with 4,",
        ),
        (
            {"ptst": [{**PTST[0], "maxCompletionLength": 16}, PTST[1]]},
            r"ptst\[0\]\.maxCompletionLength",
        ),
        ({"learningRate": 5e-3}, r"params\.learningRate"),
        ({"resetReferenceEachStage": True}, r"params\.resetReferenceEachStage"),
    ],
)
def test_a_resumed_run_with_changed_ptst_rows_is_refused(
    trained: dict[str, Any], change: dict[str, Any], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    ws = trained["ws"]
    (ws / "grpo" / "_manifest.json").rename(ws / "grpo" / "manifest.bak")  # "not finished"
    try:
        before = {p: p.stat().st_mtime_ns for p in (ws / "grpo").rglob("*") if p.is_file()}
        params = {"ptst": PTST} | change
        cfg = _grpo_config(ws, trained["model"], trained["rl"], params.pop("ptst"), **params)
        assert stage_main(["grpo", "--config", str(cfg)]) == 65
        err = capsys.readouterr().err
        assert re.search(field, err), err
        after = {p: p.stat().st_mtime_ns for p in (ws / "grpo").rglob("*") if p.is_file()}
        assert after == before  # refused before anything was written
    finally:
        (ws / "grpo" / "manifest.bak").rename(ws / "grpo" / "_manifest.json")


def test_done_markers_record_their_rows(trained: dict[str, Any]) -> None:
    ws = trained["ws"]
    for index, row in enumerate(PTST, start=1):
        done = json.loads((ws / "grpo" / f"stage-{index}" / "_done.json").read_text())
        assert done["row"]["steps"] == row["steps"]
        assert done["row"]["max_completion_length"] == row["maxCompletionLength"]
        assert done["row"]["learning_rate"] == 1e-2


def _stage_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    env["PYTHONPATH"] = jobs + os.pathsep + env.get("PYTHONPATH", "")
    return env | extra


def test_a_substage_refusing_its_input_makes_the_stage_exit_65(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    import subprocess
    import sys

    from visionr1_jobs.config import EXIT_INVALID_INPUT

    ws = tmp_path / "ws"
    ws.mkdir()
    # Found only inside the sub-stage's process: no toy prompt fits in 16 tokens.
    cfg = _grpo_config(ws, trained["model"], trained["rl"], PTST, maxPromptLength=16)
    out = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs", "grpo", "--config", str(cfg)],
        env=_stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == EXIT_INVALID_INPUT, out.stderr[-3000:]
    assert "params.maxPromptLength (16) leaves no prompt" in out.stderr, out.stderr[-3000:]
    assert read_manifest(ws, "grpo") is None
    assert not (ws / "grpo" / "stage-1" / "_done.json").exists()


def test_sigterm_to_the_stage_program_stops_the_substage_process(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    ws = tmp_path / "ws"
    ws.mkdir()
    long = [{**PTST[0], "steps": 200}]
    cfg = _grpo_config(ws, trained["model"], trained["rl"], long)
    with (tmp_path / "stage.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "visionr1_jobs", "grpo", "--config", str(cfg)],
            env=_stage_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        # The sub-stage's process writes its row just before it builds the trainer.
        while not (ws / "grpo" / "stage-1" / "_row.json").exists():
            assert proc.poll() is None and time.time() < deadline, (
                tmp_path / "stage.log"
            ).read_text()
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        # Only the stage program gets it, as PID 1 of a pod does from the kubelet.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"left running: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (ws / "grpo" / "stage-1" / "_done.json").exists()
