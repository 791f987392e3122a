"""refusals.py: a Job's FailedCreate Events (the messages the Job controller records when the API
server refuses its pods) as the reason and message the run shows."""

from __future__ import annotations

from typing import Any

from visionr1_operator import refusals

QUOTA = (
    'Error creating: pods "r-sft-0-x7k2p" is forbidden: exceeded quota: gpu, requested: '
    "requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=0, limited: "
    "requests.nvidia.com/gpu=1"
)
POD_SECURITY = (
    'Error creating: pods "r-sft-0-q9d" is forbidden: violates PodSecurity "restricted:latest": '
    'runAsNonRoot != true (container "workspace-init" must not set '
    'securityContext.runAsNonRoot=false), runAsUser=0 (container "workspace-init" must not set '
    'runAsUser=0), unrestricted capabilities (container "workspace-init" must not include '
    '"CHOWN", "DAC_OVERRIDE", "FOWNER" in securityContext.capabilities.add)'
)
LIMIT_RANGE = (
    'Error creating: pods "r-sft-0-a1" is forbidden: [maximum memory usage per Container is 1Gi, '
    "but limit is 4Gi, maximum cpu usage per Container is 1, but limit is 2]"
)


def event(message: str, uid: str = "u1", when: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "reason": "FailedCreate",
        "type": "Warning",
        "message": message,
        "involvedObject": {"kind": "Job", "name": "r-sft-0", "uid": uid},
        "lastTimestamp": when,
    }


def test_quota_names_the_quota_its_numbers_and_the_field() -> None:
    reason, message = refusals.classify(QUOTA, "sft")
    assert reason == "QuotaExceeded"
    assert message.startswith("ResourceQuota gpu refuses the Job's pods: ")
    assert "requested requests.nvidia.com/gpu=2" in message
    assert "used requests.nvidia.com/gpu=0" in message
    assert "limited requests.nvidia.com/gpu=1" in message
    assert "spec.stages.sft.resources.gpus" in message


def test_a_quota_that_needs_a_request_is_named() -> None:
    text = 'Error creating: pods "p" is forbidden: failed quota: mem: must specify limits.memory'
    assert refusals.classify(text, "sft") == (
        "QuotaExceeded",
        "ResourceQuota mem refuses the Job's pods: must specify limits.memory",
    )


def test_pod_security_names_the_level_and_the_violated_rules() -> None:
    reason, message = refusals.classify(POD_SECURITY, "sft")
    assert reason == "PodSecurity"
    assert "restricted:latest of the namespace refuses" in message
    assert "runAsNonRoot != true" in message and "workspace-init" in message
    assert "spec.storage.workspaceInit" in message


def test_limit_range_names_the_bound_and_the_field() -> None:
    reason, message = refusals.classify(LIMIT_RANGE, "grpo")
    assert reason == "LimitRange"
    assert "maximum memory usage per Container is 1Gi, but limit is 4Gi" in message
    assert "spec.stages.grpo.resources.memory" in message


def test_anything_else_is_quoted() -> None:
    text = 'Error creating: pods "p" is forbidden: error looking up service account ml/x: nope'
    assert refusals.classify(text, "sft") == (
        "PodCreateRefused",
        "the Job's pods are refused: error looking up service account ml/x: nope",
    )


def test_the_newest_failed_create_of_this_job_counts() -> None:
    events = [
        event(QUOTA, when="2026-01-01T00:00:01Z"),
        event(POD_SECURITY, when="2026-01-01T00:00:09Z"),
        event(LIMIT_RANGE, uid="an-earlier-job-of-the-same-name", when="2026-01-01T00:00:20Z"),
        {**event(QUOTA, when="2026-01-01T00:00:30Z"), "reason": "SuccessfulCreate"},
    ]
    assert refusals.refusal(events, "u1", "sft")[0] == "PodSecurity"  # type: ignore[index]
    assert refusals.refusal(events[3:], "u1", "sft") is None
    assert refusals.refusal([], "u1", "sft") is None
