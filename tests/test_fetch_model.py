"""``python -m visionr1_jobs.fetch_model``, the one writer of a hub model's folder of the model
cache, on a real filesystem with huggingface_hub's downloader replaced by a fake one that writes
files (the hub is not reached): whole or nothing, once, and safe when two fetch at once."""

from __future__ import annotations

import errno
import fcntl
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from visionr1_jobs.config import FETCH_MARKER
from visionr1_jobs.fetch_model import SNAPSHOT, fetch, main

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
COMMIT = "c" * 40
FILES = {"config.json": '{"model_type": "qwen2_5_vl"}', "model.safetensors": "w" * 1000}


class FakeHub:
    """Stands in for huggingface_hub.model_info and snapshot_download: counts the downloads,
    writes FILES (and the hub's own bookkeeping folder) into local_dir."""

    def __init__(self, delay: float = 0.0, fail_after: str | None = None) -> None:
        self.downloads: list[dict[str, Any]] = []
        self.resolved: list[str | None] = []
        self.delay = delay
        self.fail_after = fail_after
        self.barrier: threading.Barrier | None = None
        self._lock = threading.Lock()

    def model_info(self, repo_id: str, *, revision: str | None = None, **_: Any) -> Any:
        self.resolved.append(revision)
        return SimpleNamespace(sha=COMMIT)

    def snapshot_download(self, repo_id: str, *, revision: str, local_dir: Path, **_: Any) -> str:
        with self._lock:
            self.downloads.append({"repo_id": repo_id, "revision": revision})
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        local = Path(local_dir)
        (local / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        for name, text in FILES.items():
            (local / name).write_text(text)
            if name == self.fail_after:
                raise ConnectionError("connection reset by the hub")
            time.sleep(self.delay)
        return str(local)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def markers(root: Path) -> list[Path]:
    return list(root.rglob(FETCH_MARKER))


def test_a_fetch_downloads_the_whole_model_once(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "main"
    snapshot = fetch(MODEL, "main", dest)
    assert snapshot == dest / SNAPSHOT
    assert {p.name: p.read_text() for p in snapshot.iterdir() if p.name != FETCH_MARKER} == FILES
    # the branch is resolved once and every file comes from that commit
    assert hub.resolved == ["main"]
    assert hub.downloads == [{"repo_id": MODEL, "revision": COMMIT}]
    marker = json.loads((snapshot / FETCH_MARKER).read_text())
    assert (marker["name"], marker["revision"], marker["commit"]) == (MODEL, "main", COMMIT)
    assert sorted(marker["files"]) == sorted(FILES)
    # nothing of the download left beside it
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".partial")) == []
    # a later pod (another run, the next stage) finds it and downloads nothing
    before = snapshot.stat().st_mtime_ns
    assert fetch(MODEL, "main", dest) == snapshot
    assert len(hub.downloads) == 1 and hub.resolved == ["main"]
    assert snapshot.stat().st_mtime_ns == before


def test_a_pinned_commit_is_downloaded_as_it_is(hub: FakeHub, tmp_path: Path) -> None:
    fetch(MODEL, "d" * 40, tmp_path / "key")
    assert hub.resolved == [] and hub.downloads[0]["revision"] == "d" * 40


def test_a_failed_download_leaves_no_model_and_the_next_attempt_completes(
    hub: FakeHub, tmp_path: Path
) -> None:
    dest = tmp_path / "key"
    hub.fail_after = "config.json"
    with pytest.raises(ConnectionError):
        fetch(MODEL, "main", dest)
    assert not (dest / SNAPSHOT).exists()
    assert markers(tmp_path) == []
    hub.fail_after = None
    snapshot = fetch(MODEL, "main", dest)
    assert len(hub.downloads) == 2
    assert markers(tmp_path) == [snapshot / FETCH_MARKER]
    assert (snapshot / "model.safetensors").read_text() == FILES["model.safetensors"]


def test_a_folder_without_the_marker_is_never_taken_for_the_model(
    hub: FakeHub, tmp_path: Path
) -> None:
    dest = tmp_path / "key"
    (dest / SNAPSHOT).mkdir(parents=True)
    (dest / SNAPSHOT / "model.safetensors").write_text("not the model")
    snapshot = fetch(MODEL, "main", dest)
    assert len(hub.downloads) == 1
    assert (snapshot / "model.safetensors").read_text() == FILES["model.safetensors"]


