"""Why a Job's pods are not created: its ``FailedCreate`` Events, as a reason and a message.

ResourceQuota, Pod Security admission and LimitRange judge pods, not Jobs: the operator's Job is
accepted and the Job controller's pod creations are refused. The only trace is a Warning Event
``FailedCreate`` on the Job (``Error creating: pods "..." is forbidden: ...``), retried with the
controller's backoff. This module turns the newest such Event into a ``(reason, message)`` pair
(the plan's ``ObservedJob.pod_problem``): the reason names the kind of refusal, the message
quotes what refused (the quota and its numbers, the violated Pod Security rules, the LimitRange
bound) and the run's field to change. Pure: the caller lists the Events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

FAILED_CREATE = "FailedCreate"
# (reason in the run's condition and Event, what refused)
QUOTA = "QuotaExceeded"
POD_SECURITY = "PodSecurity"
LIMIT_RANGE = "LimitRange"
OTHER = "PodCreateRefused"

_FORBIDDEN = re.compile(r'pods "[^"]*" is forbidden: (?P<why>.*)$', re.DOTALL)
_QUOTA = re.compile(r"exceeded quota: (?P<quota>[^,]+), (?P<numbers>.*)$", re.DOTALL)
_FAILED_QUOTA = re.compile(r"failed quota: (?P<quota>[^:]+): (?P<what>.*)$", re.DOTALL)
_POD_SECURITY = re.compile(r'violates PodSecurity "(?P<level>[^"]+)": (?P<rules>.*)$', re.DOTALL)
_LIMIT_RANGE = re.compile(
    r"(maximum|minimum) \S+ usage per (Container|Pod|PersistentVolumeClaim)|"
    r"max limit to request ratio per (Container|Pod)"
)


def _field(stage: str, text: str) -> str:
    """The run's field behind a resource named in ``text``."""
    if "gpu" in text:
        what = "gpus"
    elif "memory" in text:
        what = "memory"
    elif "cpu" in text:
        what = "cpu"
    else:
        return f"spec.stages.{stage}.resources"
    return f"spec.stages.{stage}.resources.{what}"


def classify(message: str, stage: str) -> tuple[str, str]:
    """(reason, message for people) of one FailedCreate Event's message."""
    text = " ".join(message.split())
    match = _FORBIDDEN.search(text)
    why = match.group("why") if match else text.removeprefix("Error creating: ")
    if quota := _QUOTA.search(why):
        numbers = quota.group("numbers").replace(": ", " ")
        return QUOTA, (
            f"ResourceQuota {quota.group('quota')} refuses the Job's pods: {numbers}; lower "
            f"{_field(stage, numbers)} or raise the namespace's quota"
        )
    if quota := _FAILED_QUOTA.search(why):
        return QUOTA, (
            f"ResourceQuota {quota.group('quota')} refuses the Job's pods: {quota.group('what')}"
        )
    if ps := _POD_SECURITY.search(why):
        return POD_SECURITY, (
            f"Pod Security {ps.group('level')} of the namespace refuses the Job's pods: "
            f"{ps.group('rules')} (spec.storage.workspaceInit FSGroup runs no root init "
            "container)"
        )
    if _LIMIT_RANGE.search(why):
        return LIMIT_RANGE, (
            f"a LimitRange of the namespace refuses the Job's pods: {why.strip('[]')}; change "
            f"{_field(stage, why)}"
        )
    return OTHER, f"the Job's pods are refused: {why}"


def _when(event: Mapping[str, Any]) -> str:
    series = event.get("series") or {}
    return str(
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def refusal(
    events: Iterable[Mapping[str, Any]], job_uid: str, stage: str
) -> tuple[str, str] | None:
    """The newest FailedCreate of the Job ``job_uid`` among ``events`` (a list of core/v1
    Events), classified; None when there is none (the pods were not refused)."""
    mine = [
        e
        for e in events
        if e.get("reason") == FAILED_CREATE
        and (e.get("involvedObject") or {}).get("kind") == "Job"
        and (not job_uid or (e.get("involvedObject") or {}).get("uid") == job_uid)
    ]
    if not mine:
        return None
    newest = max(mine, key=_when)
    return classify(str(newest.get("message") or ""), stage)


__all__ = ["FAILED_CREATE", "LIMIT_RANGE", "POD_SECURITY", "QUOTA", "classify", "refusal"]
