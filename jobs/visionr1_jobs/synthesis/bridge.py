"""Modality bridging (method.md §2) for one batch of samples: three teacher calls per sample.

1. Pseudo-CoT: describer(image + question + ground-truth answer) → caption + reasoning.
2. Description: describer(image + question + its pseudo-CoT) → a detailed description holding
   every visual fact the answer needs.
3. Reasoning: text-only reasoner(description + question [+ answer and an instruction when
   ``give_answer_to_reasoner``]) → an R1-style chain of thought ending in the answer tag.
4. The reasoning is paired back with the original image: the sample's ``response``.

Teachers are callables over the generation interface (:mod:`visionr1_jobs.generation`: a batch of
ChatRequests in, Generations out), so any backend fits each teacher; the raw output of every
step is kept in ``Sample.raw`` for audit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from visionr1_jobs.data.record import Sample
from visionr1_jobs.generation.base import ChatRequest, Generation, user
from visionr1_jobs.synthesis.prompts import Prompt

#: A teacher: a batch of requests in, one Generation per request out (a backend + its sampling).
Generate = Callable[[list[ChatRequest]], list[Generation]]

STEPS = ("pseudo_cot", "description", "reasoner")


@dataclass
class BatchStats:
    """Generated tokens per step, for the tokens/s metrics."""

    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def compose_response(gen: Generation) -> str:
    """The reasoner's output as one ``<think>…</think>…`` text, without repairing it otherwise.

    R1-style servers either return the thinking separately (``reasoning``), or print it with the
    opening ``<think>`` already in the chat template (so only ``</think>`` appears). Both become
    ``<think> … </think>`` + the rest; anything else is kept verbatim for the filter to judge.
    """
    text = gen.text.strip()
    if gen.reasoning and not _THINK_OPEN.search(text):
        return f"<think> {gen.reasoning.strip()} </think>{text}"
    if _THINK_CLOSE.search(text) and not _THINK_OPEN.search(text):
        return f"<think> {text}"
    return text


def _meta(sample: Sample, step: str, with_scene: bool) -> dict[str, object]:
    # Real backends ignore metadata; the toy describer stand-in reads the scene it drew from it.
    meta: dict[str, object] = {"visionr1_step": step, "sample_id": sample.id}
    if with_scene and "scene" in sample.metadata:
        meta["scene"] = sample.metadata["scene"]
    return meta


@dataclass
class Described:
    """A batch after the describer's two steps (1–2), waiting for the reasoner (step 3)."""

    samples: list[Sample]
    cots: list[Generation]
    descs: list[Generation]
    stats: BatchStats
    failed: list[dict[str, str]]


def _call(
    fn: Generate,
    live: list[Sample],
    requests: list[ChatRequest],
    step: str,
    stats: BatchStats,
    failed: list[dict[str, str]],
) -> tuple[list[Sample], list[Generation], list[int]]:
    """One teacher step over the live samples: the ones answered, their answers, and their
    positions in ``live``; a sample answered with a RowFailure is recorded in ``failed``."""
    from visionr1_jobs.synthesis.failures import RowFailure

    outs = fn(requests)
    if len(outs) != len(requests):
        raise RuntimeError(f"{step}: teacher returned {len(outs)} results for {len(requests)}")
    kept: list[int] = []
    for i, (s, o) in enumerate(zip(live, outs, strict=True)):
        if isinstance(o, RowFailure):
            failed.append({"id": s.id, "step": step, "reason": o.reason, "detail": o.detail})
        else:
            kept.append(i)
    gens = [outs[i] for i in kept]
    stats.tokens[step] += sum(o.completion_tokens for o in gens)
    return [live[i] for i in kept], gens, kept


