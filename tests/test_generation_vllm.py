"""The vLLM backend: the engine arguments and GPU layout each config asks for (pure, no vLLM),
the engine processes and their shutdown (with a stand-in vLLM module), and, on a GPU with vLLM
installed, a real engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visionr1_jobs.config import Backend
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation import user
from visionr1_jobs.generation.factory import vllm_options
from visionr1_jobs.generation.vllm_backend import (
    VLLMBackend,
    engine_args,
    engine_layout,
    pod_gpus,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EIGHT = [str(i) for i in range(8)]


class Processor:
    """The one processor method the backend uses: the chat template, rendered plainly."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):  # type: ignore[no-untyped-def]
        assert add_generation_prompt and not tokenize
        parts = []
        for m in messages:
            for p in m["content"] if isinstance(m["content"], list) else [m["content"]]:
                parts.append("<image>" if p.get("type") == "image" else p["text"])
        return "user: " + "".join(parts) + "\nassistant:"


@pytest.mark.parametrize(
    ("tp", "dp", "layout"),
    [
        (None, None, [EIGHT]),  # unset: one engine over the whole pod
        (1, None, [[g] for g in EIGHT]),  # a 7B model: eight engines, one per GPU
        (2, None, [EIGHT[0:2], EIGHT[2:4], EIGHT[4:6], EIGHT[6:8]]),
        (None, 2, [EIGHT[0:4], EIGHT[4:8]]),
        (4, 1, [EIGHT[0:4]]),  # asked for fewer: the rest stay idle (and it says so)
        (3, None, [EIGHT[0:3], EIGHT[3:6]]),
    ],
)
def test_engine_layout_defaults_to_every_gpu_of_the_pod(
    tp: int | None, dp: int | None, layout: list[list[str]]
) -> None:
    assert engine_layout(EIGHT, tp, dp) == layout


def test_engine_layout_refuses_what_the_pod_cannot_hold() -> None:
    with pytest.raises(InvalidInput, match=r"tensorParallelSize=16 .* the pod has 8"):
        engine_layout(EIGHT, 16, None)
    with pytest.raises(InvalidInput, match=r"tensorParallelSize=4 × dataParallelSize=4"):
        engine_layout(EIGHT, 4, 4)
    with pytest.raises(InvalidInput, match="dataParallelSize=9"):
        engine_layout(EIGHT, None, 9)
    with pytest.raises(InvalidInput, match="needs a GPU"):
        engine_layout([], None, None)


def test_pod_gpus_reads_cuda_visible_devices_then_the_device_count() -> None:
    assert pod_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: 8) == ["2", "3"]
    assert pod_gpus({}, lambda: 4) == ["0", "1", "2", "3"]
    assert pod_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: 0) == []


def _stage_backend(example: str, stage: str) -> tuple[Backend, int]:
    from visionr1_operator.api import parse_run

    run = parse_run(yaml.safe_load((EXAMPLES / example).read_text()))
    spec = getattr(run.spec.stages, stage)
    params = spec.params
    backend = params.backend if stage == "eval" else params.describer.backend
    return backend, spec.resources.gpus


def test_the_7b_examples_eval_uses_all_eight_gpus_of_each_pod() -> None:
    backend, gpus = _stage_backend("qwen25vl-7b.yaml", "eval")
    assert backend.kind == "vllm" and gpus == 8
    opts = vllm_options(backend)
    layout = engine_layout([str(i) for i in range(gpus)], opts["tensor_parallel_size"], None)
    assert sorted(g for group in layout for g in group) == EIGHT
    assert len(layout) == 8  # data parallel: a 7B model needs no tensor parallel
    args = engine_args(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        tensor_parallel_size=len(layout[0]),
        gpu_memory_utilization=opts["gpu_memory_utilization"],
        dtype=opts["dtype"],
        max_images_per_prompt=opts["max_images_per_prompt"],
        max_model_len=opts["max_model_len"],
        seed=0,
    )
    assert args == {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "seed": 0,
        "limit_mm_per_prompt": {"image": 4},
        "max_model_len": 32768,
    }


