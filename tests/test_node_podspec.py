"""The local node's pure rules (scripts/cluster/controlplane/podspec.py): env, subPath, user.

The same behaviour is checked end to end on the real control plane in tests/cluster; these run
without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "cluster"))

from controlplane.podspec import (  # noqa: E402
    ConfigError,
    container_env,
    exit_code,
    expand,
    make_sub_path,
    resource_field,
    user_of,
)

POD = {
    "metadata": {
        "name": "run-grpo-1-0-abcde",
        "namespace": "ml",
        "uid": "u-1",
        "labels": {"app": "x"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "2"},
    },
    "spec": {
        "nodeName": "n1",
        "containers": [{"name": "main", "resources": {"limits": {"cpu": "1500m"}}}],
    },
}


def _lookup(kind: str, name: str) -> dict[str, str] | None:
    store = {("configMapRef", "cfg"): {"A": "1", "B": "2"}, ("secretRef", "tok"): {"token": "s"}}
    return store.get((kind, name))


def test_env_sources_order_and_expansion() -> None:
    container = {
        "name": "main",
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "CFG_A", "value": "override"},
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            },
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "MSG", "value": "$(TOKEN)-$(CFG_B)-$(UNDEFINED)-$$(TOKEN)"},
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
            },
        ],
    }
    env = container_env(
        POD, container, _lookup, status={"podIP": "10.0.0.1"}, base={"PATH": "/bin"}, allocatable={}
    )
    assert env["CFG_A"] == "override" and env["CFG_B"] == "2"
    assert env["JOB_COMPLETION_INDEX"] == "2"
    assert env["CPUS"] == "2"  # rounded up, as the kubelet does
    assert env["MEM_MI"] == "1024"
    assert env["MSG"] == "s-2-$(UNDEFINED)-$(TOKEN)"
    assert "OPT" not in env and env["PATH"] == "/bin"


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}},
            'secret "absent" not found',
        ),
        (
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "zz"}}},
            "couldn't find key zz in configmap cfg",
        ),
        (
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}},
            "fieldRef 'spec.nope' is not supported",
        ),
    ],
)
def test_env_errors_name_what_is_missing(var: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        container_env(
            POD, {"name": "main", "env": [var]}, _lookup, status={}, base={}, allocatable={}
        )


def test_missing_sub_path_is_made_as_root_with_the_volume_mode(tmp_path: Path) -> None:
    root = tmp_path / "pv"
    root.mkdir()
    root.chmod(0o750)
    made = make_sub_path(root, "ns/run/deep")
    for folder in (root / "ns", root / "ns" / "run", made):
        st = folder.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o750)
    with pytest.raises(ConfigError, match="without '..'"):
        make_sub_path(root, "../escape")
    with pytest.raises(ConfigError):
        make_sub_path(root, "/abs")


def test_user_and_run_as_non_root() -> None:
    pod = {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000}}}
    assert user_of(pod, {"name": "c"}) == (1000, 1000, [2000])
    assert user_of(pod, {"name": "c", "securityContext": {"runAsUser": 7}}) == (7, 1000, [2000])
    with pytest.raises(ConfigError, match="runAsNonRoot"):
        user_of({"spec": {"securityContext": {"runAsNonRoot": True}}}, {"name": "c"})


def test_expand_and_exit_codes() -> None:
    assert expand("a $(B) $$ $(C)", {"B": "b"}) == "a b $ $(C)"
    assert exit_code(-9) == 137 and exit_code(-15) == 143 and exit_code(3) == 3
    assert resource_field(POD, None, {"resource": "limits.cpu", "containerName": "main"}, {}) == "2"
