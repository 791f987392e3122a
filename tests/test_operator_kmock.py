"""The operator end to end: kopf (KopfRunner) against kmock, the test playing the Job controller,
tracking into a real ``mlflow server`` on loopback."""

from __future__ import annotations

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
    cluster,
    connection,
    create_run,
    get_run,
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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIVE = ["synthesis", "filter", "sft", "grpo", "eval"]

pytestmark = [pytest.mark.timeout(120)]


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
