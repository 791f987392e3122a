"""The prompt stream PTST sub-stages share (training.prompt_order) and the hand-off rule
(training.ptst.plan_rows): pure, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionr1_jobs.config import GRPOParams
from visionr1_jobs.training import prompt_order, ptst


def test_consecutive_spans_are_one_stream() -> None:
    whole = prompt_order.span(10, 3, 0, 37)
    first = prompt_order.span(10, 3, 0, 16)
    second = prompt_order.span(10, 3, 16, 21)
    assert first.indices + second.indices == whole.indices
    assert second.first_position == first.last_position + 1


@pytest.mark.parametrize("size", [1, 7, 16])
def test_the_set_is_used_up_before_any_prompt_comes_back(size: int) -> None:
    stream = prompt_order.span(size, 0, 0, size * 4).indices
    for epoch in range(4):
        assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size))


def test_each_pass_is_shuffled_anew_and_seeded() -> None:
    passes = [prompt_order.epoch_order(50, 0, e) for e in range(3)]
    assert passes[0] != passes[1] != passes[2]
    assert prompt_order.epoch_order(50, 0, 1) == passes[1]  # the same seed, the same order
    assert prompt_order.epoch_order(50, 1, 0) != passes[0]
    assert passes[0] != list(range(50))


def test_a_span_across_the_wrap_records_where_it_starts_and_ends() -> None:
    span = prompt_order.span(5, 7, 4, 4)  # the last prompt of pass 0, then 3 of pass 1
    rec = span.record([f"id{i}" for i in range(5)])
    assert rec["first_prompt"] == prompt_order.epoch_order(5, 7, 0)[4]
    assert rec["last_prompt"] == prompt_order.epoch_order(5, 7, 1)[2]
    assert (rec["first_position"], rec["last_position"], rec["prompts"]) == (4, 7, 4)
    assert (rec["first_epoch"], rec["last_epoch"]) == (0, 1)
    assert rec["first_prompt_id"] == f"id{rec['first_prompt']}"


def test_a_substage_starts_after_the_prompts_of_the_ones_before() -> None:
    params = _params(promptsPerStep=16)
    assert [prompt_order.substage_start(params, i) for i in range(3)] == [0, 64, 128]


def test_rollouts_reused_or_spread_over_steps_take_fewer_prompts() -> None:
    # A rollout of 64 prompts feeds 64/16 = 4 steps, each rollout trained on twice: 8 steps.
    rows = [{"maxCompletionLength": 64, "numGenerations": 8, "steps": 16}] * 2
    params = _params(promptsPerStep=16, promptsPerRollout=64, numIterations=2, ptst=rows)
    assert prompt_order.prompts_taken(params, 0) == 2 * 64
    assert prompt_order.substage_start(params, 2) == 4 * 64  # after both rows


def test_bad_spans_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        prompt_order.span(0, 0, 0, 1)
    with pytest.raises(ValueError, match="bad span"):
        prompt_order.span(3, 0, -1, 1)


def _params(**kw: object) -> GRPOParams:
    rows = [{"maxCompletionLength": 64, "numGenerations": 8, "steps": 4}] * 3
    return GRPOParams.model_validate(
        {"dataset": {"path": "rl", "format": "toy"}, "ptst": rows} | kw
    )


@pytest.mark.parametrize("reset", [False, True])
def test_each_substage_starts_from_the_last_and_is_held_to_the_rules_reference(
    reset: bool, tmp_path: Path
) -> None:
    rows = ptst.plan_rows(_params(resetReferenceEachStage=reset), tmp_path, "sft/final")
    starts = [r["start_model"] for r in rows]
    assert starts == [
        "sft/final",
        str(tmp_path / "stage-1" / "final"),
        str(tmp_path / "stage-2" / "final"),
    ]
    refs = [r["reference_model"] for r in rows]
    assert refs == (starts if reset else ["sft/final"] * 3)
