"""The Kubernetes objects of a stage attempt, and `visionr1 render`, checked against real schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_operator.api import VisionR1Run
from visionr1_operator.cli import main as cli_main
from visionr1_operator.manifests import (
    KUEUE_QUEUE_LABEL,
    LABEL_RUN,
    LABEL_STAGE,
    NoClusterStorage,
    observe_job,
    observe_pod,
    stage_objects,
    suspend_patch,
    with_pods,
)
from visionr1_operator.policy import ClusterPolicy

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the chart supports (podFailurePolicy is GA)


def load(
    name: str, uid: str | None = "0b6f5e6e-1c1e-4a0e-9d59-1f0d8f0c2b11", pvc: bool = True
) -> VisionR1Run:
    obj = yaml.safe_load((EXAMPLES[0].parent / name).read_text())
    if uid:
        obj["metadata"]["uid"] = uid
    if pvc and not obj["spec"]["storage"].get("pvc"):
        obj["spec"]["storage"] = {"pvc": "visionr1-data"}  # the laptop example, on a cluster
    return VisionR1Run.model_validate(obj)


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objs if o["kind"] == kind]
    return found


CLUSTER_EXAMPLES = [p for p in EXAMPLES if "pvc:" in p.read_text()]


def test_a_laptop_only_run_is_refused_on_a_cluster_never_given_an_empty_dir(
    capsys: pytest.CaptureFixture[str],
) -> None:
    laptop = EXAMPLES[0].parent / "tiny-cpu.yaml"  # storage.localDir only
    assert cli_main(["render", str(laptop)]) == 1
    err = capsys.readouterr().err
    assert "spec.storage.pvc" in err and "localDir" in err
    with pytest.raises(NoClusterStorage, match="set spec.storage.pvc"):
        stage_objects(load("tiny-cpu.yaml", pvc=False), "sft", 0)


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES, ids=[p.name for p in CLUSTER_EXAMPLES])
def test_render_output_passes_strict_kubernetes_validation(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["render", str(example), "--mlflow-uri", "http://mlflow:5000"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    run = yaml.safe_load(example.read_text())
    enabled = [
        s
        for s in ("synthesis", "filter", "sft", "grpo", "eval")
        if run["spec"]["stages"].get(s, {}).get("enabled", True)
    ]
    assert [d["metadata"]["labels"][LABEL_STAGE] for d in docs if d["kind"] == "Job"] == enabled
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_wrong_field() -> None:
    doc = by_kind(stage_objects(load("tiny-cpu.yaml"), "sft", 0), "Job")
    doc["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_job_of_a_gpu_training_stage() -> None:
    run = load("qwen25vl-7b.yaml")
    objs = stage_objects(
        run, "sft", 2, mlflow_uri="http://mlflow:5000", parent_run_id="p1", stage_run_id="s1"
    )
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    job = by_kind(objs, "Job")
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == "qwen25vl-7b-sft-2"
    assert meta["labels"][LABEL_RUN] == "qwen25vl-7b" and meta["labels"][LABEL_STAGE] == "sft"
    assert meta["ownerReferences"][0]["kind"] == "VisionR1Run"
    assert meta["ownerReferences"][0]["uid"] == "0b6f5e6e-1c1e-4a0e-9d59-1f0d8f0c2b11"
    # Kueue: queue label, created suspended so Kueue admits it
    assert meta["labels"][KUEUE_QUEUE_LABEL] == "gpu-team" and spec["suspend"] is True
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 4
    assert spec["activeDeadlineSeconds"] == 172800 and spec["ttlSecondsAfterFinished"] == 86400
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "stage", "operator": "In", "values": [65, 66]},
    }
    # Four pods in one torchrun group: losing any one (an eviction too) fails the attempt at
    # once, so the plan's next attempt restarts every rank from the checkpoint.
    assert rules[1] == {
        "action": "Count",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "qwen25vl-7b-sft" == by_kind(objs, "Service")["metadata"]["name"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [c] = pod["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The stage re-launches itself under torchrun from this env (training/launch.py); index 0 of
    # the Indexed Job is the rendezvous host through the headless Service.
    assert c["command"] == [
        "python",
        "-m",
        "visionr1_jobs",
        "sft",
        "--config",
        "/etc/visionr1/config.json",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["VISIONR1_NNODES"]["value"] == "4"
    assert env["VISIONR1_NPROC_PER_NODE"]["value"] == "8"
    assert env["MASTER_ADDR"]["value"] == "qwen25vl-7b-sft-2-0.qwen25vl-7b-sft"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["VISIONR1_PARENT_RUN_ID"]["value"] == "p1"
    assert env["VISIONR1_STAGE_RUN_ID"]["value"] == "s1"
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    # the hub base model, downloaded by the model-fetch init container
    assert env["VISIONR1_BASE_MODEL_DIR"]["value"] == "/cache/base-model/snapshot"
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    assert c["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert "VISIONR1_SHARDS" not in env
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/workspace"] == {
        "name": "workspace",
        "mountPath": "/workspace",
        "subPath": "ml/qwen25vl-7b",
    }
    # Only the shared data folder, read-only (never the PVC's root with every tenant's runs)
    assert mounts["/data"] == {
        "name": "workspace",
        "mountPath": "/data",
        "subPath": "shared",
        "readOnly": True,
    }
    # The hub libraries' cache (HF_HOME): the run's own, in its folder, read-write.
    assert mounts["/cache/huggingface"] == {
        "name": "workspace",
        "mountPath": "/cache/huggingface",
        "subPath": "ml/qwen25vl-7b/.cache/huggingface",
    }
    # The base model's folder of the namespace's model cache: read-only.
    assert mounts["/cache/base-model"] == {
        "name": "workspace",
        "mountPath": "/cache/base-model",
        "subPath": "ml/.cache/huggingface/models--Qwen--Qwen2.5-VL-7B-Instruct/main",
        "readOnly": True,
    }
    assert set(mounts) == {
        "/workspace",
        "/data",
        "/cache/huggingface",
        "/cache/base-model",
        "/etc/visionr1",
        "/dev/shm",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "visionr1-data"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert volumes["config"]["configMap"]["name"] == "qwen25vl-7b-sft-2"
    svc = by_kind(objs, "Service")["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True


def test_sharded_stage_is_an_indexed_job_with_the_shard_count() -> None:
    job = by_kind(stage_objects(load("qwen25vl-7b.yaml"), "synthesis", 0), "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 16
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VISIONR1_SHARDS"]["value"] == "16"
    # secrets only by reference, never a value
    assert env["DEEPSEEK_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "deepseek",
        "key": "api-key",
    }


def test_single_node_cpu_stage_runs_python_directly_and_is_not_suspended() -> None:
    objs = stage_objects(load("tiny-cpu.yaml"), "sft", 0)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    job = by_kind(objs, "Job")
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False and "completionMode" not in job["spec"]
    [c] = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == [
        "python",
        "-m",
        "visionr1_jobs",
        "sft",
        "--config",
        "/etc/visionr1/config.json",
    ]
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    # One pod: an evicted one is replaced by the Job controller, no retry spent.
    assert job["spec"]["podFailurePolicy"]["rules"][1]["action"] == "Ignore"


def test_config_map_holds_the_resolved_stage_config() -> None:
    cm = by_kind(
        stage_objects(load("tiny-cpu.yaml"), "grpo", 1, parent_run_id="p", stage_run_id="s"),
        "ConfigMap",
    )
    cfg = ResolvedStageConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert cfg.stage == "grpo" and cfg.workspace == "/workspace"
    assert cfg.inputs["model"].stage == "sft" and cfg.inputs["data"].path == "toy/rl"
    assert (cfg.mlflow.parent_run_id, cfg.mlflow.run_id) == ("p", "s")
    assert cfg.stage_params().ptst[0].num_generations == 8  # type: ignore[attr-defined]


def test_render_without_uid_has_no_owner_reference() -> None:
    job = by_kind(stage_objects(load("tiny-cpu.yaml", uid=None), "sft", 0), "Job")
    assert "ownerReferences" not in job["metadata"]


def test_render_refuses_an_invalid_file_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = yaml.safe_load((EXAMPLES[0].parent / "tiny-cpu.yaml").read_text())
    obj["spec"]["stages"]["sft"]["nodes"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(obj))
    assert cli_main(["render", str(bad)]) == 1
    assert "spec.stages.sft.nodes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, ("running", None, None)),
        ({"active": 1}, ("running", None, None)),
        (
            {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
            ("succeeded", None, None),
        ),
        (
            {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": "Container stage for pod ns/p-0 failed with "
                        "exit code 65 matching FailJob rule at index 0",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ],
            },
            ("failed", "PodFailurePolicy", 65),
        ),
        (
            {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    }
                ],
            },
            ("failed", "BackoffLimitExceeded", None),
        ),
    ],
)
def test_observe_job(status: dict[str, Any], expected: tuple[Any, ...]) -> None:
    job = by_kind(stage_objects(load("tiny-cpu.yaml"), "filter", 3), "Job")
    job["status"] = status
    seen = observe_job(job)
    assert seen is not None and (seen.stage, seen.attempt) == ("filter", 3)
    assert (seen.outcome, seen.failed_reason, seen.exit_code) == expected


def test_observe_held_job_and_foreign_job() -> None:
    job = by_kind(stage_objects(load("tiny-cpu.yaml"), "sft", 0), "Job")
    patch = suspend_patch(True)
    job["metadata"]["annotations"] = patch["metadata"]["annotations"]
    job["spec"].update(patch["spec"])
    seen = observe_job(job)
    assert seen is not None and seen.suspended and seen.held and seen.outcome == "suspended"
    assert observe_job({"metadata": {"name": "other", "labels": {}}}) is None


# --------------------------------------------------------------------------- storage and tenancy


def test_mounts_are_the_runs_folder_and_the_configured_shared_folder_only() -> None:
    run = load("qwen25vl-7b.yaml")
    job = by_kind(
        stage_objects(run, "grpo", 0, policy=ClusterPolicy(shared_data_path="/datasets/")), "Job"
    )
    pod = job["spec"]["template"]["spec"]
    mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "workspace"]
    assert mounts == [
        {"name": "workspace", "mountPath": "/workspace", "subPath": "ml/qwen25vl-7b"},
        {"name": "workspace", "mountPath": "/data", "subPath": "datasets", "readOnly": True},
        {
            "name": "workspace",
            "mountPath": "/cache/huggingface",
            "subPath": "ml/qwen25vl-7b/.cache/huggingface",
        },
    ]
    # nothing in the pod mounts the PVC without a subPath
    for c in [*pod["initContainers"], *pod["containers"]]:
        for m in c["volumeMounts"]:
            if m["name"] == "workspace":
                assert m.get("subPath"), (c["name"], m)


def test_fresh_pvc_the_init_container_creates_and_chowns_the_runs_folder(tmp_path: Path) -> None:
    """The kubelet creates a missing subPath as root 0755; the init container's command, run
    here for real with sh against a folder standing in for the PVC, makes it the stage user's."""
    import os
    import shutil
    import subprocess

    run = load("qwen25vl-7b.yaml")
    job = by_kind(stage_objects(run, "sft", 0), "Job")
    pod = job["spec"]["template"]["spec"]
    [init] = [c for c in pod["initContainers"] if c["name"] == "workspace-init"]
    assert pod["initContainers"][0] is init  # before the model-fetch, which writes as uid 1000
    # root (it must chown), but nothing more than it needs
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]}
    assert init["image"] == pod["containers"][0]["image"]  # already pulled for the stage
    # it mounts the namespace's folder, not the PVC's root
    [mount] = init["volumeMounts"]
    assert mount == {"name": "workspace", "mountPath": "/parent", "subPath": "ml"}
    if os.geteuid() != 0 or shutil.which("sh") is None:
        pytest.skip("chown to 1000 needs root")
    parent = tmp_path / "ml"
    parent.mkdir(mode=0o755)
    args = [a.replace("/parent", str(parent)) for a in init["args"]]
    subprocess.run([*init["command"], *args], check=True)
    # the run's folder, its hub cache, and each level of its base model's folder of the
    # namespace's model cache: all the stage user's
    model = parent / ".cache" / "huggingface" / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    made_here = [
        parent / "qwen25vl-7b",
        parent / "qwen25vl-7b" / ".cache" / "huggingface",
        model.parent,
        model,
        model / "main",
    ]
    for made in made_here:
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), made
        assert st.st_mode & 0o777 == 0o775
    # idempotent: a second attempt's init container finds it there
    subprocess.run([*init["command"], *args], check=True)


