"""The operator on the local cluster as a user installs it: the chart's operator Deployment and its
bundled MLflow server running from our images on the real node (kubelet, containerd), real Jobs
run by the Job controller with our podFailurePolicy, every stage pod running the trainer-cpu
image, and the real garbage collector. The operator logs in with the chart's ServiceAccount (the
API server enforces the chart's RBAC: any 403 in its log fails the test); stage pods reach MLflow
by its Service name, the tests through ``kubectl port-forward``, as a user does.

One release and one MLflow server serve the whole module, in a namespace of its own that is
removed at the end (a second session starts clean). The tiny run drives every stage program end
to end; each fault test uses a small run whose stage programs fail, are killed or are paused the
way a cluster does it (invalid input → exit 65, a SIGKILLed process, a deleted pod, a suspended
Job), never a stand-in program.

Set VISIONR1_CLUSTER_DOCS=path to write what kubectl shows during the tiny run to that file
(docs/what-you-see-on-a-cluster.md is made this way).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from cluster_helpers import (
    ChartOperator,
    PortForward,
    apply,
    condition,
    copy_login,
    create_namespace,
    ensure_crd,
    items,
    kget,
    kget_or_none,
    mlflow_login,
    tiny_cluster_run,
    wait_for,
    with_stages,
)

from visionr1_operator.plan import parse_time

pytestmark = pytest.mark.cluster

SUFFIX = uuid.uuid4().hex[:6]
NS = f"vr1-e2e-{SUFFIX}"
PVC = "visionr1-data"
RELEASE = "vr1-operator"
RELEASE_NS = f"vr1-operator-{SUFFIX}"
FULLNAME = f"{RELEASE}-visionr1-operator"  # the chart's <release>-<chart> fullname
CHART = Path(__file__).resolve().parents[2] / "charts" / "visionr1-operator"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
TRAINER = ""  # the trainer-cpu image, pinned by digest (set by the world fixture)


@dataclass
class World:
    cp: Any
    pv: Path  # the PVC's folder: its shared/ folder is what every pod sees at /data
    mlflow_uri: str
    operator: ChartOperator
    tmp: Path

    def run(self, name: str) -> dict[str, Any]:
        return kget(self.cp, "vr1", name, "-n", NS)

    def phase(self, name: str) -> str | None:
        obj = kget_or_none(self.cp, "vr1", name, "-n", NS)
        return ((obj or {}).get("status") or {}).get("phase")

    def jobs(self, run: str) -> list[dict[str, Any]]:
        return items(self.cp, "jobs", "-n", NS, "-l", f"visionr1.io/run={run}")

    def pods(self, run: str) -> list[dict[str, Any]]:
        return items(self.cp, "pods", "-n", NS, "-l", f"visionr1.io/run={run}")

    def workspace(self, run: str) -> Path:
        return self.pv / NS / run

    def stage_manifest(self, run: str, stage: str) -> dict[str, Any] | None:
        path = self.workspace(run) / stage / "_manifest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def events(self, run: str) -> list[dict[str, Any]]:
        return items(
            self.cp,
            "events",
            "-n",
            NS,
            "--field-selector",
            f"involvedObject.kind=VisionR1Run,involvedObject.name={run}",
        )

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        try:
            wait_for(lambda: self.phase(name) in phases, timeout, f"{name} to reach {phases}", 0.5)
        except AssertionError:
            raise AssertionError(self.diagnose(name)) from None
        return self.run(name)

    def diagnose(self, name: str) -> str:
        """What a person would look at when a run does not finish."""
        parts = [
            f"run {name} phase={self.phase(name)}",
            self.cp.kubectl("describe", "vr1", name, "-n", NS, check=False).stdout,
            self.cp.kubectl("get", "jobs,pods", "-n", NS, "-o", "wide", check=False).stdout,
            "--- operator log (tail)",
            self.operator.log()[-4000:],
        ]
        for pod in self.pods(name)[-3:]:
            pod_name = pod["metadata"]["name"]
            log = self.cp.kubectl("logs", pod_name, "-n", NS, "--all-containers", check=False)
            parts += [f"--- kubectl logs {pod_name} (tail)", (log.stdout + log.stderr)[-2500:]]
        return "\n".join(parts)

    def mlflow(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.mlflow_uri)

    def assert_no_forbidden(self) -> None:
        assert self.operator.alive(), "the operator is not running:\n" + self.operator.log()[-3000:]
        assert self.operator.forbidden() == [], "the API server refused the operator (RBAC)"


def _toy_world(pv: Path) -> None:
    """The shared data every pod reads at /data: toy problems and the tiny model (the Makefile's
    demo target, written onto the PVC)."""
    cli = [sys.executable, "-m", "visionr1_operator.cli", "toy"]
    if not (pv / "toy" / "bench").exists():
        subprocess.run(
            [*cli, "data", "--out", str(pv / "toy"), "--n", "24", "--seed", "0", "--n-bench", "8"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    if not (pv / "models" / "tiny-qwen25vl" / "config.json").exists():
        subprocess.run(
            [*cli, "model", "--out", str(pv / "models" / "tiny-qwen25vl")],
            check=True,
            capture_output=True,
            timeout=600,
        )
    # The pods' user (1000) reads what root wrote here.
    for d, _, files in os.walk(pv):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)


def installed_ok(cp: Any) -> bool:
    return cp.helm("status", RELEASE, "-n", RELEASE_NS, check=False).returncode == 0


def _image_values(ref: str) -> dict[str, str]:
    """``host:port/path/name:tag@sha256:...`` as the chart's image values (pinned by digest)."""
    name, digest = ref.split("@")
    repository, tag = name.rsplit(":", 1)
    return {"repository": repository, "tag": tag, "digest": digest}


