"""SFT rows longer than maxLength are dropped and counted before training, never truncated.

Tiny model, toy data, CPU, real TRL. The length a row is judged by is the one TRL's vision
collator builds (chat template, image tokens expanded, prompt + completion), so a row exactly at
maxLength trains and one token more is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from train_world import make_train_world, sft_config, stand_in_filter

from visionr1_jobs.__main__ import main as stage_main
from visionr1_jobs.contract import read_manifest

pytestmark = pytest.mark.slow

SHORT = "<think> I count them. </think><answer> Final Answer:{a} </answer>"
MEDIUM = "<think> I count them. I count them again to be sure. </think><answer> Final Answer:{a} </answer>"
LONG = "<think> " + "I count them again. " * 40 + "</think><answer> Final Answer:{a} </answer>"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """16 toy rows: row 0 with a long answer, row 1 medium (the longest that fits), the rest
    short; row 2 carries a larger image so image tokens differ between rows."""
    from PIL import Image

    from visionr1_jobs.data.io import write_records
    from visionr1_jobs.data.load import load_dataset_dir

    root = tmp_path_factory.mktemp("sft-length")
    world: dict[str, Any] = make_train_world(root, seed=2, n_rl=4, n_bench=4, response=SHORT)
    samples = load_dataset_dir(root / "toy" / "train", "toy")
    big = root / "big.png"
    Image.new("RGB", (280, 196), (200, 30, 30)).save(big)
    cold = []
    for i, s in enumerate(samples):
        template = LONG if i == 0 else MEDIUM if i == 1 else SHORT
        update: dict[str, Any] = {"response": template.format(a=s.answer)}
        if i == 2:
            update["images"] = [str(big)]
        cold.append(s.model_copy(update=update))
    write_records(cold, root / "cold")
    world["samples"] = cold
    return world


def _rows_and_lengths(world: dict[str, Any], max_pixels: int | None = None) -> tuple[list, list]:
    from visionr1_jobs.training.data import sft_lengths, sft_rows
    from visionr1_jobs.training.runtime import load_processor

    rows = sft_rows(world["samples"])
    return rows, sft_lengths(rows, load_processor(str(world["model"]), None, max_pixels))


@pytest.mark.parametrize("max_pixels", [None, 784 * 8], ids=["model-default", "small-budget"])
def test_length_is_what_trls_collator_builds(world: dict[str, Any], max_pixels: int | None) -> None:
    from visionr1_jobs.training.data import _sft_lengths_by_collator
    from visionr1_jobs.training.runtime import load_processor

    rows, fast = _rows_and_lengths(world, max_pixels)
    slow = _sft_lengths_by_collator(rows, load_processor(str(world["model"]), None, max_pixels))
    assert fast == slow
    # The larger image costs more tokens than the toy ones unless the budget caps both alike.
    assert fast[0] > fast[1] > max(fast[3:])
    if max_pixels is None:
        assert fast[2] > fast[3]


def test_long_row_dropped_at_limit_kept_nothing_truncated(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    rows, lengths = _rows_and_lengths(world)
    limit = lengths[1]  # the medium row sits exactly at maxLength
    assert lengths[0] > limit >= max(lengths[2:])

    seen: list[tuple[int, str]] = []
    original = DataCollatorForVisionLanguageModeling.torch_call

    def spy(self: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = original(self, examples)
        tok = self.processor.tokenizer
        for mask, labels in zip(batch["attention_mask"], batch["labels"], strict=True):
            seen.append((int(mask.sum()), tok.decode(labels[labels != -100].tolist())))
        return batch

    monkeypatch.setattr(DataCollatorForVisionLanguageModeling, "torch_call", spy)
    ws = stand_in_filter(tmp_path / "ws", world)
    cfg = sft_config(
        ws,
        world,
        "sft-length",
        maxLength=limit,
        globalBatchSize=3,
        perDeviceBatchSize=3,
        maxSteps=None,
        epochs=1,
    )
    assert stage_main(["sft", "--config", str(cfg)]) == 0

    manifest = read_manifest(ws, "sft")
    assert manifest is not None
    assert manifest.rows == {"train": 15, "dropped_too_long": 1}
    assert manifest.metrics["rows_dropped_too_long"] == 1.0
    (record,) = manifest.extra["dropped_too_long"]
    assert record["id"] == world["samples"][0].id
    assert record["tokens"] == lengths[0]
    assert f"maxLength={limit}" in record["reason"]

    # The trainer saw each kept row once (one epoch), the row at the limit among them, none
    # longer, and every answer whole.
    assert len(seen) == 15
    assert max(n for n, _ in seen) == limit
    assert all(a.rstrip().endswith("</answer><|im_end|>") for _, a in seen), seen

    client = mlflow.MlflowClient(f"sqlite:///{ws.resolve() / 'mlflow.db'}")
    metrics = client.get_run(manifest.mlflow_run_id).data.metrics
    assert metrics["rows_dropped_too_long"] == 1.0
    assert metrics["rows_trained"] == 15.0


def test_every_row_too_long_is_refused_naming_max_length(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionr1_jobs.config import EXIT_INVALID_INPUT

    _, lengths = _rows_and_lengths(world)
    ws = stand_in_filter(tmp_path / "ws", world)
    cfg = sft_config(ws, world, "sft-length-none", maxLength=min(lengths) - 1)
    assert stage_main(["sft", "--config", str(cfg)]) == EXIT_INVALID_INPUT
    assert "raise params.maxLength" in capsys.readouterr().err
    assert read_manifest(ws, "sft") is None
