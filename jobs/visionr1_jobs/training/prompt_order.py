"""The order in which GRPO's PTST sub-stages take the RL prompts: one stream through the data.

The stream is the prompt set's epochs back to back, each epoch a permutation of the row indices
drawn from the stage's ``seed`` and the epoch's number. Sub-stage k takes the positions right
after sub-stage k-1's last, so the sub-stages together walk the whole set before any prompt
comes back (a wrap happens only when the set is used up, and the next pass is shuffled anew).
Before this, each sub-stage's trainer drew its own permutation from the same seed, so stage 2
replayed stage 1's prompts in the same order and most of a 10K set was never seen.

Pure: every rank computes the same span from the same numbers, and a resumed sub-stage gets the
same prompts again (the trainer then skips the ones its checkpoint already consumed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from visionr1_jobs.config import GRPOParams


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """Row indices ``0..size-1`` in the order of pass ``epoch`` (0-based) through the set."""
    order = list(range(size))
    # A string seed is hashed with SHA-512 by ``random``: stable across Python versions and
    # independent of how many passes were drawn before.
    random.Random(f"visionr1-prompt-order:{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class Span:
    """The prompts one sub-stage trains on: stream positions ``first..last`` (inclusive)."""

    first_position: int
    indices: tuple[int, ...]
    size: int  # prompts in the set

    @property
    def last_position(self) -> int:
        return self.first_position + len(self.indices) - 1

    def record(self, ids: Sequence[Any] | None = None) -> dict[str, Any]:
        """What the sub-stage's done marker, MLflow run and the stage manifest carry.

        ``first_prompt``/``last_prompt`` are row indices into the prompt set (after prompts too
        long for ``maxPromptLength`` are left out); ``*_position`` count along the stream, so
        ``epoch`` = position // prompts in the set.
        """
        out: dict[str, Any] = {
            "first_prompt": self.indices[0],
            "last_prompt": self.indices[-1],
            "first_position": self.first_position,
            "last_position": self.last_position,
            "prompts": len(self.indices),
            "set_size": self.size,
            "first_epoch": self.first_position // self.size,
            "last_epoch": self.last_position // self.size,
        }
        if ids is not None:
            out |= {
                "first_prompt_id": ids[self.indices[0]],
                "last_prompt_id": ids[self.indices[-1]],
            }
        return out


def span(size: int, seed: int, first_position: int, count: int) -> Span:
    """``count`` prompts of the stream from ``first_position`` on, as row indices."""
    if size < 1:
        raise ValueError("the prompt set is empty")
    if count < 1 or first_position < 0:
        raise ValueError(f"bad span: first_position={first_position}, count={count}")
    indices: list[int] = []
    epoch = first_position // size
    offset = first_position % size
    while len(indices) < count:
        order = epoch_order(size, seed, epoch)
        indices.extend(order[offset : offset + count - len(indices)])
        epoch, offset = epoch + 1, 0
    return Span(first_position, tuple(indices), size)


def prompts_taken(params: GRPOParams, index: int) -> int:
    """Prompts PTST row ``index`` (0-based) trains on: each rollout generates for
    ``promptsPerRollout`` prompts (default ``promptsPerStep``) and feeds
    ``steps_per_rollout()`` optimizer steps (``numIterations`` passes included), and the row's
    steps are a whole number of rollouts (validation refuses anything else)."""
    rollouts = params.ptst[index].steps // params.steps_per_rollout()
    return rollouts * (params.prompts_per_rollout or params.prompts_per_step)


def substage_start(params: GRPOParams, index: int) -> int:
    """Stream position of row ``index``'s (0-based) first prompt: right after every prompt the
    rows before it took."""
    return sum(prompts_taken(params, j) for j in range(index))
