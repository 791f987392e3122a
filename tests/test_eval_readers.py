"""Benchmark readers on small hand-made files in each published layout, and bad input."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from visionr1_jobs.eval.readers import BenchmarkError, read_benchmark


def png_bytes(color: str = "white") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


MV_REC = {
    "pid": "7",
    "question": "How many?",
    "image": "images/7.jpg",
    "choices": None,
    "unit": None,
    "precision": None,
    "answer": "3",
    "question_type": "free_form",
    "answer_type": "integer",
    "metadata": {"task": "math word problem", "skills": ["arithmetic reasoning"]},
}


def test_mathvista_hf_parquet_with_embedded_images(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "mv" / "data"
    root.mkdir(parents=True)
    rec = {
        **MV_REC,
        "precision": 2.0,
        "answer_type": "float",
        "answer": "1.25",
        "query": "Hint: ...\nQuestion: How many?",
        "decoded_image": {"bytes": png_bytes(), "path": "7.jpg"},
    }
    pq.write_table(pa.Table.from_pylist([rec]), root / "testmini-00000-of-00001.parquet")
    res = read_benchmark("mathvista", tmp_path / "mv", image_cache=tmp_path / "cache")
    (row,) = res.rows
    assert row["precision"] == 2 and isinstance(row["precision"], int)  # float64 in HF
    assert row["query"].startswith("Hint:")
    assert Path(row["images"][0]).read_bytes() == png_bytes()
    assert str(tmp_path / "cache") in row["images"][0]


def test_mathvista_json_counts_missing_and_corrupt_images(tmp_path: Path) -> None:
    root = tmp_path / "mv"
    (root / "images").mkdir(parents=True)
    (root / "images" / "7.jpg").write_bytes(png_bytes())
    (root / "images" / "8.jpg").write_bytes(b"not an image")
    data = {
        "7": MV_REC,
        "8": {**MV_REC, "pid": "8", "image": "images/8.jpg"},
        "9": {**MV_REC, "pid": "9", "image": "images/9.jpg"},
    }
    (root / "testmini.json").write_text(json.dumps(data))
    (root / "query.json").write_text(json.dumps({"7": "Q7", "8": "Q8", "9": "Q9"}))
    res = read_benchmark("mathvista", root)
    assert [r["id"] for r in res.rows] == ["7"] and res.rows[0]["query"] == "Q7"
    reasons = {s["id"]: s["reason"] for s in res.skipped}
    assert "unreadable image" in reasons["8"] and "not found" in reasons["9"]
    assert read_benchmark("mathvista", root, limit=1).rows[0]["id"] == "7"


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    root = tmp_path / "mv"
    root.mkdir()
    bad = {k: v for k, v in MV_REC.items() if k != "answer_type"}
    (root / "testmini.json").write_text(json.dumps({"7": bad}))
    with pytest.raises(BenchmarkError, match=r"testmini\.json|answer_type"):
        read_benchmark("mathvista", root)


@pytest.mark.parametrize("name", ["mathvista", "mathverse", "mmmath", "dynamath"])
def test_empty_directory_says_what_was_expected(tmp_path: Path, name: str) -> None:
    with pytest.raises(BenchmarkError, match="expected"):
        read_benchmark(name, tmp_path)
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark(name, tmp_path / "nope")


def test_mathverse_versions_vision_only_and_text_only(tmp_path: Path) -> None:
    root = tmp_path / "mverse"
    (root / "images" / "images_version_6").mkdir(parents=True)
    (root / "images" / "images_version_6" / "image_1.png").write_bytes(png_bytes())
    base = {
        "problem_index": "1",
        "answer": "B",
        "question_type": "multi-choice",
        "metadata": {"subject": "Plane Geometry"},
        "query_cot": "Please reason. Q",
    }
    rows = [
        {
            **base,
            "sample_index": "1",
            "problem_version": "Text Dominant",
            "question": "Q\nChoices:\nA:1\nB:2",
            "image": "images_version_6/image_1.png",
        },
        {
            **base,
            "sample_index": "5",
            "problem_version": "Vision Only",
            "question": "",
            "image": "images_version_6/image_1.png",
        },
    ]
    (root / "testmini.json").write_text(json.dumps(rows))
    (root / "testmini_text_only.json").write_text(
        json.dumps(
            [
                {
                    **base,
                    "sample_index": "1",
                    "problem_version": "Text Only",
                    "question": "Q",
                    "image": "",
                }
            ]
        )
    )
    every = read_benchmark("mathverse", root)
    assert [r["problem_version"] for r in every.rows] == ["Text Dominant", "Vision Only"]
    vo = read_benchmark("mathverse", root, versions=["Vision Only"]).rows
    assert len(vo) == 1 and vo[0]["question"] == "" and vo[0]["images"]
    to = read_benchmark("mathverse", root, versions=["Text Only"]).rows
    assert len(to) == 1 and to[0]["images"] == []


def test_mmmath_original_json_and_vlmevalkit_tsv(tmp_path: Path) -> None:
    root = tmp_path / "mm"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    orig = {
        "q1": {
            "question": "Find x.",
            "file_name": "a.png",
            "solution": "so \\boxed{3}",
            "year": "七年级上学期",
            "difficult": "容易",
            "knowledge": ["Functions", "Lines"],
        }
    }
    (root / "mm_math.json").write_text(json.dumps(orig, ensure_ascii=False))
    (row,) = read_benchmark("mmmath", root).rows
    assert (row["id"], row["answer"], row["difficulty"], row["knowledge_l1"]) == (
        "q1",
        "so \\boxed{3}",
        "容易",
        "Functions",
    )

    tsv_root = tmp_path / "tsv"
    tsv_root.mkdir()
    b64 = base64.b64encode(png_bytes("black")).decode()
    (tsv_root / "MM-Math.tsv").write_text(
        "index\timage\tquestion\tanswer\tdifficulty\tyear\tknowledge_l1\tknowledge_l2\n"
        f"0\t{b64}\tFind y.\t4\t普通\t九年级下学期\tShapes\tCircles\n"
    )
    (row,) = read_benchmark("mmmath", tsv_root, image_cache=tmp_path / "c").rows
    assert row["id"] == "0" and row["answer"] == "4"
    assert Path(row["images"][0]).read_bytes() == png_bytes("black")


def test_dynamath_hf_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "dyn"
    root.mkdir()
    rec = {
        "id": "3",
        "question": "Value?",
        "ground_truth": "2.5",
        "answer_type": "float",
        "subject": "algebra",
        "knowledge_level": "high school",
        "decoded_image": {"bytes": png_bytes(), "path": None},
    }
    pq.write_table(pa.Table.from_pylist([rec]), root / "sample_variant1-00000-of-00001.parquet")
    (row,) = read_benchmark("dynamath", root, image_cache=tmp_path / "c").rows
    assert (row["id"], row["answer"], row["level"]) == ("3/sample_variant1", "2.5", "high school")


def test_toy_benchmark_from_the_data_layer(tmp_path: Path) -> None:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=4, n_bench=5, seed=1)
    res = read_benchmark("toy", tmp_path / "toy" / "bench")
    assert len(res.rows) == 5
    assert all(r["answer"] and Path(r["images"][0]).exists() for r in res.rows)
