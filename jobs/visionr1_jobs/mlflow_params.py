"""MLflow params of a stage run that may be resumed with another config (write-once params)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

CHANGED_TAG = "visionr1.param_changed."
NOTE_TAG = "mlflow.note.content"


def log_params_noting_changes(client: Any, run_id: str, params: dict[str, str]) -> dict[str, Any]:
    """Log ``params`` into ``run_id``; returns the changed ones as ``{key: (first, now)}``.

    MLflow params are write-once, so a resumed run whose config changed cannot overwrite them:
    the first attempt's value stays the param, and each change is recorded as a tag
    ``visionr1.param_changed.<key>`` (``first -> now``) and a line in the run's note, so the run
    page shows that the later attempts ran with other values.
    """
    from mlflow.entities import Param

    before = client.get_run(run_id).data.params
    params = {k: str(v)[:6000] for k, v in params.items()}
    new = [Param(k, v) for k, v in params.items() if k not in before]
    changed = {k: (before[k], v) for k, v in params.items() if k in before and before[k] != v}
    for i in range(0, len(new), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=new[i : i + 100], synchronous=True)
    if changed:
        log.warning(
            "MLflow run %s was started with other values; params keep the first, the changes "
            "are tagged %s*: %s",
            run_id,
            CHANGED_TAG,
            ", ".join(sorted(changed)),
        )
        for key, (first, now) in changed.items():
            client.set_tag(run_id, f"{CHANGED_TAG}{key}"[:250], f"{first} -> {now}"[:5000])
        note = client.get_run(run_id).data.tags.get(NOTE_TAG, "")
        lines = "".join(f"\n- {k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))
        client.set_tag(
            run_id, NOTE_TAG, (note + "\n\nResumed with changed params:" + lines).strip()[:5000]
        )
    return changed
