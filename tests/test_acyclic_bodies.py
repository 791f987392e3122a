"""kopf's per-event Body and Patch without reference cycles: they read and write what kopf's
own do, an event's object is freed as soon as kopf lets go of it (no cycle collector needed),
and kopf still builds them where install() puts them."""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import weakref
from collections.abc import Iterator

import kopf
import pytest
from kopf._cogs.structs import bodies, patches

from visionr1_operator import acyclic_bodies

RAW = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "r-synthesis-0",
        "namespace": "team-a",
        "uid": "u-1",
        "labels": {"visionr1.io/run": "r"},
        "annotations": {"a": "b"},
        "creationTimestamp": "2026-12-08T00:00:00Z",
        "finalizers": ["x"],
    },
    "spec": {"completions": 2},
    "status": {"succeeded": 1},
}

KOPF_BODY, KOPF_PATCH = bodies.Body, patches.Patch
BODY, PATCH = acyclic_bodies._classes()


@pytest.fixture
def gc_off() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _reads(body: bodies.Body) -> object:
    meta = body.meta
    return (
        dict(body),
        meta.name,
        meta.namespace,
        meta.uid,
        dict(meta.labels),
        dict(body.metadata.annotations),
        meta.creation_timestamp,
        meta.deletion_timestamp,
        dict(body.spec),
        dict(body.status),
        len(body.status),
        body.status.get("missing", "default"),
    )


def test_a_body_reads_what_kopfs_own_reads() -> None:
    ours, theirs = BODY(copy.deepcopy(RAW)), KOPF_BODY(copy.deepcopy(RAW))
    assert isinstance(ours, kopf.Body) and isinstance(ours.meta, bodies.Meta)
    assert _reads(ours) == _reads(theirs)
    # a view taken before the body is replaced sees the new object (kopf's live bodies)
    status, labels = ours.status, ours.meta.labels
    ours._replace_with({**RAW, "status": {"failed": 1}, "metadata": {"labels": {"k": "v"}}})
    assert dict(status) == {"failed": 1} and dict(labels) == {"k": "v"}


def _writes(patch: patches.Patch) -> patches.Patch:
    patch.meta.labels["l"] = "1"
    patch.metadata.annotations["a"] = None
    patch.spec["suspend"] = True
    patch.status["phase"] = "Running"
    del patch.status["phase"]
    patch.status["ready"] = 1
    patch.fns.append(lambda raw: raw["metadata"]["finalizers"].clear())
    return patch


def test_a_patch_writes_what_kopfs_own_writes() -> None:
    ours = _writes(PATCH(body=BODY(copy.deepcopy(RAW))))
    theirs = _writes(KOPF_PATCH(body=KOPF_BODY(copy.deepcopy(RAW))))
    assert isinstance(ours, patches.Patch) and isinstance(ours.meta, patches.MetaPatch)
    assert dict(ours) == dict(theirs) and bool(ours) and repr(ours).startswith("Patch(")
    assert ours.as_json_patch() == theirs.as_json_patch()
    # a patch made from a remaining one (kopf's own, from before install) keeps its functions
    again = PATCH(theirs, body=BODY(copy.deepcopy(RAW)))
    assert dict(again) == dict(theirs) and len(again.fns) == 1
    again.clear()
    assert not again and again.fns == []


class _Marker:
    """Something weakly referable inside an event's object."""


def _freed_without_the_collector(body_cls: type, patch_cls: type) -> bool:
    marker = _Marker()
    raw = copy.deepcopy(RAW)
    raw["status"]["marker"] = marker
    body = body_cls(raw)
    patch = patch_cls({}, body=body)
    patch.meta.labels["x"] = "y"
    _ = (body.meta.labels, body.spec, body.status, patch.status)
    gone = weakref.ref(marker)
    del raw, body, patch, marker, _
    return gone() is None


def test_an_events_object_is_freed_by_reference_counting(gc_off: None) -> None:
    assert _freed_without_the_collector(BODY, PATCH)
    # kopf's own keep it for the collector: what this module is for
    assert not _freed_without_the_collector(KOPF_BODY, KOPF_PATCH)
    gc.collect()


@pytest.fixture
def restore_kopf() -> Iterator[None]:
    try:
        yield
    finally:
        bodies.Body, patches.Patch = KOPF_BODY, KOPF_PATCH


def test_install_puts_them_where_kopf_builds_each_events(restore_kopf: None) -> None:
    assert acyclic_bodies.install() is True
    assert acyclic_bodies.install() is True  # twice: subclassed once
    assert bodies.Body.__mro__[1] is KOPF_BODY and patches.Patch.__mro__[1] is KOPF_PATCH
    made = bodies.Body(copy.deepcopy(RAW))
    assert type(made) is bodies.Body and not hasattr(made, "_meta")
    # kopf looks them up in their modules at each event: if a release imports them by name
    # instead, installing changes nothing and this fails first
    import importlib

    for name in acyclic_bodies.KOPF_BUILDERS:
        source = inspect.getsource(importlib.import_module(name))
        assert "patches.Patch(" in source, name
    processing = importlib.import_module(acyclic_bodies.KOPF_BUILDERS[0])
    assert "bodies.Body(raw_body)" in inspect.getsource(processing)


def test_install_leaves_a_kopf_that_builds_them_otherwise_alone(
    restore_kopf: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Other(KOPF_BODY):  # type: ignore[misc,valid-type]
        def __init__(self, src: object) -> None:
            super().__init__(src)  # type: ignore[arg-type]
            self.extra = 1

    bodies.Body = Other
    with caplog.at_level(logging.WARNING, logger=acyclic_bodies.__name__):
        assert acyclic_bodies.install() is False
    assert bodies.Body is Other and patches.Patch is KOPF_PATCH
    assert "Body.__init__" in caplog.text