def describe_batch(
    samples: list[Sample], prompts: dict[str, Prompt], describer: Generate
) -> Described:
    """Steps 1–2 (the multimodal describer) on ``samples``."""
    stats = BatchStats()
    failed: list[dict[str, str]] = []
    p1 = prompts["pseudo_cot"]
    live, cots, _ = _call(
        describer,
        samples,
        [
            user(
                p1.render(question=s.question, answer=s.answer),
                s.images,
                **_meta(s, "pseudo_cot", True),
            )
            for s in samples
        ],
        "pseudo_cot",
        stats,
        failed,
    )
    p2 = prompts["description"]
    live, descs, kept = _call(
        describer,
        live,
        [
            user(
                p2.render(question=s.question, answer=s.answer, pseudo_cot=c.text),
                s.images,
                **_meta(s, "description", True),
            )
            for s, c in zip(live, cots, strict=True)
        ],
        "description",
        stats,
        failed,
    )
    return Described(live, [cots[i] for i in kept], descs, stats, failed)


def reason_batch(
    described: Described,
    prompts: dict[str, Prompt],
    reasoner: Generate,
    *,
    give_answer_to_reasoner: bool,
    describer_name: str,
    reasoner_name: str,
) -> tuple[list[Sample], BatchStats, list[dict[str, str]]]:
    """Step 3 (the text-only reasoner) and step 4 (pairing its reasoning with the image) on a
    described batch; returns what :func:`bridge_batch` returns."""
    stats, failed = described.stats, list(described.failed)
    live, cots, descs = described.samples, described.cots, described.descs
    p1 = prompts["pseudo_cot"]
    p3 = prompts["reasoner_with_answer" if give_answer_to_reasoner else "reasoner"]
    reasoner_prompts = [
        p3.render(question=s.question, description=d.text, answer=s.answer)
        for s, d in zip(live, descs, strict=True)
    ]
    # Text only, and no scene: the reasoner never sees the image (that is the point of the bridge).
    live, answers, kept = _call(
        reasoner,
        live,
        [
            user(t, (), **_meta(s, "reasoner", False))
            for t, s in zip(reasoner_prompts, live, strict=True)
        ],
        "reasoner",
        stats,
        failed,
    )
    cots, descs = [cots[i] for i in kept], [descs[i] for i in kept]
    reasoner_prompts = [reasoner_prompts[i] for i in kept]
    out = []
    for s, c, d, a, rp in zip(live, cots, descs, answers, reasoner_prompts, strict=True):
        raw = {
            "pseudo_cot": c.text,
            "description": d.text,
            "reasoner_prompt": rp,
            "reasoner": a.text,
            "reasoner_reasoning": a.reasoning,
            "finish_reasons": {
                "pseudo_cot": c.finish_reason,
                "description": d.finish_reason,
                "reasoner": a.finish_reason,
            },
            "describer_model": describer_name,
            "reasoner_model": reasoner_name,
            "prompts_version": p1.version,
            # The source's own answer text (e.g. LLaVA-CoT's staged answer), replaced below.
            "source_response": s.response,
            "tokens": {
                "pseudo_cot": c.completion_tokens,
                "description": d.completion_tokens,
                "reasoner": a.completion_tokens,
            },
        }
        behaviour = getattr(a, "behaviour", None)
        if (
            behaviour
        ):  # only a toy stand-in says what it did on purpose; real rows carry no toy field
            raw["toy_behaviour"] = behaviour
        out.append(s.model_copy(update={"response": compose_response(a), "raw": raw}))
    return out, stats, failed


def bridge_batch(
    samples: list[Sample],
    prompts: dict[str, Prompt],
    describer: Generate,
    reasoner: Generate,
    *,
    give_answer_to_reasoner: bool,
    describer_name: str,
    reasoner_name: str,
) -> tuple[list[Sample], BatchStats, list[dict[str, str]]]:
    """Run the three steps on ``samples``; returns them with ``response`` and ``raw`` filled,
    the stats, and the rows dropped on the way (``id``, ``step``, ``reason``, ``detail``).

    A teacher may answer a request with a :class:`~visionr1_jobs.synthesis.failures.RowFailure`
    instead of a Generation: that sample leaves the batch at that step and is reported as dropped.
    The synthesis stage runs the two halves (:func:`describe_batch`, :func:`reason_batch`) on
    consecutive chunks at once.
    """
    return reason_batch(
        describe_batch(samples, prompts, describer),
        prompts,
        reasoner,
        give_answer_to_reasoner=give_answer_to_reasoner,
        describer_name=describer_name,
        reasoner_name=reasoner_name,
    )
