"""Generation with Hugging Face ``generate``: batched, left-padded, CPU or GPU.

Loads a vision-language model with AutoModelForImageTextToText + AutoProcessor; a text-only
model (e.g. a local reasoner stand-in) falls back to AutoModelForCausalLM + AutoTokenizer.
"""

from __future__ import annotations

import os
from typing import Any

from visionr1_jobs.config import Sampling, local_base_model, model_revision
from visionr1_jobs.generation.base import (
    ChatRequest,
    Generation,
    GenerationBackend,
    content_parts,
    load_image,
)


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


class TransformersBackend(GenerationBackend):
    kind = "transformers"
    process_bound = True  # torch's global RNG and this process's accelerator

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_name = str(model)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = _torch_dtype(dtype, self.device)
        model = local_base_model(model)  # the fetched base model, on a cluster
        revision = model_revision(model)  # spec.baseModel.revision for the base model
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, dtype=torch_dtype, revision=revision
            )
            self.processor = AutoProcessor.from_pretrained(model, revision=revision)
            self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
            self.multimodal = True
        except ValueError:  # not an image-text-to-text architecture
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch_dtype, revision=revision
            )
            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(
                model, revision=revision
            )
            self.multimodal = False
        self.model.to(self.device).eval()
        # Decoder-only batching: pad on the left so every prompt ends where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)

    def _render(self, req: ChatRequest) -> tuple[str, list[Any]]:
        if req.images and not self.multimodal:
            raise ValueError(f"model {self.model_name} is text-only but the request has images")
        if self.multimodal:
            messages = content_parts(req, lambda _p: {"type": "image"})
        else:
            messages = req.messages
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return text, [load_image(p) for p in req.images]

    def _batch(
        self, reqs: list[ChatRequest], sampling: Sampling, seed: int | None
    ) -> list[Generation]:
        import torch

        rendered = [self._render(r) for r in reqs]
        texts = [t for t, _ in rendered]
        images = [im for _, ims in rendered for im in ims]
        if self.multimodal:
            inputs = self.processor(
                text=texts, images=images or None, padding=True, return_tensors="pt"
            )
        else:
            inputs = self.tokenizer(
                texts, padding=True, return_tensors="pt", add_special_tokens=False
            )
        inputs = inputs.to(self.device)
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": not greedy}
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:  # silence the generation_config's sampling defaults under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for i, row in enumerate(out[:, prompt_len:].tolist()):
            n, finished = len(row), False
            for j, tok in enumerate(row):
                if tok in self._eos:
                    n, finished = j, True
                    break
            results.append(
                Generation(
                    text=self.tokenizer.decode(row[:n], skip_special_tokens=True),
                    prompt_tokens=int(prompt_tokens[i]),
                    completion_tokens=n + (1 if finished else 0),
                    finish_reason="stop" if finished else "length",
                )
            )
        return results

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        results: list[Generation] = []
        for start in range(0, len(requests), self.batch_size):
            seed = None if sampling.seed is None else sampling.seed + start
            results += self._batch(requests[start : start + self.batch_size], sampling, seed)
        return results

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