# --------------------------------------------------------------------------- observing pods


def pod(phase: str = "Pending", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "r-sft-0-0-abcde",
            "labels": {
                LABEL_RUN: "r",
                LABEL_STAGE: "sft",
                "visionr1.io/attempt": "0",
                "batch.kubernetes.io/job-name": "r-sft-0",
            },
        },
        "status": {"phase": phase, **status},
    }


def running_job() -> Any:
    from visionr1_operator.plan import ObservedJob

    return ObservedJob("r-sft-0", "sft", 0, completions=2, active=2)


def test_observe_pod_unschedulable_and_image_pull_and_oom() -> None:
    unsched = observe_pod(
        pod(
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ]
        )
    )
    assert unsched is not None and unsched.job == "r-sft-0"
    assert unsched.problem is not None and unsched.problem[0] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in unsched.problem[1]
    pull = observe_pod(
        pod(
            containerStatuses=[
                {
                    "name": "stage",
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": 'Back-off pulling image "ghcr.io/x/nope:1"',
                        }
                    },
                }
            ]
        )
    )
    assert pull is not None and pull.problem is not None
    assert pull.problem[0] == "ImagePullBackOff" and "ghcr.io/x/nope:1" in pull.problem[1]
    oom = observe_pod(
        pod(
            "Failed",
            containerStatuses=[
                {"name": "stage", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ],
        )
    )
    assert oom is not None and oom.problem is not None and oom.exit_code == 137
    assert oom.problem[0] == "OOMKilled" and "exit code 137" in oom.problem[1]
    assert observe_pod({"metadata": {"name": "x", "labels": {}}}) is None


def test_running_counts_only_running_pods_not_pending_ones() -> None:
    from visionr1_operator.plan import _job_progress

    job = running_job()
    pods = [observe_pod(pod("Running")), observe_pod(pod("Pending"))]
    seen = with_pods(job, [p for p in pods if p is not None])
    assert seen.running_pods == 1
    assert _job_progress(seen) == "0/2 pods done, 1 running, 1 pending"


def test_a_pod_done_before_its_job_counts_it_is_not_shown_as_pending() -> None:
    """The Job controller records a pod's success a moment after the pod ends (seconds under
    load): until then the stage's progress is unchanged, not "0 running, 1 pending"."""
    from dataclasses import replace

    from visionr1_operator.plan import _job_progress

    job = running_job()  # 2 completions, both pods active
    running = [observe_pod(pod("Running")), observe_pod(pod("Running"))]
    before = _job_progress(with_pods(job, [p for p in running if p is not None]))
    one_done = [observe_pod(pod("Succeeded")), observe_pod(pod("Running"))]
    seen = with_pods(job, [p for p in one_done if p is not None])
    assert _job_progress(seen) == before == "0/2 pods done, 2 running"
    counted = replace(job, active=1, succeeded=1)  # the Job's next status
    seen = with_pods(counted, [p for p in one_done if p is not None])
    assert _job_progress(seen) == "1/2 pods done, 1 running"


def test_a_failed_jobs_message_carries_the_failing_pods_reason_and_exit_code() -> None:
    from visionr1_operator.plan import ObservedJob

    job = ObservedJob(
        "r-sft-0",
        "sft",
        0,
        failed=1,
        failed_reason="BackoffLimitExceeded",
        message="Job has reached the specified backoff limit",
    )
    oom = observe_pod(
        pod(
            "Failed",
            containerStatuses=[
                {"name": "stage", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ],
        )
    )
    assert oom is not None
    seen = with_pods(job, [oom])
    assert seen.exit_code == 137
    assert "OOMKilled (exit code 137)" in seen.message and "backoff limit" in seen.message


# --------------------------------------------------------------------------- failures, explained


def stage_pod(run: VisionR1Run, stage: str, terminated: dict[str, Any]) -> dict[str, Any]:
    """The failed pod of attempt 0 of ``stage``, as the kubelet reports it: the Job's pod
    template (labels, spec with its resources) and the stage container's terminated state."""
    job = by_kind(stage_objects(run, stage, 0), "Job")
    name = job["metadata"]["name"]
    return {
        "metadata": {
            "name": f"{name}-0-abcde",
            "labels": {
                **job["spec"]["template"]["metadata"]["labels"],
                "batch.kubernetes.io/job-name": name,
            },
        },
        "spec": job["spec"]["template"]["spec"],
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}],
        },
    }


