"""Readers of the public formats, on the real rows in tests/data/realdata and hand-written files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visionr1_jobs.data.io import DataError, read_records, write_records
from visionr1_jobs.data.load import detect_format, load_dataset, load_dataset_dir
from visionr1_jobs.data.readers import extract_answer, parse_choices


def _png(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_llava_cot_real_rows(realdata: Path, tmp_path: Path) -> None:
    src = realdata / "llava_cot_rows_visionr1_pipeline_intermediate.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for r in rows:
        _png(tmp_path / "imgs" / r["image"])
    assert detect_format(src) == "llava_cot"
    res = load_dataset(src, image_root=tmp_path / "imgs")
    # The third record has two human→gpt turns: one sample per turn.
    assert [s.id.split("-")[0] for s in res.records] == [
        "1ade7413",
        "50b055f6",
        "101d75e8",
        "101d75e8",
    ]
    assert res.records[2].id.endswith("#0") and res.records[3].id.endswith("#1")
    assert [s.answer for s in res.records] == ["B", "B", "D", "D"]
    assert res.records[0].choices == ["Seattle", "Juneau", "Saint Paul", "Anchorage"]
    assert res.records[2].choices == ["blue", "green", "yellow", "purple"]
    assert res.records[3].choices == ["one way", "stop", "dead end", "enter"]
    assert res.records[0].answer_text() == "Juneau"
    for s in res.records:
        assert s.source == "llava_cot" and "<CONCLUSION>" in (s.response or "")
        assert (
            len(s.images) == 1 and Path(s.images[0]).is_absolute() and Path(s.images[0]).is_file()
        )
        assert "<image>" not in s.question


def test_mulberry_comcts_real_rows(realdata: Path, tmp_path: Path) -> None:
    src = realdata / "mulberry_comcts_input_demo.json"
    rows = json.loads(src.read_text())
    for r in rows:
        _png(tmp_path / r["image"])
    res = load_dataset(src, image_root=tmp_path)
    assert res.format == "mulberry" and len(res.records) == len(rows) == 30
    for row, s in zip(rows, res.records, strict=True):
        assert s.answer == row["conversations"][1]["value"].removeprefix("Answer:")
        assert s.question == row["question"] and "<image>" not in s.question
        assert s.choices and 2 <= len(s.choices) <= 6
        assert Path(s.images[0]).name == row["image"]
    assert res.records[0].choices == ["\\sqrt{10}", "8", "16", "8\\sqrt{10}"]


def _cold_variants(realdata: Path, tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """The paper's Vision-R1-cold examples in both LLaMA-Factory sharegpt variants."""
    paper = json.loads((realdata / "vision_r1_cold_examples_from_paper.json").read_text())
    _png(tmp_path / "llava_cot_images" / "a.png")
    _png(tmp_path / "mulberry_images" / "b.png", "blue")
    llava_variant = [
        {  # `image` (singular), human/gpt; `<image>` on some rows only
            "image": "llava_cot_images/a.png",
            "conversations": [
                {"from": "human", "value": ("<image>\n" if i % 2 else "") + ex["question"]},
                {"from": "gpt", "value": ex["assistant"]},
            ],
        }
        for i, ex in enumerate(paper)
    ]
    mulberry_variant = [
        {  # `images` (a string on odd rows, a list on even rows), user/assistant
            "images": "mulberry_images/b.png" if i % 2 else ["mulberry_images/b.png"],
            "conversations": [
                {"from": "user", "value": ex["question"] + ("<image>" if i % 2 == 0 else "")},
                {"from": "assistant", "value": ex["assistant"]},
            ],
        }
        for i, ex in enumerate(paper)
    ]
    a, b = tmp_path / "vision_r1_llava_cot_full.json", tmp_path / "vision_r1_mulberry_sft_full.json"
    a.write_text(json.dumps(llava_variant))
    b.write_text(json.dumps(mulberry_variant))
    return a, b, paper


