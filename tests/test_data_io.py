"""The pipeline's sample record and its sharded parquet storage."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.data.io import (
    DataError,
    read_records,
    shard_files,
    store_image,
    write_records,
    write_shard,
)
from visionr1_jobs.data.load import detect_format, load_dataset_dir
from visionr1_jobs.data.record import Sample


def _png(path: Path, color: str) -> Path:
    Image.new("RGB", (8, 8), color).save(path)
    return path


def test_record_normalises_answers_and_maps_letters() -> None:
    s = Sample(id="x", question="q", answer=12, choices=["a", "b"])
    assert s.answer == "12"
    assert Sample(id="y", question="q", answer=" B ", choices=["a", "b"]).answer_text() == "b"
    assert Sample(id="z", question="q", answer="3").answer_text() == "3"
    with pytest.raises(ValueError):
        Sample(id="w", question="q", answer="")


def test_roundtrip_shards_and_images_stored_once(tmp_path: Path) -> None:
    red = _png(tmp_path / "red.png", "red")
    blue = _png(tmp_path / "blue.png", "blue")
    same_red = _png(tmp_path / "red_copy.png", "red")
    records = [
        Sample(
            id=f"r{i}",
            images=[str(p)],
            question=f"q{i}",
            answer=str(i),
            choices=["x", "y"] if i % 2 else None,
            raw={"reasoner": f"out {i}"},
            metadata={"scene": {"objects": [i]}, "k": "é"},
        )
        for i, p in enumerate([red, blue, same_red, red, blue])
    ]
    out = tmp_path / "ds"
    paths = write_records(records, out, rows_per_shard=2)
    assert [p.name for p in paths] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    # Two distinct contents → two stored files, whatever the number of rows referencing them.
    assert len(list((out / "images").rglob("*.png"))) == 2
    # On disk the paths are relative to the dataset folder.
    stored = pq.read_table(paths[0]).column("images").to_pylist()
    assert all(not Path(p).is_absolute() and p.startswith("images/") for row in stored for p in row)
    back = read_records(out)
    assert [r.id for r in back] == [r.id for r in records]
    assert back[1].choices == ["x", "y"] and back[0].choices is None
    assert back[3].metadata == {"scene": {"objects": [3]}, "k": "é"}
    assert back[2].raw == {"reasoner": "out 2"}
    assert back[0].images[0] == back[2].images[0]  # same content, same stored file
    assert Image.open(back[1].images[0]).getpixel((0, 0)) == (0, 0, 255)
    assert read_records(out, limit=3)[-1].id == "r2"


def test_moved_dataset_still_reads(tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png", "green")
    write_records([Sample(id="a", images=[str(img)], question="q", answer="1")], tmp_path / "d1")
    (tmp_path / "d1").rename(tmp_path / "moved")
    (rec,) = read_records(tmp_path / "moved")
    assert Path(rec.images[0]).is_file() and "moved" in rec.images[0]


def test_rewrite_keeps_images_already_in_store(tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png", "green")
    write_shard(
        [Sample(id="a", images=[str(img)], question="q", answer="1")], tmp_path / "d" / "s.parquet"
    )
    recs = read_records(tmp_path / "d")
    write_shard(recs, tmp_path / "d" / "t.parquet")  # e.g. the filter re-writing beside it
    assert len(list((tmp_path / "d" / "images").rglob("*"))) == 2  # one dir + one file


def test_temp_files_of_unfinished_writers_are_ignored(tmp_path: Path) -> None:
    write_records([Sample(id="a", question="q", answer="1")], tmp_path)
    (tmp_path / ".shard-00001.parquet.abc.tmp").write_bytes(b"half")
    (tmp_path / ".hidden.parquet").write_bytes(b"half")
    assert [p.name for p in shard_files(tmp_path)] == ["shard-00000.parquet"]


def test_bad_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        write_shard(
            [Sample(id="a", images=[str(tmp_path / "nope.png")], question="q", answer="1")],
            tmp_path / "o" / "s.parquet",
        )
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        store_image(tmp_path / "o", tmp_path / "bad.png")
    with pytest.raises(InvalidInput, match="no such file"):
        load_dataset_dir(tmp_path / "missing")
    write_records([], tmp_path / "empty")
    with pytest.raises(DataError, match="empty dataset"):
        load_dataset_dir(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "x.bin").write_bytes(b"?")
    with pytest.raises(DataError, match="unknown format"):
        detect_format(tmp_path / "odd")
