"""A pretend cluster for operator tests and the load benchmark: kmock plus what kmock lacks.

kmock 0.8 serves objects over the real Kubernetes HTTP API, in memory. It does not assign uids,
does not filter by label selector, runs no controllers and no garbage collector. Here: the
resources the operator uses are declared for discovery, the test plays the Job controller by
patching Job status, and :func:`collect_garbage` deletes objects whose owner is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import httpx
import kmock

NS = "ml"


@dataclass(frozen=True)
class Logged:
    method: str
    group: str | None
    plural: str | None
    subresource: str | None
    name: str | None
    watch: bool
    user_agent: str
    label_selector: str | None = None


RUNS = "/apis/visionr1.io/v1alpha1/namespaces/{ns}/visionr1runs"
JOBS = "/apis/batch/v1/namespaces/{ns}/jobs"

RESOURCES: dict[str, tuple[str, set[str]]] = {
    "visionr1.io/v1alpha1/visionr1runs": ("VisionR1Run", {"status"}),
    "batch/v1/jobs": ("Job", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/services": ("Service", set()),
    "v1/pods": ("Pod", {"status"}),
    "v1/events": ("Event", set()),
}
# kopf waits for these to be discoverable even with scanning disabled (it never lists them then;
# listing namespaces would fail anyway: kmock 0.8 parses /api/v1/namespaces as a namespace path).
CLUSTER_RESOURCES: dict[str, str] = {
    "v1/namespaces": "Namespace",
    "apiextensions.k8s.io/v1/customresourcedefinitions": "CustomResourceDefinition",
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)$")


class Emulator(kmock.KubernetesEmulator):
    """kmock plus what the API server does on create: generateName, uid, resourceVersion; and
    GET of a Namespace (kmock parses /api/v1/namespaces/NAME as a namespace, not an object):
    ``namespaces`` maps each namespace that exists to its labels (a test sets Pod Security
    labels there).

    kmock matches every request against its reactions by scanning the whole request history, so
    serving gets slower with every request (quadratic: 10 runs took 40 CPU-seconds). Only the
    latest requests are kept for that; ``log`` keeps a compact record of all of them.
    """

    keep_requests = 8

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.log: list[Logged] = []
        self._finished: set[int] = set()
        self.namespaces: dict[str, dict[str, str]] = {NS: {}}

    async def _handle(self, request: Any) -> Any:
        method = str(getattr(request.method, "value", request.method)).upper()
        found = NAMESPACE_PATH.match(request.url.path)
        if found and method == "GET":
            return self._get_namespace(request, found.group(1))
        res = request.resource
        self.log.append(
            Logged(
                method=str(getattr(request.method, "value", request.method)).upper(),
                group=res.group if res is not None else None,
                plural=res.plural if res is not None else None,
                subresource=request.subresource,
                name=request.name,
                watch=bool(request.params.get("watch")),
                user_agent=request.headers.get("User-Agent", ""),
                label_selector=request.params.get("labelSelector"),
            )
        )
        # Forget finished requests (a watch stays listed while it streams).
        if len(self._requests) > 2 * self.keep_requests:
            finished = self._finished
            self._requests[:] = [r for r in self._requests if id(r) not in finished]
            finished.clear()
        try:
            return await self._handle_api(request)
        finally:
            self._finished.add(id(request))

    def _get_namespace(self, request: Any, name: str) -> aiohttp.web.StreamResponse:
        self.log.append(
            Logged(
                method="GET",
                group="",
                plural="namespaces",
                subresource=None,
                name=name,
                watch=False,
                user_agent=request.headers.get("User-Agent", ""),
            )
        )
        if name not in self.namespaces:
            status = {
                "apiVersion": "v1",
                "kind": "Status",
                "status": "Failure",
                "reason": "NotFound",
                "message": f'namespaces "{name}" not found',
                "code": 404,
            }
            return aiohttp.web.json_response(status, status=404)
        labels = {"kubernetes.io/metadata.name": name, **self.namespaces[name]}
        obj = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                "resourceVersion": "1",
                "labels": labels,
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        return aiohttp.web.json_response(obj)

    async def _handle_api(self, request: Any) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
        elif (
            request.action == kmock.action.UPDATE
            and request.subresource is None
            and isinstance(data, dict)
            and "spec" in data
            and request.resource is not None
        ):
            # as the API server does: a spec change is a new generation (kmock bumps none)
            res = request.resource
            stored = next(
                (
                    o.raw
                    for (r, _ns, name), o in list(self.objects.items())
                    if (r.group, r.plural) == (res.group, res.plural)
                    and name == request.name
                    and not o.deleted
                ),
                None,
            )
            if stored is not None:
                generation = int((stored.get("metadata") or {}).get("generation") or 1)
                data.setdefault("metadata", {})["generation"] = generation + 1
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[kmock.KubernetesEmulator]:
    """A kmock Kubernetes emulator on a loopback port, resources declared."""
    async with Emulator() as k8s, kmock.Server(k8s):
        for key, (kind, subresources) in RESOURCES.items():
            k8s.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs=VERBS, subresources=subresources
            )
        for key, kind in CLUSTER_RESOURCES.items():
            k8s.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=False, verbs=VERBS)
        yield k8s


def connection(k8s: kmock.KubernetesEmulator) -> Any:
    import kopf

    return kopf.ConnectionInfo(server=str(k8s.url).rstrip("/"), default_namespace=NS)


def run_object(manifest: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """What the API server would store on create: namespace, uid, generation (kmock adds none)."""
    obj = copy.deepcopy(manifest)
    meta = obj["metadata"]
    if name:
        meta["name"] = name
    meta["namespace"] = NS
    meta["uid"] = str(uuid.uuid4())
    meta["generation"] = 1
    # kopf guards its finalizer patch with a JSON-patch test of resourceVersion; kmock never
    # sets or bumps one, so a constant is consistent.
    meta["resourceVersion"] = "1"
    meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return obj


async def create_run(client: httpx.AsyncClient, obj: dict[str, Any]) -> None:
    r = await client.post(RUNS.format(ns=NS), json=obj)
    r.raise_for_status()


def objects(k8s: kmock.KubernetesEmulator, resource: str) -> dict[str, dict[str, Any]]:
    """Live objects of one resource, by name."""
    out = {}
    for (res, _ns, name), obj in list(k8s.objects.items()):
        if f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource.lstrip("/") and not (
            obj.deleted
        ):
            out[name] = obj.raw
    return out


def jobs(k8s: kmock.KubernetesEmulator, run: str | None = None) -> dict[str, dict[str, Any]]:
    return {
        n: j
        for n, j in objects(k8s, "batch/v1/jobs").items()
        if run is None or j["metadata"]["labels"].get("visionr1.io/run") == run
    }


def get_run(k8s: kmock.KubernetesEmulator, name: str) -> dict[str, Any] | None:
    return objects(k8s, "visionr1.io/v1alpha1/visionr1runs").get(name)


# --------------------------------------------------------------------------- the Job controller


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


PODS = "/api/v1/namespaces/{ns}/pods"


async def put_pod(
    client: httpx.AsyncClient, job: dict[str, Any], status: dict[str, Any], index: int = 0
) -> str:
    """A pod of ``job`` in ``status`` (as the Job controller and the kubelet would report it),
    created or replaced; returns its name."""
    name = f"{job['metadata']['name']}-{index}-abcde"
    labels = {
        **job["spec"]["template"]["metadata"]["labels"],
        "batch.kubernetes.io/job-name": job["metadata"]["name"],
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": job["spec"]["template"]["spec"],
        "status": status,
    }
    r = await client.post(PODS.format(ns=NS), json=pod)
    if r.status_code == 409:
        r = await client.patch(
            f"{PODS.format(ns=NS)}/{name}/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )
    r.raise_for_status()
    return name


async def job_running(client: httpx.AsyncClient, name: str) -> None:
    """The Job has one active pod, and that pod is Running."""
    r = await client.patch(
        f"{JOBS.format(ns=NS)}/{name}/status",
        json={"status": {"active": 1, "startTime": _now()}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    r.raise_for_status()
    job = (await client.get(f"{JOBS.format(ns=NS)}/{name}")).json()
    await put_pod(client, job, {"phase": "Running", "startTime": _now()})


async def job_succeeded(client: httpx.AsyncClient, name: str, completions: int = 1) -> None:
    status = {
        "active": 0,
        "succeeded": completions,
        "completionTime": _now(),
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": _now()},
            {"type": "Complete", "status": "True", "lastTransitionTime": _now()},
        ],
    }
    r = await client.patch(
        f"{JOBS.format(ns=NS)}/{name}/status",
        json={"status": status},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    r.raise_for_status()


async def job_failed(client: httpx.AsyncClient, name: str, exit_code: int) -> None:
    """As the Job controller reports it: exit 65 matches our FailJob rule, others spend the
    (zero) backoffLimit."""
    if exit_code == 65:
        reason = "PodFailurePolicy"
        message = (
            f"Container stage for pod {NS}/{name}-0-abcde failed with exit code 65 "
            "matching FailJob rule at index 0"
        )
    else:
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    status = {
        "active": 0,
        "failed": 1,
        "conditions": [
            {
                "type": "FailureTarget",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            },
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            },
        ],
    }
    r = await client.patch(
        f"{JOBS.format(ns=NS)}/{name}/status",
        json={"status": status},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    r.raise_for_status()


async def collect_garbage(k8s: kmock.KubernetesEmulator, client: httpx.AsyncClient) -> list[str]:
    """Delete every object whose owner (by uid) no longer exists; returns 'Kind/name' deleted."""
    live_uids = {o.raw["metadata"].get("uid") for o in k8s.objects.values() if not o.deleted}
    gone = []
    for (res, ns, name), obj in list(k8s.objects.items()):
        if obj.deleted:
            continue
        owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
        if owners and not any(o["uid"] in live_uids for o in owners):
            kind = obj.raw.get("kind")
            base = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
            r = await client.delete(f"{base}/namespaces/{ns}/{res.plural}/{name}")
            r.raise_for_status()
            gone.append(f"{kind}/{name}")
    return gone


async def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
