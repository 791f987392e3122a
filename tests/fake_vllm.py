"""A stand-in for the ``vllm`` module with the two names the vLLM backend uses (``LLM`` and
``SamplingParams``), in vLLM's shapes, for CPU tests of the engine processes. Each reply says
which GPUs its engine process was given, its arguments and its pid."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, **kwargs: Any) -> None:
        if kwargs["model"] == "does-not-load":
            raise RuntimeError("CUDA out of memory (fake)")
        self.kwargs = kwargs
        self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES")

    def generate(self, inputs: list[dict[str, Any]], params: SamplingParams, use_tqdm: bool) -> Any:
        out = []
        for x in inputs:
            # vLLM's own refusals of a batch for one request, raised before anything is generated.
            if "CUDA-OOM" in x["prompt"]:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
            if "TOO-LONG" in x["prompt"]:
                raise ValueError(
                    "The decoder prompt (length 40000) is longer than the maximum model length "
                    "of 32768. Make sure that `max_model_len` is no smaller than the number of "
                    "text tokens plus multimodal tokens."
                )
        for x in inputs:
            images = x.get("multi_modal_data", {}).get("image", [])
            reply = {
                "gpus": self.gpus,
                "tp": self.kwargs["tensor_parallel_size"],
                "limit": self.kwargs["limit_mm_per_prompt"],
                "seed": params.seed,
                "prompt": x["prompt"],
                "image_sizes": [im.size for im in images],
                "pid": os.getpid(),
            }
            n = min(params.max_tokens, 5)
            out.append(
                SimpleNamespace(
                    prompt_token_ids=list(range(len(x["prompt"]))),
                    outputs=[
                        SimpleNamespace(
                            text=json.dumps(reply),
                            token_ids=list(range(n)),
                            finish_reason="length" if n == params.max_tokens else "stop",
                        )
                    ],
                )
            )
        return out
