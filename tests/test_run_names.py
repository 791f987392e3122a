"""Run names: a DNS-1035 label short enough for every child name, refused otherwise by the
model (``visionr1 validate``, the operator) and by the CRD (the API server), naming the limit."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator.api import MAX_RUN_NAME, VisionR1Run
from visionr1_operator.manifests import stage_objects
from visionr1_operator.validate import validate_object

from crd_tools import api_server_errors

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qwen25vl-7b.yaml"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def manifest(name: str) -> dict[str, Any]:
    obj = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    obj["metadata"]["name"] = name
    return obj


def test_the_longest_allowed_name_gives_valid_child_names_at_the_largest_attempt_and_index() -> (
    None
):
    name = "r" * MAX_RUN_NAME
    run = VisionR1Run.model_validate(manifest(name))
    for stage in ("synthesis", "sft"):
        run.spec.stages.get(stage).nodes = 1024  # indexes 0..1023
        objs = stage_objects(run, stage, 999)  # the largest attempt the limit allows for
        job = next(o for o in objs if o["kind"] == "Job")
        names = [o["metadata"]["name"] for o in objs]
        names.append(f"{job['metadata']['name']}-1023")  # the pod host name of index 1023
        if stage == "sft":
            service = next(o for o in objs if o["kind"] == "Service")["metadata"]["name"]
            names.append(service)
        for child in names:
            assert len(child) <= 63 and DNS_1035.match(child), child
    assert len(f"{name}-synthesis-999-1023") == 63  # the limit is tight, not arbitrary


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("r" * (MAX_RUN_NAME + 1), f"at most {MAX_RUN_NAME} characters"),
        ("1st-run", "DNS-1035"),  # a Service name cannot start with a digit
        ("Run", "DNS-1035"),
        ("run-", "DNS-1035"),
    ],
)
def test_bad_names_are_refused_by_the_model_and_the_crd(name: str, needle: str) -> None:
    obj = manifest(name)
    problems = validate_object(obj)
    assert problems and problems[0].path == "metadata.name" and needle in problems[0].message
    crd_errors = [e for e in api_server_errors(obj) if "metadata.name" in e]
    assert crd_errors, "the API server must refuse it too"
    assert any(needle in e for e in crd_errors)


def test_a_good_name_passes_both() -> None:
    obj = manifest("r" * MAX_RUN_NAME)
    assert validate_object(obj) == []
    assert api_server_errors(obj) == []