def test_vision_r1_cold_sharegpt_both_variants(realdata: Path, tmp_path: Path) -> None:
    a, b, paper = _cold_variants(realdata, tmp_path)
    for path in (a, b):
        assert detect_format(path) == "sharegpt"
        recs = load_dataset_dir(path)
        assert [s.answer for s in recs] == ["B", "D", "C", "yes"]
        assert [s.response for s in recs] == [ex["assistant"] for ex in paper]
        assert [s.question for s in recs] == [ex["question"] for ex in paper]
        assert recs[0].choices == ["2π", "3π", "6π", "8π"]
        assert recs[1].choices == ["40", "20", "48", "24"]  # "Choices:A: 40 B: 20 …"
        assert recs[3].choices is None
        assert all(len(s.images) == 1 and Path(s.images[0]).is_file() for s in recs)
    # Both files in one folder read as one dataset with unique ids.
    both = load_dataset(tmp_path, "sharegpt").records
    assert len(both) == 8 and len({s.id for s in both}) == 8


def test_mulberry_sft_messages_and_reflection(tmp_path: Path) -> None:
    _png(tmp_path / "ai2d" / "1.png")
    text = (
        "### Image Description:\nA food web.\n\n### Rationales:\nEnergy flows.\n\n"
        "### Let's think step by step.\n\n### Step 1:\nI think I have made a mistake. "
        "Let me rethink it.\n\n### The final answer is:\nB"
    )
    path = tmp_path / "mulberry_sft.json"
    path.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "<image>Which eats grass?\nA. hawk\nB. rabbit"},
                        {"role": "assistant", "content": text},
                    ],
                    "images": "ai2d/1.png",
                }
            ]
        )
    )
    (s,) = load_dataset_dir(path)
    assert (s.source, s.answer, s.choices, s.response) == (
        "mulberry",
        "B",
        ["hawk", "rabbit"],
        text,
    )
    assert s.question == "Which eats grass?\nA. hawk\nB. rabbit"


def test_geometry3k_parquet_with_embedded_images(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (10, 10), "green").save(buf, format="PNG")
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "images": pa.array([[{"bytes": buf.getvalue(), "path": None}]] * 2, pa.list_(img_type)),
            "problem": ["<image>Find x.", "<image>Find y. Choices: A: 1 B: 2"],
            "answer": ["3", "2"],
        }
    )
    (tmp_path / "rl").mkdir()
    pq.write_table(table, tmp_path / "rl" / "train.parquet")
    assert detect_format(tmp_path / "rl") == "geometry3k"
    recs = load_dataset_dir(tmp_path / "rl", image_cache=tmp_path / "cache")
    assert [(s.question, s.answer) for s in recs] == [
        ("Find x.", "3"),
        ("Find y. Choices: A: 1 B: 2", "B"),
    ]
    assert recs[0].images == recs[1].images  # same bytes, stored once
    assert Path(recs[0].images[0]).parent.parent.parent == tmp_path / "cache"
    with Image.open(recs[0].images[0]) as im:
        assert im.getpixel((0, 0)) == (0, 128, 0)
    # Converting to the pipeline format copies the image into the dataset's own store.
    write_records(recs, tmp_path / "out")
    assert [s.answer for s in read_records(tmp_path / "out")] == ["3", "B"]


def test_jsonl_with_image_folder(tmp_path: Path) -> None:
    _png(tmp_path / "pics" / "1.png")
    _png(tmp_path / "pics" / "2.png", "blue")
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(
        data / "rows.jsonl",
        [
            {"id": "q1", "image": "1.png", "question": "How many?", "answer": 4, "grade": "x"},
            {
                "images": ["1.png", "2.png"],
                "problem": "<image><image>Compare.",
                "answer": "left",
                "choices": ["left", "right"],
            },
        ],
    )
    assert detect_format(data) == "jsonl"
    a, b = load_dataset_dir(data, image_root=tmp_path / "pics")
    assert (a.id, a.answer, a.metadata, a.choices) == ("q1", "4", {"grade": "x"}, None)
    assert b.id == "rows-1" and b.question == "Compare." and b.answer == "A"  # text → letter
    assert [Path(p).name for p in b.images] == ["1.png", "2.png"]