def test_two_pods_fetching_at_once_download_once(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "key"
    hub.delay = 0.2
    got: list[Path] = []
    threads = [
        threading.Thread(target=lambda: got.append(fetch(MODEL, "main", dest))) for _ in "ab"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got == [dest / SNAPSHOT] * 2
    assert len(hub.downloads) == 1  # the second waited on the lock and found the first's
    assert markers(tmp_path) == [dest / SNAPSHOT / FETCH_MARKER]


def test_without_locks_two_fetches_end_with_one_complete_model(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume without working locks (flock answers ENOLCK): both download, each into its own
    folder, the first rename wins and the other discards its copy."""

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dest = tmp_path / "key"
    hub.barrier = threading.Barrier(2)  # both are downloading before either renames
    got: list[Path] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            got.append(fetch(MODEL, "main", dest))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert got == [dest / SNAPSHOT] * 2
    assert len(hub.downloads) == 2
    assert markers(tmp_path) == [dest / SNAPSHOT / FETCH_MARKER]
    assert [p.name for p in dest.iterdir() if p.name.startswith(".partial")] == []
    assert {p.name for p in (dest / SNAPSHOT).iterdir()} == {*FILES, FETCH_MARKER}


def _error(kind: type[Exception]) -> Exception:
    return kind("404", response=SimpleNamespace(headers={}, request=None))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("error", "field"),
    [(RepositoryNotFoundError, "name"), (RevisionNotFoundError, "revision")],
)
def test_no_such_model_or_revision_is_permanent_and_names_the_field(
    error: type[Exception],
    field: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(repo_id: str, **_: Any) -> Any:
        raise _error(error)

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("VISIONR1_TERMINATION_LOG", str(log))
    code = main(["--name", "acme/nope", "--revision", "main", "--dest", str(tmp_path / "key")])
    assert code == 65  # the Job's podFailurePolicy fails the run instead of retrying
    said = log.read_text()
    assert said.startswith(f"spec.baseModel.{field}") and "acme/nope" in said
    assert markers(tmp_path) == []


def test_a_workspace_folder_named_like_the_model_is_not_fetched(
    hub: FakeHub, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    (workspace / "models" / "tiny").mkdir(parents=True)
    args = ["--name", "models/tiny", "--revision", "main", "--dest", str(tmp_path / "key")]
    assert main([*args, "--workspace", str(workspace)]) == 0
    assert hub.downloads == [] and not (tmp_path / "key").exists()
    assert main([*args, "--workspace", str(tmp_path / "empty")]) == 0
    assert len(hub.downloads) == 1 and (tmp_path / "key" / SNAPSHOT / FETCH_MARKER).is_file()


def test_the_stage_loads_the_fetched_folder_only_when_it_is_complete(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.config import InputLocation, ResolvedStageConfig, RunRef
    from visionr1_jobs.contract import input_path
    from visionr1_jobs.generation.vllm_backend import engine_args

    dest = tmp_path / "key"
    snapshot = dest / SNAPSHOT
    monkeypatch.setenv("VISIONR1_BASE_MODEL", MODEL)
    monkeypatch.setenv("VISIONR1_BASE_MODEL_REVISION", "main")
    monkeypatch.setenv("VISIONR1_BASE_MODEL_DIR", str(snapshot))
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    cfg = ResolvedStageConfig(
        stage="sft",
        run=RunRef(namespace="ml", name="r"),
        workspace=str(workspace),
        output_dir="sft",
        base_model=MODEL,
        inputs={
            "model": InputLocation(path=MODEL, format="model"),
            "teacher": InputLocation(path="Qwen/Qwen2.5-VL-72B-Instruct", format="model"),
        },
        params={},
    )
    # not fetched (yet): the hub id, as on a laptop
    assert input_path(cfg, "model") == Path(MODEL)
    fetch(MODEL, "main", dest)
    assert input_path(cfg, "model") == snapshot
    assert input_path(cfg, "teacher") == Path("Qwen/Qwen2.5-VL-72B-Instruct")  # not the base
    args = engine_args(MODEL, tensor_parallel_size=1)
    assert args["model"] == str(snapshot) and "revision" not in args  # a folder has none
    # a folder of the workspace named like the model comes first, as before
    (workspace / MODEL).mkdir(parents=True)
    assert input_path(cfg, "model") == workspace / MODEL


def test_the_module_runs_as_a_program() -> None:
    """What the fetch container runs: the module's entry point, importable without the hub."""
    out = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs.fetch_model", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--revision" in out.stdout
