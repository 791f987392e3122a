"""A synthesis pod killed in the middle of a shard (SIGKILL) and restarted: finished chunk
files are left untouched, the half-done chunk is redone cleanly, no row is lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionr1_jobs.config import (
    Backend,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.contract import read_manifest, sha256_file
from visionr1_jobs.data.io import read_records

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a real subprocess: imports MLflow and creates its store (~20 s on 2 cores)
def test_kill_in_the_middle_of_a_shard_then_resume(tmp_path: Path) -> None:
    from visionr1_jobs.stages import synthesis
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=40, seed=9, n_rl=1, n_bench=1)
    toy = Teacher(backend=Backend(kind="toy"), sampling=Sampling(seed=3))
    cfg = ResolvedStageConfig(
        stage="synthesis",
        workspace=str(tmp_path),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path="toy/train", format="toy")},
        params=SynthesisParams(describer=toy, reasoner=toy, rows_per_shard=8).dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="kill"),
    )
    cfg_file = tmp_path / "synthesis.json"
    cfg_file.write_text(cfg.model_dump_json(by_alias=True))
    out = tmp_path / "synthesis"
    chunks = [out / f"shard-00000-0000{c}.parquet" for c in range(5)]

    env = dict(
        os.environ, VISIONR1_TOY_DELAY_S="0.05", JOB_COMPLETION_INDEX="0", VISIONR1_SHARDS="1"
    )
    env["PYTHONPATH"] = str(REPO / "jobs") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionr1_jobs", "synthesis", "--config", str(cfg_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not chunks[0].exists():
            assert proc.poll() is None, "synthesis exited before writing its first chunk"
            assert time.monotonic() < deadline, "no chunk file after 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # 8 rows × 3 requests × 50 ms: mid-way through chunk 1
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = [p for p in chunks if p.exists()]
    assert 1 <= len(finished) < len(chunks)
    assert read_manifest(tmp_path, "synthesis") is None
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in finished}
    # What a pod killed inside the atomic write of the next chunk leaves behind.
    stale = out / f".{chunks[len(finished)].name}.abc123.tmp"
    stale.write_bytes(b"PAR1 half a parquet file")

    manifest = synthesis.run(cfg)  # the restarted pod (no delay)

    assert not stale.exists()
    assert all(p.exists() for p in chunks)
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in finished} == before
    rows = read_records(out)
    inputs = read_records(tmp_path / "toy" / "train")
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) == 40
    assert ids == [s.id for s in inputs]
    assert all(r.response and r.raw["reasoner"] for r in rows)
    assert manifest.rows == {"data": 40}
    assert read_manifest(tmp_path, "synthesis") == manifest
    # The rerun generated only the missing chunks, and the marker says so.
    import json

    marker = json.loads((out / "_shards" / "shard-00000.done.json").read_text())
    assert marker["generated_rows"] == 40 - 8 * len(finished)
    assert [c["sha256"] for c in marker["chunks"]] == [sha256_file(p) for p in chunks]
