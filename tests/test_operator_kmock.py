"""The operator end to end: kopf (KopfRunner) against kmock, the test playing the Job controller,
tracking into a real ``mlflow server`` on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kmock_cluster import (
    JOBS,
    NS,
    RUNS,
    cluster,
    collect_garbage,
    connection,
    create_run,
    get_run,
    job_failed,
    job_running,
    job_succeeded,
    jobs,
    objects,
    run_object,
    wait_for,
)
from mlflow_server import free_port, mlflow_server

from visionr1_operator.handlers import OperatorConfig, make_registry
from visionr1_operator.plan import RetryPolicy
from visionr1_operator.policy import ClusterPolicy
from visionr1_operator.rbac import NAMESPACE_RULES, RULES, covers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEST_AGENT = "visionr1-tests"
FIVE = ["synthesis", "filter", "sft", "grpo", "eval"]

# slow: the module starts a real `mlflow server` once (~40 s on a busy 2-core machine)
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("VISIONR1_TEST_MLFLOW_URI"):  # a server already running (development)
        yield os.environ["VISIONR1_TEST_MLFLOW_URI"]
        return
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), start_timeout_s=90) as uri:
        yield uri


@pytest.fixture
async def k8s() -> AsyncIterator[Any]:
    async with cluster() as k:
        yield k


@pytest.fixture
async def client(k8s: Any) -> AsyncIterator[httpx.AsyncClient]:
    # named, so that the test's own requests are told from the operator's (both use httpx)
    async with httpx.AsyncClient(
        base_url=str(k8s.url).rstrip("/"), headers={"User-Agent": TEST_AGENT}
    ) as c:
        yield c


@contextlib.asynccontextmanager
async def operator(
    k8s: Any,
    mlflow_uri: str | None,
    retry: RetryPolicy | None = None,
    policy: ClusterPolicy | None = None,
    progress_interval_s: float = 0.5,
    progress_writes_per_s: float = 5.0,
) -> AsyncIterator[Any]:
    """The operator under kopf's KopfRunner (a thread with its own event loop), stopped without
    blocking this test's event loop, which is the one kmock serves the API from: kopf stops
    only after the requests it has in flight (a patch, an Event) are answered. A plain ``with``
    joined the operator's thread on this loop, so a test that ended while the operator was
    mid-request (a busy machine) held both until KopfRunner's timeout: "The operator didn't
    stop, still running"."""
    from kopf.testing import KopfRunner

    config = OperatorConfig(
        mlflow_uri=mlflow_uri,
        connection=connection(k8s),
        retry=retry or RetryPolicy(base_s=0.2, max_s=1.0),
        error_delay_s=0.5,
        policy=policy or ClusterPolicy(),
        mlflow_timeout_s=5.0,
        mlflow_retry_s=0.5,
        progress_interval_s=progress_interval_s,
        progress_writes_per_s=progress_writes_per_s,
    )
    runner = KopfRunner(
        ["run", "--standalone", "-n", NS, "--verbose"], registry=make_registry(config), timeout=30
    )
    runner.__enter__()
    try:
        yield runner
    except BaseException as exc:
        await asyncio.to_thread(runner.__exit__, type(exc), exc, exc.__traceback__)
        raise
    await asyncio.to_thread(runner.__exit__, None, None, None)


def tiny(**spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text())
    obj["spec"]["storage"] = {"pvc": "visionr1-data"}  # a cluster needs a PVC
    obj["spec"].update(spec)
    return run_object(obj)


def status(k8s: Any, name: str = "tiny-cpu") -> dict[str, Any]:
    return (get_run(k8s, name) or {}).get("status") or {}


def events(k8s: Any, name: str = "tiny-cpu") -> list[tuple[str, str]]:
    out = []
    for e in objects(k8s, "v1/events").values():
        if e.get("involvedObject", {}).get("name") == name:
            out.append((e.get("reason"), e.get("message")))
    return out


async def next_job(k8s: Any, stage: str, attempt: int = 0, run: str = "tiny-cpu") -> dict:
    name = f"{run}-{stage}-{attempt}"
    return await wait_for(lambda: jobs(k8s, run).get(name), what=f"Job {name}")


def status_writes(k8s: Any) -> int:
    return sum(
        1
        for r in k8s.log
        if r.method == "PATCH" and r.plural == "visionr1runs" and r.subresource == "status"
    )