def test_the_72b_describer_is_one_engine_over_the_whole_pod() -> None:
    backend, gpus = _stage_backend("qwen25vl-7b.yaml", "synthesis")
    opts = vllm_options(backend)
    assert engine_layout(EIGHT[:gpus], opts["tensor_parallel_size"], None) == [EIGHT]


def test_every_backend_field_reaches_the_engine() -> None:
    cfg = Backend(
        kind="vllm",
        tensor_parallel_size=2,
        data_parallel_size=3,
        gpu_memory_utilization=0.8,
        dtype="bfloat16",
        max_model_len=20480,
        max_images_per_prompt=6,
    )
    assert vllm_options(cfg) == {
        "tensor_parallel_size": 2,
        "data_parallel_size": 3,
        "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16",
        "max_model_len": 20480,
        "max_images_per_prompt": 6,
    }
    args = engine_args("m", tensor_parallel_size=2, max_model_len=None, max_images_per_prompt=6)
    assert "max_model_len" not in args and args["limit_mm_per_prompt"] == {"image": 6}


def test_engines_run_in_their_own_processes_split_batches_and_exit_on_close(
    tmp_path: Path,
) -> None:
    Image.new("RGB", (6, 4), "red").save(tmp_path / "a.png")
    gen = VLLMBackend(
        "m",
        tensor_parallel_size=1,
        gpus=["0", "1", "2"],
        processor=Processor(),
        engine_module="fake_vllm",
        max_images_per_prompt=2,
    )
    try:
        procs = [e.proc for e in gen.engines]
        assert len(procs) == 3 and all(p.is_alive() for p in procs)
        reqs = [user(f"q{i}", [str(tmp_path / "a.png")] if i % 2 else []) for i in range(7)]
        outs = gen.generate(reqs, temperature=0.6, top_p=0.95, max_tokens=16, seed=11)
        replies = [json.loads(o.text) for o in outs]
        # Contiguous slices 2/2/3, put back in order; each engine sees only its own GPU.
        assert [r["gpus"] for r in replies] == ["0", "0", "1", "1", "2", "2", "2"]
        assert [r["prompt"] for r in replies] == [
            f"user: {'<image>' if i % 2 else ''}q{i}\nassistant:" for i in range(7)
        ]
        assert [r["image_sizes"] for r in replies][:2] == [[], [[6, 4]]]
        assert {r["seed"] for r in replies} == {11} and {r["tp"] for r in replies} == {1}
        assert replies[0]["limit"] == {"image": 2}
        assert len({r["pid"] for r in replies}) == 3 and os.getpid() not in {
            r["pid"] for r in replies
        }
        assert (outs[0].completion_tokens, outs[0].finish_reason) == (5, "stop")
        assert gen.generate([user("x")], max_tokens=3)[0].finish_reason == "length"
    finally:
        gen.close()
    # The engine processes (and with them the GPU memory they held) are gone.
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate([user("x")])


def test_an_engine_that_cannot_load_is_a_clear_error_and_leaves_no_process() -> None:
    import multiprocessing

    with pytest.raises(RuntimeError, match=r"GPU\(s\) 0 failed:[\s\S]*CUDA out of memory"):
        VLLMBackend(
            "does-not-load",
            tensor_parallel_size=1,
            gpus=["0", "1"],
            processor=Processor(),
            engine_module="fake_vllm",
        )
    assert multiprocessing.active_children() == []


@pytest.mark.gpu
def test_a_real_vllm_engine_on_the_tiny_model_frees_its_gpu_memory(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from visionr1_jobs.toy.model import create_tiny_model

    model = tmp_path / "tiny"
    create_tiny_model(model, hidden=256)  # head sizes 64 (text) and 128 (vision): what kernels take
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "a.png")
    free_before, _ = torch.cuda.mem_get_info()
    gen = VLLMBackend(model, gpu_memory_utilization=0.3, max_model_len=2048, dtype="bfloat16")
    try:
        free_loaded, _ = torch.cuda.mem_get_info()
        outs = gen.generate(
            [user("How many circles?", [str(tmp_path / "a.png")]), user("Say hi.")],
            temperature=0.6,
            max_tokens=16,
            seed=1,
        )
        assert len(outs) == 2 and all(0 < o.completion_tokens <= 16 for o in outs)
        assert all(o.prompt_tokens > 0 for o in outs)
    finally:
        gen.close()
    free_after, _ = torch.cuda.mem_get_info()
    print(
        f"vllm tiny engine: engines={len(gen.layout)} free GiB before {free_before / 2**30:.1f}, "
        f"loaded {free_loaded / 2**30:.1f}, after close {free_after / 2**30:.1f}"
    )
    assert free_loaded < free_before - 2**30  # the engine held memory...
    assert free_after > free_before - 2**30  # ...and gave it back on close


