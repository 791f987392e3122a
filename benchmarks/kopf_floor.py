"""The floor of ``operator_load.py``: a bare kopf operator that only watches Jobs and creates the
next one.

A chain is a run's stages in miniature: Jobs ``<chain>-<stage>-0`` labelled with their chain and
step. When one completes, this creates the chain's next Job (the same one-container pod, on KWOK's
fake nodes) until the last stage. No plan, no status, no ConfigMap, no Event: what kopf, one
Python API client and this API server cost per stage transition on this machine, so that the
operator's figures measured in the same run read as a ratio to it.

    python benchmarks/kopf_floor.py -n NAMESPACE      (KUBECONFIG: who it logs in as)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

STAGES = ("synthesis", "filter", "sft", "grpo", "eval")
CHAIN_LABEL = "benchmark.visionr1.io/floor-chain"
STEP_LABEL = "benchmark.visionr1.io/floor-step"
# KWOK's fake nodes (scripts/cluster): the pods only pretend, and complete at once.
KWOK_NODE_SELECTOR = {"type": "kwok"}
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


def job_name(chain: str, step: int) -> str:
    return f"{chain}-{STAGES[step]}-0"


def chain_job(namespace: str, chain: str, step: int) -> dict[str, Any]:
    """Step ``step`` of ``chain``: one pod on a KWOK node, never retried."""
    labels = {CHAIN_LABEL: chain, STEP_LABEL: str(step)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(chain, step), "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": KWOK_NODE_SELECTOR,
                    "tolerations": [KWOK_TOLERATION],
                    "containers": [
                        {
                            "name": "stage",
                            "image": "visionr1.invalid/floor:none",  # never pulled (KWOK)
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                        }
                    ],
                },
            },
        },
    }


def _complete(body: Mapping[str, Any]) -> bool:
    conds = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conds)


def make_registry() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    client: dict[str, Any] = {}
    started: set[str] = set()  # Jobs this process already created a successor for

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The operator's own settings where they change what the API server sees.
        settings.peering.standalone = True
        settings.scanning.disabled = True
        settings.watching.label_selectors["batch", "jobs"] = CHAIN_LABEL
        settings.posting.level = logging.WARNING

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> Any:
        from lightkube import AsyncClient

        from visionr1_operator.kube import config_from_connection

        info = kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            raise kopf.LoginError("no kubeconfig ($KUBECONFIG)")
        client["api"] = AsyncClient(config_from_connection(info), trust_env=False)
        return info

    @kopf.on.event("batch", "v1", "jobs", labels={CHAIN_LABEL: kopf.PRESENT}, registry=registry)
    async def job_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
        from lightkube import ApiError
        from lightkube.resources.batch_v1 import Job

        meta = body.get("metadata") or {}
        name, labels = meta.get("name", ""), meta.get("labels") or {}
        if event.get("type") == "DELETED" or name in started or not _complete(body):
            return
        step = int(labels.get(STEP_LABEL, len(STAGES)))
        if step + 1 >= len(STAGES):
            return
        started.add(name)
        nxt = Job.from_dict(chain_job(meta["namespace"], labels[CHAIN_LABEL], step + 1))
        for attempt in range(5):  # kopf does not retry event handlers: 429/5xx as the operator
            try:
                await client["api"].create(nxt)
                return
            except ApiError as exc:
                if exc.status.code == 409:  # created already
                    return
                if exc.status.code not in (429, 500, 502, 503, 504) or attempt == 4:
                    raise
            await asyncio.sleep(0.5 * 2**attempt)

    return registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(
        kopf.operator(registry=make_registry(), standalone=True, namespaces=[args.namespace])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
