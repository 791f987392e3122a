"""The optional LLM judge (``params.judge: llm``): a second verdict on each saved response.

The rule-based verdict stays the reproducible default (method.md §7); the paper judged
MathVista and MathVerse with an LLM, so this judge exists to compare against it. Every verdict
row records what produced it: the model id the endpoint says answered (a dated snapshot for
hosted APIs, else the configured name), the prompt version and its sha256, the temperature and
the raw replies.

The judge must answer with a line ``Verdict: 1`` or ``Verdict: 0``. A reply without exactly one
such verdict is asked again (up to ``retries`` times); when every reply is unparseable the row
keeps the rule-based verdict and is marked ``judge_status: "unparsed"`` and counted. A request
that fails for good (a 4xx such as a content filter, retries spent, a local engine rejecting the
row) is that row's alone: the row keeps the rule-based verdict, is marked ``judge_status:
"error"`` with ``judge_error``, and is counted; only an error that would fail every row the same
way (a refused key, an unknown model, a dead engine) stops the judging.

The judge runs greedy (temperature 0) so a rerun gives the same verdicts as far as the server
is deterministic; ``llmJudge.sampling`` supplies ``maxTokens`` and ``seed`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from visionr1_jobs.contract import InvalidInput

if TYPE_CHECKING:
    from visionr1_jobs.config import Teacher
    from visionr1_jobs.generation import GenerationBackend

PROMPT_VERSION = "v1"
TEMPERATURE = 0.0
#: extra asks after an unparseable reply
RETRIES = 2
#: the judge sees the end of a long response (where the final answer is), not all 16k tokens
MAX_RESPONSE_CHARS = 6000
PLACEHOLDERS = frozenset({"question", "choices", "gold", "response", "extracted"})

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_VERDICT = re.compile(r"^\s*\**\s*verdict\s*\**\s*:\s*\**\s*([01])\s*\**\s*\.?\s*$", re.I | re.M)


@dataclass(frozen=True)
class JudgePrompt:
    """The judge's prompt template with its identity (recorded with every verdict)."""

    version: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, **values: str) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


def load_prompt(version: str = PROMPT_VERSION) -> JudgePrompt:
    """``prompts/judge/<version>.txt``, checked to use exactly the judge's placeholders."""
    file = resources.files("visionr1_jobs") / "prompts" / "judge" / f"{version}.txt"
    if not file.is_file():
        raise InvalidInput(f"judge prompt {version!r}: no file prompts/judge/{version}.txt")
    text = file.read_text(encoding="utf-8")
    used = set(_PLACEHOLDER.findall(text))
    if used != PLACEHOLDERS:
        raise InvalidInput(
            f"prompts/judge/{version}.txt: placeholders {sorted(used)}; "
            f"expected exactly {sorted(PLACEHOLDERS)}"
        )
    return JudgePrompt(version, text)


def _choices_text(choices: Any) -> str:
    if not choices:
        return "(none: free-form answer)"
    if isinstance(choices, list | tuple):
        return "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return str(choices)


def build_prompt(
    prompt: JudgePrompt,
    *,
    question: str,
    gold: Any,
    choices: Any,
    response: str,
    extracted: Any,
) -> str:
    """The judge's user turn for one (question, gold, choices, response, rule extraction)."""
    tail = response or ""
    if len(tail) > MAX_RESPONSE_CHARS:
        tail = "…" + tail[-MAX_RESPONSE_CHARS:]
    return prompt.render(
        question=question.strip() or "(not given)",
        choices=_choices_text(choices),
        gold=gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False),
        response=tail.strip() or "(empty)",
        extracted="(nothing extracted)" if extracted in (None, "") else str(extracted),
    )


def parse_verdict(text: str) -> bool | None:
    """True/False from the reply's single ``Verdict: 1|0`` line; None when there is no such line
    or the reply gives conflicting verdicts. Reasoning models' thinking is not searched."""
    found = {m.group(1) for m in _VERDICT.finditer(text or "")}
    if len(found) != 1:
        return None
    return found.pop() == "1"


