"""The one sample record every stage reads and writes.

Synthesis, filter, SFT, GRPO and eval all pass :class:`Sample` around; the public formats are
converted into it by :mod:`visionr1_jobs.data.readers` and it is stored as sharded parquet by
:mod:`visionr1_jobs.data.io`.

Conventions (the contract between stages):

* ``question`` is the complete user text shown to the model *without* image placeholders
  (``<image>`` is stripped on read; the chat template places the image). When the problem is
  multiple choice the options are part of this text as the source wrote them.
* ``choices`` lists the option texts in order when they are known, so that option letter ``A``
  is ``choices[0]``; it is ``None`` for free-form problems or when the options could not be parsed.
* ``answer`` is the ground truth as it should appear after ``Final Answer:`` — for multiple
  choice the option *letter* (``"B"``), as in Vision-R1-cold and Mulberry; otherwise the value
  (``"12"``, ``"yes"``, ``"2\\sqrt{3}"``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Bumped when the stored layout changes; written into every parquet file's schema metadata.
SCHEMA_VERSION = "1"

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Sample(BaseModel):
    """One problem (and, after synthesis, its reasoning) flowing through the pipeline."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str = Field(
        min_length=1,
        description="Stable unique id within the dataset (the source's id when it has one, "
        "else derived from the file name and row number).",
    )
    images: list[str] = Field(
        default_factory=list,
        description="Image files, in the order they appear in the prompt. In memory these are "
        "absolute paths (readers resolve them); on disk they are relative to the dataset "
        "directory (``images/<sha256>.<ext>``, stored once per content).",
    )
    question: str = Field(
        description="The user text without image placeholders; options included for "
        "multiple-choice problems.",
    )
    choices: list[str] | None = Field(
        None,
        description="Option texts in letter order (A = first), or None for free-form problems.",
    )
    answer: str = Field(
        min_length=1,
        description="Ground truth as written after 'Final Answer:' (option letter for MC).",
    )
    source: str = Field(
        "unknown",
        description="Where the row came from: 'toy', 'llava_cot', 'mulberry', 'sharegpt', "
        "'geometry3k', 'jsonl', 'hf_disk', or a benchmark name.",
    )
    response: str | None = Field(
        None,
        description="The assistant text to train on or that was generated: the Vision-R1 target "
        "'<think> … </think><answer> Final Answer:X </answer>' after synthesis/filter, the source's "
        "own answer text (e.g. LLaVA-CoT's staged answer) when read from a public SFT set, or a "
        "model's output in eval.",
    )
    raw: dict[str, Any] = Field(
        default_factory=dict,
        description="Intermediate teacher outputs keyed by step, e.g. {'pseudo_cot': …, "
        "'description': …, 'reasoner': …, 'reasoner_model': …}; JSON-serialisable values only.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Everything else, JSON-serialisable: the toy 'scene' (structured, see "
        "visionr1_jobs.toy.world), toy 'kind', benchmark 'category', the source's extra fields, "
        "filter verdicts ('drop_reason'), eval scores.",
    )

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_as_text(cls, value: Any) -> Any:
        # Sources store numeric answers as numbers; the pipeline compares strings.
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, int | float):
            return str(value)
        return value.strip() if isinstance(value, str) else value

    @field_validator("choices")
    @classmethod
    def _choices_fit_letters(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not 1 <= len(value) <= len(OPTION_LETTERS):
            raise ValueError(
                f"choices must have 1..{len(OPTION_LETTERS)} entries, got {len(value)}"
            )
        return value

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    def answer_text(self) -> str:
        """The answer's option text for MC problems (letter → choice), else the answer itself."""
        if self.choices and len(self.answer) == 1 and self.answer in OPTION_LETTERS:
            idx = OPTION_LETTERS.index(self.answer)
            if idx < len(self.choices):
                return self.choices[idx]
        return self.answer


def format_choices(choices: list[str]) -> str:
    """The options block used by the toy world and by readers that must add options to a question."""
    return "Choices:\n" + "\n".join(f"{OPTION_LETTERS[i]}: {c}" for i, c in enumerate(choices))
