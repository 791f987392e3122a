"""How the operator decodes the API server's watch streams: orjson, without managedFields.

kopf decodes each line of a watch stream with the standard library's ``json.loads``. With
1,000 runs that was a fifth of the operator's CPU: every event of every Job, pod and run is a
whole object, and about half of a pod's bytes are its ``metadata.managedFields``, which the
operator never reads (kopf writes with merge patches; our handlers read labels, spec and
status). :func:`install` gives kopf's stream module a decoder that parses with orjson (a few
times faster on these objects) and drops ``managedFields`` before the object is queued, so
neither kopf's queues nor any handler holds them.

kopf has no setting for its decoder, so this replaces the ``json`` its ``stream`` uses. When a
kopf release no longer decodes that way, :func:`install` changes nothing and says so: the
operator then works as before, only slower (``tests/test_watch_stream.py`` fails first).
"""

from __future__ import annotations

import json
import logging
import types
from typing import Any

import orjson

log = logging.getLogger(__name__)

# Where kopf decodes watch lines: ``json.loads(line.decode('utf-8'))`` in ``stream``.
KOPF_STREAM_MODULE = "kopf._cogs.clients.api"


def decode_event(line: bytes | str) -> Any:
    """One line of a watch stream → the event, its object without ``managedFields``."""
    event = orjson.loads(line)
    if isinstance(event, dict):
        obj = event.get("object")
        if isinstance(obj, dict):
            meta = obj.get("metadata")
            if isinstance(meta, dict):
                meta.pop("managedFields", None)
    return event


class _Json(types.ModuleType):
    """The standard ``json`` module with :func:`decode_event` as its ``loads``."""

    def __init__(self) -> None:
        super().__init__("json")
        self.loads = decode_event

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)


def install() -> bool:
    """Make kopf decode watch streams with :func:`decode_event`; whether it did."""
    import importlib

    module = importlib.import_module(KOPF_STREAM_MODULE)
    current = getattr(module, "json", None)
    if isinstance(current, _Json):
        return True
    if current is not json or not callable(getattr(module, "stream", None)):
        log.warning(
            "kopf's %s no longer decodes watch streams with json.loads: keeping its decoder "
            "(the operator works, with more CPU per watch event)",
            KOPF_STREAM_MODULE,
        )
        return False
    module.json = _Json()  # type: ignore[attr-defined]
    return True
