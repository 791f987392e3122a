"""Which trainer images can read the stage configs this operator writes.

The operator writes each stage's config (``visionr1_jobs.config.ResolvedStageConfig``) with its
config schema, its version and its parameters' defaults; a trainer image from
``MIN_TRAINER_VERSION`` on reads configs of any newer writer as long as the fields it does not
know are at their defaults. An older trainer image would refuse every config (exit 65), and a
trainer of a later major version may have dropped fields: both are refused at admission, where
the image's tag says its version. Tags that are no version (``latest``, ``e2e``, a bare digest)
are not checked here; the stage program itself then refuses a config it cannot read, naming the
field and the trainer version that knows it.
"""

from __future__ import annotations

import re

from visionr1_jobs.config import CONFIG_SCHEMA, package_version
from visionr1_operator.api import VisionR1Run
from visionr1_operator.policy import images

#: The first trainer version whose stage programs read ``schemaVersion``/``paramDefaults`` and
#: ignore a newer writer's fields left at their defaults.
MIN_TRAINER_VERSION = (0, 1, 0)

#: The Failed condition's reason of a run refused for its trainer image's version.
REASON = "IncompatibleTrainerImage"

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:[-+.].*)?$")


def image_version(image: str) -> tuple[int, int, int] | None:
    """The version an image's tag names (``...:0.2.1``, ``...:v0.2.1-cpu``), or None."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    match = _VERSION.match(last.rsplit(":", 1)[1])
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _parse(version: str) -> tuple[int, int, int] | None:
    match = _VERSION.match(version)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def supported_range(operator_version: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[lowest, above highest) trainer version this operator's configs work with."""
    mine = _parse(operator_version or package_version()) or MIN_TRAINER_VERSION
    return MIN_TRAINER_VERSION, (mine[0] + 1, 0, 0)


def _text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def trainer_problems(run: VisionR1Run, operator_version: str | None = None) -> list[str]:
    """A problem per trainer image (spec.images.trainer, spec.stages.*.image) whose tag names a
    version outside :func:`supported_range`."""
    low, high = supported_range(operator_version)
    mine = operator_version or package_version()
    out = []
    for path, image in images(run).items():
        version = image_version(image)
        if version is None or low <= version < high:
            continue
        out.append(
            f"{path}: trainer image {image!r} is visionr1 {_text(version)}; this operator "
            f"(visionr1 {mine}, config schema {CONFIG_SCHEMA}) writes stage configs that trainer "
            f"images >= {_text(low)} and < {_text(high)} read: use a trainer image of such a "
            "version (e.g. the chart's appVersion)"
        )
    return out