def test_hf_save_to_disk(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (6, 6), "red")], "question": ["Color?"], "answer": ["red"]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    assert detect_format(tmp_path / "hf") == "hf_disk"
    (s,) = load_dataset_dir(tmp_path / "hf", image_cache=tmp_path / "c")
    assert (s.question, s.answer, s.id) == ("Color?", "red", "hf-0")
    with Image.open(s.images[0]) as im:
        assert im.size == (6, 6)


def test_bad_rows_are_named_or_counted(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "ok.png", "question": "fine", "answer": "1"},
            {"image": "missing.png", "question": "q", "answer": "1"},
            {"image": "broken.png", "question": "q", "answer": "1"},
            {"image": "ok.png", "question": "no answer here"},
            {"image": "ok.png", "question": "q", "answer": "2"},
        ],
    )
    (tmp_path / "d.jsonl").write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl row 1: image .*missing\.png does not exist"):
        load_dataset(path)
    res = load_dataset(path, skip_bad=True)
    assert [s.question for s in res.records] == ["fine", "q"]
    assert dict(res.skipped) == {
        "missing_image": 1,
        "corrupt_image": 1,
        "no_answer": 1,
        "bad_row": 1,
    }
    assert res.n_skipped == 4 and any("row 3" in e for e in res.examples)
    # Skipping never hides an unusable dataset.
    only_bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_dataset(only_bad, skip_bad=True)
    chat = tmp_path / "chat.json"
    chat.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "I am not sure."},
                    ]
                }
            ]
        )
    )
    with pytest.raises(DataError, match=r"chat\.json row 0: no answer found"):
        load_dataset(chat, "sharegpt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        load_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "weird.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(DataError, match="unknown row layout"):
        load_dataset(tmp_path / "weird.json")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_dataset(tmp_path / "weird.json", "csv")


@pytest.mark.parametrize(
    ("text", "choices"),
    [
        ("Q?\nA. blue\nB. green", ["blue", "green"]),
        ("Q?\nChoices:\nA: 40°\nB: 60°\nAnswer with the letter.", ["40°", "60°"]),
        ("Q?\nOptions: (A) Seattle (B) Juneau", ["Seattle", "Juneau"]),
        ("Find x. Choices: A: 2π B: 3π C: 6π", ["2π", "3π", "6π"]),
        ("Is there a dog? A dog barks.", None),
        ("Points A. and C. are marked.", None),
    ],
)
def test_parse_choices(text: str, choices: list[str] | None) -> None:
    assert parse_choices(text) == choices


def test_extract_answer_formats() -> None:
    assert extract_answer("<think> x </think><answer> Final Answer:B </answer>") == "B"
    assert extract_answer("<CONCLUSION> Juneau is it. The answer is B. </CONCLUSION>") == "B"
    assert extract_answer("<CONCLUSION> 3 dogs </CONCLUSION>") == "3 dogs"
    assert extract_answer("### Step 1:\nx\n\n### The final answer is:\n12") == "12"
    assert extract_answer("Answer:D") == "D"
    assert extract_answer("no idea") is None


def test_dataset_ref_paths_are_under_the_workspace(tmp_path: Path) -> None:
    from visionr1_jobs.config import DatasetRef
    from visionr1_jobs.data.load import load_dataset_ref

    _png(tmp_path / "ws" / "imgs" / "1.png")
    (tmp_path / "ws" / "data").mkdir()
    _jsonl(
        tmp_path / "ws" / "data" / "a.jsonl",
        [{"image": "1.png", "question": f"q{i}", "answer": str(i)} for i in range(3)],
    )
    ref = DatasetRef(path="data", format="jsonl", image_root="imgs", limit=2)
    res = load_dataset_ref(ref, tmp_path / "ws")
    assert [s.question for s in res.records] == ["q0", "q1"]
    assert res.records[0].images == [str(tmp_path / "ws" / "imgs" / "1.png")]