def failed_job(run: VisionR1Run, stage: str, reason: str, message: str) -> dict[str, Any]:
    """The Job of attempt 0 of ``stage``, failed as the Job controller reports it."""
    job = by_kind(stage_objects(run, stage, 0), "Job")
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-01-01T12:00:00Z",
    }
    job["status"] = {"failed": 1, "conditions": [failed]}
    return job


def conditions_after_failure(
    run: VisionR1Run, stage: str, job: dict[str, Any], pod: dict[str, Any]
) -> dict[str, Any]:
    """The run's conditions (type → condition) once the operator has seen the failed Job and
    its pod, ``stage`` having been the running one."""
    from datetime import UTC, datetime

    from visionr1_operator.plan import StartRun, apply, plan

    t0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    stages = ("synthesis", "filter", "sft", "grpo", "eval")
    status = apply(None, [StartRun(stages, ())], t0)
    for s in stages[: stages.index(stage)]:
        status.stages[s].phase = "Succeeded"
    observed = observe_job(job)
    facts = observe_pod(pod)
    assert observed is not None and facts is not None
    status = apply(status, plan(run, status, [], t0), t0)  # creates attempt 0
    seen = with_pods(observed, [facts])
    status = apply(status, plan(run, status, [seen], t0), t0)
    return {c.type: c for c in status.conditions}


