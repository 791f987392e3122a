"""kopf's wrappers of each watch event's object, without reference cycles.

For every event of every Job, pod and run, kopf wraps the object in a ``Body`` and makes a
``Patch`` for it (one more per index). Both keep their ``meta``, ``spec`` and ``status`` views as
attributes, and each view refers back to its ``Body`` or ``Patch``: a reference cycle. So the
event's whole decoded object (every dict and list of a pod) outlives kopf's processing until
Python's cycle collector finds it, never freed at once by reference counting. At 1,000 runs
those cycles were most of the objects the young collections freed, and what survived them
filled the oldest generation, whose full collections stop the operator for up to a second.

:func:`install` makes kopf build subclasses of its own ``Body`` and ``Patch`` that create those
views when asked for (a view is two attribute reads; kopf's views hold no state of their own
beyond their source and path, so a new one reads and writes exactly what the kept one did).
Everything else about them is kopf's: ``isinstance`` checks, ``_replace_with``, merge and JSON
patches. When a kopf release builds them otherwise, :func:`install` changes nothing and says so
(``tests/test_acyclic_bodies.py`` fails first).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger(__name__)

# Where kopf builds a Body and a Patch per watch event (as ``bodies.Body(...)`` and
# ``patches.Patch(...)``: looked up in their modules at each call).
KOPF_BODIES = "kopf._cogs.structs.bodies"
KOPF_PATCHES = "kopf._cogs.structs.patches"
KOPF_BUILDERS = ("kopf._core.reactor.processing", "kopf._core.engines.indexing")


def _classes() -> tuple[type, type]:
    """Acyclic subclasses of kopf's ``Body`` and ``Patch`` (as found now)."""
    bodies = importlib.import_module(KOPF_BODIES)
    patches = importlib.import_module(KOPF_PATCHES)
    dicts = importlib.import_module("kopf._cogs.structs.dicts")
    kopf_patch = patches.Patch  # kopf's own, before install replaces the module's name

    class Meta(bodies.Meta):  # type: ignore[misc,name-defined]
        def __init__(self, src: Any) -> None:
            dicts.MappingView.__init__(self, src, "metadata")

        @property
        def labels(self) -> Any:
            return dicts.MappingView(self, "labels")

        @property
        def annotations(self) -> Any:
            return dicts.MappingView(self, "annotations")

    class Body(bodies.Body):  # type: ignore[misc,name-defined]
        """kopf's ``Body``; its views made when asked for, not kept."""

        def __init__(self, src: Any) -> None:
            dicts.ReplaceableMappingView.__init__(self, src)

        @property
        def metadata(self) -> Any:
            return Meta(self)

        meta = metadata

        @property
        def spec(self) -> Any:
            return bodies.Spec(self)

        @property
        def status(self) -> Any:
            return bodies.Status(self)

    class MetaPatch(patches.MetaPatch):  # type: ignore[misc,name-defined]
        def __init__(self, src: Any) -> None:
            dicts.MutableMappingView.__init__(self, src, "metadata")

        @property
        def labels(self) -> Any:
            return dicts.MutableMappingView(self, "labels")

        @property
        def annotations(self) -> Any:
            return dicts.MutableMappingView(self, "annotations")

    class Patch(patches.Patch):  # type: ignore[misc,name-defined]
        """kopf's ``Patch``; its views made when asked for, not kept."""

        def __init__(self, src: Any = None, /, body: Any = None, fns: Any = ()) -> None:
            dict.__init__(self, src or {})
            self._original = body
            self._fns = (src.fns if isinstance(src, kopf_patch) else []) + list(fns)

        @property
        def metadata(self) -> Any:
            return MetaPatch(self)

        meta = metadata

        @property
        def spec(self) -> Any:
            return patches.SpecPatch(self)

        @property
        def status(self) -> Any:
            return patches.StatusPatch(self)

    return Body, Patch


def _kopf_as_known() -> str | None:
    """What of kopf's Body and Patch is not as :func:`_classes` expects, if anything."""
    import inspect

    bodies = importlib.import_module(KOPF_BODIES)
    patches = importlib.import_module(KOPF_PATCHES)
    expected = {
        "Body": (bodies.Body, ("self._meta = Meta(self)", "self._status = Status(self)")),
        "Meta": (bodies.Meta, ("self._labels", "self._annotations")),
        "Patch": (patches.Patch, ("self._meta = MetaPatch(self)", "self._original = body")),
        "MetaPatch": (patches.MetaPatch, ("self._labels", "self._annotations")),
    }
    for name, (cls, lines) in expected.items():
        try:
            source = inspect.getsource(cls.__init__)
        except (OSError, TypeError):  # no source shipped: nothing to compare with
            return f"the source of kopf's {name}.__init__ is not there to check"
        if not all(line in source for line in lines):
            return f"kopf's {name}.__init__ no longer reads as expected"
    return None


def install() -> bool:
    """Make kopf build its per-event ``Body`` and ``Patch`` without cycles; whether it does."""
    bodies = importlib.import_module(KOPF_BODIES)
    patches = importlib.import_module(KOPF_PATCHES)
    if getattr(bodies.Body, "_visionr1_acyclic", False):
        return True
    problem = _kopf_as_known()
    if problem is not None:
        log.warning(
            "kopf's event wrappers changed (%s): keeping them as they are "
            "(the operator works, with more work for the garbage collector)",
            problem,
        )
        return False
    body, patch = _classes()
    body._visionr1_acyclic = patch._visionr1_acyclic = True
    bodies.Body, patches.Patch = body, patch
    return True