async def test_pod_progress_waits_for_the_interval_a_stage_change_does_not(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    """A stage's pods changing state soon after the run's last status write cost no write each:
    the progress is written once the interval has passed, as the pods say then; a stage that
    ends (and the next one created) is written at once, interval or not."""
    interval = 6.0
    async with operator(k8s, None, progress_interval_s=interval):
        await create_run(client, tiny())
        job = await next_job(k8s, "synthesis")
        await wait_for(lambda: status(k8s).get("currentStage") == "synthesis", what="started")
        started, writes = asyncio.get_running_loop().time(), status_writes(k8s)
        await job_running(client, job["metadata"]["name"])
        await asyncio.sleep(1.5)  # the operator has seen the pod running by now
        assert status(k8s)["stages"]["synthesis"].get("progress") != "1 pod running"
        assert status_writes(k8s) == writes, "no write for the progress alone yet"
        await job_succeeded(client, job["metadata"]["name"])
        await next_job(k8s, "filter")
        await wait_for(
            lambda: status(k8s)["stages"]["synthesis"]["phase"] == "Succeeded", what="written"
        )
        assert asyncio.get_running_loop().time() - started < interval, "not held back"
        assert status(k8s)["stages"]["synthesis"].get("progress") is None
        job = await next_job(k8s, "filter")
        written = asyncio.get_running_loop().time()
        await job_running(client, job["metadata"]["name"])
        await wait_for(
            lambda: status(k8s)["stages"]["filter"].get("progress") == "1 pod running",
            timeout=interval + 15,
            what="the progress, later",
        )
        assert asyncio.get_running_loop().time() - written > interval - 1.0


async def test_a_stages_minor_changes_reconcile_together_and_its_end_at_once(
    k8s: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Job counted and its pod running are two watch events and one reconcile, within the
    coalescing delay; the Job's end reconciles at once (the next stage waits on it). A wait
    timer set while the Job had no pods reconciles nothing once the pod is there."""
    from visionr1_operator import handlers

    monkeypatch.setattr(handlers, "COALESCE_S", 5.0)
    calls: list[float] = []
    reconcile = handlers.Reconciler.reconcile

    async def counted(self: Any, namespace: str, name: str) -> None:
        calls.append(time.monotonic())
        await reconcile(self, namespace, name)

    monkeypatch.setattr(handlers.Reconciler, "reconcile", counted)
    async with operator(k8s, None, progress_interval_s=0.5):
        await create_run(client, tiny())
        job = await next_job(k8s, "synthesis")
        await wait_for(lambda: status(k8s).get("currentStage") == "synthesis", what="started")
        await asyncio.sleep(5.5)  # the creation's own events (coalesced) are reconciled
        since = len(calls)
        ran = time.monotonic()
        await job_running(client, job["metadata"]["name"])  # Job active=1, then pod Running

        def progress() -> str | None:
            return status(k8s)["stages"]["synthesis"].get("progress")

        await asyncio.sleep(2.5)
        assert progress() != "1 pod running", "a minor change waits for the others"
        assert len(calls) == since, "no reconcile yet"
        await wait_for(lambda: progress() == "1 pod running", timeout=30, what="the progress")
        assert len(calls) == since + 1, "both changes (and no wait timer) in one reconcile"
        assert calls[-1] - ran > 4.0
        ended = time.monotonic()
        await job_succeeded(client, job["metadata"]["name"])
        await next_job(k8s, "filter")
        assert time.monotonic() - ended < 2.5, "the end is not coalesced"


async def test_with_many_runs_going_each_runs_progress_waits_longer(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    """Progress writes of all runs together stay under a rate: with three runs going and one
    progress write per 6 s allowed, a run's pods' progress waits 18 s after its last write, not
    the 1 s interval; its stage's end does not wait."""
    async with operator(k8s, None, progress_interval_s=1.0, progress_writes_per_s=1 / 6):
        for name in ("a", "b", "c"):
            await create_run(client, run_object(tiny(), name=name))
        job = await next_job(k8s, "synthesis", run="a")
        await wait_for(lambda: status(k8s, "a").get("currentStage") == "synthesis", what="a")
        written = asyncio.get_running_loop().time()  # just after a's last write
        for name in ("b", "c"):  # all three go before a's pod runs
            await next_job(k8s, "synthesis", run=name)
            await wait_for(
                lambda n=name: status(k8s, n).get("currentStage") == "synthesis", what=name
            )
        await job_running(client, job["metadata"]["name"])

        def progress() -> str | None:
            return status(k8s, "a")["stages"]["synthesis"].get("progress")

        running = asyncio.get_running_loop().time()
        # well past the interval of a run alone, well before the shared one ends
        await asyncio.sleep(max(3.0, written + 12.0 - running))
        assert progress() != "1 pod running", "held back: three runs share the write rate"
        await wait_for(lambda: progress() == "1 pod running", timeout=40, what="the progress")
        assert asyncio.get_running_loop().time() - written > 18.0 - 1.0
        await job_succeeded(client, job["metadata"]["name"])
        ended = asyncio.get_running_loop().time()
        await wait_for(
            lambda: status(k8s, "a")["stages"]["synthesis"]["phase"] == "Succeeded", what="end"
        )
        assert asyncio.get_running_loop().time() - ended < 5.0


async def test_a_new_reason_for_waiting_is_written_at_once_interval_or_not(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    """Why a stage waits is not progress: when the quota that refuses a stage's pods says
    something new (same reason, new numbers), the run says it at the next check, not once the
    progress interval has passed."""
    interval = 120.0
    async with operator(k8s, None, progress_interval_s=interval):
        await create_run(client, run_object(tiny(), name="refused"))
        job = await next_job(k8s, "synthesis", run="refused")
        started = asyncio.get_running_loop().time()
        await refuse_pods(client, job, QUOTA_REFUSAL)

        def said(text: str) -> Callable[[], bool]:
            return lambda: (
                text
                in (
                    (status(k8s, "refused").get("stages") or {}).get("synthesis", {}).get("message")
                    or ""
                )
            )

        await wait_for(said("limited requests.nvidia.com/gpu=1"), timeout=20, what="refusal")
        later = QUOTA_REFUSAL.replace("limited: requests.nvidia.com/gpu=1", "limited: ...gpu=0")
        await asyncio.sleep(1.1)  # a newer lastTimestamp (whole seconds)
        await refuse_pods(client, job, later, n=2)
        await wait_for(said("limited ...gpu=0"), timeout=40, what="new reason")
        assert asyncio.get_running_loop().time() - started < interval / 2
        # one Event for the reason, not one per message: the condition says the newest
        assert [r for r, _ in events(k8s, "refused")].count("QuotaExceeded") == 1


async def test_five_stage_run_succeeds_with_status_events_and_mlflow(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    run = tiny()
    async with operator(k8s, mlflow_uri):
        await create_run(client, run)
        for stage in FIVE:
            job = await next_job(k8s, stage)
            await job_running(client, job["metadata"]["name"])
            await wait_for(
                lambda s=stage: (
                    (status(k8s).get("stages", {}).get(s) or {}).get("progress") == "1 pod running"
                ),
                what=f"{stage} progress",
            )
            await job_succeeded(client, job["metadata"]["name"])
        await wait_for(lambda: status(k8s).get("phase") == "Succeeded", what="Succeeded")
        # Events are posted in the background; MLflow slow to answer (a busy machine) adds two
        await wait_for(
            lambda: len(events(k8s)) >= 12 and "AllStagesSucceeded" in [r for r, _ in events(k8s)],
            what="events posted",
        )
    st = status(k8s)
    assert st["progress"] == "5/5"
    assert all(st["stages"][s]["phase"] == "Succeeded" for s in FIVE)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Succeeded"]["reason"] == "AllStagesSucceeded"
    assert conds["Progressing"]["status"] == "False"
    assert set(jobs(k8s)) == {f"tiny-cpu-{s}-0" for s in FIVE}, "one Job per stage, no extras"
    # the Jobs and pods are watched with a server-side label selector: with --all-namespaces
    # the API server sends only the runs' own, not every Job and pod of the cluster
    watched = {(r.plural, r.label_selector) for r in k8s.log if r.watch}
    assert ("jobs", "visionr1.io/run") in watched and ("pods", "visionr1.io/run") in watched
    assert not {p for p, sel in watched if p in ("jobs", "pods") and not sel}
    reasons = [r for r, _ in events(k8s)]
    assert reasons.count("StageStarted") == 5 and reasons.count("StageSucceeded") == 5
    assert "RunStarted" in reasons and "AllStagesSucceeded" in reasons
    # every Job carries the MLflow ids of the parent and its own stage run
    mlf = MlflowClient(tracking_uri=mlflow_uri)
    parent = mlf.get_run(st["mlflowRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["visionr1.uid"] == run["metadata"]["uid"]
    for s in FIVE:
        env = {
            e["name"]: e.get("value")
            for e in jobs(k8s)[f"tiny-cpu-{s}-0"]["spec"]["template"]["spec"]["containers"][0][
                "env"
            ]
        }
        assert env["VISIONR1_PARENT_RUN_ID"] == parent.info.run_id
        assert env["MLFLOW_TRACKING_URI"] == mlflow_uri
        child = mlf.get_run(env["VISIONR1_STAGE_RUN_ID"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["visionr1.stage"] == s


def parent_run(mlflow_uri: str, run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri).get_run(run_id)


async def pass_stages(k8s: Any, client: httpx.AsyncClient, stages: list[str]) -> None:
    for stage in stages:
        job = await next_job(k8s, stage)
        await job_succeeded(client, job["metadata"]["name"])


async def test_retryable_failure_is_retried_up_to_the_limit_then_the_run_fails(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    run = tiny()
    run["spec"]["stages"]["sft"]["backoffLimit"] = 1
    async with operator(k8s, mlflow_uri):
        await create_run(client, run)
        await pass_stages(k8s, client, ["synthesis", "filter"])
        for attempt in (0, 1):
            job = await next_job(k8s, "sft", attempt)
            await job_failed(client, job["metadata"]["name"], exit_code=137)
        await wait_for(lambda: status(k8s).get("phase") == "Failed", what="Failed")
        await wait_for(lambda: "RetriesExhausted" in [r for r, _ in events(k8s)], what="event")
    st = status(k8s)
    assert set(jobs(k8s)) == {
        "tiny-cpu-synthesis-0",
        "tiny-cpu-filter-0",
        "tiny-cpu-sft-0",
        "tiny-cpu-sft-1",
    }
    assert st["stages"]["sft"]["phase"] == "Failed" and st["stages"]["sft"]["attempts"] == 2
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "after 2 attempts" in failed["message"]
    reasons = [r for r, _ in events(k8s)]
    assert "StageRetrying" in reasons and "StageRetried" in reasons
    assert "RetriesExhausted" in reasons
    assert parent_run(mlflow_uri, st["mlflowRunId"]).info.status == "FAILED"


async def test_invalid_input_exit_code_fails_the_run_at_once(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    from kmock_cluster import put_pod

    reason = "dataset /workspace/toy/train: no such file or directory"
    async with operator(k8s, mlflow_uri):
        await create_run(client, tiny())
        await pass_stages(k8s, client, ["synthesis"])
        job = await next_job(k8s, "filter")
        # the stage's own reason, as its termination message (the kubelet reads the file)
        terminated = {"exitCode": 65, "reason": "Error", "message": reason}
        await put_pod(
            client,
            job,
            {
                "phase": "Failed",
                "containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}],
            },
        )
        await job_failed(client, job["metadata"]["name"], exit_code=65)
        await wait_for(lambda: status(k8s).get("phase") == "Failed", what="Failed")
        await wait_for(lambda: "InvalidInput" in [r for r, _ in events(k8s)], what="event")
        await asyncio.sleep(1.0)  # a retry would have been created by now (backoff 0.2 s)
    st = status(k8s)
    assert "tiny-cpu-filter-1" not in jobs(k8s)
    assert st["stages"]["filter"]["attempts"] == 1
    assert "exit code 65" in st["stages"]["filter"]["message"]
    assert "InvalidInput" in [r for r, _ in events(k8s)]
    # what `kubectl describe vr1` shows: the exit code and the stage's own reason
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["message"].startswith("filter: ")
    assert f"(exit code 65): {reason}" in failed["message"]


async def test_invalid_spec_fails_naming_the_field_and_creates_nothing(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    run = tiny()
    run["spec"]["stages"]["sft"]["nodes"] = 0  # kmock enforces no schema, the operator must
    async with operator(k8s, None):
        await create_run(client, run)
        await wait_for(lambda: status(k8s).get("phase") == "Failed", what="Failed")
    failed = next(c for c in status(k8s)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.stages.sft.nodes" in failed["message"]
    assert jobs(k8s) == {} and objects(k8s, "v1/configmaps") == {}


async def test_a_restricted_namespace_gets_pods_it_admits(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    """The namespace enforces the restricted Pod Security Standard: the operator reads its label
    and gives the pods no root init container; a run that insists on one waits, saying why,
    instead of creating a Job whose pods the API server would refuse."""
    from pod_security import restricted_violations

    k8s.namespaces[NS] = {"pod-security.kubernetes.io/enforce": "restricted"}
    insists = tiny()
    insists["metadata"]["name"] = "insists"
    insists["spec"]["storage"]["workspaceInit"] = "RootInitContainer"

    def progressing(name: str) -> dict[str, Any]:
        conds = status(k8s, name).get("conditions", [])
        return next((c for c in conds if c["type"] == "Progressing"), {})

    async with operator(k8s, None):
        await create_run(client, tiny())
        await create_run(client, insists)
        job = await next_job(k8s, "synthesis")
        await wait_for(lambda: progressing("insists").get("reason") == "PodSecurity", what="wait")
        await wait_for(lambda: "PodSecurity" in [r for r, _ in events(k8s, "insists")], what="ev")
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod, job["spec"]["template"]["metadata"]) == []
    assert "initContainers" not in pod
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    cond = progressing("insists")
    assert cond["status"] == "False" and "spec.storage.workspaceInit" in cond["message"]
    assert "restricted" in cond["message"]
    assert jobs(k8s, "insists") == {} and "insists-synthesis-0" not in objects(k8s, "v1/configmaps")


async def test_operator_restarted_mid_stage_continues_without_duplicates(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    async with operator(k8s, mlflow_uri):
        await create_run(client, tiny())
        await pass_stages(k8s, client, ["synthesis"])
        job = await next_job(k8s, "filter")
        await job_running(client, job["metadata"]["name"])
        await wait_for(lambda: status(k8s)["stages"]["filter"].get("progress"), what="progress")
    before = status(k8s)
    # while the operator is down, the filter Job finishes
    await job_succeeded(client, "tiny-cpu-filter-0")
    async with operator(k8s, mlflow_uri):
        await next_job(k8s, "sft")
        await pass_stages(k8s, client, ["sft", "grpo", "eval"])
        await wait_for(lambda: status(k8s).get("phase") == "Succeeded", what="Succeeded")
    after = status(k8s)
    assert set(jobs(k8s)) == {f"tiny-cpu-{s}-0" for s in FIVE}, "no duplicate Job, no new attempt"
    assert after["mlflowRunId"] == before["mlflowRunId"], "the same MLflow parent run continues"
    assert after["stages"]["filter"]["mlflowRunId"] == before["stages"]["filter"]["mlflowRunId"]
    assert parent_run(mlflow_uri, after["mlflowRunId"]).info.status == "FINISHED"


async def test_deleting_a_running_run_removes_children_and_kills_its_mlflow_run(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    run = tiny()
    async with operator(k8s, mlflow_uri):
        await create_run(client, run)
        await pass_stages(k8s, client, ["synthesis"])
        await next_job(k8s, "filter")
        await wait_for(lambda: status(k8s)["stages"]["filter"].get("mlflowRunId"), what="ids")
        st = status(k8s)
        # no finalizer: deleting a run never waits for the operator (nor for a removed one)
        assert not get_run(k8s, "tiny-cpu")["metadata"].get("finalizers")
        for child in [*jobs(k8s).values(), *objects(k8s, "v1/configmaps").values()]:
            [owner] = child["metadata"]["ownerReferences"]
            assert owner["uid"] == run["metadata"]["uid"] and owner["kind"] == "VisionR1Run"
        r = await client.delete(f"{RUNS.format(ns=NS)}/tiny-cpu")
        r.raise_for_status()
        await wait_for(lambda: get_run(k8s, "tiny-cpu") is None, what="run deleted")
        # ended from the deletion's watch event (no finalizer holds the run for it)
        await wait_for(
            lambda: parent_run(mlflow_uri, st["mlflowRunId"]).info.status == "KILLED",
            what="MLflow run killed",
        )
    gone = await collect_garbage(k8s, client)  # what the garbage collector does with the owners
    assert sorted(gone) == sorted(
        [f"Job/tiny-cpu-{s}-0" for s in ("synthesis", "filter")]
        + [f"ConfigMap/tiny-cpu-{s}-0" for s in ("synthesis", "filter")]
    )
    assert jobs(k8s) == {}
    assert parent_run(mlflow_uri, st["mlflowRunId"]).info.status == "KILLED"
    assert parent_run(mlflow_uri, st["stages"]["filter"]["mlflowRunId"]).info.status == "KILLED"


def operator_requests(k8s: Any) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every API request the operator made."""
    out = set()
    for req in k8s.log:
        if not req.plural or req.user_agent == TEST_AGENT:
            continue  # discovery, or the test itself
        if req.method == "GET":
            verb = "get" if req.name else ("watch" if req.watch else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[
                req.method
            ]
        resource = req.plural + (f"/{req.subresource}" if req.subresource else "")
        out.add((req.group or "", resource, verb))
    return out


def leftover(kind: str, name: str, run_uid: str = "0000-deleted-run") -> dict[str, Any]:
    """A child of a deleted run of the same name, not yet collected (owned by the old uid)."""
    api = "batch/v1" if kind == "Job" else "v1"
    obj: dict[str, Any] = {
        "apiVersion": api,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"visionr1.io/run": "tiny-cpu", "visionr1.io/stage": name.split("-")[2]}
            | ({"visionr1.io/attempt": name.split("-")[3]} if kind == "Job" else {}),
            "ownerReferences": [
                {
                    "apiVersion": "visionr1.io/v1alpha1",
                    "kind": "VisionR1Run",
                    "name": "tiny-cpu",
                    "uid": run_uid,
                    "controller": True,
                }
            ],
        },
    }
    if kind == "Service":
        obj["spec"] = {"clusterIP": "None", "ports": [{"port": 29500}]}
    if kind == "Job":
        obj["spec"] = {"template": {"spec": {"containers": []}}}
    return obj


PATHS = {
    "Job": JOBS,
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
}


async def in_the_way_then_gone(
    k8s: Any, client: httpx.AsyncClient, kind: str, name: str
) -> dict[str, Any]:
    """Wait for the run to name ``kind/name`` as in its way, then delete it (the garbage
    collector's part); returns the condition that named it."""

    def named() -> Any:
        c = next((c for c in status(k8s).get("conditions", []) if c["type"] == "Progressing"), {})
        return (
            c
            if c.get("reason") == "ObjectInTheWay" and f"{kind} ml/{name}" in c["message"]
            else None
        )

    cond = await wait_for(named, what=f"ObjectInTheWay naming {kind} {name}")
    r = await client.delete(f"{PATHS[kind].format(ns=NS)}/{name}")
    r.raise_for_status()
    return cond


async def test_create_conflicts_adopt_only_owned_objects_and_rbac_rules_are_exact(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    """Children of a deleted run of the same name are in the way until collected: the run
    waits, saying which object; its own (a ConfigMap created before the Service was in the way)
    is adopted. Also: suspend/resume, and every request is allowed by exactly the RBAC rules."""
    run = tiny()
    run["spec"]["stages"]["sft"]["nodes"] = 2  # multi-node: the rendezvous Service too
    run["spec"]["stages"]["sft"]["params"]["globalBatchSize"] = 32  # 16 per process × 2
    headers = {"Content-Type": "application/merge-patch+json"}
    for kind, name in (("ConfigMap", "tiny-cpu-synthesis-0"), ("Service", "tiny-cpu-sft")):
        r = await client.post(PATHS[kind].format(ns=NS), json=leftover(kind, name))
        r.raise_for_status()
    r = await client.post(JOBS.format(ns=NS), json=leftover("Job", "tiny-cpu-sft-0"))
    r.raise_for_status()
    async with operator(k8s, None):
        await create_run(client, run)
        cond = await in_the_way_then_gone(k8s, client, "ConfigMap", "tiny-cpu-synthesis-0")
        assert cond["status"] == "False" and "0000-deleted-run" in cond["message"]
        assert "tiny-cpu-synthesis-0" not in jobs(k8s), "no Job while its ConfigMap is not ours"
        await pass_stages(k8s, client, ["synthesis", "filter"])
        await in_the_way_then_gone(k8s, client, "Service", "tiny-cpu-sft")
        await in_the_way_then_gone(k8s, client, "Job", "tiny-cpu-sft-0")
        job = await next_job(k8s, "sft")
        assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        await job_running(client, job["metadata"]["name"])
        assert "tiny-cpu-sft" in objects(k8s, "v1/services")
        r = await client.patch(
            f"{RUNS.format(ns=NS)}/tiny-cpu", json={"spec": {"suspend": True}}, headers=headers
        )
        r.raise_for_status()
        await wait_for(
            lambda: jobs(k8s)["tiny-cpu-sft-0"]["spec"]["suspend"] is True, what="Job suspended"
        )
        await wait_for(lambda: status(k8s).get("phase") == "Suspended", what="Suspended")
        held = jobs(k8s)["tiny-cpu-sft-0"]
        assert held["metadata"]["annotations"]["visionr1.io/suspended-by"] == "operator"
        cond = next(c for c in status(k8s)["conditions"] if c["type"] == "Suspended")
        assert cond["status"] == "True"
        r = await client.patch(
            f"{RUNS.format(ns=NS)}/tiny-cpu", json={"spec": {"suspend": False}}, headers=headers
        )
        r.raise_for_status()
        await wait_for(
            lambda: jobs(k8s)["tiny-cpu-sft-0"]["spec"]["suspend"] is False, what="Job resumed"
        )
        await wait_for(lambda: status(k8s).get("phase") == "Running", what="Running")
        await job_succeeded(client, "tiny-cpu-sft-0", completions=2)
        await pass_stages(k8s, client, ["grpo", "eval"])
        await wait_for(lambda: status(k8s).get("phase") == "Succeeded", what="Succeeded")
        await wait_for(lambda: "AllStagesSucceeded" in [r for r, _ in events(k8s)], what="event")
        # a second run whose pods the API server refuses, then edited into an invalid spec
        await refused_then_invalid(k8s, client)
    reasons = [r for r, _ in events(k8s)]
    assert "Suspended" in reasons and "Resumed" in reasons
    assert reasons.count("ObjectInTheWay") >= 3
    # RBAC: every request is allowed by a rule, and every rule's every verb was needed
    made = operator_requests(k8s)
    for group, resource, verb in sorted(made):
        assert covers(group, resource, verb), f"no RBAC rule allows {verb} {group}/{resource}"
    granted = {(r.api_group, r.resource, v) for r in (*RULES, *NAMESPACE_RULES) for v in r.verbs}
    assert granted - made == set(), "rules granting more than the operator uses"


QUOTA_REFUSAL = (
    'Error creating: pods "refused-synthesis-0-x7k2p" is forbidden: exceeded quota: gpu, '
    "requested: requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=0, limited: "
    "requests.nvidia.com/gpu=1"
)


async def refuse_pods(
    client: httpx.AsyncClient, job: dict[str, Any], message: str, n: int = 1
) -> None:
    """Post the FailedCreate Event the Job controller posts when the API server refuses the
    Job's pods (a ResourceQuota, a LimitRange, Pod Security)."""
    refusal = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{job['metadata']['name']}.{n}", "namespace": NS},
        "involvedObject": {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job["metadata"]["name"],
            "namespace": NS,
            "uid": job["metadata"]["uid"],
        },
        "reason": "FailedCreate",
        "type": "Warning",
        "message": message,
        "lastTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    r = await client.post(f"/api/v1/namespaces/{NS}/events", json=refusal)
    r.raise_for_status()


async def refused_then_invalid(
    k8s: Any, client: httpx.AsyncClient, name: str = "refused", tracked: bool = False
) -> dict[str, Any]:
    """A run whose Job's pods are refused (the Job controller's FailedCreate Event, as a
    ResourceQuota makes it): the run names the quota; then an edit makes its spec invalid: the
    run fails and its live Job is deleted. Returns the run's last status."""
    await create_run(client, run_object(tiny(), name=name))
    job = await next_job(k8s, "synthesis", run=name)
    await refuse_pods(client, job, QUOTA_REFUSAL)

    def named() -> dict[str, Any] | None:
        cond = next(
            (c for c in status(k8s, name).get("conditions", []) if c["type"] == "Progressing"), None
        )
        return cond if cond and cond["reason"] == "QuotaExceeded" else None

    cond = await wait_for(named, timeout=20, what="the quota refusal on the run")
    assert "limited requests.nvidia.com/gpu=1" in cond["message"]
    said = ("QuotaExceeded", cond["message"])  # the Event says what the condition says
    await wait_for(lambda: said in events(k8s, name), what="a QuotaExceeded Event on the run")
    if tracked:  # its MLflow parent and stage runs are open
        await wait_for(
            lambda: (status(k8s, name).get("stages", {}).get("synthesis") or {}).get("mlflowRunId"),
            what="the stage's MLflow run",
        )
    r = await client.patch(
        f"{RUNS.format(ns=NS)}/{name}",
        # kmock does not bump the generation of a spec edit as the API server does
        json={
            "metadata": {"generation": 2},
            "spec": {"storage": {"pvc": None, "localDir": ".visionr1/x"}},
        },
        headers={"Content-Type": "application/merge-patch+json"},
    )
    r.raise_for_status()
    await wait_for(lambda: status(k8s, name).get("phase") == "Failed", what="Failed")
    await wait_for(lambda: job["metadata"]["name"] not in jobs(k8s), what="the live Job deleted")
    deletes = [
        e
        for e in k8s.log
        if e.method == "DELETE" and e.plural == "jobs" and e.user_agent != TEST_AGENT
    ]
    assert [e.name for e in deletes] == [job["metadata"]["name"]]
    st = status(k8s, name)
    assert st["stages"]["synthesis"]["phase"] == "Failed"
    return st


async def test_a_refused_job_is_named_and_an_invalid_edit_stops_it_and_fails_mlflow(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    mlf = MlflowClient(tracking_uri=mlflow_uri)

    def answers() -> bool:
        try:
            return mlf.search_experiments() is not None
        except Exception:  # noqa: BLE001 (still starting)
            return False

    await wait_for(answers, timeout=60, what="MLflow answering")
    async with operator(k8s, mlflow_uri):
        st = await refused_then_invalid(k8s, client, tracked=True)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.storage.pvc" in failed["message"]
    assert mlf.get_run(st["mlflowRunId"]).info.status == "FAILED"
    stage_run = st["stages"]["synthesis"]["mlflowRunId"]
    assert stage_run and mlf.get_run(stage_run).info.status == "FAILED"


async def test_runs_a_cluster_cannot_or_may_not_run_are_refused_naming_the_field(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    laptop = tiny()
    laptop["spec"]["storage"] = {"localDir": ".visionr1/x"}  # no PVC: never an emptyDir
    foreign = tiny()
    foreign["metadata"]["name"] = "foreign"
    foreign["spec"]["images"] = {"trainer": "docker.io/someone/else:1"}
    foreign["spec"]["serviceAccountName"] = "cluster-admin-ish"
    policy = ClusterPolicy(
        allowed_images=("ghcr.io/visionr1/*",), allowed_service_accounts=("default",)
    )
    async with operator(k8s, None, policy=policy):
        await create_run(client, laptop)
        await create_run(client, foreign)
        for name in ("tiny-cpu", "foreign"):
            await wait_for(lambda n=name: status(k8s, n).get("phase") == "Failed", what=name)
    laptop_failed = next(c for c in status(k8s)["conditions"] if c["type"] == "Failed")
    assert laptop_failed["reason"] == "InvalidSpec"
    assert "spec.storage.pvc" in laptop_failed["message"]
    assert "PersistentVolumeClaim" in laptop_failed["message"]
    foreign_failed = next(c for c in status(k8s, "foreign")["conditions"] if c["type"] == "Failed")
    assert foreign_failed["reason"] == "NotAllowed"
    assert "spec.images.trainer" in foreign_failed["message"]
    assert "ghcr.io/visionr1/*" in foreign_failed["message"]
    assert "spec.serviceAccountName" in foreign_failed["message"]
    assert jobs(k8s) == {} and objects(k8s, "v1/configmaps") == {}


async def test_mlflow_unreachable_never_blocks_jobs_and_is_shown(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing answers
    async with operator(k8s, dead):
        await create_run(client, tiny())
        job = await next_job(k8s, "synthesis")
        cond = await wait_for(
            lambda: next(
                (c for c in status(k8s).get("conditions", []) if c["type"] == "Tracking"), None
            ),
            what="Tracking condition",
        )
        await wait_for(lambda: "MlflowUnreachable" in [r for r, _ in events(k8s)], what="event")
        await job_succeeded(client, job["metadata"]["name"])
        await next_job(k8s, "filter")  # the run goes on
    assert cond["status"] == "False" and cond["reason"] == "MlflowUnreachable"
    assert dead in cond["message"]
    assert status(k8s).get("mlflowRunId") is None


async def test_pod_trouble_and_the_failing_pods_exit_code_are_shown(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    from kmock_cluster import put_pod

    run = tiny()
    run["spec"]["stages"]["synthesis"]["backoffLimit"] = 1
    slow = RetryPolicy(base_s=30.0, max_s=30.0)  # the retry waits: look at it
    async with operator(k8s, None, retry=slow):
        await create_run(client, run)
        job = await next_job(k8s, "synthesis")
        await put_pod(
            client,
            job,
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "stage",
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "ghcr.io/visionr1/trainer:0.1.0"',
                            }
                        },
                    }
                ],
            },
        )
        await wait_for(
            lambda: "ImagePullBackOff" in [r for r, _ in events(k8s)], what="ImagePullBackOff"
        )
        st = status(k8s)
        assert "Back-off pulling image" in st["stages"]["synthesis"]["message"]
        progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
        assert progressing["reason"] == "ImagePullBackOff"
        # then it ran out of memory
        await put_pod(
            client,
            job,
            {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "stage",
                        "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ],
            },
        )
        await job_failed(client, job["metadata"]["name"], exit_code=137)
        await wait_for(lambda: "StageRetrying" in [r for r, _ in events(k8s)], what="retrying")
    stage = status(k8s)["stages"]["synthesis"]
    assert "OOMKilled (exit code 137)" in stage["message"]
    assert any("OOMKilled (exit code 137)" in m for r, m in events(k8s) if r == "StageRetrying")
    # the next attempt's time is its own field, not a finish time in the future
    finished, due = stage["finishTime"], stage["nextRetryTime"]
    assert finished < due


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, target: str) -> AsyncIterator[None]:
    """Forward 127.0.0.1:``port`` to ``target`` (http://host:port) while the context is open."""
    host, _, target_port = target.removeprefix("http://").partition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_mlflow_coming_back_is_picked_up_on_its_own(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    port = free_port()  # nothing listens yet: MLflow is "down"
    uri = f"http://127.0.0.1:{port}"

    def tracking() -> dict[str, Any]:
        conds = status(k8s).get("conditions", [])
        return next((c for c in conds if c["type"] == "Tracking"), {})

    async with operator(k8s, uri):
        await create_run(client, tiny())
        first = await next_job(k8s, "synthesis")
        await wait_for(lambda: tracking().get("status") == "False", what="MLflow down")
        async with tcp_proxy(port, mlflow_uri):  # MLflow is back
            await wait_for(lambda: tracking().get("status") == "True", what="MLflow back")
            await wait_for(lambda: status(k8s).get("mlflowRunId"), what="parent run opened")
            await job_succeeded(client, first["metadata"]["name"])
            second = await next_job(k8s, "filter")
    env = {
        e["name"]: e.get("value")
        for e in second["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["VISIONR1_PARENT_RUN_ID"] == status(k8s)["mlflowRunId"]
    assert "VISIONR1_PARENT_RUN_ID" not in {
        e["name"] for e in first["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert tracking()["reason"] == "MlflowReachable"
    assert "MlflowReachable" in [r for r, _ in events(k8s)]
