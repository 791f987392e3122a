"""README, "Run it on a local cluster": the commands of its walkthrough block, run as written
(bash, from the repository root, against the running local cluster), and what they must leave:
the chart's operator and MLflow running from our images, the tiny run Succeeded through all five
stages on a PVC of the default StorageClass, its stages' logs and MLflow runs there.

The walkthrough uses fixed names (release ``visionr1-operator`` in ``visionr1-system``, namespace
``ml``): a cluster where a user already followed it gets them removed first, and the test removes
them again at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import REPO, PortForward, condition, kget, mlflow_login

pytestmark = pytest.mark.cluster

BLOCK = re.compile(
    r"<!-- local-cluster-walkthrough[^>]*-->\s*```bash\n(.*?)```\s*<!-- /local-cluster-walkthrough -->",
    re.S,
)
RELEASE, RELEASE_NS, NS = "visionr1-operator", "visionr1-system", "ml"


def walkthrough() -> str:
    match = BLOCK.search((REPO / "README.md").read_text())
    assert match, "README.md has no local-cluster-walkthrough block"
    return match.group(1)


def _clean(cp: Any) -> None:
    cp.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False)
    for ns in (NS, RELEASE_NS):
        cp.kubectl("delete", "namespace", ns, "--ignore-not-found", "--timeout=180s", timeout=200)


def test_the_readme_walkthrough_runs_as_written(
    control_plane: Any, images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = control_plane
    _clean(cp)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
    }
    script = "set -euo pipefail\n" + walkthrough()
    try:
        proc = subprocess.run(
            ["bash", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert proc.returncode == 0, (
            f"the walkthrough failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}\n"
            + cp.kubectl("describe", "vr1", "tiny", "-n", NS, check=False).stdout[-3000:]
        )
        run = kget(cp, "vr1", "tiny", "-n", NS)
        assert run["status"]["phase"] == "Succeeded"
        assert run["status"]["progress"] == "5/5"
        assert condition(run, "Succeeded")["reason"] == "AllStagesSucceeded"
        # What the block printed: the run's row, its conditions, the eval stage's own output.
        assert re.search(r"^tiny\s+Succeeded", proc.stdout, re.M), proc.stdout[-3000:]
        assert "AllStagesSucceeded" in proc.stdout
        # The data PVC came from the default StorageClass (local-path-provisioner).
        pvc = kget(cp, "pvc", "visionr1-data", "-n", NS)
        assert pvc["spec"]["storageClassName"] == "local-path"
        # The chart's operator and MLflow run from the pushed images.
        pods = kget(cp, "pods", "-n", RELEASE_NS)["items"]
        by_component = {p["metadata"]["labels"].get("app.kubernetes.io/component"): p for p in pods}
        # The chart's pods run the images the walkthrough pushed, by their digests (a node that
        # cached an older image under the same tag does not run that one).
        pushed = json.loads((REPO / ".visionr1" / "images" / "pushed.json").read_text())
        for component in ("operator", "mlflow", "postgresql"):
            status = by_component[component]["status"]["containerStatuses"][0]
            digest = pushed[component].partition("@")[2]
            assert status["ready"] and status["imageID"].endswith(digest), (status, digest)
        # MLflow, reached as the README says, with the chart's admin login: the parent run and
        # a nested run per stage.
        from mlflow.tracking import MlflowClient

        for key, value in mlflow_login(cp, RELEASE_NS, RELEASE).items():
            monkeypatch.setenv(key, value)
        with PortForward(cp, RELEASE_NS, f"svc/{RELEASE}-mlflow", 5000) as pf:
            client = MlflowClient(pf.url)
            parent = client.get_run(run["status"]["mlflowRunId"])
            assert parent.info.status == "FINISHED"
            children = client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            )
            names = {r.info.run_name for r in children}
            assert {"synthesis", "filter", "sft", "grpo", "eval"} <= names, names
    finally:
        _clean(cp)
