"""Rollouts sized for the GPUs: the GRPO batch plan, every new field on its way into TRL's
GRPOConfig, the model's kwargs and the colocated vLLM engine, and the refusals of numbers that
cannot divide (naming the fields and the fix).

vLLM cannot be installed here: the colocated engine's settings are checked where they are handed
to TRL (its GRPOConfig, which builds the engine from them), never on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_jobs.config import GRPOParams, grpo_batch_plan
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.training import runtime
from visionr1_jobs.training.rollout_args import grpo_rollout_kwargs

from crd_tools import api_server_errors

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "qwen25vl-7b.yaml"


def _params(**kw: Any) -> GRPOParams:
    base: dict[str, Any] = {
        "prompts_per_step": 4,
        "ptst": [{"max_completion_length": 64, "num_generations": 4, "steps": 8}],
        "deepspeed": "none",
        "bf16": False,
        "gradient_checkpointing": False,
    }
    return GRPOParams(**(base | kw))


# --------------------------------------------------------------------------- the plan


def test_the_7b_example_plan_on_8_and_64_gpus() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    grpo = example["spec"]["stages"]["grpo"]
    params = GRPOParams.model_validate(grpo["params"])
    world = grpo["nodes"] * grpo["resources"]["gpus"]
    assert world == 8
    one, two = (grpo_batch_plan(params, i, world) for i in range(2))
    # Stage 1: 128 prompts × 16 = 2048 sequences a rollout, 256 per GPU; a step is 32 × 16 = 512,
    # 64 per GPU in micro-batches of 4 → 16 accumulation steps; 4 steps per rollout.
    assert one == dataclasses.replace(
        one,
        per_device=4,
        grad_accum=16,
        steps_per_rollout=4,
        steps_per_generation=64,
        generation_batch_size=2048,
        rollout_per_process=256,
    )
    # Stage 2: half the samples, twice the budget: 1024 a rollout, 128 per GPU.
    assert (two.grad_accum, two.generation_batch_size, two.rollout_per_process) == (8, 1024, 128)
    # The comment's 64-GPU version keeps every per-GPU number.
    scaled = params.model_copy(update={"prompts_per_step": 256, "prompts_per_rollout": 1024})
    assert dataclasses.replace(grpo_batch_plan(scaled, 0, 64), generation_batch_size=0) == (
        dataclasses.replace(one, generation_batch_size=0)
    )
    assert grpo_batch_plan(scaled, 0, 64).generation_batch_size == 16384
    # The image budget is the one SFT trains with, and the engine context fits each row.
    assert params.max_pixels == example["spec"]["stages"]["sft"]["params"]["maxPixels"] == 1003520
    assert [
        grpo_rollout_kwargs(params, i, p, "colocate")["vllm_max_model_length"]
        for i, p in enumerate((one, two))
    ] == [8192, 12288]


def test_one_rollout_per_step_by_default() -> None:
    plan = grpo_batch_plan(_params(), 0, 2)
    assert (plan.per_device, plan.grad_accum, plan.steps_per_rollout) == (8, 1, 1)
    assert plan.steps_per_generation == plan.grad_accum
    assert plan.generation_batch_size == 16


@pytest.mark.parametrize(
    ("change", "world", "expected"),
    [
        (
            {"prompts_per_step": 3},
            8,
            "params.promptsPerStep (3) × params.ptst[0].numGenerations (4) = 12 completions per "
            "step cannot be split over 8 processes (nodes × GPUs per pod); make promptsPerStep "
            "× numGenerations a multiple of 8, e.g. promptsPerStep: 4",
        ),
        (
            {"per_device_batch_size": 3},
            2,
            "params.perDeviceBatchSize (3) must divide the 8 completions each of the 2 "
            "processes trains per optimizer step",
        ),
        ({"per_device_batch_size": 3}, 2, "e.g. set perDeviceBatchSize to 2"),
        (
            {"prompts_per_rollout": 12, "num_iterations": 2},
            1,
            "params.ptst[0].steps (8) must be a multiple of the optimizer steps one rollout "
            "feeds (params.promptsPerRollout / promptsPerStep × numIterations = 3 × 2 = 6), so "
            "every rollout is trained on in full; e.g. set steps to 6",
        ),
    ],
    ids=["completions-over-processes", "micro-batch", "micro-batch-fix", "steps-over-rollouts"],
)
def test_numbers_that_cannot_divide_are_refused(
    change: dict[str, Any], world: int, expected: str
) -> None:
    params = _params(**change)
    with pytest.raises(ValueError) as err:
        grpo_batch_plan(params, 0, world)
    assert expected in str(err.value)
    # The stage program refuses the same numbers with exit 65 (InvalidInput).
    with pytest.raises(InvalidInput, match="must|cannot"):
        runtime.grpo_plan(params, 0, world)


def test_rollout_must_hold_whole_steps() -> None:
    with pytest.raises(ValueError, match=r"promptsPerRollout \(6\) must be a multiple of "):
        _params(prompts_per_rollout=6)


# --------------------------------------------------------------------------- into TRL


def _grpo_config(params: GRPOParams, plan: Any, mode: str | None, tmp_path: Path) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        **runtime.common_training_kwargs(params, tmp_path, False, None),
        **grpo_rollout_kwargs(params, 0, plan, mode),
    )


def test_every_name_is_a_field_of_the_installed_trl(tmp_path: Path) -> None:
    import trl
    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    params = _params(vllm_server_url="http://vllm:8000")
    plan = grpo_batch_plan(params, 0, 1)
    for mode in (None, "colocate", "server"):
        unknown = set(grpo_rollout_kwargs(params, 0, plan, mode)) - fields
        assert not unknown, f"TRL {trl.__version__} has no GRPOConfig field {unknown}"
    assert "use_liger_kernel" in runtime.common_training_kwargs(params, tmp_path, False, None)
    assert "use_liger_kernel" in fields


def test_colocated_vllm_fields_reach_grpo_config(tmp_path: Path) -> None:
    params = _params(
        prompts_per_rollout=8,
        num_iterations=2,
        per_device_batch_size=2,
        max_prompt_length=1000,
        vllm_enable_sleep_mode=True,
        vllm_tensor_parallel_size=2,
        vllm_gpu_memory_utilization=0.5,
        use_liger_kernel=True,
    )
    # One process, as TRL sees it in this test: its own arithmetic must meet the plan.
    plan = grpo_batch_plan(params, 0, 1)
    args = _grpo_config(params, plan, "colocate", tmp_path)
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 8
    assert args.steps_per_generation == 16  # 8 micro-steps a step × 2 steps a rollout
    assert args.generation_batch_size == plan.generation_batch_size == 32  # 8 prompts × 4
    assert args.num_iterations == 2
    assert args.vllm_max_model_length == 1000 + 64
    assert args.vllm_enable_sleep_mode is True
    assert args.vllm_tensor_parallel_size == 2
    assert args.vllm_gpu_memory_utilization == 0.5
    assert args.use_liger_kernel is True


def test_server_and_transformers_rollouts_leave_the_engine_alone(tmp_path: Path) -> None:
    params = _params(
        rollout="vllm_server",
        vllm_server_url="http://vllm:8000",
        vllm_enable_sleep_mode=True,
        vllm_tensor_parallel_size=2,
    )
    plan = grpo_batch_plan(params, 0, 1)
    server = _grpo_config(params, plan, "server", tmp_path)
    # A server is sized where it is started; TRL's colocate-only knobs keep their defaults.
    assert server.vllm_server_base_url == "http://vllm:8000"
    assert (server.vllm_enable_sleep_mode, server.vllm_tensor_parallel_size) == (False, 1)
    local = _grpo_config(params, plan, None, tmp_path)
    assert local.use_vllm is False and local.steps_per_generation == plan.steps_per_generation


def test_kernels_this_pod_cannot_run_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"params.useLigerKernel: true needs a GPU"):
        runtime.check_kernels(_params(use_liger_kernel=True), cuda=False)
    with pytest.raises(InvalidInput, match="needs the liger-kernel package"):
        runtime.check_kernels(_params(use_liger_kernel=True), cuda=True)
    with pytest.raises(InvalidInput, match="flash_attention_2 needs the flash-attn package"):
        runtime.check_kernels(_params(attn_implementation="flash_attention_2"), cuda=True)
    runtime.check_kernels(_params(attn_implementation="sdpa"), cuda=False)
    with pytest.raises(InvalidInput, match=r"vllmTensorParallelSize \(4\) must divide the 6"):
        runtime.check_vllm_tensor_parallel(_params(vllm_tensor_parallel_size=4), 6)


# --------------------------------------------------------------------------- the manifest


def _example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _refusals(obj: dict[str, Any]) -> list[str]:
    from visionr1_operator.validate import validate_object

    return [str(p) for p in validate_object(obj)]


def test_the_7b_example_renders_its_rollout_settings() -> None:
    from visionr1_operator.api import parse_run
    from visionr1_operator.render import render_run

    assert _refusals(_example()) == [] and api_server_errors(_example()) == []
    objects = render_run(parse_run(_example()))
    (config_map,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"]["visionr1.io/stage"] == "grpo"
    ]
    (config,) = [json.loads(v) for v in config_map["data"].values()]
    params = GRPOParams.model_validate(config["params"])
    assert (params.prompts_per_rollout, params.per_device_batch_size) == (128, 4)
    assert (params.vllm_enable_sleep_mode, params.vllm_tensor_parallel_size) == (True, 1)
    assert (params.attn_implementation, params.max_pixels) == ("sdpa", 1003520)
    (job,) = [
        o
        for o in objects
        if o["kind"] == "Job" and o["metadata"]["labels"]["visionr1.io/stage"] == "grpo"
    ]
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    world = int(env["VISIONR1_NNODES"]) * int(env["VISIONR1_NPROC_PER_NODE"])
    assert grpo_batch_plan(params, 0, world).rollout_per_process == 256


@pytest.mark.parametrize(
    ("path", "value", "expected", "crd_can"),
    [
        (
            ("grpo", "nodes"),
            3,
            "stages.grpo.params.promptsPerStep (32) × stages.grpo.params.ptst[0].numGenerations "
            "(16) = 512 completions per step cannot be split over 24 processes",
            False,
        ),
        (
            ("grpo", "params", "perDeviceBatchSize"),
            5,
            "stages.grpo.params.perDeviceBatchSize (5) must divide the 64 completions",
            False,
        ),
        (
            ("grpo", "params", "promptsPerRollout"),
            48,
            "promptsPerRollout (48) must be a multiple of promptsPerStep (32)",
            True,
        ),
        (
            ("grpo", "params", "numIterations"),
            3,
            "stages.grpo.params.ptst[0].steps (100) must be a multiple of the optimizer steps "
            "one rollout feeds",
            False,
        ),
        (
            ("grpo", "params", "vllmTensorParallelSize"),
            3,
            "stages.grpo.params.vllmTensorParallelSize (3) must divide stages.grpo.resources.gpus",
            False,
        ),
        (
            ("sft", "params", "globalBatchSize"),
            40,
            "stages.sft.params.globalBatchSize (40) must be a multiple of "
            "stages.sft.params.perDeviceBatchSize (1) × processes (32)",
            False,
        ),
    ],
    ids=["grpo-nodes", "grpo-micro-batch", "rollout-vs-step", "steps-vs-rollout", "vllm-tp", "sft"],
)
def test_the_manifest_is_refused_naming_the_fields(
    path: tuple[str, ...], value: Any, expected: str, crd_can: bool
) -> None:
    obj = copy.deepcopy(_example())
    node = obj["spec"]["stages"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = _refusals(obj)
    assert any(expected in p for p in problems), problems
    # Only the rule within params is a CEL rule; the others need nodes × GPUs and the
    # models' defaults, which the API server's schema does not carry.
    assert bool(api_server_errors(obj)) is crd_can


# --------------------------------------------------------------------------- the real stage


@pytest.mark.slow
def test_grpo_stage_rolls_out_once_for_the_steps_it_feeds(tmp_path: Path) -> None:
    """The real stage on CPU (tiny model, TRL's GRPOTrainer, transformers generate): one rollout
    of 2 prompts × 2 samples feeds 2 optimizer steps, trained on twice (numIterations 2), so 4
    steps generate once; the policy and TRL's KL reference use the attention asked for."""

    from visionr1_jobs.__main__ import main as stage_main
    from visionr1_jobs.config import ResolvedStageConfig
    from visionr1_jobs.contract import read_manifest
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny")
    write_toy_dataset(tmp_path / "toy", 2, seed=5, n_rl=6, n_bench=1)
    rl = tmp_path / "toy" / "rl"
    ws = tmp_path / "ws"
    ws.mkdir()
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
            "promptsPerStep": 1,
            "promptsPerRollout": 2,
            "numIterations": 2,
            "attnImplementation": "eager",
            "maxPromptLength": 512,
            "rollout": "transformers",
            "saveSteps": 100,
            "ptst": [{"maxCompletionLength": 6, "numGenerations": 2, "steps": 4}],
        },
        mlflow={"experiment": "rollouts", "trackingUri": f"sqlite:///{ws / 'mlflow.db'}"},
    )
    path = ws / "grpo.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    # The sub-stage trains in a process of its own: a probe on the children's path records what
    # their GRPOTrainer was given and which prompts each rollout consumed.
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe_path = Path(__file__).resolve().parent / "substage_probe"
    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    mp = pytest.MonkeyPatch()
    mp.setenv(
        "PYTHONPATH", os.pathsep.join([str(probe_path), jobs, os.environ.get("PYTHONPATH", "")])
    )
    mp.setenv("VISIONR1_PROBE_DIR", str(probe_dir))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert stage_main(["grpo", "--config", str(path)]) == 0
    finally:
        mp.undo()

    (probe_file,) = probe_dir.glob("trainer-*.json")
    seen = json.loads(probe_file.read_text())
    sizes = (seen["steps_per_generation"], seen["num_iterations"], seen["generation_batch_size"])
    assert sizes == (2, 2, 4)
    assert seen["attn"] == ["eager", "eager"]
    (rollout,) = seen["batches"]  # 4 steps, 2 × 2 fed by each rollout
    assert len(rollout) == 4 and len(set(rollout)) == 2
    done = json.loads((ws / "grpo" / "stage-1" / "_done.json").read_text())
    assert (done["steps_per_rollout"], done["rollout_completions"]) == (2, 4)
    manifest = read_manifest(ws, "grpo")
    assert manifest is not None
