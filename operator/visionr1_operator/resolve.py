"""Pure: a VisionR1Run spec → the resolved config each stage program receives.

Shared by the operator (which writes it into a ConfigMap) and the local executor (which writes it
to a file), so both run the same pipeline. No I/O here.
"""

from __future__ import annotations

from visionr1_jobs.config import (
    CONFIG_SCHEMA,
    PARAMS_BY_STAGE,
    STAGES,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    RunRef,
    package_version,
    param_defaults,
)
from visionr1_operator.api import UPSTREAM, InputRef, VisionR1Run

# Workspace layout: each stage writes under its own folder.
OUTPUT_DIRS: dict[str, str] = {s: s for s in STAGES}

# The output key a consumer reads from each producing stage's manifest.
OUTPUT_KEY: dict[str, str] = {
    "synthesis": "data",
    "filter": "data",
    "sft": "model",
    "grpo": "model",
    "eval": "report",
}


def _from_ref(ref: InputRef, run: VisionR1Run, kind: str) -> InputLocation:
    if ref.stage is not None:
        return InputLocation(path=OUTPUT_DIRS[ref.stage], format="stage", stage=ref.stage)
    if ref.dataset is not None:
        return InputLocation(path=ref.dataset, format=ref.format or "auto")
    if ref.checkpoint is not None:
        return InputLocation(path=ref.checkpoint, format="model")
    return InputLocation(path=run.spec.base_model.name, format="model")


def _main_input(run: VisionR1Run, stage: str) -> InputLocation | None:
    spec = run.spec.stages.get(stage)
    if spec.from_ is not None:
        return _from_ref(spec.from_, run, stage)
    upstream = UPSTREAM[stage]
    if upstream is None:
        return None
    return InputLocation(path=OUTPUT_DIRS[upstream], format="stage", stage=upstream)


def eval_checkpoints(run: VisionR1Run) -> dict[str, InputLocation]:
    """Checkpoint name → where it is. Checkpoints of disabled stages are left out."""
    stages = run.spec.stages
    out: dict[str, InputLocation] = {}
    for name in stages.eval.params.checkpoints:
        head = name.split("/", 1)[0]
        if name == "base":
            out[name] = InputLocation(path=run.spec.base_model.name, format="model")
        elif head in ("sft", "grpo"):
            if stages.get(head).enabled:
                out[name] = InputLocation(path=OUTPUT_DIRS[head], format="stage", stage=head)
        else:
            out[name] = InputLocation(path=name, format="model")
    return out


def eval_system_prompts(run: VisionR1Run) -> dict[str, str]:
    """The system prompt of each evaluated checkpoint: the eval stage's own ``systemPrompts``,
    and for each GRPO checkpoint (``grpo``, ``grpo/stage-N``) of a run whose rollouts had a
    ``systemPrompt`` (the Vision-R1-Zero ablation: RL from the base model with a format
    instruction and the 0.5·format + 0.5·accuracy reward) that prompt, so the model is evaluated
    as it was trained. Every other checkpoint gets none, as the paper evaluates."""
    stages = run.spec.stages
    out = dict(stages.eval.params.system_prompts)
    trained_with = stages.grpo.params.system_prompt if stages.grpo.enabled else None
    if trained_with:
        for name in eval_checkpoints(run):
            if name.split("/", 1)[0] == "grpo":
                out.setdefault(name, trained_with)
    return out


def resolve_stage_config(
    run: VisionR1Run,
    stage: str,
    workspace: str,
    *,
    mlflow_tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    stage_run_id: str | None = None,
) -> ResolvedStageConfig:
    """The stage program's ``--config`` for ``stage`` of ``run``."""
    spec = run.spec.stages.get(stage)
    inputs: dict[str, InputLocation] = {}
    main = _main_input(run, stage)
    if stage in ("synthesis", "filter"):
        assert main is not None
        inputs["data"] = main
    elif stage == "sft":
        assert main is not None
        inputs["data"] = main
        inputs["model"] = InputLocation(path=run.spec.base_model.name, format="model")
    elif stage == "grpo":
        assert main is not None
        inputs["model"] = main
        ds = run.spec.stages.grpo.params.dataset
        if ds is not None:
            inputs["data"] = InputLocation(path=ds.path, format=ds.format)
    elif stage == "eval":
        for name, loc in eval_checkpoints(run).items():
            inputs[f"checkpoint:{name}"] = loc
    params = spec.params.dump()  # type: ignore[attr-defined]
    if stage == "eval":
        system_prompts = eval_system_prompts(run)
        if system_prompts:
            params["systemPrompts"] = system_prompts
    meta = run.metadata
    return ResolvedStageConfig(
        stage=stage,  # type: ignore[arg-type]
        run=RunRef(
            namespace=meta.namespace or "default",
            name=meta.name,
            uid=(meta.model_extra or {}).get("uid"),
        ),
        workspace=workspace,
        output_dir=OUTPUT_DIRS[stage],
        base_model=run.spec.base_model.name,
        inputs=inputs,
        params=params,
        schema_version=CONFIG_SCHEMA,
        written_by=package_version(),
        param_defaults=param_defaults(PARAMS_BY_STAGE[stage]),
        mlflow=MlflowRef(
            tracking_uri=mlflow_tracking_uri or run.spec.mlflow.tracking_uri,
            experiment=run.spec.mlflow.experiment,
            parent_run_id=parent_run_id,
            run_id=stage_run_id,
        ),
    )
