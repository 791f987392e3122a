"""vLLM's offline engine on all of a pod's GPUs (GPU image only; vLLM loads only in the engines).

Layout: the pod's GPUs (``CUDA_VISIBLE_DEVICES``, else every device torch sees) are cut into
``data_parallel_size`` groups of ``tensor_parallel_size`` GPUs. Unset, tensor parallel is the
whole pod (one engine) and data parallel is GPUs / tensor parallel, so ``tensorParallelSize: 1``
on an 8-GPU pod runs eight engines, one per GPU. Each engine is ``vllm.LLM`` in its own process
(spawned with its group in ``CUDA_VISIBLE_DEVICES``); every batch is split between the engines in
contiguous slices and the results are put back in order. ``close()`` ends those processes, so
the engines' GPU memory is free again when it returns (the eval stage closes the backend between
checkpoints; freeing an ``LLM`` inside a long-lived process does not reliably release it).

Follows vLLM's documented offline API: ``LLM(model=…, tensor_parallel_size=…, seed=…,
max_model_len=…, limit_mm_per_prompt={"image": n})`` and
``LLM.generate([{"prompt": text, "multi_modal_data": {"image": [PIL…]}}], SamplingParams(…))``.
The prompt text comes from the model's own chat template (its Hugging Face processor, in this
process), so the transformers and vLLM backends see byte-identical prompts. Per-request seeds
come from the sampling parameters; the engine ``seed`` covers requests sent without one.

:func:`engine_args` and :func:`engine_layout` are pure: the tests check what each config asks
vLLM for without importing it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from visionr1_jobs.config import Sampling, local_base_model, model_revision
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation.base import (
    ChatRequest,
    Generation,
    GenerationBackend,
    content_parts,
    load_image,
)

#: seconds an engine gets to exit after close() before it is killed
CLOSE_TIMEOUT_S = 120.0
_ENV_LOCK = threading.Lock()


def pod_gpus(
    env: Mapping[str, str] | None = None, device_count: Callable[[], int] | None = None
) -> list[str]:
    """The GPU ids this pod may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``0..n-1`` for the
    ``n`` devices torch sees (in a Kubernetes pod: the GPUs its resources requested)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [d.strip() for d in visible.split(",") if d.strip()]
    if device_count is None:

        def device_count() -> int:
            import torch

            return torch.cuda.device_count()

    return [str(i) for i in range(device_count())]


def engine_layout(
    gpus: list[str], tensor_parallel_size: int | None, data_parallel_size: int | None
) -> list[list[str]]:
    """The GPU ids of each engine. Tensor parallel defaults to all GPUs divided by the data
    parallel size (all GPUs when that is unset too); data parallel to GPUs / tensor parallel."""
    n = len(gpus)
    if n == 0:
        raise InvalidInput(
            "backend kind 'vllm' needs a GPU and this pod has none (no CUDA device visible); "
            "request GPUs in the stage's resources, or use kind 'transformers'"
        )
    tp = tensor_parallel_size
    dp = data_parallel_size
    if tp is None:
        tp = n // (dp or 1)
        if tp < 1:
            raise InvalidInput(
                f"backend.dataParallelSize={dp} is more engines than the pod's {n} GPU(s)"
            )
    if dp is None:
        dp = n // tp
    if tp * dp > n or dp < 1:
        raise InvalidInput(
            f"backend.tensorParallelSize={tp} × dataParallelSize={dp} needs {tp * max(dp, 1)} "
            f"GPUs but the pod has {n} ({','.join(gpus)}); lower them or request more GPUs"
        )
    if tp * dp < n:
        print(
            f"[vllm] {n - tp * dp} of the pod's {n} GPUs stay idle "
            f"(tensorParallelSize={tp} × dataParallelSize={dp})",
            flush=True,
        )
    return [gpus[i * tp : (i + 1) * tp] for i in range(dp)]