def judge_identity(cfg: Teacher, prompt: JudgePrompt) -> dict[str, Any]:
    """The settings that define the judge (for reports and MLflow params)."""
    return {
        "judge_backend": cfg.backend.kind,
        "judge_model_requested": cfg.backend.model,
        "judge_prompt_version": prompt.version,
        "judge_prompt_sha256": prompt.sha256,
        "judge_temperature": TEMPERATURE,
        "judge_max_tokens": cfg.sampling.max_tokens,
        "judge_retries": RETRIES,
    }


def judge_texts(
    prompt: JudgePrompt, rows: list[dict[str, Any]], rule_verdicts: list[dict[str, Any]]
) -> list[str]:
    """The judge's user turn for each (row, rule verdict)."""
    return [
        build_prompt(
            prompt,
            question=str(r.get("prompt") or r.get("question") or ""),
            gold=r.get("answer"),
            choices=r.get("choices"),
            response=str(r.get("response") or ""),
            extracted=v.get("extracted"),
        )
        for r, v in zip(rows, rule_verdicts, strict=True)
    ]


def judge_rows(
    backend: GenerationBackend,
    rows: list[dict[str, Any]],
    rule_verdicts: list[dict[str, Any]],
    *,
    prompt: JudgePrompt,
    max_tokens: int,
    seed: int | None = None,
    retries: int = RETRIES,
    model_name: str | None = None,
) -> list[dict[str, Any]]:
    """One judge record per row: ``llm_correct`` (None when unparsed or failed), ``correct``
    (the LLM verdict, else the rule verdict), ``judge_status`` (``ok``/``unparsed``/``error``),
    ``judge_error`` (what failed, for ``error``), ``judge_raw`` (the last reply), ``judge_raws``
    (every reply), ``judge_model`` (served id), ``judge_prompt_version``,
    ``judge_prompt_sha256``, ``judge_temperature``."""
    from visionr1_jobs.synthesis.failures import RowFailure, classify_any, generate_rows

    texts = judge_texts(prompt, rows, rule_verdicts)
    replies: list[list[str]] = [[] for _ in rows]
    served: list[str | None] = [None] * len(rows)
    parsed: list[bool | None] = [None] * len(rows)
    errors: list[str | None] = [None] * len(rows)
    todo = list(range(len(rows)))
    for attempt in range(retries + 1):
        if not todo:
            break
        gens = generate_rows(
            backend,
            [{"messages": [{"role": "user", "content": texts[i]}]} for i in todo],
            classify_error=classify_any,
            temperature=TEMPERATURE,
            max_tokens=max_tokens,
            # A re-ask with the first ask's seed would get the first reply back from a seeded server.
            seed=None if seed is None else seed + attempt,
        )
        for i, g in zip(todo, gens, strict=True):
            if isinstance(g, RowFailure):
                errors[i] = f"{g.reason}: {g.detail}"
                continue
            replies[i].append(g.text)
            served[i] = g.model or served[i]
            parsed[i] = parse_verdict(g.text)
        todo = [i for i in todo if parsed[i] is None and errors[i] is None]
    out = []
    for i, v in enumerate(rule_verdicts):
        ok = parsed[i] is not None
        status = "ok" if ok else "error" if errors[i] is not None else "unparsed"
        record = {
            "llm_correct": parsed[i],
            "correct": bool(parsed[i]) if ok else bool(v["correct"]),
            "judge_status": status,
            "judge_raw": replies[i][-1] if replies[i] else None,
            "judge_raws": replies[i],
            "judge_attempts": len(replies[i]) + (errors[i] is not None),
            "judge_model": served[i] or model_name,
            "judge_prompt_version": prompt.version,
            "judge_prompt_sha256": prompt.sha256,
            "judge_temperature": TEMPERATURE,
        }
        if errors[i] is not None:
            record["judge_error"] = errors[i]
        out.append(record)
    return out
