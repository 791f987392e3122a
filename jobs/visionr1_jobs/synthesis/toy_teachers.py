"""TOY STAND-INS for the synthesis teachers (backend kind ``toy``), for the toy world only.

They stand in for the 72B multimodal describer and the R1 text reasoner so that the whole
synthesis → filter path runs on a laptop with the real data flow. What they say is in
:mod:`visionr1_jobs.synthesis.toy_logic`; this module fits them to the generation interface
(:class:`visionr1_jobs.generation.GenerationBackend`) and registers kind ``toy``.

One backend serves both roles, chosen per request by ``metadata["visionr1_step"]`` (set by the
synthesis bridge): ``pseudo_cot`` and ``description`` need the toy scene (``metadata["scene"]``);
``reasoner`` reads the prompt text only. Everything is deterministic from the sampling seed and
the request text. "Tokens" are whitespace-separated words (there is no tokenizer).

Their behaviour is the toy backend's own config, never a field of the production schema: the
backend's ``model`` is unset (the defaults of :class:`ToyTeachersConfig`) or names a JSON file
holding a :class:`ToyTeachersConfig` (``{"errorRate": 0.3, "inconsistentRate": 0.1}``).

``VISIONR1_TOY_DELAY_S`` (seconds, default 0) makes every request sleep that long: a slow
teacher, so tests can kill synthesis in the middle of a shard.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from visionr1_jobs.config import Backend, Model, Sampling
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation.base import ChatRequest, Generation, GenerationBackend
from visionr1_jobs.generation.factory import register_backend
from visionr1_jobs.synthesis import toy_logic

DESCRIBER_NAME = "toy-describer (TOY STAND-IN for the Qwen2.5-VL-72B describer; toy world only)"
REASONER_NAME = "toy-reasoner (TOY STAND-IN for the DeepSeek-R1 reasoner; toy world only)"
DELAY_ENV = "VISIONR1_TOY_DELAY_S"


class ToyTeachersConfig(Model):
    """How the toy reasoner stand-in misbehaves (the filter must catch every kind)."""

    error_rate: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of wrong answers (the filter must drop them)."
    )
    inconsistent_rate: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of CoTs whose final answer contradicts the thinking's last "
        "conclusion, or that break the format.",
    )


def load_toy_config(backend: Backend) -> ToyTeachersConfig:
    """The stand-ins' settings: defaults when ``backend.model`` is unset, else its JSON file."""
    if not backend.model:
        return ToyTeachersConfig()
    path = Path(backend.model)
    try:
        return ToyTeachersConfig.model_validate_json(path.read_text())
    except OSError as exc:
        raise InvalidInput(
            f"backend.model {backend.model!r}: kind toy reads its settings from this JSON file "
            f"({exc.strerror}); leave model unset for the defaults"
        ) from exc
    except ValidationError as exc:
        raise InvalidInput(
            f"backend.model {backend.model!r}: not a toy teachers config ({exc.errors()[0]['msg']} "
            f"at {'.'.join(map(str, exc.errors()[0]['loc'])) or 'top level'}); "
            'expected e.g. {"errorRate": 0.3, "inconsistentRate": 0.1}'
        ) from exc


@dataclass
class ToyGeneration(Generation):
    """A Generation plus what the stand-in did (``correct``, ``wrong``, ``inconsistent:<how>``;
    ``describer`` for steps 1–2), kept in the audit trail."""

    behaviour: str = ""


def _text(req: ChatRequest) -> str:
    content = req.messages[-1].get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))


def _rng(seed: int | None, text: str) -> random.Random:
    digest = hashlib.sha256(f"{seed or 0}\x00{text}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


class ToyTeachers(GenerationBackend):
    """Toy stand-ins of the describer and the reasoner, behind one backend."""

    kind = "toy"
    reentrant = True  # each request's randomness comes from its own seed and text

    def __init__(self, error_rate: float, inconsistent_rate: float) -> None:
        self.error_rate = error_rate
        self.inconsistent_rate = inconsistent_rate
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)

    def _one(self, req: ChatRequest, sampling: Sampling) -> ToyGeneration:
        step = req.metadata.get("visionr1_step")
        text = _text(req)
        if step in ("pseudo_cot", "description"):
            scene = req.metadata.get("scene")
            if not isinstance(scene, dict):
                raise ValueError(
                    f"toy describer stand-in: request for sample {req.metadata.get('sample_id')!r} "
                    "has no toy scene (metadata.scene); the toy backend only works on toy data "
                    "(`visionr1 toy data`) — use a real describer backend for other data"
                )
            if step == "pseudo_cot":
                question = text.split("Question:\n", 1)[-1].split("\n\nCorrect answer:", 1)[0]
                answer = text.rsplit("Correct answer:", 1)[-1].strip()
                out, behaviour = toy_logic.pseudo_cot(scene, question, answer), "describer"
            else:
                out, behaviour = toy_logic.describe_scene(scene), "describer"
        elif step == "reasoner":
            out, behaviour = toy_logic.reason(
                text, _rng(sampling.seed, text), self.error_rate, self.inconsistent_rate
            )
        else:
            raise ValueError(
                f"toy teacher stand-in: unknown metadata.visionr1_step {step!r} "
                "(it serves the synthesis steps pseudo_cot, description and reasoner only)"
            )
        words = out.split()
        if len(words) > sampling.max_tokens:  # honour the budget like a real model: cut, 'length'
            out = " ".join(words[: sampling.max_tokens])
            return ToyGeneration(
                out,
                prompt_tokens=len(text.split()),
                completion_tokens=sampling.max_tokens,
                finish_reason="length",
                behaviour=behaviour,
            )
        return ToyGeneration(
            out,
            prompt_tokens=len(text.split()),
            completion_tokens=len(words),
            finish_reason="stop",
            behaviour=behaviour,
        )

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[Generation]:
        out: list[Generation] = []
        for req in requests:
            if self.delay_s:
                time.sleep(self.delay_s)
            out.append(self._one(req, sampling))
        return out


def _factory(backend: Backend, default_model: str | None) -> GenerationBackend:
    # default_model (the stage's own model) is not a toy config: only backend.model counts.
    cfg = load_toy_config(backend)
    return ToyTeachers(cfg.error_rate, cfg.inconsistent_rate)


def stand_in_name(backend: Backend, role: str) -> str | None:
    """The display name of a toy stand-in for ``role`` (describer/reasoner), None if not toy."""
    if backend.kind != "toy":
        return None
    return DESCRIBER_NAME if role == "describer" else REASONER_NAME


register_backend("toy", _factory)