def _eval_cfg(ws: Path, batch_size: int) -> object:
    from visionr1_jobs.config import Benchmark, EvalParams, InputLocation, ResolvedStageConfig

    params = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base"],
        max_new_tokens=16,
        retries_missing_answer=0,
        batch_size=batch_size,
    )
    return ResolvedStageConfig(
        stage="eval",
        workspace=str(ws),
        output_dir="eval",
        base_model="m",
        inputs={"checkpoint:base": InputLocation(path="m", format="model")},
        params=params.dump(),
    )


def test_eval_bisects_a_batch_vllm_refused_to_its_bad_rows_and_scores_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM raises for a whole batch when one request is bad (here an image file it cannot read,
    and a prompt over max_model_len): eval records those rows as failed and scores the others."""
    from visionr1_jobs.eval.readers import read_benchmark
    from visionr1_jobs.stages import eval as eval_stage
    from visionr1_jobs.toy.dataset import write_toy_dataset

    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    write_toy_dataset(tmp_path / "toy", n=2, n_bench=8, seed=4)
    rows = read_benchmark("toy", tmp_path / "toy" / "bench").rows
    corrupt = rows[2]["images"][0]
    Path(corrupt).write_bytes(b"not an image")
    long_q = rows[5]["question"]
    batches: list[int] = []

    class Counted(VLLMBackend):
        def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
            batches.append(len(requests))
            for r in requests:  # this row's prompt is too long for the engine
                if r.messages[-1]["content"] == long_q and r.images == rows[5]["images"]:
                    r.messages[-1] = {"role": "user", "content": long_q + " TOO-LONG"}
            return super()._generate(requests, sampling)

    def factory(model: str, params: object) -> VLLMBackend:
        return Counted(
            model,
            tensor_parallel_size=1,
            gpus=["0"],
            processor=Processor(),
            engine_module="fake_vllm",
        )

    man = eval_stage.run(_eval_cfg(tmp_path, batch_size=8), factory)
    assert man is not None
    saved = [
        json.loads(x)
        for x in (tmp_path / "eval" / "base" / "toy.verdicts.jsonl").read_text().splitlines()
    ]
    failed = {r["row_index"]: r["error"] for r in saved if r.get("failed")}
    assert sorted(failed) == [2, 5]
    assert "UnidentifiedImageError" in failed[2] and "maximum model length" in failed[5]
    # Every other row was generated and scored.
    assert all(json.loads(r["response"])["prompt"] for r in saved if not r.get("failed"))
    assert json.loads((tmp_path / "eval" / "base" / "toy.json").read_text())["failed"] == 2
    # One batch of 8, then halves down to the two bad rows alone (not one request per row).
    assert batches[0] == 8 and len(batches) < 2 * 8 and batches.count(1) >= 2


def test_eval_does_not_bisect_an_engine_that_ran_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.stages import eval as eval_stage
    from visionr1_jobs.toy.dataset import write_toy_dataset

    monkeypatch.delenv("VISIONR1_SHARDS", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    write_toy_dataset(tmp_path / "toy", n=2, n_bench=4, seed=4)
    batches: list[int] = []

    class OOM(VLLMBackend):
        def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
            batches.append(len(requests))
            requests[0].messages[-1]["content"] += " CUDA-OOM"
            return super()._generate(requests, sampling)

    def factory(model: str, params: object) -> VLLMBackend:
        return OOM(
            model,
            tensor_parallel_size=1,
            gpus=["0"],
            processor=Processor(),
            engine_module="fake_vllm",
        )

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        eval_stage.run(_eval_cfg(tmp_path, batch_size=4), factory)
    assert batches == [4]  # failed the stage at once (retried by the Job), no bisecting