def test_the_stages_own_reason_for_failing_reaches_the_run() -> None:
    """Exit 65 with the stage's one-line reason as its termination message: the Failed
    condition (what `kubectl describe vr1` shows) carries it, after the exit code."""
    run = load("tiny-cpu.yaml")
    reason = "dataset /workspace/toy/train: no such file or directory"
    pod = stage_pod(run, "filter", {"exitCode": 65, "reason": "Error", "message": reason})
    job = failed_job(
        run,
        "filter",
        "PodFailurePolicy",
        "Container stage for pod ml/tiny-cpu-filter-0-0-abcde failed with exit code 65 "
        "matching FailJob rule at index 0",
    )
    conds = conditions_after_failure(run, "filter", job, pod)
    failed = conds["Failed"]
    assert failed.status == "True" and failed.message.startswith("filter: ")
    assert f"(exit code 65): {reason}" in failed.message


def test_a_termination_message_from_the_log_is_cut_to_its_last_line() -> None:
    """A crash before the stage could write its reason: the kubelet takes the log's tail
    (FallbackToLogsOnError); the run shows the exception's line, not the traceback, not the
    progress lines after it, and never more than 300 characters."""
    run = load("tiny-cpu.yaml")
    tail = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.12/site-packages/visionr1_jobs/__main__.py", line 9\n'
        "ImportError: libcuda.so.1: cannot open shared object file\n"
        'VISIONR1_PROGRESS {"stage": "sft", "done": 3}\r\n'
    )
    pod = stage_pod(run, "sft", {"exitCode": 1, "reason": "Error", "message": tail})
    facts = observe_pod(pod)
    assert facts is not None and facts.problem is not None
    assert facts.problem[1].endswith(
        "Error (exit code 1): ImportError: libcuda.so.1: cannot open shared object file"
    )
    long = observe_pod(stage_pod(run, "sft", {"exitCode": 1, "message": "x" * 5000}))
    assert long is not None and long.problem is not None
    said = long.problem[1].split("(exit code 1): ", 1)[1]
    assert len(said) == 300 and "\n" not in said