@pytest.fixture(scope="module")
def world(
    control_plane: Any, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    global TRAINER
    TRAINER = images["trainer-cpu"]
    cp = control_plane
    tmp = tmp_path_factory.mktemp("operator")
    ensure_crd(cp)
    create_namespace(cp, NS)
    operator = ChartOperator(cp, RELEASE_NS, FULLNAME)
    try:
        # The chart, as a user installs it, for this namespace only (a Role, nothing cluster-wide);
        # the CRD is already there. Its operator and MLflow run from our images on the node.
        values = tmp / "values.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "crds": {"install": False},
                    "watchNamespaces": [NS],
                    "image": {**_image_values(images["operator"]), "pullPolicy": "IfNotPresent"},
                    "operator": {
                        "trainerImage": TRAINER,  # the runs' image: allowed (deny by default)
                        # one pod: these tests kill and restart the operator (the standby's
                        # takeover is test_cluster_lifecycle's)
                        "replicas": 1,
                        "retryBackoffSeconds": 1,
                        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                    },
                    "mlflow": {
                        "image": _image_values(images["mlflow"]),
                        # The chart's defaults: PostgreSQL (our image, from Debian's packages)
                        # and authentication on.
                        "postgresql": {
                            "image": _image_values(images["postgresql"]),
                            "persistence": {"size": "1Gi"},
                            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                        },
                        "workers": 1,
                        "persistence": {"size": "1Gi", "keep": False},
                        "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}},
                    },
                }
            )
        )
        installed = cp.helm(
            "upgrade", "--install", RELEASE, str(CHART), "-n", RELEASE_NS, "--create-namespace",
            "-f", str(values), "--wait", "--timeout=300s", timeout=360, check=False,
        )  # fmt: skip
        if installed.returncode != 0:  # what a user would look at: the pods and their events
            pods = cp.kubectl("describe", "pods", "-n", RELEASE_NS, check=False).stdout
            pytest.fail(f"helm install failed: {installed.stderr.strip()}\n{pods[-6000:]}")
        pv = Path(cp.make_pvc(NS, PVC, "10Gi"))
        # A fresh volume for each session: outputs left by an earlier session would make the
        # stages find themselves "already done".
        for child in pv.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        # Root-owned 0755, as a fresh volume usually is: the kubelet creates the missing subPath
        # folders as root, and the operator's init container must give the run its folder.
        pv.chmod(0o755)
        os.chown(pv, 0, 0)
        _toy_world(pv / "shared")  # the operator's default --shared-data-path
        # The runs' MLflow login (examples/tiny-cluster.yaml's credentialsSecret), and this
        # process's, as a user copies the chart's admin Secret (README).
        login = mlflow_login(cp, RELEASE_NS, FULLNAME)
        copy_login(cp, login, NS)
        saved = {k: os.environ.get(k) for k in login}
        os.environ.update(login)
        try:
            with PortForward(cp, RELEASE_NS, f"svc/{FULLNAME}-mlflow", 5000) as mlflow:
                yield World(cp, pv, mlflow.url, operator, tmp)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        # Runs carry the operator's finalizer: delete them while it still runs.
        if installed_ok(cp) and not operator.pods():
            operator.start()
        cp.kubectl("delete", "vr1", "--all", "-n", NS, "--timeout=120s", check=False)
        cp.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False)
        for ns in (NS, RELEASE_NS):
            cp.kubectl("delete", "namespace", ns, "--timeout=180s", check=False, timeout=200)
        cp.kubectl("delete", "pv", f"pv-{NS}-{PVC}", check=False)
        shutil.rmtree(cp.pv_root / f"{NS}-{PVC}", ignore_errors=True)


# --------------------------------------------------------------------------- the tiny run


class Recorder:
    """Snapshots of what a user types while the run goes: one per new (phase, stage)."""

    def __init__(self, w: World, name: str) -> None:
        self.w, self.name = w, name
        self.seen: list[tuple[str, str]] = []
        self.snapshots: list[tuple[str, str]] = []

    def kubectl(self, *args: str) -> str:
        return self.w.cp.kubectl(*args, check=False).stdout

    def poll(self, t: float) -> None:
        obj = kget_or_none(self.w.cp, "vr1", self.name, "-n", NS) or {}
        st = obj.get("status") or {}
        key = (st.get("phase") or "", st.get("currentStage") or "")
        if key in self.seen:
            return
        self.seen.append(key)
        text = "$ kubectl get vr1 -o wide\n" + self.kubectl("get", "vr1", "-n", NS, "-o", "wide")
        text += "\n$ kubectl get jobs,pods\n" + self.kubectl(
            "get", "jobs,pods", "-n", NS, "-l", f"visionr1.io/run={self.name}"
        )
        self.snapshots.append(
            (f"t = {t:.0f} s: phase {key[0] or '-'}, stage {key[1] or '-'}", text)
        )


def test_tiny_run_end_to_end(world: World) -> None:
    w, name = world, "tiny"
    run = tiny_cluster_run(name, NS, PVC, image=TRAINER)
    rec = Recorder(w, name)
    t0 = time.monotonic()
    out = apply(w.cp, run)
    assert "created" in out.stdout
    deadline = t0 + 900
    while time.monotonic() < deadline:
        rec.poll(time.monotonic() - t0)
        if w.phase(name) in ("Succeeded", "Failed"):
            break
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    rec.poll(elapsed)
    obj = w.run(name)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)

    # Status written through the status subresource, as the CRD's printer columns show it.
    st = obj["status"]
    assert st["progress"] == "5/5"
    assert condition(obj, "Succeeded")["status"] == "True"
    assert condition(obj, "Succeeded")["reason"] == "AllStagesSucceeded"
    stages = st["stages"]
    assert {s: stages[s]["phase"] for s in stages} == dict.fromkeys(
        ["synthesis", "filter", "sft", "grpo", "eval"], "Succeeded"
    )
    assert [s for s in stages if stages[s].get("progress")] == []  # no stale "1 pod running"
    # One Job per stage, each completed by the real Job controller, owned by the run.
    uid = obj["metadata"]["uid"]
    jobs = {j["metadata"]["name"]: j for j in w.jobs(name)}
    assert sorted(jobs) == sorted(f"{name}-{s}-0" for s in stages)
    for job in jobs.values():
        assert condition(job, "Complete")["status"] == "True", job["status"]
        assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    # Their pods ran the trainer image on the local node and exited 0.
    pods = w.pods(name)
    assert len(pods) >= 5
    for pod in pods:
        assert pod["spec"]["nodeName"] == w.cp.node_name
        assert pod["status"]["phase"] == "Succeeded"
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 0
        assert pod["status"]["containerStatuses"][0]["imageID"].endswith(TRAINER.split("@")[1])
    # One resolved-config ConfigMap per attempt.
    cms = items(w.cp, "configmaps", "-n", NS, "-l", f"visionr1.io/run={name}")
    assert len(cms) == 5
    # The stage programs wrote their outputs into the PVC's folder.
    for stage in stages:
        manifest = w.stage_manifest(name, stage)
        assert manifest is not None, f"{stage}: no _manifest.json under {w.workspace(name)}"
    assert (w.workspace(name) / "sft" / "final" / "config.json").exists()
    # Events on the run, as `kubectl describe` lists them.
    events = w.events(name)
    reasons = [e["reason"] for e in events]
    for reason in ("RunStarted", "StageStarted", "StageSucceeded", "AllStagesSucceeded"):
        assert reason in reasons, reasons
    assert {e["source"].get("component") for e in events} == {"visionr1-operator"}
    # MLflow: the parent run finished, a nested run per stage.
    client = w.mlflow()
    parent = client.get_run(st["mlflowRunId"])
    assert parent.info.status == "FINISHED"
    for stage in stages:
        child = client.get_run(stages[stage]["mlflowRunId"])
        assert child.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        assert child.info.status == "FINISHED", (stage, child.info.status)
    w.assert_no_forbidden()
    # `kubectl logs deploy/...` reaches the chart's operator (it no longer logs each API request
    # at INFO; that it reconciled this run is the status and the Events above).
    deploy_log = w.cp.kubectl("logs", f"deploy/{FULLNAME}", "-n", RELEASE_NS).stdout
    assert "Initial authentication has finished" in deploy_log, deploy_log[-3000:]

    describe = w.cp.kubectl("describe", "vr1", name, "-n", NS).stdout
    assert "AllStagesSucceeded" in describe
    _write_reference(rec, describe, elapsed)
    print(f"tiny run end to end: {elapsed:.1f} s")


