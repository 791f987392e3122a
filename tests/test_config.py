"""Stage parameter models: the paper's defaults, and every field documented and bounded."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from pydantic import BaseModel

from visionr1_jobs.config import (
    PARAMS_BY_STAGE,
    EvalParams,
    GRPOParams,
    ResolvedStageConfig,
    SFTParams,
)


def test_defaults_reproduce_the_paper() -> None:
    sft = SFTParams()
    assert (sft.learning_rate, sft.lr_scheduler, sft.warmup_ratio, sft.epochs) == (
        5e-6,
        "cosine",
        0.05,
        2.0,
    )
    assert (sft.global_batch_size, sft.per_device_batch_size, sft.weight_decay) == (32, 1, 0.0)
    assert (sft.max_length, sft.deepspeed, sft.bf16) == (16384, "zero3", True)
    grpo = GRPOParams()
    assert (grpo.beta, grpo.epsilon, grpo.reward, grpo.system_prompt) == (
        0.01,
        0.2,
        "hard_format_result",
        None,
    )
    assert [(r.max_completion_length * r.num_generations) for r in grpo.ptst] == [65536, 65536]
    ev = EvalParams()
    assert (
        ev.temperature,
        ev.top_p,
        ev.max_new_tokens,
        ev.retries_missing_answer,
        ev.judge_mode(),
    ) == (
        0.6,
        0.95,
        16000,
        4,
        "rule",
    )


def _fields(model: type[BaseModel], seen: set[type]) -> typing.Iterator[tuple[str, typing.Any]]:
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        yield f"{model.__name__}.{name}", field
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for sub in [arg, *typing.get_args(arg)]:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    yield from _fields(sub, seen)


@pytest.mark.parametrize("stage", sorted(PARAMS_BY_STAGE))
def test_every_field_has_a_description_and_numbers_have_bounds(stage: str) -> None:
    for name, field in _fields(PARAMS_BY_STAGE[stage], set()):
        assert field.description, f"{name} has no description"
        if field.annotation in (int, float, int | None, float | None):
            bounds = [
                m for m in field.metadata if any(hasattr(m, b) for b in ("ge", "gt", "le", "lt"))
            ]
            assert bounds, f"{name} has no bounds"


def test_resolved_config_validates_its_params() -> None:
    cfg = ResolvedStageConfig(
        stage="grpo",
        workspace="/w",
        output_dir="grpo",
        base_model="m",
        params={"ptst": [{"maxCompletionLength": 64, "numGenerations": 1, "steps": 1}]},
    )
    with pytest.raises(ValueError, match="numGenerations"):
        cfg.stage_params()


def test_config_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, visionr1_jobs.config, visionr1_operator.api, visionr1_operator.validate;"
        "heavy = {'torch', 'transformers', 'trl', 'mlflow', 'kopf', 'kubernetes'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
