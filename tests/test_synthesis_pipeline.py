"""Describer and reasoner pipelined across chunks: against a local OpenAI-compatible server that
takes its time, the reasoner of chunk i runs while the describer does chunk i+1 (wall time near
the slower phase per chunk, not the sum), the chunks and their rows come out as they do one
teacher at a time, and the reasoner's API timeout fits a 16K-token chain of thought."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Reply, chat_completion

from visionr1_jobs.config import (
    Backend,
    InputLocation,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.data.io import read_records

N_ROWS, PER_CHUNK = 16, 4
STEP_S = 0.25  # each describer request (two per row), so the describer phase of a chunk ~0.5 s
REASON_S = 0.5  # each reasoner request


class Teachers:
    """Serves model 'describer' and model 'reasoner', each request after its delay, and logs
    (model, start, end) of every request."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()
        self.delays = {"reasoner": REASON_S, "describer": STEP_S}
        self.refuse_reasoner_after: int | None = None  # then answer 401 (a revoked key)
        self.reasoned = 0
        self.http = ChatServer(self.respond)

    def respond(self, path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Reply:
        t0 = time.monotonic()
        model = body["model"]
        if model == "reasoner":
            with self.lock:
                self.reasoned += 1
                refuse = (
                    self.refuse_reasoner_after is not None
                    and self.reasoned > self.refuse_reasoner_after
                )
            if refuse:
                return 401, {"error": {"message": "key revoked", "code": "invalid_api_key"}}, {}
        time.sleep(self.delays[model])
        text = (
            "<think> Three circles. </think><answer> Final Answer:3 </answer>"
            if model == "reasoner"
            else "The image shows three red circles."
        )
        with self.lock:
            self.log.append((model, t0, time.monotonic()))
        usage = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
        return 200, chat_completion(model, text, usage), {}


@pytest.fixture
def teachers() -> Iterator[Teachers]:
    srv = Teachers()
    yield srv
    srv.http.close()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root / "toy", n=N_ROWS, seed=2, n_rl=1, n_bench=1)
    return root / "toy" / "train"


def _params(url: str, **kw: Any) -> SynthesisParams:
    return SynthesisParams(
        describer=Teacher(
            backend=Backend(kind="openai", base_url=url, model="describer", max_retries=0),
            sampling=Sampling(max_tokens=64),
        ),
        reasoner=Teacher(
            backend=Backend(kind="openai", base_url=url, model="reasoner", max_retries=0),
            sampling=Sampling(max_tokens=64),
        ),
        rows_per_shard=PER_CHUNK,
        **kw,
    )


def _run(ws: Path, toy: Path, url: str, pipeline: bool) -> float:
    from visionr1_jobs.stages import synthesis

    cfg = ResolvedStageConfig(
        stage="synthesis",
        workspace=str(ws),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path=str(toy), format="toy")},
        params=_params(url, pipeline=pipeline).dump(),
    )
    t0 = time.monotonic()
    assert synthesis.run(cfg) is not None
    return time.monotonic() - t0


def _overlaps(log: list[tuple[str, float, float]]) -> int:
    """Pairs of a reasoner request and a describer request in flight at the same time."""
    reasoner = [(a, b) for m, a, b in log if m == "reasoner"]
    describer = [(a, b) for m, a, b in log if m == "describer"]
    return sum(1 for a, b in reasoner for c, d in describer if a < d and c < b)