def _write_reference(rec: Recorder, describe: str, elapsed: float) -> None:
    target = os.environ.get("VISIONR1_CLUSTER_DOCS")
    if not target:
        return
    lines = [
        "# What you see on a cluster",
        "",
        "What `kubectl` prints while a VisionR1Run goes through the operator on a real control",
        "plane: the cluster variant of `examples/tiny-cpu.yaml` (the PVC instead of a local",
        "folder, sizes cut to the minimum) applied in namespace `vr1-e2e`, recorded by",
        "`tests/cluster/test_cluster_operator.py::test_tiny_run_end_to_end` with",
        "`VISIONR1_CLUSTER_DOCS=docs/what-you-see-on-a-cluster.md`. Every stage ran as a real Job",
        "whose pod the local node ran as a process (2 shared CPU cores).",
        "",
        f"End to end (apply → Succeeded): {elapsed:.0f} s.",
        "",
        "## During and after the run",
        "",
    ]
    for title, text in rec.snapshots:
        lines += [f"### {title}", "", "```", text.rstrip(), "```", ""]
    lines += ["## `kubectl describe vr1 tiny`", "", "```", describe.rstrip(), "```", ""]
    Path(target).write_text("\n".join(lines))


# --------------------------------------------------------------------------- faults


# SFT long enough to be interrupted between checkpoints: 2 micro-batches per optimizer step,
# a checkpoint every 2 steps.
STEPS = 16
SLOW_SFT = {"globalBatchSize": 8, "perDeviceBatchSize": 4, "saveSteps": 2}


def _small(name: str, stages: list[str], **sft: Any) -> dict[str, Any]:
    run = with_stages(tiny_cluster_run(name, NS, PVC, image=TRAINER), stages)
    if "sft" in stages:
        run["spec"]["stages"]["sft"]["params"].update(sft)
    return run


def _sft_only(name: str, cold_start: str, **sft: Any) -> dict[str, Any]:
    """A run of SFT alone, fed the cold-start dataset already on the PVC."""
    run = _small(name, ["sft"], **sft)
    run["spec"]["stages"]["sft"]["from"] = {"dataset": cold_start, "format": "visionr1"}
    return run


@pytest.fixture(scope="module")
def cold_start(world: World) -> str:
    """A cold-start dataset on the PVC (the path pods see) for the fault runs that train: the tiny
    run's filter output when that test ran, else a synthesis → filter run made for it. A stage pod
    sees only its own run's folder and the shared data folder (/data), so the dataset is copied
    into the shared folder, as a user would publish a dataset for other runs."""
    for run in ("tiny", "cold"):
        manifest = world.stage_manifest(run, "filter")
        if manifest is not None:
            return _publish(world, run, manifest["outputs"]["data"])
    apply(world.cp, _small("cold", ["synthesis", "filter"]))
    obj = world.wait_phase("cold", ("Succeeded", "Failed"), 600)
    assert obj["status"]["phase"] == "Succeeded", world.diagnose("cold")
    manifest = world.stage_manifest("cold", "filter")
    assert manifest is not None
    return _publish(world, "cold", manifest["outputs"]["data"])


def _publish(world: World, run: str, rel: str) -> str:
    """Copy a run's output into the PVC's shared folder; return the path pods read it at."""
    src = world.workspace(run) / rel
    dst = world.pv / "shared" / "published" / run / rel
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return f"/data/published/{run}/{rel}"


