"""A stage program reading a config written by a newer operator: the newer fields left at their
defaults are ignored with a warning each (an operator upgrade must not fail runs on an older
trainer image); a newer field set to anything else is refused with exit 65, naming the field and
the trainer image that knows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from visionr1_jobs.config import (
    CONFIG_SCHEMA,
    EXIT_INVALID_INPUT,
    PTSTStage,
    ResolvedStageConfig,
    SFTParams,
    param_defaults,
)
from visionr1_jobs.contract import StageManifest, load_config, run_stage


class NewerPTSTStage(PTSTStage):
    temperature_decay: float = Field(1.0, description="A field a newer operator added.")


class NewerSFTParams(SFTParams):
    """SFT's parameters as a newer operator knows them: two optional fields more."""

    label_smoothing: float = Field(0.0, description="A field a newer operator added.")
    schedule: list[NewerPTSTStage] = Field(
        default_factory=lambda: [
            NewerPTSTStage(max_completion_length=8, num_generations=2, steps=1)
        ]
    )


def newer_config(tmp_path: Path, params: dict[str, Any]) -> Path:
    """What the newer operator writes: its parameters in full (defaults included, as Model.dump
    writes them), its schema and version, and its defaults."""
    cfg = ResolvedStageConfig(
        stage="sft",
        workspace=str(tmp_path / "ws"),
        output_dir="sft",
        base_model="m",
        params=NewerSFTParams.model_validate(params).dump(),
        schema_version=CONFIG_SCHEMA + 1,
        written_by="9.9.9",
        param_defaults=param_defaults(NewerSFTParams),
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def test_newer_fields_at_their_defaults_are_ignored_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = newer_config(tmp_path, {"learningRate": 1e-4})
    written = json.loads(path.read_text())["params"]
    assert written["labelSmoothing"] == 0.0 and "schedule" in written  # really in the file
    seen: list[SFTParams] = []

    def stage(cfg: ResolvedStageConfig) -> StageManifest:
        seen.append(cfg.stage_params())  # type: ignore[arg-type]
        return StageManifest(stage="sft")

    assert run_stage(stage, str(path)) == 0
    assert seen[0].learning_rate == 1e-4  # the fields it knows keep their values
    err = capsys.readouterr().err
    assert "warning: spec.stages.sft.params.labelSmoothing = 0.0: not known" in err
    assert "spec.stages.sft.params.schedule" in err
    assert (tmp_path / "ws" / "sft" / "_manifest.json").exists()


def test_a_nested_newer_field_at_its_default_is_ignored(tmp_path: Path) -> None:
    """Known list field, unknown field inside its items: the items' defaults decide."""
    cfg = ResolvedStageConfig(
        stage="grpo",
        workspace=str(tmp_path),
        output_dir="grpo",
        base_model="m",
        params={"ptst": [{"maxCompletionLength": 8, "numGenerations": 2, "steps": 1, "x": 1}]},
        schema_version=CONFIG_SCHEMA + 1,
        written_by="9.9.9",
        param_defaults={"ptst": {"fields": {"x": {"default": 1}}}},
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    assert load_config(path).params["ptst"] == [
        {"maxCompletionLength": 8, "numGenerations": 2, "steps": 1}
    ]
    cfg.params["ptst"][0]["x"] = 2
    path.write_text(cfg.model_dump_json(by_alias=True))
    with pytest.raises(Exception, match=r"spec\.stages\.grpo\.params\.ptst\[0\]\.x = 2"):
        load_config(path)


def test_a_newer_field_set_exits_65_naming_it_and_the_trainer_to_use(tmp_path: Path) -> None:
    path = newer_config(tmp_path, {"labelSmoothing": 0.1})
    termination = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs", "sft", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VISIONR1_TERMINATION_LOG": str(termination)},
    )
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr
    message = termination.read_text()
    assert "spec.stages.sft.params.labelSmoothing = 0.1 (its default: 0.0)" in message
    assert "use a trainer image >= 9.9.9" in message
    assert not (tmp_path / "ws" / "sft" / "_manifest.json").exists()


def test_an_unknown_field_from_an_equal_or_older_writer_is_still_refused(tmp_path: Path) -> None:
    cfg = ResolvedStageConfig(
        stage="sft",
        workspace=str(tmp_path),
        output_dir="sft",
        base_model="m",
        params={"learningRatee": 1e-4},
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    with pytest.raises(Exception, match=r"params\.learningRatee = 0\.0001: .*remove these fields"):
        load_config(path)


def test_the_operator_writes_its_schema_version_and_defaults() -> None:
    """What lets an older trainer tell a default from a setting: the operator's own config."""
    import yaml

    from visionr1_operator.api import VisionR1Run
    from visionr1_operator.resolve import resolve_stage_config

    repo = Path(__file__).resolve().parents[1]
    run = VisionR1Run.model_validate(yaml.safe_load((repo / "examples/tiny-cpu.yaml").read_text()))
    cfg = resolve_stage_config(run, "sft", "/ws")
    assert cfg.schema_version == CONFIG_SCHEMA
    assert cfg.written_by and cfg.written_by != "unknown"
    assert cfg.param_defaults["learningRate"] == {"default": 5e-6}
    assert cfg.param_defaults["maxLength"] == {"default": 16384}
    # the file a stage reads round-trips, and this trainer takes every field of it
    again = ResolvedStageConfig.model_validate_json(cfg.model_dump_json(by_alias=True))
    assert again.stage_params() == cfg.stage_params()


def test_trainer_images_carry_their_config_schema_as_a_label() -> None:
    """What a platform team reads off an image (skopeo inspect) before pointing runs at it."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("images_script", repo / "scripts" / "images.py")
    assert spec is not None and spec.loader is not None
    images = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = images  # dataclasses look their module up there
    spec.loader.exec_module(images)
    source = images.Source(version="9.9.9", revision="r", suite="bookworm")
    for name in ("trainer-cpu", "trainer", "operator"):
        got = images.labels(images.IMAGES[name], source).get("io.visionr1.config-schema")
        assert got == (str(CONFIG_SCHEMA) if name.startswith("trainer") else None), name