def test_the_reasoner_of_one_chunk_runs_while_the_describer_does_the_next(
    tmp_path: Path, toy: Path, teachers: Teachers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")  # no MLflow: only the teachers' time counts
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    chunks = N_ROWS // PER_CHUNK
    in_turn = _run(tmp_path / "in-turn", toy, teachers.http.url, pipeline=False)
    assert _overlaps(teachers.log) == 0
    teachers.log.clear()
    pipelined = _run(tmp_path / "pipelined", toy, teachers.http.url, pipeline=True)
    # Each chunk's reasoner requests overlapped the next chunk's describer requests.
    assert _overlaps(teachers.log) >= (chunks - 1) * PER_CHUNK
    # In turn: chunks × (describer + reasoner). Pipelined: about the slower phase per chunk,
    # plus one of each at the ends, (chunks + 1) × 0.5 s here against chunks × 1.0 s: it saves
    # (chunks - 1) × the faster phase. Asked for half of that, as both runs carry the same
    # per-request overhead (and a busy machine's noise).
    phase = 2 * STEP_S
    assert in_turn >= chunks * (phase + REASON_S)
    saved = in_turn - pipelined
    assert saved >= 0.5 * (chunks - 1) * min(phase, REASON_S), (pipelined, in_turn)
    print(f"synthesis {chunks} chunks: in turn {in_turn:.2f} s, pipelined {pipelined:.2f} s")

    # The same chunks, rows and order either way.
    for a, b in zip(
        sorted((tmp_path / "in-turn" / "synthesis").glob("shard-*.parquet")),
        sorted((tmp_path / "pipelined" / "synthesis").glob("shard-*.parquet")),
        strict=True,
    ):
        assert a.name == b.name
        ra, rb = read_records(a), read_records(b)
        assert [r.id for r in ra] == [r.id for r in rb]
        assert [r.response for r in ra] == [r.response for r in rb]
    ids = [r.id for r in read_records(tmp_path / "pipelined" / "synthesis")]
    assert ids == [r.id for r in read_records(toy)]


def test_the_reasoners_api_timeout_fits_a_16k_token_chain_of_thought() -> None:
    from visionr1_jobs.generation import get_backend
    from visionr1_jobs.stages.synthesis import _teachers, can_overlap, reasoner_backend

    params = _params("http://127.0.0.1:9/v1")
    assert reasoner_backend(params).timeout_s == 1800.0
    made: list[Any] = []

    def factory(backend: Backend, default_model: str | None) -> Any:
        made.append(get_backend(backend, default_model))
        return made[-1]

    _, _, backends, overlap = _teachers(params, None, factory)
    assert [b.model for b in made] == ["describer", "reasoner"] and overlap
    assert [b.timeout_s for b in made] == [600.0, 1800.0]
    # A timeout set in the manifest is kept.
    own = params.model_copy(deep=True)
    own.reasoner.backend.timeout_s = 300.0
    assert reasoner_backend(own).timeout_s == 300.0

    class Local:
        process_bound = True

    class Api:
        reentrant = True

    local, api = Local(), Api()
    assert can_overlap(api, api) and can_overlap(local, api) and can_overlap(api, Api())
    assert not can_overlap(local, local) and not can_overlap(local, Local())


def test_a_failure_mid_pipeline_keeps_the_finished_chunks_and_a_rerun_completes_them(
    tmp_path: Path, toy: Path, teachers: Teachers, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.contract import sha256_file

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    teachers.delays = {"reasoner": 0.05, "describer": 0.0}
    reference = tmp_path / "reference"
    _run(reference, toy, teachers.http.url, pipeline=True)
    # The reasoner's key is revoked in the third chunk, while the describer is on the fourth.
    teachers.reasoned, teachers.refuse_reasoner_after = 0, 2 * PER_CHUNK
    with pytest.raises(Exception, match="401"):
        _run(tmp_path / "ws", toy, teachers.http.url, pipeline=True)
    out = tmp_path / "ws" / "synthesis"
    written = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert written == ["shard-00000-00000.parquet", "shard-00000-00001.parquet"]  # in order
    before = {n: sha256_file(out / n) for n in written}
    teachers.refuse_reasoner_after = None
    teachers.reasoned = 0
    _run(tmp_path / "ws", toy, teachers.http.url, pipeline=True)
    assert teachers.reasoned == N_ROWS - 2 * PER_CHUNK  # only the unfinished chunks again
    assert {n: sha256_file(out / n) for n in written} == before
    got = read_records(out)
    want = read_records(reference / "synthesis")
    assert [(r.id, r.response) for r in got] == [(r.id, r.response) for r in want]
