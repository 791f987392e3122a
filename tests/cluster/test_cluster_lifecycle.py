"""The operator over a run's lifetime as a platform team runs it: two replicas of the chart's
operator Deployment, one active (kopf peering), the active one SIGKILLed mid-run and the other
taking over; `helm upgrade` mid-run to an operator built from a copy of this tree with a new
optional stage parameter and a stricter run-name rule; what `kubectl get vr1` shows while a stage
trains (step/total, ETA, key metric, read from the stage's MLflow run) and the GPU-hours recorded
at the end; and two releases of the chart, one per tenant namespace, side by side on one CRD.

Everything runs from our images on the real node, the operator with the chart's ServiceAccount
(RBAC enforced: a 403 in its log fails the test). The takeover time is printed as a figure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import (
    CRD_NAME,
    REPO,
    STAGES,
    ChartOperator,
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
from test_cluster_operator import _image_values, _toy_world

pytestmark = pytest.mark.cluster

SUFFIX = uuid.uuid4().hex[:6]
NS = f"vr1-lc-{SUFFIX}"
RELEASE = "vr1-lc"
RELEASE_NS = f"vr1-lc-op-{SUFFIX}"
FULLNAME = f"{RELEASE}-visionr1-operator"
PEERING = f"{RELEASE_NS}-{FULLNAME}"  # the chart's --peering: release namespace + fullname
CHART = REPO / "charts" / "visionr1-operator"
PVC = "visionr1-data"
LIFETIME_S = 15


def _say(line: str) -> None:
    print(f"[lifecycle] {line}", file=sys.stderr, flush=True)


@dataclass
class Lab:
    cp: Any
    images: dict[str, str]
    values: dict[str, Any]
    operator: ChartOperator
    tmp: Path

    def run(self, name: str) -> dict[str, Any]:
        return kget(self.cp, "vr1", name, "-n", NS)

    def phase(self, name: str) -> str | None:
        return ((kget_or_none(self.cp, "vr1", name, "-n", NS) or {}).get("status") or {}).get(
            "phase"
        )

    def jobs(self, name: str) -> list[str]:
        found = items(self.cp, "jobs", "-n", NS, "-l", f"visionr1.io/run={name}")
        return sorted(j["metadata"]["name"] for j in found)

    def diagnose(self, name: str) -> str:
        return "\n".join(
            [
                self.cp.kubectl("describe", "vr1", name, "-n", NS, check=False).stdout,
                self.cp.kubectl("get", "jobs,pods", "-n", NS, "-o", "wide", check=False).stdout,
                self.cp.kubectl("get", "pods", "-n", RELEASE_NS, "-o", "wide", check=False).stdout,
                "--- operator logs (tail)",
                self.operator.log()[-5000:],
            ]
        )

    def pod_log(self, pod: str) -> str:
        out = self.cp.kubectl("logs", pod, "-n", RELEASE_NS, "-c", "operator", check=False)
        return out.stdout

    def active_pod(self) -> str:
        """The live peer of highest priority in the release's KopfPeering: the active one."""
        obj = kget(self.cp, "kopfpeerings.kopf.dev", PEERING, "-n", NS)
        now = datetime.now(UTC)
        live = {
            ident: info
            for ident, info in (obj.get("status") or {}).items()
            if isinstance(info, dict)
            and datetime.fromisoformat(info["lastseen"]) + timedelta(seconds=info["lifetime"]) > now
        }
        pods = {p["metadata"]["name"] for p in self.operator.pods()}
        candidates = {i: v for i, v in live.items() if i in pods}
        assert candidates, f"no live operator pod in the peering object: {obj.get('status')}"
        return max(candidates, key=lambda i: candidates[i]["priority"])

    def assert_no_forbidden(self) -> None:
        assert self.operator.forbidden() == [], "the API server refused the operator (RBAC)"