def test_the_stage_container_hands_its_reason_to_kubernetes() -> None:
    """The stage writes its reason to the file Kubernetes reads: the same path, from env."""
    job = by_kind(stage_objects(load("qwen25vl-7b.yaml"), "grpo", 0), "Job")
    pod = job["spec"]["template"]["spec"]
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    [c] = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VISIONR1_TERMINATION_LOG"] == c["terminationMessagePath"]


@pytest.mark.parametrize("memory", ["8Gi", None])
def test_an_oomkilled_stage_names_its_limit_and_the_field_to_raise(memory: str | None) -> None:
    obj = yaml.safe_load((EXAMPLES[0].parent / "tiny-cpu.yaml").read_text())
    obj["spec"]["storage"] = {"pvc": "visionr1-data"}
    sft = obj["spec"]["stages"].setdefault("sft", {})
    sft["backoffLimit"] = 0
    sft.setdefault("resources", {}).pop("memory", None)
    if memory:
        sft["resources"]["memory"] = memory
    run = VisionR1Run.model_validate(obj)
    # the log's tail (FallbackToLogsOnError) is no reason for an OOM kill
    tail = 'VISIONR1_PROGRESS {"stage": "sft", "done": 40}'
    pod = stage_pod(run, "sft", {"exitCode": 137, "reason": "OOMKilled", "message": tail})
    job = failed_job(
        run, "sft", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    )
    failed = conditions_after_failure(run, "sft", job, pod)["Failed"]
    text = failed.message
    assert text.startswith("sft: ") and "OOMKilled (exit code 137)" in text
    assert "VISIONR1_PROGRESS" not in text
    if memory:
        assert f"memory limit of {memory}" in text
        assert "raise spec.stages.sft.resources.memory" in text
    else:
        assert "no memory limit" in text and "set spec.stages.sft.resources.memory" in text


