"""The operator end to end: kopf (KopfRunner) against kmock, the test playing the Job controller,
tracking into a real ``mlflow server`` on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kmock_cluster import (
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
    mlflow_server,
    objects,
    run_object,
    wait_for,
)

from visionr1_operator.handlers import OperatorConfig, make_registry
from visionr1_operator.plan import RetryPolicy
from visionr1_operator.rbac import RULES, covers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIVE = ["synthesis", "filter", "sft", "grpo", "eval"]

# slow: the module starts a real `mlflow server` once (~40 s on a busy 2-core machine)
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("VISIONR1_TEST_MLFLOW_URI"):  # a server already running (development)
        yield os.environ["VISIONR1_TEST_MLFLOW_URI"]
        return
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
async def k8s() -> AsyncIterator[Any]:
    async with cluster() as k:
        yield k


@pytest.fixture
async def client(k8s: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(k8s.url).rstrip("/")) as c:
        yield c


@contextlib.contextmanager
def operator(k8s: Any, mlflow_uri: str | None, retry: RetryPolicy | None = None) -> Iterator[Any]:
    from kopf.testing import KopfRunner

    config = OperatorConfig(
        mlflow_uri=mlflow_uri,
        connection=connection(k8s),
        retry=retry or RetryPolicy(base_s=0.2, max_s=1.0),
        error_delay_s=0.5,
    )
    with KopfRunner(
        ["run", "--standalone", "-n", NS, "--verbose"], registry=make_registry(config), timeout=30
    ) as runner:
        yield runner


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


async def test_five_stage_run_succeeds_with_status_events_and_mlflow(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    run = tiny()
    with operator(k8s, mlflow_uri):
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
        await wait_for(lambda: len(events(k8s)) >= 12, what="events posted")
    st = status(k8s)
    assert st["progress"] == "5/5"
    assert all(st["stages"][s]["phase"] == "Succeeded" for s in FIVE)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True"
    assert conds["Succeeded"]["reason"] == "AllStagesSucceeded"
    assert conds["Progressing"]["status"] == "False"
    assert set(jobs(k8s)) == {f"tiny-cpu-{s}-0" for s in FIVE}, "one Job per stage, no extras"
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
    with operator(k8s, mlflow_uri):
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
    with operator(k8s, mlflow_uri):
        await create_run(client, tiny())
        await pass_stages(k8s, client, ["synthesis"])
        job = await next_job(k8s, "filter")
        await job_failed(client, job["metadata"]["name"], exit_code=65)
        await wait_for(lambda: status(k8s).get("phase") == "Failed", what="Failed")
        await wait_for(lambda: "InvalidInput" in [r for r, _ in events(k8s)], what="event")
        await asyncio.sleep(1.0)  # a retry would have been created by now (backoff 0.2 s)
    st = status(k8s)
    assert "tiny-cpu-filter-1" not in jobs(k8s)
    assert st["stages"]["filter"]["attempts"] == 1
    assert "exit code 65" in st["stages"]["filter"]["message"]
    assert "InvalidInput" in [r for r, _ in events(k8s)]


async def test_invalid_spec_fails_naming_the_field_and_creates_nothing(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    run = tiny()
    run["spec"]["stages"]["sft"]["nodes"] = 0  # kmock enforces no schema, the operator must
    with operator(k8s, None):
        await create_run(client, run)
        await wait_for(lambda: status(k8s).get("phase") == "Failed", what="Failed")
    failed = next(c for c in status(k8s)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.stages.sft.nodes" in failed["message"]
    assert jobs(k8s) == {} and objects(k8s, "v1/configmaps") == {}


async def test_operator_restarted_mid_stage_continues_without_duplicates(
    k8s: Any, client: httpx.AsyncClient, mlflow_uri: str
) -> None:
    with operator(k8s, mlflow_uri):
        await create_run(client, tiny())
        await pass_stages(k8s, client, ["synthesis"])
        job = await next_job(k8s, "filter")
        await job_running(client, job["metadata"]["name"])
        await wait_for(lambda: status(k8s)["stages"]["filter"].get("progress"), what="progress")
    before = status(k8s)
    # while the operator is down, the filter Job finishes
    await job_succeeded(client, "tiny-cpu-filter-0")
    with operator(k8s, mlflow_uri):
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
    with operator(k8s, mlflow_uri):
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
        if not req.plural or "python-httpx" in req.user_agent:
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


async def test_suspend_then_resume_and_rbac_rules_are_exact(
    k8s: Any, client: httpx.AsyncClient
) -> None:
    run = tiny()
    run["spec"]["stages"]["sft"]["nodes"] = 2  # multi-node: the rendezvous Service too
    headers = {"Content-Type": "application/merge-patch+json"}
    with operator(k8s, None):
        await create_run(client, run)
        await pass_stages(k8s, client, ["synthesis", "filter"])
        job = await next_job(k8s, "sft")
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
    reasons = [r for r, _ in events(k8s)]
    assert "Suspended" in reasons and "Resumed" in reasons
    # RBAC: every request is allowed by a rule, and every rule's every verb was needed
    made = operator_requests(k8s)
    for group, resource, verb in sorted(made):
        assert covers(group, resource, verb), f"no RBAC rule allows {verb} {group}/{resource}"
    granted = {(r.api_group, r.resource, v) for r in RULES for v in r.verbs}
    assert granted - made == set(), "rules granting more than the operator uses"
