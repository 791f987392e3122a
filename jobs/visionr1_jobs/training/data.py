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


def sft_lengths(rows: Sequence[dict[str, Any]], processor: Any) -> list[int]:
    """Tokens of each SFT row as TRL's SFTTrainer feeds it to the model: prompt (chat template,
    image placeholders expanded to the processor's image tokens) plus completion, untruncated.

    The text goes through TRL's own ``prepare_multimodal_messages`` and ``apply_chat_template``
    and the real tokenizer, exactly as TRL's vision collator prepares a batch; each image counts
    the tokens the processor gives an image of its size (``_get_num_multimodal_tokens``, the
    method vLLM sizes prompts with), read from the file header without decoding the pixels, so a
    200K-row set is measured in minutes. A processor without that method is measured by running
    TRL's collator itself on every row (slower, same numbers).
    """
    from PIL import Image
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    count = getattr(processor, "_get_num_multimodal_tokens", None)
    image_token = getattr(processor, "image_token", None)
    if count is None or image_token is None:
        return _sft_lengths_by_collator(rows, processor)
    tok = getattr(processor, "tokenizer", processor)
    prompts, completions, extra = [], [], []
    for row in rows:
        sizes = []
        for path in row["images"]:
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        example = {
            "prompt": prepare_multimodal_messages(row["prompt"], images=list(row["images"])),
            "completion": prepare_multimodal_messages(row["completion"]),
        }
        text = apply_chat_template(example, processor)
        prompts.append(text["prompt"])
        completions.append(text["completion"])
        per_image = count(image_sizes=sizes).num_image_tokens if sizes else []
        # The template writes one placeholder token per image; the processor repeats it.
        extra.append(sum(per_image) - len(sizes))
    enc_p = tok(prompts, add_special_tokens=False)["input_ids"]
    enc_c = tok(completions, add_special_tokens=False)["input_ids"]
    return [len(p) + len(c) + e for p, c, e in zip(enc_p, enc_c, extra, strict=True)]


def _sft_lengths_by_collator(rows: Sequence[dict[str, Any]], processor: Any) -> list[int]:
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collate = DataCollatorForVisionLanguageModeling(processor, max_length=None)
    lengths = []
    for row in rows:
        example = dict(row)
        example["images"] = [Image.open(p).convert("RGB") for p in row["images"]]
        batch = collate([example])
        lengths.append(int(batch["attention_mask"].sum()))
    return lengths


def drop_long_sft_rows(
    rows: list[dict[str, Any]], ids: Sequence[str], processor: Any, max_length: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows whose whole sequence fits ``max_length`` tokens, and one record per dropped row
    (id, tokens, reason).

    Truncating would cut the answer off the end of the completion (the part SFT trains on) and
    teach the model to stop mid-thought, so a row that does not fit is left out, never cut.
    """
    lengths = sft_lengths(rows, processor)
    kept, dropped = [], []
    reason = f"longer than params.maxLength={max_length} tokens (text + image tokens)"
    for row, row_id, n in zip(rows, ids, lengths, strict=True):
        if n <= max_length:
            kept.append(row)
        else:
            dropped.append({"id": row_id, "tokens": n, "reason": reason})
    if dropped:
        log.warning(
            "sft: dropped %d of %d rows %s (longest: %d tokens); raise params.maxLength to keep "
            "them",
            len(dropped),
            len(rows),
            reason,
            max(lengths),
        )
    if not kept:
        raise InvalidInput(
            f"every one of the {len(rows)} SFT rows is {reason} (shortest: {min(lengths)} "
            "tokens); raise params.maxLength"
        )
    return kept, dropped
