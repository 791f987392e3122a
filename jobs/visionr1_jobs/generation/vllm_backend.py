"""vLLM's offline engine (GPU image only; imported only when this backend is chosen).

Follows vLLM's documented offline API: ``LLM(model=…, tensor_parallel_size=…)`` and
``LLM.generate([{"prompt": text, "multi_modal_data": {"image": [PIL…]}}], SamplingParams(…))``.
The prompt text comes from the model's own chat template (via its Hugging Face processor), so
the transformers and vLLM backends see byte-identical prompts.
"""

from __future__ import annotations

import os
from typing import Any

from visionr1_jobs.config import Sampling, model_revision
from visionr1_jobs.generation.base import (
    ChatRequest,
    Generation,
    GenerationBackend,
    content_parts,
    load_image,
)


class VLLMBackend(GenerationBackend):
    kind = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_images_per_prompt: int = 4,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "backend kind 'vllm' needs vLLM, which is only in the GPU trainer image; "
                "use kind 'transformers' (or 'auto') elsewhere"
            ) from exc
        from transformers import AutoProcessor

        self.model_name = str(model)
        revision = model_revision(model)  # spec.baseModel.revision for the base model
        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        kwargs: dict[str, Any] = {
            "model": self.model_name,
            "revision": revision,
            "tokenizer_revision": revision,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": seed,
            "limit_mm_per_prompt": {"image": max_images_per_prompt},
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    def _prompt(self, req: ChatRequest) -> dict[str, Any]:
        messages = content_parts(req, lambda _p: {"type": "image"})
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        prompt: dict[str, Any] = {"prompt": text}
        if req.images:
            prompt["multi_modal_data"] = {"image": [load_image(p) for p in req.images]}
        return prompt

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
        )
        outputs = self.llm.generate([self._prompt(r) for r in requests], params, use_tqdm=False)
        results = []
        for out in outputs:
            best = out.outputs[0]
            results.append(
                Generation(
                    text=best.text,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(best.token_ids),
                    finish_reason="length" if best.finish_reason == "length" else "stop",
                )
            )
        return results

    def close(self) -> None:
        self.llm = None  # the engine's workers exit when it is collected
