"""One model cache per cluster: every stage pod of every run on a PVC downloads models into the
same folder of that PVC (``spec.storage.modelCache``), which is where the trainer image's HF_HOME
points, instead of into each run's own workspace."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifests import HF_HOME, stage_objects

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, **storage: Any) -> VisionR1Run:
    obj = yaml.safe_load((ROOT / "examples" / "qwen25vl-7b.yaml").read_text())
    obj["metadata"] |= {"name": name, "uid": "0b6f5e6e-1c1e-4a0e-9d59-1f0d8f0c2b11"}
    obj["spec"]["storage"] |= storage
    return VisionR1Run.model_validate(obj)


def _pod(run: VisionR1Run, stage: str) -> dict[str, Any]:
    [job] = [o for o in stage_objects(run, stage, 0) if o["kind"] == "Job"]
    return job["spec"]["template"]["spec"]


def _cache_mount(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == env["HF_HOME"]]
    return mount


def test_every_run_and_stage_shares_one_model_cache_on_the_pvc() -> None:
    mounts = [
        _cache_mount(_pod(_run(name), stage))
        for name in ("run-a", "run-b")
        for stage in ("synthesis", "sft", "grpo", "eval")
    ]
    # The same folder of the same PVC for every run of a namespace (tenants do not share a
    # writable cache): not under a run's workspace subPath.
    assert {(m["name"], m["subPath"]) for m in mounts} == {("workspace", "ml/.cache/huggingface")}
    assert not any(m.get("readOnly") for m in mounts)  # pods download into it
    pod = _pod(_run("run-a"), "synthesis")
    [volume] = [v for v in pod["volumes"] if v["name"] == "workspace"]
    assert "persistentVolumeClaim" in volume


def test_the_cache_folder_is_configurable() -> None:
    mount = _cache_mount(_pod(_run("run-a", modelCache="team/models/hf"), "synthesis"))
    assert mount["subPath"] == "ml/team/models/hf"


def test_the_trainer_image_and_the_manifests_agree_on_hf_home() -> None:
    dockerfile = (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    match = re.search(r"HF_HOME=(\S+)", dockerfile)
    assert match is not None and match.group(1) == HF_HOME
