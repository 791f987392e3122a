"""The committed CRD matches the models, is a valid Kubernetes object, and accepts every example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visionr1_operator.crd import crd, crd_yaml
from visionr1_operator.reference import reference_markdown
from visionr1_operator.validate import validate_file

from crd_tools import api_server_errors
from repo_paths import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_committed_crd_is_current() -> None:
    committed = (REPO / "crds" / "visionr1run.yaml").read_text()
    assert committed == crd_yaml(), "crds/visionr1run.yaml is stale: run `make crd`"


def test_visionr1_crd_command_prints_the_committed_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "visionr1_operator.cli", "crd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == (REPO / "crds" / "visionr1run.yaml").read_text()


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_crd_passes_kubernetes_validate_strict(version: str) -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "-k",
            version,
            str(REPO / "crds" / "visionr1run.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout + proc.stderr


def test_crd_shape() -> None:
    doc = crd()
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "VisionR1Run",
        "visionr1runs",
        ["vr1"],
    )
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Progress",
        "Step",
        "ETA",
        "Metric",
        "GPU-Hours",
        "Age",
    ]
    wide_only = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")]
    assert wide_only == ["GPU-Hours"]
    text = yaml.safe_dump(doc)
    assert "$ref" not in text and "anyOf" not in text  # structural
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_there_are_the_paper_recipe_and_the_ablations() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "tiny-cpu.yaml",
        "qwen25vl-7b.yaml",
        "zero.yaml",
        "long.yaml",
        "sft-only.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid_everywhere(path: Path) -> None:
    assert validate_file(path) == []
    obj = yaml.safe_load(path.read_text())
    assert api_server_errors(obj) == []


def test_ablations_are_one_line_changes_of_the_recipe() -> None:
    from visionr1_operator.api import enabled_stages, parse_run

    runs = {p.stem: parse_run(yaml.safe_load(p.read_text())) for p in EXAMPLES}
    assert enabled_stages(runs["zero"].spec) == ["grpo", "eval"]
    assert runs["zero"].spec.stages.grpo.from_.base_model is True
    assert enabled_stages(runs["sft-only"].spec) == ["sft", "eval"]
    long_ptst = runs["long"].spec.stages.grpo.params.ptst
    assert [(r.max_completion_length, r.num_generations) for r in long_ptst] == [(16384, 4)]
    paper = runs["qwen25vl-7b"].spec.stages.grpo.params
    assert [(r.max_completion_length, r.num_generations, r.steps) for r in paper.ptst] == [
        (4096, 16, 100),
        (8192, 8, 100),
    ]
    assert (paper.beta, paper.epsilon) == (0.01, 0.2)


def test_manifest_reference_is_current() -> None:
    committed = (REPO / "docs" / "manifest-reference.md").read_text()
    assert committed == reference_markdown(), "docs/manifest-reference.md is stale: `make crd`"
    assert "`spec.stages.grpo.params.ptst[].numGenerations`" in committed