def _install(cp: Any, values: dict[str, Any], tmp: Path, name: str = "values.yaml") -> None:
    path = tmp / name
    path.write_text(yaml.safe_dump(values))
    out = cp.helm(
        "upgrade", "--install", RELEASE, str(CHART), "-n", RELEASE_NS, "--create-namespace",
        "-f", str(path), "--wait", "--timeout=300s", timeout=360, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        pods = cp.kubectl("describe", "pods", "-n", RELEASE_NS, check=False).stdout
        pytest.fail(f"helm upgrade --install failed: {out.stderr.strip()}\n{pods[-6000:]}")


def _peering_crds(cp: Any) -> None:
    """crds/ applied on their own, as a cluster admin installs them once for every release."""
    cp.kubectl("apply", "-f", str(REPO / "crds" / "kopf-peering.yaml"))
    for crd in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@pytest.fixture(scope="module")
def lab(
    control_plane: Any, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    cp = control_plane
    tmp = tmp_path_factory.mktemp("lifecycle")
    ensure_crd(cp)
    _peering_crds(cp)
    create_namespace(cp, NS)
    values: dict[str, Any] = {
        "crds": {"install": False},
        "watchNamespaces": [NS],
        "image": {**_image_values(images["operator"]), "pullPolicy": "IfNotPresent"},
        "operator": {
            "trainerImage": images["trainer-cpu"],  # the runs' image: allowed (deny by default)
            "replicas": 2,
            "peeringLifetimeSeconds": LIFETIME_S,
            "retryBackoffSeconds": 1,
            "metricsIntervalSeconds": 1,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        },
        "mlflow": {
            "image": _image_values(images["mlflow"]),
            # the chart's defaults: PostgreSQL (our image, from Debian's packages), auth on
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
    operator = ChartOperator(cp, RELEASE_NS, FULLNAME)
    try:
        _install(cp, values, tmp)
        # The runs' MLflow login (the tiny example's credentialsSecret): the chart's MLflow
        # requires one by default.
        copy_login(cp, mlflow_login(cp, RELEASE_NS, FULLNAME), NS)
        pv = Path(cp.make_pvc(NS, PVC, "10Gi"))
        for child in pv.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        pv.chmod(0o755)
        os.chown(pv, 0, 0)
        _toy_world(pv / "shared")
        yield Lab(cp, images, values, operator, tmp)
    finally:
        cp.kubectl("delete", "vr1", "--all", "-n", NS, "--timeout=120s", check=False)
        cp.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False)
        for ns in (NS, RELEASE_NS):
            cp.kubectl("delete", "namespace", ns, "--timeout=180s", check=False, timeout=200)
        cp.kubectl("delete", "pv", f"pv-{NS}-{PVC}", check=False)
        shutil.rmtree(cp.pv_root / f"{NS}-{PVC}", ignore_errors=True)


def _longer(run: dict[str, Any]) -> dict[str, Any]:
    """The tiny run with a few more training steps, so that a poll sees a stage mid-training."""
    stages = run["spec"]["stages"]
    stages["sft"]["params"]["maxSteps"] = 6
    for row in stages["grpo"]["params"]["ptst"]:
        row["steps"] = 3
    return run


# --------------------------------------------------------------------------- failover + watch


def test_the_standby_takes_over_from_a_killed_active_operator_and_users_see_progress(
    lab: Lab,
) -> None:
    name = "failover"
    cp = lab.cp
    pods = [p["metadata"]["name"] for p in lab.operator.pods()]
    assert len(pods) == 2, pods
    apply(cp, _longer(tiny_cluster_run(name, NS, PVC, image=lab.images["trainer-cpu"])))
    wait_for(lambda: f"{name}-synthesis-0" in lab.jobs(name), 120, "the synthesis Job")

    active = lab.active_pod()
    (standby,) = [p for p in pods if p != active]
    # The standby stands by: its last word on peering is a pause (or none: it never resumed).
    # (Both replicas of a fresh install may resume for a moment before each sees the other.)
    before = lab.pod_log(standby)
    last_pause, last_resume = before.rfind("Pausing operations"), before.rfind("Resuming")
    assert last_resume == -1 or last_resume < last_pause, before[-3000:]
    resumed_before = before.count("Resuming operations")
    pids = cp.container_pids(RELEASE_NS, active)
    assert pids, f"no running container of {active}"
    killed_at = time.monotonic()
    for pid in pids:
        os.kill(pid, 9)  # a crash: no cleanup handler runs, its keep-alive stays
    _say(f"SIGKILLed the active operator {active}; {standby} stands by")

    takeover_s: float | None = None
    seen: list[dict[str, Any]] = []  # the run's watch columns while a stage trains
    seen_eval: list[dict[str, Any]] = []  # and while eval generates
    wide: list[str] = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if takeover_s is None and lab.pod_log(standby).count("Resuming operations") > (
            resumed_before
        ):
            takeover_s = time.monotonic() - killed_at
            _say(f"takeover after {takeover_s:.1f} s")
        st = (kget_or_none(cp, "vr1", name, "-n", NS) or {}).get("status") or {}
        stage = st.get("currentStage")
        if st.get("step") and stage in ("sft", "grpo"):
            seen.append({k: st.get(k) for k in ("currentStage", "step", "eta", "metric")})
            if len(wide) < 4:
                wide.append(cp.kubectl("get", "vr1", name, "-n", NS, "-o", "wide").stdout)
        elif st.get("step") and stage == "eval":
            seen_eval.append({k: st.get(k) for k in ("step", "eta", "metric")})
        if st.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.3)
    obj = lab.run(name)
    assert obj["status"]["phase"] == "Succeeded", lab.diagnose(name)
    assert takeover_s is not None and takeover_s < 30, (takeover_s, lab.operator.log()[-4000:])

    # No lost transitions and no duplicates: every stage done once, one Job per stage/attempt.
    st = obj["status"]
    assert st["progress"] == "5/5"
    assert {s: st["stages"][s]["phase"] for s in STAGES} == dict.fromkeys(STAGES, "Succeeded")
    assert lab.jobs(name) == sorted(f"{name}-{s}-0" for s in STAGES)
    cms = items(cp, "configmaps", "-n", NS, "-l", f"visionr1.io/run={name}")
    assert sorted(c["metadata"]["name"] for c in cms) == lab.jobs(name)

    # What a user watched: the training stage's step/total and its key metric.
    _say(f"watched: {seen[:3]} ... {seen[-3:]}")
    assert seen, "no poll saw a training stage's step"
    for row in seen:
        done, _, total = row["step"].partition("/")
        assert int(done) >= 1 and int(total) >= int(done), row
        # the stage's own key metric, or none while it has logged none (never the stage
        # before it's under the new STAGE)
        key = "loss=" if row["currentStage"] == "sft" else "reward="
        assert row["metric"] is None or row["metric"].startswith(key), row
    assert {r["currentStage"] for r in seen} <= {"sft", "grpo"}
    assert any(r["metric"] for r in seen), seen
    for row in seen:
        if row["eta"]:
            assert re.fullmatch(r"\d+s|\d+m\d\ds|\d+h\d\dm", row["eta"]), row
    header = wide[0].splitlines()[0].split()
    assert header[:8] == [
        "NAME",
        "PHASE",
        "STAGE",
        "PROGRESS",
        "STEP",
        "ETA",
        "METRIC",
        "GPU-HOURS",
    ]
    assert seen[0]["step"] in wide[0] or any(r["step"] in w for r in seen for w in wide)
    _say("kubectl get vr1 -o wide, while training:\n" + wide[0])

    # While eval generated: its rows done of all its rows, and a running accuracy (or none yet)
    _say(f"watched during eval: {seen_eval[:2]} ... {seen_eval[-2:]}")
    assert seen_eval, "no poll saw eval's step while it ran"
    for row in seen_eval:
        done, _, total = row["step"].partition("/")
        assert 0 <= int(done) <= int(total), row
        # a running accuracy, the final one if it came before the stage's end, or none yet
        assert row["metric"] is None or re.search(r"\.(running_)?accuracy=", row["metric"]), row

    # After the run: GPU-hours per stage and in total (the tiny run asks for no GPU: 0), and
    # the eval stage's accuracy as the run's metric (read once after it finished).
    assert st["gpuHours"] == 0
    assert all(st["stages"][s]["gpuHours"] == 0 for s in STAGES), st["stages"]
    last = wait_for(
        lambda: "accuracy=" in ((lab.run(name)["status"].get("metric")) or ""),
        30,
        "the eval accuracy on the run",
    )
    assert last
    final = lab.run(name)["status"]
    assert final.get("step") is None and final.get("eta") is None
    _say(f"after the run: metric {final['metric']}, gpuHours {final['gpuHours']}")
    # The killed pod's container was restarted by the kubelet and now stands by (it is newer).
    wait_for(lambda: len([p for p in lab.operator.pods()]) == 2 and lab.operator.alive(), 120, "2")
    assert lab.active_pod() == standby
    lab.assert_no_forbidden()


# --------------------------------------------------------------------------- helm upgrade


def _newer_tree(dest: Path) -> None:
    """A copy of this checkout as the next release would change it: version 0.2.0, a new
    optional training parameter (config schema + 1), and a stricter run-name rule."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    record = REPO / ".visionr1" / "images" / "images.json"
    if record.exists():  # the base images' record: the copy reuses them
        (dest / ".visionr1" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy2(record, dest / ".visionr1" / "images" / "images.json")

    def edit(rel: str, old: str, new: str) -> None:
        path = dest / rel
        text = path.read_text()
        assert old in text, f"{rel}: {old!r} not found (the test needs updating)"
        path.write_text(text.replace(old, new, 1))

    edit("pyproject.toml", 'version = "0.1.0"', 'version = "0.2.0"')
    edit("jobs/visionr1_jobs/config.py", "CONFIG_SCHEMA = 1\n", "CONFIG_SCHEMA = 2\n")
    probe = '    upgrade_probe: int = Field(0, ge=0, description="New in 0.2.0.")\n'
    seed = '    seed: int = Field(42, ge=0, description="Training seed.")\n'
    edit("jobs/visionr1_jobs/config.py", seed, seed + probe)  # SFT and GRPO
    config = dest / "jobs" / "visionr1_jobs" / "config.py"
    text, n = re.subn(  # eval: before EvalParams' first field
        r"(?ms)^(class EvalParams\(Model\):.*?\n)(    benchmarks: )",
        lambda m: m.group(1) + probe + m.group(2),
        config.read_text(),
        count=1,
    )
    assert n == 1, "EvalParams' first field moved (the test needs updating)"
    config.write_text(text)
    api = dest / "operator" / "visionr1_operator" / "api.py"
    text = api.read_text()
    text, n = re.subn(r"(?m)^MAX_RUN_NAME = .*$", "MAX_RUN_NAME = 10", text)
    assert n == 1
    api.write_text(text)


def _build_operator(tree: Path, registry: str) -> str:
    """The operator image of ``tree``, built and pushed the way the images fixture does."""
    script = [sys.executable, str(tree / "scripts" / "images.py"), "--tag", "upgrade"]
    script += ["--only", "operator"]
    build = ["build", "--pip-cache", str(Path.home() / ".cache" / "pip")]
    if Path("/etc/ssl/certs").is_dir():
        build += ["--build-ca", "/etc/ssl/certs"]
    if Path("/etc/pip.conf").is_file():
        build += ["--pip-conf", "/etc/pip.conf"]
    for args in (build, ["push", "--repo", f"{registry}/visionr1"]):
        proc = subprocess.run([*script, *args], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    pushed = json.loads((tree / ".visionr1" / "images" / "pushed.json").read_text())
    return pushed["operator"]


def test_helm_upgrade_mid_run_to_a_stricter_operator_with_a_new_parameter(
    lab: Lab, tmp_path: Path
) -> None:
    cp = lab.cp
    started = time.monotonic()
    tree = tmp_path / "newer"
    _newer_tree(tree)
    newer = _build_operator(tree, cp.registry)
    _say(f"built the newer operator {newer} in {time.monotonic() - started:.0f} s")
    assert newer != lab.images["operator"]

    name = "upgrade-run"  # 11 characters: the newer operator allows 10
    apply(cp, _longer(tiny_cluster_run(name, NS, PVC, image=lab.images["trainer-cpu"])))
    wait_for(lambda: f"{name}-synthesis-0" in lab.jobs(name), 120, "the synthesis Job")
    accepted = lab.run(name)
    assert accepted["status"]["observedGeneration"] == accepted["metadata"]["generation"] == 1

    values = {**lab.values, "image": {**_image_values(newer), "pullPolicy": "IfNotPresent"}}
    upgraded_at = time.monotonic()
    _install(cp, values, lab.tmp, "newer.yaml")
    _say(f"helm upgrade rolled out in {time.monotonic() - upgraded_at:.0f} s")
    digests = {
        c["image"].split("@")[-1]
        for p in lab.operator.pods()
        for c in p["spec"]["containers"]
        if c["name"] == "operator"
    }
    assert digests == {newer.split("@")[1]}, digests  # the chart pins repository@digest

    obj = wait_for(
        lambda: lab.phase(name) in ("Succeeded", "Failed") and lab.run(name), 900, "the run"
    )
    assert obj["status"]["phase"] == "Succeeded", lab.diagnose(name)
    assert obj["status"]["observedGeneration"] == 1
    assert lab.jobs(name) == sorted(f"{name}-{s}-0" for s in STAGES)

    # Stages created by the newer operator got its config (schema 2, the new field at its
    # default); the older trainer image ignored the field with a warning and trained.
    by_new = []
    for stage in STAGES:
        cm = kget(cp, "configmap", f"{name}-{stage}-0", "-n", NS)
        cfg = json.loads(cm["data"]["config.json"])
        if cfg.get("schemaVersion") == 2:
            assert cfg["writtenBy"] == "0.2.0"
            by_new.append(stage)
            if stage in ("sft", "grpo", "eval"):
                assert cfg["params"]["upgradeProbe"] == 0
                pods = items(cp, "pods", "-n", NS, "-l", f"job-name={name}-{stage}-0")
                logs = "".join(
                    cp.kubectl("logs", p["metadata"]["name"], "-n", NS, check=False).stdout
                    + cp.kubectl("logs", p["metadata"]["name"], "-n", NS, check=False).stderr
                    for p in pods
                )
                assert "upgradeProbe = 0: not known to this trainer image" in logs, logs[-3000:]
    _say(f"stages configured by the newer operator: {by_new}")
    # the last stage at least: the rollout takes less time than the four stages before it
    assert "eval" in by_new, by_new

    # The stricter rule is live: the same name is refused for a new run, naming the field.
    again = "upgrade-two"
    apply(
        cp,
        with_stages(
            tiny_cluster_run(again, NS, PVC, image=lab.images["trainer-cpu"]), ["synthesis"]
        ),
    )
    refused = wait_for(lambda: lab.phase(again) == "Failed" and lab.run(again), 120, "refusal")
    failed = condition(refused, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "metadata.name" in failed["message"] and "at most 10" in failed["message"]
    assert lab.jobs(again) == []
    lab.assert_no_forbidden()


# --------------------------------------------------------------------------- two releases


def test_two_releases_one_per_tenant_namespace_share_the_crd(
    control_plane: Any, images: dict[str, str], tmp_path: Path
) -> None:
    """The same release name installed in two tenant namespaces, each watching its own, the
    CRDs installed once on their own (crds/): each reconciles its own namespace's run."""
    cp = control_plane
    ensure_crd(cp)
    _peering_crds(cp)
    tenants = [f"vr1-tenant-a-{SUFFIX}", f"vr1-tenant-b-{SUFFIX}"]
    homes = {ns: f"{ns}-ops" for ns in tenants}  # each tenant's release, beside its namespace
    release = "visionr1"
    try:
        for ns in tenants:
            create_namespace(cp, ns)
            create_namespace(cp, homes[ns])
            values = {
                "crds": {"install": False},
                "watchNamespaces": [ns],
                "image": {**_image_values(images["operator"]), "pullPolicy": "IfNotPresent"},
                "mlflow": {"enabled": False},
                "operator": {
                    "trainerImage": images["trainer-cpu"],
                    "replicas": 2,
                    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                },
            }
            path = tmp_path / f"{ns}.yaml"
            path.write_text(yaml.safe_dump(values))
            out = cp.helm(
                "install", release, str(CHART), "-n", homes[ns], "-f", str(path), "--wait",
                "--timeout=300s", timeout=360, check=False,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            pv = Path(cp.make_pvc(ns, PVC, "1Gi"))
            for child in pv.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            subprocess.run(
                [sys.executable, "-m", "visionr1_operator.cli", "toy", "data", "--out",
                 str(pv / "shared" / "toy"), "--n", "8", "--seed", "0", "--n-bench", "4"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            for d, _, files in os.walk(pv):
                os.chmod(d, 0o755)
                for f in files:
                    os.chmod(os.path.join(d, f), 0o644)
            run = with_stages(
                tiny_cluster_run("tenant-run", ns, PVC, image=images["trainer-cpu"]), ["synthesis"]
            )
            run["spec"].pop("mlflow", None)
            apply(cp, run)
        for ns in tenants:
            wait_for(
                lambda ns=ns: phase(cp, "tenant-run", ns) in ("Succeeded", "Failed"),
                600,
                f"the run in {ns}",
            )
            assert phase(cp, "tenant-run", ns) == "Succeeded"
        for ns in tenants:
            log = ChartOperator(cp, homes[ns], f"{release}-visionr1-operator").log()
            assert FORBIDDEN_RE.search(log) is None, log[-3000:]
        # Cluster-scoped objects per release: uninstalling one leaves the other's in place.
        cp.helm("uninstall", release, "-n", homes[tenants[0]], "--wait")
        kept = f"{homes[tenants[1]]}-{release}-visionr1-operator-namespaces"
        assert kget_or_none(cp, "clusterrole", kept) is not None
        gone = f"{homes[tenants[0]]}-{release}-visionr1-operator-namespaces"
        assert kget_or_none(cp, "clusterrole", gone) is None
        # Each release reconciles its own namespace only: with the first release gone, a new
        # run in its namespace is left alone (no status, no finalizer, no Job), while the same
        # run in the second tenant's namespace runs to the end under the second release.
        for ns in tenants:
            again = with_stages(
                tiny_cluster_run("again", ns, PVC, image=images["trainer-cpu"]), ["synthesis"]
            )
            again["spec"].pop("mlflow", None)
            apply(cp, again)
        wait_for(
            lambda: phase(cp, "again", tenants[1]) in ("Succeeded", "Failed"),
            600,
            f"the second run in {tenants[1]}",
        )
        assert phase(cp, "again", tenants[1]) == "Succeeded"
        orphan = kget(cp, "vr1", "again", "-n", tenants[0])
        assert not orphan.get("status"), orphan["status"]
        assert not orphan["metadata"].get("finalizers"), orphan["metadata"]
        jobs = kget(cp, "jobs", "-n", tenants[0], "-l", "visionr1.io/run=again")["items"]
        assert jobs == [], [j["metadata"]["name"] for j in jobs]
        assert kget_or_none(cp, "crd", CRD_NAME) is not None
    finally:
        for ns in tenants:
            cp.helm("uninstall", release, "-n", homes[ns], "--wait", check=False)
            for gone_ns in (ns, homes[ns]):
                cp.kubectl(
                    "delete", "namespace", gone_ns, "--timeout=180s", check=False, timeout=200
                )
            cp.kubectl("delete", "pv", f"pv-{ns}-{PVC}", check=False)
            shutil.rmtree(cp.pv_root / f"{ns}-{PVC}", ignore_errors=True)


def phase(cp: Any, name: str, namespace: str) -> str | None:
    return ((kget_or_none(cp, "vr1", name, "-n", namespace) or {}).get("status") or {}).get("phase")


FORBIDDEN_RE = re.compile(r"\" 403\b|\bHTTP/[0-9.]+ 403\b|forbidden", re.IGNORECASE)
