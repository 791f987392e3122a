"""Admission happens once per generation of a spec: a run accepted under one operator keeps
running under a newer one with tighter rules; a changed spec is judged by the rules of its day.
And the trainer image's version is checked against the configs this operator writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator import api, compat
from visionr1_operator.api import VisionR1RunStatus
from visionr1_operator.handlers import OperatorConfig, Reconciler
from visionr1_operator.policy import ClusterPolicy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_object(name: str = "a-run-with-a-long-name", generation: int = 1) -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": "team", "generation": generation, "uid": "u1"}
    obj["spec"]["storage"] = {"pvc": "visionr1-data"}
    return obj


def admit(
    obj: dict[str, Any], observed: int | None, policy: ClusterPolicy | None = None
) -> tuple[Any, Any]:
    # any image: these runs name trainer images of other versions (the allowlist is not tested)
    rec = Reconciler(OperatorConfig(policy=policy or ClusterPolicy(allowed_images=("*",))))
    status = VisionR1RunStatus(phase="Running", observed_generation=observed)
    return rec._admit("team", obj["metadata"]["name"], obj, status)


def test_a_tighter_name_rule_spares_accepted_runs_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    obj = run_object()
    assert admit(obj, None)[0] is not None  # today's rule: accepted
    monkeypatch.setattr(api, "MAX_RUN_NAME", 10)  # a newer operator's tighter limit
    run, refusal = admit(obj, observed=1)
    assert refusal is None and run.metadata.name == "a-run-with-a-long-name"
    # the same spec as a new generation (an edit) or a new run: judged by the new rule
    run, refusal = admit(run_object(generation=2), observed=1)
    assert run is None and refusal.reason == "InvalidSpec"
    assert "metadata.name" in refusal.message and "at most 10 characters" in refusal.message


def test_a_tighter_cluster_policy_spares_accepted_runs() -> None:
    obj = run_object()
    obj["spec"]["images"] = {"trainer": "docker.io/someone/trainer:0.1.0"}
    strict = ClusterPolicy(allowed_images=("ghcr.io/visionr1/*",))
    assert admit(obj, observed=1, policy=strict)[1] is None
    run, refusal = admit(obj, observed=None, policy=strict)
    assert run is None and "spec.images.trainer" in refusal.message


def test_a_field_the_newer_operator_dropped_is_ignored_for_an_accepted_run() -> None:
    obj = run_object()
    obj["spec"]["stages"]["sft"]["params"]["oldKnob"] = 3  # known to the operator that accepted
    run, refusal = admit(obj, observed=1)
    assert refusal is None and run.spec.stages.sft.enabled
    run, refusal = admit(obj, observed=None)
    assert run is None and "spec.stages.sft.params.oldKnob: unknown field" in refusal.message


def test_an_accepted_spec_that_cannot_be_read_at_all_still_fails_naming_the_field() -> None:
    obj = run_object()
    obj["spec"]["stages"]["sft"]["nodes"] = "many"  # a type no rule change can make valid
    run, refusal = admit(obj, observed=1)
    assert run is None and "spec.stages.sft.nodes" in refusal.message


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("ghcr.io/visionr1/trainer:0.2.1", (0, 2, 1)),
        ("127.0.0.1:5000/visionr1/trainer-cpu:v1.0.0-cpu@sha256:" + "a" * 64, (1, 0, 0)),
        ("127.0.0.1:5000/visionr1/trainer-cpu:e2e@sha256:" + "a" * 64, None),
        ("127.0.0.1:5000/visionr1/trainer-cpu", None),
        ("trainer@sha256:" + "a" * 64, None),
    ],
)
def test_image_versions_from_tags(image: str, version: tuple[int, int, int] | None) -> None:
    assert compat.image_version(image) == version


def test_a_trainer_image_too_old_or_of_a_later_major_is_refused_at_admission() -> None:
    obj = run_object()
    obj["spec"]["images"] = {"trainer": "ghcr.io/visionr1/trainer:0.0.9"}
    obj["spec"]["stages"]["grpo"]["image"] = "ghcr.io/visionr1/trainer:7.0.0"
    run, refusal = admit(obj, observed=None)
    assert run is None and refusal.reason == compat.REASON == "IncompatibleTrainerImage"
    assert "spec.images.trainer: trainer image 'ghcr.io/visionr1/trainer:0.0.9'" in refusal.message
    assert "spec.stages.grpo.image" in refusal.message
    assert ">= 0.1.0" in refusal.message
    # a tag that names no version is left to the stage program's own check
    ok = copy.deepcopy(obj)
    ok["spec"]["images"] = {"trainer": "ghcr.io/visionr1/trainer:latest"}
    ok["spec"]["stages"]["grpo"]["image"] = "ghcr.io/visionr1/trainer:0.1.3"
    assert admit(ok, observed=None)[1] is None
    # once accepted, a newer operator's range does not stop it
    assert admit(obj, observed=1)[1] is None


def test_the_supported_range_follows_the_operator_major_version() -> None:
    assert compat.supported_range("0.4.2") == ((0, 1, 0), (1, 0, 0))
    assert compat.supported_range("2.0.0") == ((0, 1, 0), (3, 0, 0))
