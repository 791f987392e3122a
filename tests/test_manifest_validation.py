"""`visionr1 validate` and the CRD (schema + CEL) refuse bad manifests, naming the field.

Each case mutates one valid manifest. The pydantic models are the reference; the CRD must refuse
the same manifest wherever an OpenAPI schema or a CEL rule can express the rule.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator.cli import main as cli_main
from visionr1_operator.validate import validate_file, validate_object

from crd_tools import api_server_errors

BASE: dict[str, Any] = {
    "apiVersion": "visionr1.io/v1alpha1",
    "kind": "VisionR1Run",
    "metadata": {"name": "base-run", "namespace": "ml"},
    "spec": {
        "baseModel": {"name": "Qwen/Qwen2.5-VL-7B-Instruct"},
        "storage": {"pvc": "visionr1-data"},
        "stages": {
            "synthesis": {"from": {"dataset": "raw/llava-cot"}},
            "grpo": {"params": {"dataset": {"path": "raw/rl", "format": "geometry3k"}}},
        },
    },
}


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        obj = obj.setdefault(k, {})
    if value is _DELETE:
        obj.pop(keys[-1])
    else:
        obj[keys[-1]] = value


_DELETE = object()
S = "spec.stages"

# (case id, {dotted path: new value}, text the error must contain, CRD can express it)
CASES: list[tuple[str, dict[str, Any], str, bool]] = [
    (
        "steps-wrong-type",
        {
            f"{S}.grpo.params.ptst": [
                {"maxCompletionLength": 64, "numGenerations": 4, "steps": "many"}
            ]
        },
        "spec.stages.grpo.params.ptst[0].steps",
        True,
    ),
    ("unknown-spec-field", {"spec.gpuCount": 8}, "spec.gpuCount: unknown field", True),
    (
        "unknown-param-typo",
        {f"{S}.sft.params.learningRat": 1e-5},
        "spec.stages.sft.params.learningRat: unknown field",
        True,
    ),
    ("negative-gpus", {f"{S}.sft.resources.gpus": -1}, "spec.stages.sft.resources.gpus", True),
    ("empty-ptst", {f"{S}.grpo.params.ptst": []}, "spec.stages.grpo.params.ptst", True),
    (
        "num-generations-1",
        {
            f"{S}.grpo.params.ptst": [
                {"maxCompletionLength": 4096, "numGenerations": 1, "steps": 100}
            ]
        },
        "spec.stages.grpo.params.ptst[0].numGenerations",
        True,
    ),
    ("filter-disabled-sft-unfed", {f"{S}.filter.enabled": False}, "stages.sft.from", True),
    ("sft-disabled-grpo-unfed", {f"{S}.sft.enabled": False}, "stages.grpo.from", True),
    (
        "synthesis-without-input",
        {f"{S}.synthesis.from": _DELETE},
        "synthesis needs from.dataset",
        True,
    ),
    ("non-dns-name", {"metadata.name": "My_Run"}, "metadata.name", True),
    ("name-too-long", {"metadata.name": "a" * 45}, "metadata.name", True),
    (
        "bad-memory-quantity",
        {f"{S}.sft.resources.memory": "lots"},
        "spec.stages.sft.resources.memory",
        True,
    ),
    (
        "bad-cpu-quantity",
        {f"{S}.sft.resources.cpu": "2 cores"},
        "spec.stages.sft.resources.cpu",
        True,
    ),
    ("missing-base-model", {"spec.baseModel": _DELETE}, "spec.baseModel", True),
    ("missing-storage", {"spec.storage": _DELETE}, "spec.storage", True),
    ("storage-empty", {"spec.storage": {"subPath": "x"}}, "set pvc (cluster) or localDir", True),
    (
        "from-two-sources",
        {f"{S}.sft.from": {"stage": "filter", "dataset": "raw/cold"}},
        "exactly one of stage, dataset, checkpoint or baseModel",
        True,
    ),
    (
        "from-basemodel-false",
        {f"{S}.grpo.from": {"baseModel": False}},
        "baseModel may only be true",
        True,
    ),
    (
        "from-unknown-stage",
        {f"{S}.grpo.from": {"stage": "rl"}},
        "spec.stages.grpo.from.stage",
        True,
    ),
    (
        "openai-without-url",
        {f"{S}.synthesis.params": {"reasoner": {"backend": {"kind": "openai"}}}},
        "needs baseUrl",
        True,
    ),
    (
        "negative-temperature",
        {f"{S}.eval.params.temperature": -0.1},
        "spec.stages.eval.params.temperature",
        True,
    ),
    ("top-p-zero", {f"{S}.eval.params.topP": 0}, "spec.stages.eval.params.topP", True),
    (
        "bad-scheduler",
        {f"{S}.sft.params.lrScheduler": "cosine_restarts"},
        "spec.stages.sft.params.lrScheduler",
        True,
    ),
    ("zero4", {f"{S}.sft.params.deepspeed": "zero4"}, "spec.stages.sft.params.deepspeed", True),
    (
        "grpo-without-dataset",
        {f"{S}.grpo.params": {}},
        "stages.grpo.params.dataset is required",
        True,
    ),
    (
        "env-value-and-from",
        {
            f"{S}.sft.env": [
                {
                    "name": "A",
                    "value": "1",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ]
        },
        "exactly one of value or valueFrom",
        True,
    ),
    (
        "env-bad-name",
        {f"{S}.sft.env": [{"name": "1BAD", "value": "x"}]},
        "spec.stages.sft.env[0].name",
        True,
    ),
    (
        "no-benchmarks",
        {f"{S}.eval.params.benchmarks": []},
        "spec.stages.eval.params.benchmarks",
        True,
    ),
    (
        "unknown-benchmark",
        {f"{S}.eval.params.benchmarks": [{"name": "mmlu", "path": "b/mmlu"}]},
        "spec.stages.eval.params.benchmarks[0].name",
        True,
    ),
    ("bad-queue-name", {"spec.queueName": "gpu queue!"}, "spec.queueName", True),
    (
        "pixels-inverted",
        {f"{S}.sft.params.minPixels": 1000000, f"{S}.sft.params.maxPixels": 200000},
        "minPixels must not exceed maxPixels",
        True,
    ),
    (
        "zero-budget",
        {f"{S}.grpo.params.ptst": [{"maxCompletionLength": 0, "numGenerations": 4, "steps": 1}]},
        "spec.stages.grpo.params.ptst[0].maxCompletionLength",
        True,
    ),
    (
        "vllm-server-without-url",
        {f"{S}.grpo.params.rollout": "vllm_server"},
        "needs vllmServerUrl",
        True,
    ),
    (
        "llm-judge-without-model",
        {f"{S}.eval.params.judge": "llm"},
        "needs llmJudge",
        True,
    ),
    (
        "paper-judge-without-model",
        {f"{S}.eval.params.judge": "paper"},
        "needs llmJudge",
        True,
    ),
    (
        "benchmark-judge-without-model",
        {f"{S}.eval.params.benchmarks": [{"name": "mmmath", "path": "b/mm", "judge": "llm"}]},
        "needs llmJudge",
        True,
    ),
    (
        "bad-toleration-effect",
        {f"{S}.sft.tolerations": [{"key": "gpu", "operator": "Exists", "effect": "Sometimes"}]},
        "spec.stages.sft.tolerations[0].effect",
        True,
    ),
    ("backoff-too-high", {f"{S}.sft.backoffLimit": 101}, "spec.stages.sft.backoffLimit", True),
    ("zero-nodes", {f"{S}.grpo.nodes": 0}, "spec.stages.grpo.nodes", True),
    ("sharded-filter", {f"{S}.filter.nodes": 4}, "stages.filter.nodes must be 1", True),
    ("bad-pvc-name", {"spec.storage.pvc": "Data_PVC"}, "spec.storage.pvc", True),
    # Rules only the models check: the API server cannot order stages or route by kind.
    (
        "from-later-stage",
        {f"{S}.sft.from": {"stage": "grpo"}},
        "stages.sft.from.stage=grpo runs later",
        False,
    ),
    (
        "from-disabled-stage",
        {f"{S}.filter.enabled": False, f"{S}.sft.from": {"stage": "filter"}},
        "stages.sft.from.stage=filter is disabled",
        False,
    ),
    ("wrong-api-version", {"apiVersion": "visionr1.io/v1"}, "apiVersion", False),
]


def _manifest(changes: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(BASE)
    for path, value in changes.items():
        _set(obj, path, value)
    return obj


def test_base_manifest_is_valid() -> None:
    assert validate_object(BASE) == []
    assert api_server_errors(BASE) == []


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    ("case", "changes", "expected", "crd_can"), CASES, ids=[c[0] for c in CASES]
)
def test_invalid_manifest_is_refused(
    case: str, changes: dict[str, Any], expected: str, crd_can: bool
) -> None:
    obj = _manifest(changes)
    problems = [str(p) for p in validate_object(obj)]
    assert problems, f"{case}: accepted by visionr1 validate"
    assert any(expected in p for p in problems), f"{case}: {problems}"
    server = api_server_errors(obj)
    if crd_can:
        assert server, f"{case}: the CRD schema and CEL rules accept it"
    else:
        assert not server, f"{case}: the CRD refuses it after all ({server}); set crd_can"


def test_validate_cli_exit_codes_and_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_manifest({f"{S}.sft.resources.gpus": -2})))
    assert cli_main(["validate", str(good)]) == 0
    assert cli_main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: INVALID" in err
    assert (
        "spec.stages.sft.resources.gpus: Input should be greater than or equal to 0 (got -2)" in err
    )
    assert "nvidia.com/gpu per pod" in err  # the field's description says what it is


def test_validate_reports_yaml_and_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert "not valid YAML" in str(validate_file(broken)[0])
    assert "cannot read" in str(validate_file(tmp_path / "missing.yaml")[0])
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "empty file" in str(validate_file(empty)[0])
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert str(validate_file(other)[0]) == "kind: expected 'VisionR1Run', got 'ConfigMap'"


def test_multi_document_files_number_their_documents(tmp_path: Path) -> None:
    f = tmp_path / "two.yaml"
    f.write_text(yaml.safe_dump_all([BASE, _manifest({f"{S}.grpo.nodes": 0})]))
    problems = validate_file(f)
    assert len(problems) == 1 and str(problems[0]).startswith("spec.stages.grpo.nodes: document 2:")


def test_unknown_field_lists_the_allowed_ones() -> None:
    problems = validate_object(_manifest({f"{S}.grpo.params.numGenerations": 8}))
    text = str(problems[0])
    assert "unknown field" in text and "ptst" in text and "beta" in text