def _stage_processes(stage_run_id: str) -> list[psutil.Process]:
    """The processes of a stage's pod on the node (host pids: containers are processes of this
    machine): the pod's env names the stage's MLflow run."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("VISIONR1_STAGE_RUN_ID") == stage_run_id:
                found.append(proc)
    return found


def _checkpoint_steps(w: World, run: str) -> list[int]:
    from visionr1_jobs.training.checkpoints import is_complete_checkpoint

    ckpts = w.workspace(run) / "sft" / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(
        int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if is_complete_checkpoint(p)
    )


def _wait_checkpoint(w: World, run: str, at_least: int, timeout: float = 300) -> int:
    try:
        steps = wait_for(
            lambda: [s for s in _checkpoint_steps(w, run) if s >= at_least],
            timeout,
            f"{run}: sft checkpoint >= {at_least}",
            0.2,
        )
    except AssertionError:
        raise AssertionError(w.diagnose(run)) from None
    return max(steps)


def _jobs_by_attempt(w: World, run: str) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for j in w.jobs(run):
        lab = j["metadata"]["labels"]
        out.setdefault((lab["visionr1.io/stage"], lab["visionr1.io/attempt"]), []).append(
            j["metadata"]["name"]
        )
    return out


def test_invalid_input_exit_65_fails_the_job_by_pod_failure_policy(world: World) -> None:
    w, name = world, "bad-input"
    run = _small(name, ["synthesis"])
    run["spec"]["stages"]["synthesis"]["from"]["dataset"] = "/data/toy/no-such-dataset"
    apply(w.cp, run)
    obj = w.wait_phase(name, ("Succeeded", "Failed"), 300)
    assert obj["status"]["phase"] == "Failed", w.diagnose(name)
    # The real Job controller applied our FailJob rule on exit code 65.
    (job,) = w.jobs(name)
    failed = condition(job, "Failed")
    assert failed and failed["status"] == "True" and failed["reason"] == "PodFailurePolicy"
    assert "exit code 65" in failed["message"]
    (pod,) = w.pods(name)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 65
    # Not retried: one attempt, and the run names the reason.
    syn = obj["status"]["stages"]["synthesis"]
    assert syn["phase"] == "Failed" and syn["attempts"] == 1
    cond = condition(obj, "Failed")
    assert cond["status"] == "True" and "exit code 65" in cond["message"]
    # ...in the stage's own words (its termination message), not only the exit code.
    assert "/data/toy/no-such-dataset" in cond["message"], cond["message"]
    assert "/data/toy/no-such-dataset" in w.cp.kubectl("describe", "vr1", name, "-n", NS).stdout
    reasons = [e["reason"] for e in w.events(name)]
    assert "InvalidInput" in reasons, reasons
    assert w.mlflow().get_run(obj["status"]["mlflowRunId"]).info.status == "FAILED"
    w.assert_no_forbidden()


def test_a_stage_over_its_memory_limit_is_oomkilled_and_named(world: World) -> None:
    """The kernel enforces the stage's memory limit (its cgroup): the run's condition names the
    stage, OOMKilled, the limit, and the field to raise."""
    w, name = world, "oom"
    run = _small(name, ["synthesis"])
    syn = run["spec"]["stages"]["synthesis"]
    syn["resources"] = {"memory": "40Mi"}
    syn["backoffLimit"] = 0
    apply(w.cp, run)
    obj = w.wait_phase(name, ("Succeeded", "Failed"), 300)
    assert obj["status"]["phase"] == "Failed", w.diagnose(name)
    (pod,) = [
        p for p in w.pods(name) if p["metadata"]["labels"]["visionr1.io/stage"] == "synthesis"
    ]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["reason"], term["exitCode"]) == ("OOMKilled", 137)
    message = condition(obj, "Failed")["message"]
    for needle in ("synthesis", "OOMKilled", "40Mi", "spec.stages.synthesis.resources.memory"):
        assert needle in message, message
    w.assert_no_forbidden()


def test_killed_process_and_deleted_pod_resume_from_the_last_checkpoint(
    world: World, cold_start: str
) -> None:
    """Attempt 1: the stage's process is SIGKILLed (as the OOM killer does) → exit 137, the Job
    fails (backoffLimit 0), the operator starts attempt 2 after its backoff. Attempt 2: its pod is
    deleted → the same again. Attempt 3 finishes; each attempt resumed from the newest complete
    checkpoint the one before it left."""
    w, name = world, "resume"
    apply(w.cp, _sft_only(name, cold_start, maxSteps=STEPS, **SLOW_SFT))
    w.wait_phase(name, ("Running",), 120)
    first = _wait_checkpoint(w, name, 2)
    sft_run_id = w.run(name)["status"]["stages"]["sft"]["mlflowRunId"]
    # What a user does to a running stage: read its log, look inside its container.
    (running,) = [p for p in w.pods(name) if p["status"].get("phase") == "Running"]
    pod_name = running["metadata"]["name"]
    log = w.cp.kubectl("logs", pod_name, "-n", NS, "-c", "stage").stdout
    assert "sft" in log, log[-2000:]
    inside = w.cp.kubectl(
        "exec", pod_name, "-n", NS, "-c", "stage", "--",
        "python", "-c", "import os, visionr1_jobs; print(os.getuid(), os.listdir('/workspace'))",
    ).stdout  # fmt: skip
    assert inside.startswith("1000 ") and "sft" in inside, inside
    procs = _stage_processes(sft_run_id)
    assert procs, "no process of the sft pod found on this node"
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: len(w.jobs(name)) >= 2, 120, "attempt 2 of sft (a second sft Job)")
    j0 = kget(w.cp, "job", f"{name}-sft-0", "-n", NS)
    failed = condition(j0, "Failed")
    assert failed and failed["reason"] != "PodFailurePolicy", j0["status"]
    j1 = kget(w.cp, "job", f"{name}-sft-1", "-n", NS)
    # attempt 2 came after the operator's backoff (1 s here), counted from the failure
    created = parse_time(j1["metadata"]["creationTimestamp"])
    assert created >= parse_time(failed["lastTransitionTime"]) + timedelta(seconds=1)
    assert created.timestamp() >= killed_at - 1
    reasons = [e["reason"] for e in w.events(name)]
    assert "StageRetrying" in reasons and "StageRetried" in reasons, reasons

    # attempt 2: delete its pod once it has written a newer checkpoint
    second = _wait_checkpoint(w, name, first + 2)
    pod = wait_for(
        lambda: [
            p
            for p in w.pods(name)
            if p["metadata"]["labels"].get("visionr1.io/attempt") == "1"
            and p["status"].get("phase") == "Running"
        ],
        60,
        "attempt 2's pod running",
    )[0]
    w.cp.kubectl("delete", "pod", pod["metadata"]["name"], "-n", NS, "--wait=false")

    obj = w.wait_phase(name, ("Succeeded", "Failed"), 400)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
    manifest = w.stage_manifest(name, "sft")
    assert manifest["metrics"]["global_step"] == STEPS
    assert manifest["metrics"]["resumed_from_step"] >= second
    # Nothing duplicated: one Job per (stage, attempt); one MLflow run for the stage, the same
    # one every attempt logged into, with one loss value per step.
    by_attempt = _jobs_by_attempt(w, name)
    assert all(len(v) == 1 for v in by_attempt.values()), by_attempt
    sft_attempts = sorted(int(a) for (s, a) in by_attempt if s == "sft")
    assert sft_attempts[:2] == [0, 1] and len(sft_attempts) in (2, 3), by_attempt
    assert obj["status"]["stages"]["sft"]["mlflowRunId"] == sft_run_id
    client = w.mlflow()
    steps = [m.step for m in client.get_metric_history(sft_run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1)), steps
    w.assert_no_forbidden()


def test_operator_sigkilled_mid_stage_restarts_without_duplicates(world: World) -> None:
    w, name = world, "restart"
    apply(w.cp, _small(name, ["synthesis", "filter"]))
    wait_for(
        lambda: kget_or_none(w.cp, "job", f"{name}-synthesis-0", "-n", NS), 120, "the synthesis Job"
    )
    w.operator.kill()
    try:
        # While it is down the Job controller finishes the stage; nobody starts the next one.
        wait_for(
            lambda: condition(kget(w.cp, "job", f"{name}-synthesis-0", "-n", NS), "Complete"),
            300,
            "synthesis to complete",
        )
        time.sleep(2)
        assert kget_or_none(w.cp, "job", f"{name}-filter-0", "-n", NS) is None
    finally:
        w.operator.start()
    obj = w.wait_phase(name, ("Succeeded", "Failed"), 300)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
    by_attempt = _jobs_by_attempt(w, name)
    assert by_attempt == {
        ("synthesis", "0"): [f"{name}-synthesis-0"],
        ("filter", "0"): [f"{name}-filter-0"],
    }
    cms = items(w.cp, "configmaps", "-n", NS, "-l", f"visionr1.io/run={name}")
    assert sorted(c["metadata"]["name"] for c in cms) == sorted(sum(by_attempt.values(), []))
    client = w.mlflow()
    parent = obj["status"]["mlflowRunId"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert sorted(r.info.run_name for r in children) == ["filter", "synthesis"]
    assert client.get_run(parent).info.status == "FINISHED"
    w.assert_no_forbidden()


def test_deleting_a_run_collects_its_children_and_ends_its_mlflow_run(
    world: World, cold_start: str
) -> None:
    w, name = world, "doomed"
    # a multi-node stage (it also gets a Service): 2 processes of 2 rows make the batch of 4
    run = _sft_only(name, cold_start, maxSteps=500, perDeviceBatchSize=2)
    run["spec"]["stages"]["sft"]["nodes"] = 2
    run["spec"]["stages"]["sft"]["backoffLimit"] = 20  # still running when deleted
    apply(w.cp, run)
    wait_for(
        lambda: kget_or_none(w.cp, "service", f"{name}-sft", "-n", NS),
        300,
        "the sft stage's headless Service",
    )
    wait_for(
        lambda: [
            p for p in w.pods(name) if p["metadata"]["labels"].get("visionr1.io/stage") == "sft"
        ],
        60,
        "sft pods",
    )
    obj = w.run(name)
    parent = obj["status"]["mlflowRunId"]
    sft_run = obj["status"]["stages"]["sft"]["mlflowRunId"]
    selector = f"visionr1.io/run={name}"
    kinds = "jobs,pods,configmaps,services"
    before = {o["kind"] for o in items(w.cp, kinds, "-n", NS, "-l", selector)}
    assert before == {"Job", "Pod", "ConfigMap", "Service"}, before
    w.cp.kubectl("delete", "vr1", name, "-n", NS, "--timeout=120s")
    wait_for(
        lambda: not items(w.cp, kinds, "-n", NS, "-l", selector),
        120,
        "the garbage collector to remove the run's Jobs, pods, ConfigMaps and Services",
    )
    client = w.mlflow()
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(sft_run).info.status == "KILLED"
    w.assert_no_forbidden()


def test_suspend_and_resume_a_running_stage(world: World, cold_start: str) -> None:
    w, name = world, "pausable"
    # Long enough that the pod is still training when the Job controller removes it (a pod on
    # the node's free cores does a step of the tiny model in a fraction of a second).
    steps = 8 * STEPS
    apply(w.cp, _sft_only(name, cold_start, maxSteps=steps, **SLOW_SFT))
    reached = _wait_checkpoint(w, name, 2)
    w.cp.kubectl("patch", "vr1", name, "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(
        lambda: kget(w.cp, "job", f"{name}-sft-0", "-n", NS)["spec"].get("suspend"),
        60,
        "the operator to suspend the sft Job",
    )
    # The Job controller removes the running pod of a suspended Job.
    wait_for(
        lambda: (
            not [
                p
                for p in w.pods(name)
                if p["metadata"]["labels"]["visionr1.io/stage"] == "sft"
                and p["status"].get("phase") in ("Pending", "Running")
                and not p["metadata"].get("deletionTimestamp")
            ]
        ),
        120,
        "the sft pod to be removed",
    )
    obj = w.wait_phase(name, ("Suspended",), 60)
    assert condition(obj, "Suspended")["status"] == "True"
    job = kget(w.cp, "job", f"{name}-sft-0", "-n", NS)
    assert condition(job, "Suspended")["status"] == "True"  # the Job controller's own view
    paused = max(_checkpoint_steps(w, name) or [0])
    assert paused >= reached
    w.cp.kubectl("patch", "vr1", name, "-n", NS, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    obj = w.wait_phase(name, ("Succeeded", "Failed"), 400)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
    assert condition(obj, "Suspended")["status"] == "False"
    manifest = w.stage_manifest(name, "sft")
    assert manifest["metrics"]["resumed_from_step"] >= reached
    assert manifest["metrics"]["global_step"] == steps
    assert _jobs_by_attempt(w, name)[("sft", "0")] == [f"{name}-sft-0"]
    assert ("sft", "1") not in _jobs_by_attempt(w, name)  # a pause is not a failed attempt
    reasons = [e["reason"] for e in w.events(name)]
    assert "Suspended" in reasons and "Resumed" in reasons, reasons
    w.assert_no_forbidden()


def test_a_bad_manifest_is_refused_and_creates_nothing(world: World) -> None:
    w, name = world, "refused"
    run = _small(name, ["synthesis", "filter"])
    run["spec"]["stages"]["filter"]["nodes"] = 4
    out = apply(w.cp, run, check=False)
    assert out.returncode != 0
    assert "stages.filter.nodes must be 1" in out.stderr
    time.sleep(2)
    assert kget_or_none(w.cp, "vr1", name, "-n", NS) is None
    assert items(w.cp, "jobs,configmaps", "-n", NS, "-l", f"visionr1.io/run={name}") == []
    w.assert_no_forbidden()


def test_what_a_tenant_may_not_ask_for_is_refused_naming_the_field(world: World) -> None:
    """Deny by default, against the chart-installed operator and the real API server: what the
    CRD's rules catch is refused at `kubectl apply`; what the cluster's lists catch fails the run
    at once (NotAllowed), naming each field, with nothing created."""
    w = world
    # The API server (CEL): a Secret the run does not list, a loader variable.
    unlisted = _small("reads-a-secret", ["synthesis"])
    unlisted["spec"]["stages"]["synthesis"]["env"] = [
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "ops-admin", "key": "token"}}}
    ]
    preload = _small("preloads", ["synthesis"])
    preload["spec"]["stages"]["synthesis"]["env"] = [{"name": "LD_PRELOAD", "value": "/x.so"}]
    for run, field, words in (
        (unlisted, "spec", "reads a Secret not listed in spec.secrets"),
        (preload, "spec.stages.synthesis.env[0]", "may not be set in env"),
    ):
        out = apply(w.cp, run, check=False)
        assert out.returncode != 0 and field in out.stderr and words in out.stderr, out.stderr
        assert kget_or_none(w.cp, "vr1", run["metadata"]["name"], "-n", NS) is None
    # The same Secret listed in spec.secrets: admitted by the API server.
    listed = copy.deepcopy(unlisted)
    listed["metadata"]["name"] = "lists-its-secret"
    listed["spec"]["secrets"] = ["ops-admin"]
    listed["spec"]["suspend"] = True  # admitted is all this checks: nothing needs to run
    assert apply(w.cp, listed).returncode == 0
    # The operator (the chart's lists, all at their defaults): another image, a priority class,
    # a node selector, a toleration, another tracking server.
    name = "asks-too-much"
    run = _small(name, ["synthesis"])
    spec = run["spec"]
    spec["images"]["trainer"] = "docker.io/someone/miner:1"
    spec["priorityClassName"] = "system-node-critical"
    spec["mlflow"]["trackingUri"] = "http://collector.example.net:5000"
    syn = spec["stages"]["synthesis"]
    syn["nodeSelector"] = {"node-role.kubernetes.io/control-plane": ""}
    syn["tolerations"] = [{"operator": "Exists"}]
    apply(w.cp, run)
    obj = w.wait_phase(name, ("Failed",), 120)
    failed = condition(obj, "Failed")
    assert failed["reason"] == "NotAllowed", failed
    for field in (
        "spec.images.trainer",
        "spec.priorityClassName",
        "spec.stages.synthesis.nodeSelector",
        "spec.stages.synthesis.tolerations[0]",
        "spec.mlflow.trackingUri",
    ):
        assert f"{field}: " in failed["message"], (field, failed["message"])
    assert "operator.allowedImages" in failed["message"]
    assert "NotAllowed" in w.cp.kubectl("describe", "vr1", name, "-n", NS).stdout
    assert w.jobs(name) == [] and w.pods(name) == []
    assert items(w.cp, "configmaps", "-n", NS, "-l", f"visionr1.io/run={name}") == []
    # A system namespace can never be watched: the chart refuses to render.
    out = w.cp.helm(
        "template", "x", str(CHART), "-n", RELEASE_NS, "--kube-version", "1.31.0",
        "--set", "watchNamespaces={kube-system}", check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "watchNamespaces: kube-system is a system namespace" in (
        out.stderr
    )
    w.cp.kubectl("delete", "vr1", name, "lists-its-secret", "-n", NS, "--wait=false", check=False)
    w.assert_no_forbidden()


def test_the_bundled_mlflow_runs_on_postgresql_and_refuses_anonymous_requests(
    world: World,
) -> None:
    """The chart's default MLflow: authentication on (an anonymous request gets 401, a wrong
    password too, the runs' login is let in) and its store in the chart's PostgreSQL: a run
    logged with the login is a row there, read with psql in the database's pod. (The tiny run
    logs every stage with that login: test_tiny_run_end_to_end.)"""
    import httpx

    w = world
    experiment_name = f"auth-check-{NS}"
    search = f"{w.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name"
    params = {"experiment_name": experiment_name}
    anonymous = httpx.get(search, params=params, timeout=60)
    assert anonymous.status_code == 401, anonymous.text
    login = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    wrong = httpx.get(search, params=params, auth=(login[0], "not-the-password"), timeout=60)
    assert wrong.status_code == 401
    client = w.mlflow()
    experiment_id = client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name="auth-check")
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    ok = httpx.get(search, params=params, auth=login, timeout=60)
    assert ok.status_code == 200 and ok.json()["experiment"]["experiment_id"] == experiment_id
    finished = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'")
    assert [r.info.run_id for r in finished] == [run.info.run_id]
    # The rows are in PostgreSQL (the server's store), read with psql in its pod.
    (db_pod,) = items(
        w.cp, "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=postgresql"
    )
    query = (
        "SELECT count(*) FROM runs WHERE status = 'FINISHED' AND experiment_id = "
        f"{int(experiment_id)}"
    )
    psql = w.cp.kubectl(
        "exec", db_pod["metadata"]["name"], "-n", RELEASE_NS, "--", "sh", "-c",
        'PGPASSWORD="$(cat /etc/postgresql-password/password)" psql -h 127.0.0.1 -U mlflow '
        f'-d mlflow -tAc "{query}"',
    )  # fmt: skip
    assert int(psql.stdout.strip()) == len(finished) > 0, psql.stdout + psql.stderr
    server = kget(w.cp, "deployment", f"{FULLNAME}-mlflow", "-n", RELEASE_NS)
    command = server["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--app-name basic-auth" in " ".join(command)


def test_sft_on_two_pods_follows_the_one_pod_loss_curve(world: World, cold_start: str) -> None:
    """Multi-pod training for real: SFT as an Indexed Job of 2 pods, torchrun's rendezvous at
    index 0 through the stage's headless Service (DNS on the pod network), gloo between the
    pods. The same global batch (4 rows a step: 4 on one pod, or 2 on each of two) gives the same
    loss per step as one pod, within 2% (the ranks pad their halves separately and sum in
    another order)."""
    w = world
    losses: dict[int, list[float]] = {}
    for nodes in (1, 2):
        name = f"sft-{nodes}pod"
        run = _sft_only(
            name, cold_start, maxSteps=6, saveSteps=100, globalBatchSize=4,
            perDeviceBatchSize=4 // nodes, learningRate=1.0e-3,
        )  # fmt: skip
        run["spec"]["stages"]["sft"]["nodes"] = nodes
        # torchrun's launcher and its worker each import torch: 1Gi is OOMKilled (the operator
        # says so, naming the limit).
        run["spec"]["stages"]["sft"]["resources"] = {"memory": "3Gi"}
        apply(w.cp, run)
        obj = w.wait_phase(name, ("Succeeded", "Failed"), 600)
        assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
        pods = [p for p in w.pods(name) if p["metadata"]["labels"]["visionr1.io/stage"] == "sft"]
        assert len(pods) == nodes and {p["status"]["phase"] for p in pods} == {"Succeeded"}
        run_id = obj["status"]["stages"]["sft"]["mlflowRunId"]
        history = w.mlflow().get_metric_history(run_id, "loss")
        losses[nodes] = [m.value for m in sorted(history, key=lambda m: m.step)]
    # The pods really met: index 1 launched torchrun against index 0's pod by its DNS name.
    log = w.cp.kubectl(
            "logs", "-n", NS, "-l", "visionr1.io/run=sft-2pod,batch.kubernetes.io/job-completion-index=1",
        "-c", "stage", "--tail=-1",
    ).stdout  # fmt: skip
    assert "sft-2pod-sft" in log, log[-2000:]
    assert len(losses[1]) == len(losses[2]) == 6, losses
    for step, (one, two) in enumerate(zip(losses[1], losses[2], strict=True), 1):
        assert abs(one - two) <= 0.02 * abs(one), (step, losses)


def _progress_lines(w: World, pod: str) -> list[dict[str, Any]]:
    log = w.cp.kubectl("logs", pod, "-n", NS, "-c", "stage", "--tail=-1", check=False).stdout
    out = []
    for line in log.replace("\r", "\n").splitlines():
        # a progress bar's update may precede the line on the same row of the log
        at = line.find("VISIONR1_PROGRESS ")
        if at >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line[at + len("VISIONR1_PROGRESS ") :]))
    return out


def test_a_lost_rank_restarts_the_two_pod_stage_from_its_checkpoint(
    world: World, cold_start: str
) -> None:
    """SFT on two pods (one torchrun group over gloo). Once a checkpoint is written, attempt 1
    loses index 1's pod (force-deleted, as a lost node leaves it); attempt 2, once it has written
    a newer checkpoint, loses index 0 (evicted through the Eviction API: the pod gets the
    DisruptionTarget condition). Each time the attempt fails at once (the Job controller counts
    the lost pod against backoffLimit 0 and terminates the surviving rank: nobody waits on a
    collective's timeout), the operator starts the next attempt after its backoff, and that
    attempt's two pods resume from the newest complete checkpoint; the third finishes."""
    w, name = world, "lost-rank"
    # Steps enough that the second attempt, lost right after its first checkpoint, is still
    # training when the loss lands (a tiny step takes a fraction of a second: with 16 steps it
    # sometimes saved the final model first, and the third attempt had nothing to train).
    steps = 3 * STEPS
    run = _sft_only(name, cold_start, maxSteps=steps, globalBatchSize=8, perDeviceBatchSize=2,
                    saveSteps=2)  # fmt: skip
    run["spec"]["stages"]["sft"]["nodes"] = 2
    run["spec"]["stages"]["sft"]["resources"] = {"memory": "3Gi"}
    apply(w.cp, run)

    def attempt_pod(attempt: int, index: int) -> dict[str, Any] | None:
        for p in w.pods(name):
            lab = p["metadata"]["labels"]
            if (
                lab.get("visionr1.io/attempt") == str(attempt)
                and lab.get("batch.kubernetes.io/job-completion-index") == str(index)
                and not p["metadata"].get("deletionTimestamp")
            ):
                return p
        return None

    def both_running(attempt: int) -> bool:
        pods = [attempt_pod(attempt, i) for i in (0, 1)]
        return all(p and p["status"].get("phase") == "Running" for p in pods)

    def evict(pod: str) -> None:
        body = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod, "namespace": NS}}  # fmt: skip
        w.cp.kubectl("create", "--raw", f"/api/v1/namespaces/{NS}/pods/{pod}/eviction",
                     "-f", "-", input=json.dumps(body))  # fmt: skip

    def force_delete(pod: str) -> None:
        w.cp.kubectl("delete", "pod", pod, "-n", NS, "--grace-period=0", "--force", "--wait=false")

    figures: list[dict[str, Any]] = []
    checkpoint = 0
    for attempt, (index, lose) in enumerate(((1, force_delete), (0, evict))):
        if attempt == 0:
            checkpoint = _wait_checkpoint(w, name, 2, timeout=600)
        else:
            # This attempt resumed right after the checkpoint the lost one had written (or a
            # newer one written while it went down), not at step 0.
            trained = wait_for(lambda a=attempt: _trained(w, a, name), 300, "a resumed step", 2)
            assert trained[0]["done"] - 1 >= figures[-1]["checkpoint_step"], trained
            figures[-1]["lost_to_first_resumed_step_s"] = round(
                trained[0]["time"] - figures[-1]["lost_at"], 1
            )
            # lose it once it has written a checkpoint of its own
            checkpoint = _wait_checkpoint(w, name, trained[0]["done"] + 1, timeout=600)
        victim = attempt_pod(attempt, index)
        assert victim and victim["status"].get("phase") == "Running", w.diagnose(name)
        lose(victim["metadata"]["name"])
        lost_at = time.time()
        job_name = f"{name}-sft-{attempt}"

        def failed(job_name: str = job_name) -> dict[str, Any] | None:
            job = kget_or_none(w.cp, "job", job_name, "-n", NS)
            return condition(job, "Failed") if job else None

        cond = wait_for(failed, 120, f"{job_name} to fail")
        failed_s = time.time() - lost_at
        assert cond["reason"] == "BackoffLimitExceeded", cond  # retryable, not PodFailurePolicy
        wait_for(lambda a=attempt: both_running(a + 1), 150, f"attempt {attempt + 2}'s pods", 0.5)
        figures.append({
            "lost": f"index {index} ({lose.__name__})",
            "checkpoint_step": checkpoint,
            "lost_to_attempt_failed_s": round(failed_s, 1),
            "lost_to_new_pods_running_s": round(time.time() - lost_at, 1),
            "lost_at": lost_at,
        })  # fmt: skip

    obj = w.wait_phase(name, ("Succeeded", "Failed"), 600)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
    manifest = w.stage_manifest(name, "sft")
    assert manifest is not None and manifest["metrics"]["global_step"] == steps
    resumed = manifest["metrics"]["resumed_from_step"]
    assert resumed >= checkpoint, (resumed, checkpoint)
    assert sorted(_jobs_by_attempt(w, name)) == [("sft", "0"), ("sft", "1"), ("sft", "2")]
    assert obj["status"]["stages"]["sft"]["attempts"] == 3
    trained = _trained(w, 2, name)
    assert trained[0]["done"] == resumed + 1, trained
    figures[-1]["lost_to_first_resumed_step_s"] = round(
        trained[0]["time"] - figures[-1]["lost_at"], 1
    )
    for fig in figures:
        fig.pop("lost_at")
    print("lost rank:", json.dumps(figures))
    for fig in figures:
        assert fig["lost_to_new_pods_running_s"] <= 120, figures
    w.assert_no_forbidden()