def engine_args(
    model: str,
    *,
    tensor_parallel_size: int,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    max_images_per_prompt: int = 4,
    max_model_len: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for one engine."""
    model = local_base_model(model)  # the fetched base model, on a cluster
    kwargs: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
        "limit_mm_per_prompt": {"image": max_images_per_prompt},
    }
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    revision = model_revision(model)  # spec.baseModel.revision, for the base model only
    if revision:
        kwargs["revision"] = kwargs["tokenizer_revision"] = revision
    return kwargs


def sampling_args(sampling: Sampling) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams`` for a batch."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
    }


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


# --------------------------------------------------------------------------- engine process


def _engine_main(conn: Any, module: str, kwargs: dict[str, Any]) -> None:
    """One engine: build ``<module>.LLM(**kwargs)``, then serve batches until told to stop."""
    try:
        vllm = importlib.import_module(module)
        llm = vllm.LLM(**kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.environ.get("CUDA_VISIBLE_DEVICES")))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            break
        if msg is None:
            break
        prompts, sampling = msg
        try:
            inputs = []
            for p in prompts:
                one: dict[str, Any] = {"prompt": p["prompt"]}
                if p["images"]:
                    one["multi_modal_data"] = {"image": [load_image(x) for x in p["images"]]}
                inputs.append(one)
            outputs = llm.generate(inputs, vllm.SamplingParams(**sampling), use_tqdm=False)
            conn.send(
                (
                    "ok",
                    [
                        (
                            o.outputs[0].text,
                            len(o.prompt_token_ids or []),
                            len(o.outputs[0].token_ids),
                            o.outputs[0].finish_reason,
                        )
                        for o in outputs
                    ],
                )
            )
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    del llm
    conn.close()


class EngineBatchError(RuntimeError):
    """vLLM raised for a batch while its engine lives on: the batch held a request it would not
    take (a prompt over ``max_model_len``, an image it cannot read or place). Callers may
    bisect the batch to find that request (:mod:`visionr1_jobs.synthesis.failures`)."""


class _Engine:
    def __init__(self, gpus: list[str], module: str, kwargs: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited CUDA state
        self.gpus = gpus
        self.conn, child = ctx.Pipe()
        # Not a daemon: vLLM starts its own worker processes for tensor parallel.
        self.proc = ctx.Process(target=_engine_main, args=(child, module, kwargs), daemon=False)
        # The child reads its GPUs from the environment it is spawned with.
        with _ENV_LOCK:
            before = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            try:
                self.proc.start()
            finally:
                if before is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before
        child.close()

    def reply(self, batch: bool = False) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"vLLM engine on GPU(s) {','.join(self.gpus)} died (exit code {self.proc.exitcode})"
            ) from None
        if status == "error":
            kind = EngineBatchError if batch else RuntimeError
            raise kind(f"vLLM engine on GPU(s) {','.join(self.gpus)} failed:\n{payload}")
        return payload

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(CLOSE_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()


class VLLMBackend(GenerationBackend):
    kind = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_images_per_prompt: int = 4,
        max_model_len: int | None = None,
        seed: int = 0,
        gpus: list[str] | None = None,
        processor: Any = None,
        engine_module: str = "vllm",
    ) -> None:
        if engine_module == "vllm" and importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "backend kind 'vllm' needs vLLM, which is only in the GPU trainer image; "
                "use kind 'transformers' (or 'auto') elsewhere"
            )
        self.model_name = str(model)
        if processor is None:
            from transformers import AutoProcessor

            source = local_base_model(model)  # the fetched base model, on a cluster
            processor = AutoProcessor.from_pretrained(source, revision=model_revision(source))
        self.processor = processor
        self.layout = engine_layout(
            pod_gpus() if gpus is None else gpus, tensor_parallel_size, data_parallel_size
        )
        self.kwargs = engine_args(
            self.model_name,
            tensor_parallel_size=len(self.layout[0]),
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_images_per_prompt=max_images_per_prompt,
            max_model_len=max_model_len,
            seed=seed,
        )
        self.engines: list[_Engine] = []
        try:
            # Start every engine, then wait: they load the weights in parallel.
            self.engines = [_Engine(g, engine_module, self.kwargs) for g in self.layout]
            for engine in self.engines:
                engine.reply()
        except BaseException:
            self.close()
            raise

    def _prompt(self, req: ChatRequest) -> dict[str, Any]:
        messages = content_parts(req, lambda _p: {"type": "image"})
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return {"prompt": text, "images": list(req.images)}

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        if not self.engines:
            raise RuntimeError("the vLLM backend is closed")
        prompts = [self._prompt(r) for r in requests]
        args = sampling_args(sampling)
        slices = split(len(prompts), len(self.engines))
        busy = []
        for engine, (a, b) in zip(self.engines, slices, strict=True):
            if b > a:
                engine.conn.send((prompts[a:b], args))
                busy.append(engine)
        replies: list[Any] = []
        error: BaseException | None = None
        for engine in busy:  # read every reply, so no engine's answer is left in its pipe
            try:
                replies.extend(engine.reply(batch=True))
            except RuntimeError as exc:
                # A dead engine outranks a refused batch: bisecting cannot help with it.
                if error is None or isinstance(error, EngineBatchError):
                    error = exc
        if error is not None:
            raise error
        return [
            Generation(
                text=text,
                prompt_tokens=n_prompt,
                completion_tokens=n_completion,
                finish_reason="length" if finish == "length" else "stop",
            )
            for text, n_prompt, n_completion, finish in replies
        ]

    def close(self) -> None:
        """End the engine processes (their GPU memory is free when this returns)."""
        engines, self.engines = self.engines, []
        for engine in engines:
            engine.close()
