"""Pipeline samples → the datasets TRL trains on.

SFT: conversational prompt/completion with images (``prompt``: the user turn with one image
placeholder per image and the question; ``completion``: the assistant's
``<think>…</think><answer> Final Answer:X </answer>``; ``images``: the files). GRPO: ``prompt``
(optional system turn + user turn), ``images``, and the reward's columns ``answer`` and
``choices``. Images stay files on disk: the ``images`` column is an ``Image`` feature over paths,
decoded lazily per batch, never copied into the dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.data.record import Sample

log = logging.getLogger(__name__)


def user_turn(sample: Sample) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    return {"role": "user", "content": content}


def sft_rows(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Prompt/completion rows; every sample must carry its ``response`` (the training target)."""
    rows = []
    for i, s in enumerate(samples):
        if not s.response or not s.response.strip():
            raise InvalidInput(
                f"SFT data row {i} (id {s.id!r}) has no response to train on; the SFT input must "
                "be the filter's output or a dataset with assistant answers (e.g. sharegpt "
                "Vision-R1-cold)"
            )
        rows.append(
            {
                "prompt": [user_turn(s)],
                "completion": [
                    {"role": "assistant", "content": [{"type": "text", "text": s.response}]}
                ],
                "images": list(s.images),
            }
        )
    return rows


def grpo_rows(samples: Sequence[Sample], system_prompt: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in samples:
        prompt: list[dict[str, Any]] = []
        if system_prompt:
            prompt.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        prompt.append(user_turn(s))
        rows.append(
            {
                "prompt": prompt,
                "images": list(s.images),
                "answer": s.answer,
                "choices": s.choices,
                "id": s.id,
            }
        )
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` whose ``images`` column decodes the files lazily."""
    from datasets import Dataset, Image, Sequence

    if not rows:
        raise InvalidInput("no training rows left (empty dataset, or every prompt filtered out)")
    ds = Dataset.from_list(rows)
    if "images" in ds.column_names:
        ds = ds.cast_column("images", Sequence(Image()))
    return ds


def prompt_lengths(rows: Sequence[dict[str, Any]], processor: Any) -> list[int]:
    """Prompt tokens of each GRPO row as the model sees them (image placeholders expanded)."""
    from PIL import Image

    lengths = []
    for row in rows:
        text = processor.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        images = [Image.open(p).convert("RGB") for p in row["images"]] or None
        enc = processor(text=[text], images=images, return_tensors="np")
        lengths.append(int(enc["input_ids"].shape[1]))
    return lengths


def drop_long_prompts(
    rows: list[dict[str, Any]], processor: Any, max_prompt_length: int
) -> tuple[list[dict[str, Any]], int]:
    """Rows whose prompt fits ``max_prompt_length`` tokens, and how many were dropped.

    TRL no longer truncates prompts (and truncating would cut image tokens), so too-long
    problems are left out and counted instead.
    """
    lengths = prompt_lengths(rows, processor)
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= max_prompt_length]
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning(
            "dropped %d of %d prompts longer than params.maxPromptLength=%d tokens (longest: %d)",
            dropped,
            len(rows),
            max_prompt_length,
            max(lengths),
        )
    return kept, dropped
