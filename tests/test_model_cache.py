"""The model cache: a hub base model is downloaded once per namespace, model and revision into
its own folder of the PVC (``<namespace>/<spec.storage.modelCache>/models--<owner>--<name>/
<revision>``) by the pod's ``model-fetch`` init container, the only container that mounts that
folder writable; the stage container mounts it read-only. What the hub libraries write besides
(teachers, datasets, tokens) goes to the run's own cache in its workspace (HF_HOME)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from visionr1_operator.api import VisionR1Run, enabled_stages
from visionr1_operator.manifests import HF_HOME, stage_objects
from visionr1_operator.policy import is_hub_model, model_cache_key

ROOT = Path(__file__).resolve().parents[1]
UID = "0b6f5e6e-1c1e-4a0e-9d59-1f0d8f0c2b11"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
K8S_VERSION = "1.33.0"


def _run(
    name: str = "run-a",
    namespace: str = "ml",
    example: str = "qwen25vl-7b.yaml",
    base: dict[str, Any] | None = None,
    **storage: Any,
) -> VisionR1Run:
    obj = yaml.safe_load((ROOT / "examples" / example).read_text())
    obj["metadata"] |= {"name": name, "namespace": namespace, "uid": UID}
    obj["spec"]["storage"] |= storage
    if base is not None:
        obj["spec"]["baseModel"] = base
    return VisionR1Run.model_validate(obj)


def _pod(run: VisionR1Run, stage: str, pod_security: str | None = None) -> dict[str, Any]:
    [job] = [
        o for o in stage_objects(run, stage, 0, pod_security=pod_security) if o["kind"] == "Job"
    ]
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    return job["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _stage(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = pod["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def _base_model_mount(container: dict[str, Any]) -> dict[str, Any] | None:
    found = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache/base-model"]
    return found[0] if found else None


def _key_of(pod: dict[str, Any]) -> str:
    mount = _base_model_mount(_stage(pod))
    assert mount is not None
    return str(mount["subPath"])


def _writable_over(pod: dict[str, Any], folder: str) -> list[str]:
    """The containers of ``pod`` that mount ``folder`` of the PVC (or one above it) writable."""
    return [
        c["name"]
        for c in _containers(pod)
        for m in c["volumeMounts"]
        if m["name"] == "workspace"
        and not m.get("readOnly")
        and (folder == m.get("subPath") or folder.startswith(f"{m.get('subPath')}/"))
    ]


@pytest.mark.parametrize("stage", ["sft", "eval"])
def test_one_container_writes_the_base_model_and_the_stage_reads_it(stage: str) -> None:
    run = _run()
    # Restricted namespaces (no root init container): the fetch is the one writer.
    pod = _pod(run, stage, pod_security="restricted")
    key = _key_of(pod)
    assert key == "ml/.cache/huggingface/models--Qwen--Qwen2.5-VL-7B-Instruct/main"
    assert _writable_over(pod, key) == ["model-fetch"]
    assert _base_model_mount(_stage(pod)) == {
        "name": "workspace",
        "mountPath": "/cache/base-model",
        "subPath": key,
        "readOnly": True,
    }
    # The stage loads the fetched folder, under the mount
    env = _env(_stage(pod))
    assert env["VISIONR1_BASE_MODEL_DIR"]["value"].startswith("/cache/base-model/")
    # and writes the hub libraries' caches into its own run's folder, not the namespace's
    [hf_home] = [m for m in _stage(pod)["volumeMounts"] if m["mountPath"] == HF_HOME]
    assert hf_home["subPath"] == "ml/run-a/.cache/huggingface" and not hf_home.get("readOnly")
    assert _writable_over(pod, "ml/.cache/huggingface") == []
    # Elsewhere the root init container mounts the namespace's folder only to create and chown
    # the folders themselves (tests/test_manifests.py runs its command).
    pod = _pod(run, stage)
    assert _writable_over(pod, key) == ["workspace-init", "model-fetch"]
    assert _base_model_mount(_stage(pod)) == _base_model_mount(
        _stage(_pod(run, stage, "restricted"))
    )


def test_the_key_is_the_model_and_revision_the_same_for_every_run() -> None:
    def key(run: VisionR1Run) -> tuple[str, str]:
        namespace, _, rest = _key_of(_pod(run, "sft")).partition("/")
        return namespace, rest

    pinned = {"name": MODEL, "revision": "a" * 40}
    a = key(_run("run-a", base=pinned))
    b = key(_run("run-b", base=pinned))
    other_team = key(_run("run-c", namespace="team-b", base=pinned))
    # The same model at the same revision: the same folder for every run of a namespace, and
    # the same name in another namespace's own cache (tenants never share one).
    assert a == b and a[1] == other_team[1] and other_team[0] == "team-b" != a[0]
    assert a[1] == f".cache/huggingface/models--Qwen--Qwen2.5-VL-7B-Instruct/{'a' * 40}"
    # Another revision, another folder; an unset revision is the hub's default branch.
    v2 = key(_run("run-a", base={"name": MODEL, "revision": "v2"}))
    assert v2 != a and v2[1].endswith("/v2")
    assert key(_run("run-a", base={"name": MODEL})) == key(
        _run("run-b", base={"name": MODEL, "revision": "main"})
    )
    assert key(_run("run-a", base={"name": "Qwen/Qwen2.5-VL-72B-Instruct"})) != key(
        _run("run-a", base={"name": MODEL})
    )


@pytest.mark.parametrize("revision", ["refs/pr/12", "../../etc", ".hidden", "x" * 200, "ü"])
def test_any_revision_is_one_safe_folder(revision: str) -> None:
    key = model_cache_key(MODEL, revision)
    model_dir, folder = key.split("/")  # no "/" of the revision survives
    assert model_dir == "models--Qwen--Qwen2.5-VL-7B-Instruct"
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", folder), folder
    assert model_cache_key(MODEL, revision) == key  # deterministic
    # two revisions never share a folder, even when their slugs are alike
    assert model_cache_key(MODEL, revision + "/") != key


@pytest.mark.parametrize(
    "name",
    ["/data/models/tiny-qwen25vl", "./models/tiny", "models/tiny/v1", "../other/model", "a--b/c"],
)
def test_a_base_model_that_is_a_folder_is_loaded_where_it_is(name: str) -> None:
    assert not is_hub_model(name)
    run = _run(base={"name": name})
    for stage in ("synthesis", "filter", "sft", "grpo", "eval"):
        pod = _pod(run, stage)
        names = [c["name"] for c in _containers(pod)]
        assert "model-fetch" not in names, stage
        assert _base_model_mount(_stage(pod)) is None
        assert "VISIONR1_BASE_MODEL_DIR" not in _env(_stage(pod))
        assert _writable_over(pod, "ml/.cache/huggingface") == ["workspace-init"]
    with pytest.raises(ValueError, match="not a hub model id"):
        model_cache_key(name, "main")


def test_the_cluster_example_with_a_folder_model_fetches_nothing() -> None:
    run = _run("tiny", example="tiny-cluster.yaml")
    assert run.spec.base_model.name.startswith("/data/")
    for stage in ("sft", "eval"):
        pod = _pod(run, stage)
        assert "model-fetch" not in [c["name"] for c in _containers(pod)]


def test_only_the_stages_that_load_the_base_model_fetch_it() -> None:
    def fetching(run: VisionR1Run) -> list[str]:
        return [
            stage
            for stage in enabled_stages(run.spec)
            if "model-fetch" in [c["name"] for c in _containers(_pod(run, stage))]
        ]

    # SFT starts from it, eval scores it ("base"); the teachers are other models, GRPO starts
    # from SFT's model
    assert fetching(_run()) == ["sft", "eval"]
    # RL from the base model (Vision-R1-Zero)
    assert "grpo" in fetching(_run(example="zero.yaml"))
    # a synthesis teacher naming no model generates with the base model
    obj = _run().model_dump(by_alias=True, exclude_none=True, mode="json")
    obj["spec"]["stages"]["synthesis"]["params"]["describer"]["backend"] = {"kind": "transformers"}
    assert "synthesis" in fetching(VisionR1Run.model_validate(obj))


def test_the_fetch_gets_the_hf_token_and_nothing_else_of_the_run() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "qwen25vl-7b.yaml").read_text())
    obj["metadata"]["uid"] = UID
    sft = obj["spec"]["stages"].setdefault("sft", {})
    sft["env"] = [
        {"name": "HF_ENDPOINT", "value": "http://mirror.example"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}},
    ]
    obj["spec"].setdefault("secrets", []).append("wandb")
    run = VisionR1Run.model_validate(obj)
    assert run.spec.mlflow.credentials_secret  # the stage gets it, the fetch must not
    pod = _pod(run, "sft")
    [fetch] = [c for c in _containers(pod) if c["name"] == "model-fetch"]
    secrets = [
        (e["name"], e["valueFrom"]["secretKeyRef"]) for e in fetch["env"] if "valueFrom" in e
    ]
    assert secrets == [("HF_TOKEN", {"name": "hf-token", "key": "token"})]
    assert "envFrom" not in fetch and "envFrom" in _stage(pod)
    assert not {"HF_ENDPOINT", "WANDB_API_KEY"} & set(_env(fetch))
    assert {"HF_ENDPOINT", "WANDB_API_KEY"} <= set(_env(_stage(pod)))
    # the fixed program, as the stage user, without privileges
    assert fetch["command"][:3] == ["python", "-m", "visionr1_jobs.fetch_model"]
    assert fetch["image"] == _stage(pod)["image"]
    sc = fetch["securityContext"]
    assert sc["runAsNonRoot"] is True and "runAsUser" not in sc
    assert pod["securityContext"]["runAsUser"] == 1000
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    # without spec.hfTokenSecret: no secret at all
    del obj["spec"]["hfTokenSecret"]
    pod = _pod(VisionR1Run.model_validate(obj), "sft")
    [fetch] = [c for c in _containers(pod) if c["name"] == "model-fetch"]
    assert [e for e in fetch["env"] if "valueFrom" in e] == []


def test_a_model_that_cannot_be_fetched_fails_the_run_at_once() -> None:
    from visionr1_operator.manifests import observe_job

    [job] = [o for o in stage_objects(_run(), "sft", 0) if o["kind"] == "Job"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r["onExitCodes"] for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    assert {"containerName": "model-fetch", "operator": "In", "values": [65]} in fail_job
    # what the Job controller then says, as the plan reads it: exit 65, permanent
    failed = dict(
        job,
        status={
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "Container model-fetch for pod ml/run-a-sft-0-0-x failed with exit code 65 "
                    "matching FailJob rule at index 2",
                }
            ]
        },
    )
    observed = observe_job(failed)
    assert observed is not None and observed.exit_code == 65


def test_the_cache_folder_is_configurable() -> None:
    key = _key_of(_pod(_run(modelCache="team/models/hf"), "sft"))
    assert key == "ml/team/models/hf/models--Qwen--Qwen2.5-VL-7B-Instruct/main"


def test_every_run_writes_the_hub_libraries_caches_into_its_own_folder() -> None:
    homes = {}
    for name in ("run-a", "run-b"):
        [mount] = [
            m
            for m in _stage(_pod(_run(name), "synthesis"))["volumeMounts"]
            if m["mountPath"] == HF_HOME
        ]
        homes[name] = mount["subPath"]
    assert homes == {
        "run-a": "ml/run-a/.cache/huggingface",
        "run-b": "ml/run-b/.cache/huggingface",
    }


def test_the_trainer_image_and_the_manifests_agree_on_hf_home() -> None:
    dockerfile = (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    match = re.search(r"HF_HOME=(\S+)", dockerfile)
    assert match is not None and match.group(1) == HF_HOME