def _trained(w: World, attempt: int, name: str) -> list[dict[str, Any]]:
    """Rank 0's progress lines of ``attempt`` for the steps it trained (``done``: the step,
    ``time``: when)."""
    pods = [
        p["metadata"]["name"]
        for p in w.pods(name)
        if p["metadata"]["labels"].get("visionr1.io/attempt") == str(attempt)
        and p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0"
    ]
    lines = [x for pod in pods for x in _progress_lines(w, pod)]
    return [x for x in lines if x.get("stage") == "sft" and "loss" in x]


def test_a_hub_base_model_is_read_only_from_its_folder_of_the_model_cache(
    world: World, cold_start: str
) -> None:
    """The model cache on a real cluster, without the hub: the tiny model seeded as the complete
    fetch of a hub id (its folder of the namespace's cache, with the completion marker), and an
    SFT run naming that id. The pod's model-fetch init container finds the marker and downloads
    nothing (the hub is not reachable from the cluster, so a download would fail the run), the
    stage mounts the folder read-only and trains from it, and the folder is as it was."""
    from visionr1_jobs.config import FETCH_MARKER

    w, name, model = world, "hub-model", "visionr1/tiny-qwen25vl"
    key = w.pv / NS / ".cache" / "huggingface" / "models--visionr1--tiny-qwen25vl" / "main"
    snapshot = key / "snapshot"
    if not snapshot.exists():
        shutil.copytree(w.pv / "shared" / "models" / "tiny-qwen25vl", snapshot)
        files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
        marker = {"name": model, "revision": "main", "commit": "seeded", "files": files}
        (snapshot / FETCH_MARKER).write_text(json.dumps(marker))
        for d, _, names in os.walk(key):
            os.chmod(d, 0o755)
            for f in names:
                os.chmod(os.path.join(d, f), 0o644)
    before = {
        str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()
    }
    run = _sft_only(name, cold_start, maxSteps=2)
    run["spec"]["baseModel"] = {"name": model}
    apply(w.cp, run)
    obj = w.wait_phase(name, ("Succeeded", "Failed"), 600)
    assert obj["status"]["phase"] == "Succeeded", w.diagnose(name)
    for pod in w.pods(name):
        spec = pod["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["workspace-init", "model-fetch"]
        [stage] = spec["containers"]
        [mount] = [m for m in stage["volumeMounts"] if m["mountPath"] == "/cache/base-model"]
        assert mount["readOnly"] is True
        assert mount["subPath"] == f"{NS}/.cache/huggingface/models--visionr1--tiny-qwen25vl/main"
        pod_name = pod["metadata"]["name"]
        log = w.cp.kubectl("logs", pod_name, "-n", NS, "-c", "model-fetch").stdout
        assert "commit seeded" in log, log
    after = {
        str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()
    }
    assert after == before
    assert not list(key.glob(".partial*"))
    w.assert_no_forbidden()


def test_a_restricted_namespace_runs_the_tiny_example(world: World) -> None:
    """Pod Security "restricted" enforced on the runs' namespace (last in this module: it changes
    the namespace). On a PVC of the default StorageClass (local-path: a folder the pods' user may
    write) the tiny example runs with no root init container, its data written by the
    restricted toy-data Job of the README; on a volume whose root only root may write (a
    pre-bound hostPath folder, 0755: the kubelet applies no fsGroup there) the first stage says
    so and what to do."""
    w = world
    label = "pod-security.kubernetes.io/enforce"
    w.cp.kubectl("label", "namespace", NS, f"{label}=restricted", "--overwrite")
    try:
        docs = list(
            yaml.safe_load_all((EXAMPLES_DIR / "local-cluster" / "toy-data.yaml").read_text())
        )
        for doc in docs:
            doc["metadata"]["namespace"] = NS
            doc["metadata"]["name"] = (
                "pss-data" if doc["kind"] == "PersistentVolumeClaim" else "pss-toy"
            )
        job = docs[1]["spec"]["template"]["spec"]
        job["volumes"][0]["persistentVolumeClaim"]["claimName"] = "pss-data"
        job["containers"][0]["image"] = TRAINER
        job["containers"][0]["imagePullPolicy"] = "IfNotPresent"
        apply(w.cp, docs)
        w.cp.kubectl(
            "wait", "--for=condition=Complete", "job/pss-toy", "-n", NS, "--timeout=600s",
            timeout=620,
        )  # fmt: skip
        run = tiny_cluster_run("restricted", NS, "pss-data", image=TRAINER)
        apply(w.cp, run)
        obj = w.wait_phase("restricted", ("Succeeded", "Failed"), 900)
        assert obj["status"]["phase"] == "Succeeded", w.diagnose("restricted")
        for pod in w.pods("restricted"):
            assert not pod["spec"].get("initContainers"), pod["metadata"]["name"]
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

        # The hostPath volume of the other tests: root's 0755, not writable by uid 1000.
        run = _small("unwritable", ["synthesis"])
        run["spec"]["stages"]["synthesis"]["backoffLimit"] = 0
        apply(w.cp, run)
        obj = w.wait_phase("unwritable", ("Succeeded", "Failed"), 300)
        assert obj["status"]["phase"] == "Failed", w.diagnose("unwritable")
        message = condition(obj, "Failed")["message"]
        assert "not writable by uid 1000" in message and "fsGroup 1000" in message, message
    finally:
        w.cp.kubectl("label", "namespace", NS, f"{label}-")
