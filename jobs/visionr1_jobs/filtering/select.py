"""From synthesized samples to Vision-R1-cold: per-sample verdicts, then dedupe, then the kept set.

The I/O-free core of the filter stage (the stage reads, writes and logs around it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from visionr1_jobs.data.record import Sample
from visionr1_jobs.filtering.parallel import judge_all
from visionr1_jobs.filtering.rules import DUPLICATE, REASONS, Item, RuleSet, Verdict


@dataclass
class FilterResult:
    """Kept samples (rewritten responses) and one verdict per input sample, in input order."""

    kept: list[Sample]
    verdicts: list[Verdict]
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        return sum(1 for v in self.verdicts if not v.kept)


def to_item(key: int, sample: Sample) -> Item:
    return Item(
        key=key,
        question=sample.question,
        gold=sample.answer,
        choices=list(sample.choices) if sample.choices else None,
        response=sample.response,
        # The pipeline stores images content-addressed: equal pictures have equal paths.
        images=tuple(sample.images),
    )


def filter_samples(
    samples: Sequence[Sample],
    rules: RuleSet,
    *,
    workers: int = 1,
    dedupe: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> FilterResult:
    """Judge every sample in ``workers`` processes, then drop duplicates among the survivors.

    Dedupe keeps the first surviving sample of each (images, question), the question compared
    case- and whitespace-insensitively: a wrong first attempt does not shadow a correct later one.
    """
    verdicts = judge_all(
        [to_item(i, s) for i, s in enumerate(samples)], rules, workers, on_progress
    )
    seen: set[str] = set()
    kept: list[Sample] = []
    counts: Counter[str] = Counter({reason: 0 for reason in REASONS})
    for sample, verdict in zip(samples, verdicts, strict=True):
        if verdict.kept and dedupe:
            key = verdict.dedupe_key or ""
            if key in seen:
                verdict.reason = DUPLICATE
                verdict.detail = "same images and question as an earlier kept sample"
                verdict.response = None
            seen.add(key)
        if verdict.kept:
            metadata = dict(sample.metadata)
            metadata["filter"] = {"replacements": verdict.replacements}
            kept.append(
                sample.model_copy(
                    update={"response": verdict.response, "raw": {}, "metadata": metadata}
                )
            )
        else:
            counts[verdict.reason or ""] += 1
    counts["kept"] = len(kept)
    return FilterResult(kept=kept, verdicts=verdicts, counts=counts)
