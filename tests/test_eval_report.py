"""The eval report lists checkpoints in pipeline order with names a reader understands."""

from __future__ import annotations

from visionr1_jobs.eval import report


def _row(acc: float) -> dict[str, dict[str, float]]:
    return {"toy": {"accuracy": acc, "n": 10}}


def test_checkpoints_in_pipeline_order_whatever_order_they_were_given() -> None:
    given = ["grpo", "/runs/x/recipe/sft/final", "grpo/stage-2", "base", "grpo/stage-1", "sft"]
    ordered = list(report.pipeline_order({name: _row(0.5) for name in given}))
    assert ordered == [
        "base",
        "sft",
        "/runs/x/recipe/sft/final",
        "grpo/stage-1",
        "grpo/stage-2",
        "grpo",
    ]


def test_labels_fit_a_table_and_say_what_a_path_holds() -> None:
    assert report.label("grpo/stage-2") == "GRPO PTST stage 2"
    assert report.label("sft") == "SFT (cold start)"
    long_path = "/home/someone/.visionr1/ablations/seed-3/recipe/sft/final"
    assert report.label(long_path) == "SFT model at …/recipe/sft/final"
    assert "/home/someone" not in report.label(long_path)
    assert report.label("/models/other/checkpoint-9") == "model at …/models/other/checkpoint-9"
