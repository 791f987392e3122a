"""Synthesis wall time with the describer and the reasoner pipelined across chunks, against one
teacher at a time, on a local OpenAI-compatible server that answers each request after a fixed
delay (the teachers' time; no model runs).

    python benchmarks/synthesis_pipeline.py [--chunks 6] [--rows 8] [--describe-s 0.3]
        [--reason-s 0.6] [--repeats 2]

Each chunk costs the describer two requests per row (pseudo-CoT, then description:
``2 × describe-s`` with the rows in flight together) and the reasoner one (``reason-s``). One at a
time a shard takes about ``chunks × (D + R)``; pipelined about ``D + (chunks - 1) × max(D, R) + R``.
The real stage code runs (openai backends, parquet chunks, no MLflow); the best of ``--repeats``
runs counts (the machine is shared; the stage's own work per chunk, the same in both modes, adds
to both). Prints one JSON object on stdout (the stage's logs go to stderr). Target: pipelined at
least 1.25× faster than in turn at the default delays (the model's bound is 1.71×).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' OpenAI-compatible server

from chat_server import ChatServer, chat_completion  # noqa: E402

from visionr1_jobs.config import (  # noqa: E402
    Backend,
    InputLocation,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)


def serve(describe_s: float, reason_s: float) -> ChatServer:
    def respond(path: str, headers: Any, body: dict[str, Any]) -> Any:
        reasoner = body["model"] == "reasoner"
        time.sleep(reason_s if reasoner else describe_s)
        text = (
            "<think> Three. </think><answer> Final Answer:3 </answer>"
            if reasoner
            else "The image shows three red circles."
        )
        usage = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
        return 200, chat_completion(body["model"], text, usage), {}

    return ChatServer(respond)


def run_once(ws: Path, data: Path, url: str, rows: int, pipeline: bool) -> float:
    from visionr1_jobs.stages import synthesis

    def teacher(model: str) -> Teacher:
        return Teacher(
            backend=Backend(kind="openai", base_url=url, model=model, max_concurrency=64),
            sampling=Sampling(max_tokens=64),
        )

    params = SynthesisParams(
        describer=teacher("describer"),
        reasoner=teacher("reasoner"),
        rows_per_shard=rows,
        pipeline=pipeline,
    )
    cfg = ResolvedStageConfig(
        stage="synthesis",
        workspace=str(ws),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path=str(data), format="toy")},
        params=params.dump(),
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        assert synthesis.run(cfg) is not None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--rows", type=int, default=8, help="rows per chunk")
    ap.add_argument("--describe-s", type=float, default=0.3, help="per describer request")
    ap.add_argument("--reason-s", type=float, default=0.6, help="per reasoner request")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ["RANK"] = "1"  # no MLflow: only the teachers' time and the stage's own work
    os.environ.pop("VISIONR1_SHARDS", None)
    os.environ.pop("JOB_COMPLETION_INDEX", None)
    from visionr1_jobs.toy.dataset import write_toy_dataset

    server = serve(args.describe_s, args.reason_s)
    try:
        with tempfile.TemporaryDirectory(prefix="synth-pipeline-") as tmp:
            root = Path(tmp)
            write_toy_dataset(root / "toy", n=args.chunks * args.rows, seed=1, n_rl=1, n_bench=1)
            best: dict[str, float] = {}
            for r in range(args.repeats):
                for mode in ("in_turn", "pipelined"):
                    s = run_once(
                        root / f"{mode}-{r}",
                        root / "toy" / "train",
                        server.url,
                        args.rows,
                        pipeline=mode == "pipelined",
                    )
                    best[mode] = min(best.get(mode, s), s)
    finally:
        server.close()
    d, r, n = 2 * args.describe_s, args.reason_s, args.chunks
    sum_model = n * (d + r)
    max_model = d + (n - 1) * max(d, r) + r
    print(
        json.dumps(
            {
                "benchmark": "synthesis_pipeline",
                "chunks": n,
                "rows_per_chunk": args.rows,
                "describer_phase_s": d,
                "reasoner_phase_s": r,
                "model_in_turn_s": round(sum_model, 3),
                "model_pipelined_s": round(max_model, 3),
                "in_turn_s": round(best["in_turn"], 3),
                "pipelined_s": round(best["pipelined"], 3),
                "speedup": round(best["in_turn"] / best["pipelined"], 3),
                "pipelined_over_model": round(best["pipelined"] / max_model, 3),
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