# --------------------------------------------------------------------------- Pod Security


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES, ids=[p.name for p in CLUSTER_EXAMPLES])
def test_pods_for_a_restricted_namespace_meet_the_restricted_profile(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a namespace labelled pod-security.kubernetes.io/enforce=restricted admits: every
    container, init containers included, against every control of the profile."""
    from pod_security import restricted_violations

    args = ["render", str(example), "--pod-security", "restricted"]
    assert cli_main([*args, "--mlflow-uri", "http://mlflow:5000"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert jobs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for job in jobs:
        template = job["spec"]["template"]
        assert restricted_violations(template["spec"], template["metadata"]) == []
        # the folder is made writable by the pod's fsGroup, not by a root init container; the
        # only init container left is the base model's fetch, as the stage user
        inits = template["spec"].get("initContainers", [])
        assert [c["name"] for c in inits] in ([], ["model-fetch"])
        sc = template["spec"]["securityContext"]
        assert (sc["fsGroup"], sc["fsGroupChangePolicy"]) == (1000, "OnRootMismatch")


def test_the_restricted_checks_catch_what_the_profile_forbids() -> None:
    """The checks themselves: the default pod (root init container) breaks the profile exactly
    where that container is root; each other forbidden setting is named too."""
    from pod_security import restricted_violations

    run = load("qwen25vl-7b.yaml")
    default = by_kind(stage_objects(run, "sft", 0), "Job")["spec"]["template"]["spec"]
    found = restricted_violations(default)
    init = "spec.initContainers[0](workspace-init).securityContext"
    assert sorted(found) == sorted(
        [
            f"{init}.runAsNonRoot: must be true (here or on the pod)",
            f"{init}.runAsUser: must not be 0",
            f"{init}.capabilities.add: only NET_BIND_SERVICE",
        ]
    )
    admitted = by_kind(stage_objects(run, "sft", 0, pod_security="restricted"), "Job")
    pod = admitted["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    bad = json.loads(json.dumps(pod))
    c = bad["containers"][0]
    c["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    c["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    c["ports"] = [{"containerPort": 29500, "hostPort": 29500}]
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    bad["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    problems = "\n".join(restricted_violations(bad))
    for field in (
        "privileged",
        "allowPrivilegeEscalation",
        "capabilities.add",
        "capabilities.drop",
        "hostPort",
        "hostNetwork",
        "hostPath",
        "seccompProfile",
    ):
        assert field in problems, field


def test_workspace_init_follows_the_namespace_unless_the_run_says() -> None:
    from visionr1_operator.manifests import pod_security_problem, uses_root_init

    def run_with(mode: str | None) -> VisionR1Run:
        run = load("qwen25vl-7b.yaml")
        if mode:
            run.spec.storage.workspace_init = mode  # type: ignore[assignment]
        return run

    auto = run_with(None)
    assert auto.spec.storage.workspace_init == "Auto"
    assert uses_root_init(auto, None) and uses_root_init(auto, "baseline")
    assert not uses_root_init(auto, "restricted")
    fs = run_with("FSGroup")
    assert not uses_root_init(fs, None)
    pod = by_kind(stage_objects(fs, "eval", 0), "Job")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["model-fetch"]
    insist = run_with("RootInitContainer")
    assert pod_security_problem(insist, "baseline") is None
    problem = pod_security_problem(insist, "restricted")
    assert problem is not None and problem.startswith("spec.storage.workspaceInit: ")
    assert "FSGroup" in problem and "restricted" in problem
    assert pod_security_problem(auto, "restricted") is None


def test_render_refuses_a_root_init_container_for_a_restricted_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = yaml.safe_load((EXAMPLES[0].parent / "qwen25vl-7b.yaml").read_text())
    obj["spec"]["storage"]["workspaceInit"] = "RootInitContainer"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(obj))
    assert cli_main(["render", str(path), "--pod-security", "restricted"]) == 1
    assert "spec.storage.workspaceInit" in capsys.readouterr().err
    assert cli_main(["render", str(path), "--pod-security", "baseline"]) == 0
