"""The scorers against public rows with official verdicts (tests/data/realdata, see its README)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from visionr1_jobs.eval import dynamath, mathverse, mathvista, mmmath
from visionr1_jobs.eval.readers import read_benchmark

# Released MathVista result files predate today's integer rule (README §2, group (a)): their stored
# prediction is None for a non-integer decimal extraction, where int(float(x)) now gives a value.
# These are the only rows where today's official rules, given the official extraction, disagree
# with the stored prediction; the last three also flip the verdict from False to True.
OLDER_INTEGER_RULE = {
    ("bard", "89"): ("3", False),
    ("idefics_9b_instruct", "189"): ("1", True),
    ("instruct_blip2_vicuna_13b", "917"): ("1", True),
    ("mplugowl_7b_ft", "525"): ("0", True),
}


@pytest.fixture(scope="module")
def outputs() -> list[dict]:
    from conftest import REALDATA

    return json.loads((REALDATA / "mathvista_model_outputs_sample.json").read_text())


def test_mathvista_reproduces_official_verdicts_from_official_extraction(
    outputs: list[dict],
) -> None:
    scored = 0
    disagreements = {}
    for row in outputs:
        if row.get("extraction__missing"):
            # chatgpt pids 2 and 4: the source row has no extraction/prediction/true_false at all.
            assert (row["model"], row["pid"]) in {("chatgpt", "2"), ("chatgpt", "4")}
            continue
        prediction, correct = mathvista.score_extraction(row, row["extraction"])
        scored += 1
        if prediction != row["prediction"] or correct != row["true_false"]:
            disagreements[(row["model"], row["pid"])] = (prediction, correct)
            assert row["prediction"] is None and row["true_false"] is False
    assert disagreements == OLDER_INTEGER_RULE
    assert scored == 106


def test_mathvista_agreement_on_raw_responses(outputs: list[dict]) -> None:
    """Our rule-based extraction vs the official GPT extraction, measured on the full verdict.

    Reported in the closing note; the floor guards against regressions. Disagreements are mostly
    2023-era free-text answers where GPT picked a different number or mapped a refusal to a choice.
    """
    rows = [r for r in outputs if not r.get("extraction__missing")]
    # Without the official extraction, so the rule-based extractor reads the response.
    ours = [
        mathvista.score({k: v for k, v in r.items() if k != "extraction"}, r["response"])
        for r in rows
    ]
    agree_stored = sum(v["correct"] == r["true_false"] for r, v in zip(rows, ours, strict=True))
    # Against today's rules on the official extraction (removes the older-rule noise above).
    agree_today = sum(
        v["correct"] == mathvista.score_extraction(r, r["extraction"])[1]
        for r, v in zip(rows, ours, strict=True)
    )
    print(
        f"mathvista raw-response agreement: stored {agree_stored}/{len(rows)}, "
        f"today's rules {agree_today}/{len(rows)}"
    )
    assert agree_stored >= 91  # of 106
    assert agree_today >= 94


def test_visionr1_score_rescores_official_result_files_on_their_extraction(
    outputs: list[dict], tmp_path: Path
) -> None:
    """``visionr1 score`` on an official result file judges the file's own ``extraction`` with
    the official normalisation, so it reproduces the stored verdicts (bar the older-rule rows)."""
    import argparse

    from visionr1_jobs.eval import cli

    rows = [r for r in outputs if not r.get("extraction__missing")]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "verdicts.jsonl"
    assert (
        cli.main(argparse.Namespace(benchmark="mathvista", predictions=str(path), out=str(out)))
        == 0
    )
    verdicts = [json.loads(x) for x in out.read_text().splitlines()]
    flipped = {
        (r["model"], r["pid"])
        for r, v in zip(rows, verdicts, strict=True)
        if v["correct"] != r["true_false"]
    }
    assert flipped == {k for k, (_, ok) in OLDER_INTEGER_RULE.items() if ok}
    # "2000 and 2005" is no integer: wrong, though the response's last number is the gold 2005.
    i = next(i for i, r in enumerate(rows) if r["extraction"] == "2000 and 2005")
    assert verdicts[i]["prediction"] is None and verdicts[i]["correct"] is False
    assert verdicts[i]["method"] == "given_extraction"


@pytest.mark.parametrize(
    ("model", "pid", "extracted"),
    [
        ("idefics_9b_instruct", "315", "A"),  # bare "(A)"
        ("bard", "849", "(b)"),  # kept: the official normaliser reads it as letter B
        ("bard", "506", "[2010, 2012]"),  # the last Python list in the text
        ("llavar", "770", "1"),
        ("bard", "144", "13.8"),
        ("random_guess", "2", ""),  # empty response
        ("frequent_guess", "225", "[0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6]"),
        ("idefics_9b_instruct", "229", "E"),
        ("idefics_9b_instruct", "64", "B"),  # "(B) sample A.\n\nHint: …": the leading option
    ],
)
def test_mathvista_rule_extraction_on_real_responses(
    outputs: list[dict], model: str, pid: str, extracted: str
) -> None:
    row = next(r for r in outputs if r["model"] == model and r["pid"] == pid)
    assert mathvista.extract(row["response"], row).value == extracted


def test_mathvista_reader_and_groups(realdata: Path, tmp_path: Path) -> None:
    root = tmp_path / "mathvista"
    (root / "images").mkdir(parents=True)
    data = json.loads((realdata / "mathvista_testmini_sample.json").read_text())
    _tiny_png(root / "images" / "1.jpg")
    for pid in data:
        if pid != "1":
            (root / "images" / f"{pid}.jpg").write_bytes((root / "images" / "1.jpg").read_bytes())
    (root / "testmini.json").write_text(json.dumps(data))
    res = read_benchmark("mathvista", root)
    assert len(res.rows) == 69 and not res.skipped
    by_id = {r["id"]: r for r in res.rows}
    assert by_id["849"]["choices"] == ["(c)", "(d)", "(a)", "(b)", "(e)"]
    assert by_id["1"]["precision"] == 1 and by_id["1"]["query"].startswith("Hint:")
    groups = mathvista.groups(by_id["1"])
    assert groups["task"] == ["textbook question answering"]
    assert groups["skills"] == ["scientific reasoning"]
    assert Path(by_id["1"]["images"][0]).is_absolute()
    gps = [r for r in res.rows if "GPS" in mathvista.groups(r).get("paper", [])]
    assert len(gps) == 16  # README: GPS 16 rows in the sample


def test_mmmath_official_judge_cases(realdata: Path) -> None:
    cases = json.loads((realdata / "mmmath_autoscoringjudge_cases.json").read_text())
    for case in cases:
        gt, pred = case["ground_truth"], case["prediction"]
        if case["preprocessed"][0] == "ERROR":
            with pytest.raises(mmmath.PreprocessError):
                mmmath.preprocess(gt, pred)
        else:
            assert list(mmmath.preprocess(gt, pred)) == case["preprocessed"], case
        assert mmmath.judge(gt, pred) is case["visionr1_judge_default_1e-2"], case
        assert mmmath.judge(gt, pred) is case["mmmath_orig_judge_1e-2"], case
        assert mmmath.judge(gt, pred, 1e-8) is case["mmmath_orig_judge_default_1e-8"], case


def test_mathverse_real_rows(realdata: Path) -> None:
    five = json.loads((realdata / "mathverse_output_testmini_5versions.json").read_text())
    verdicts = {
        r["problem_version"]: mathverse.score(r, r["model_answer"])["correct"] for r in five
    }
    # The real GPT-4V answers: 14 cm in four versions; the Vision Only answer says 13 cm.
    assert verdicts == {
        "Text Dominant": True,
        "Text Lite": True,
        "Vision Intensive": True,
        "Vision Dominant": True,
        "Vision Only": False,
    }
    text_only = json.loads((realdata / "mathverse_testmini_text_only_sample.json").read_text())
    # Each gold, written the way a model would say it, is judged correct...
    said = {"2191.7 metres": "2191.7", "118掳T": "118°T", "$$r=7.00$$": "7", "C\nD": "C and D"}
    for row in text_only:
        if row["sample_index"] in ("493", "494"):
            continue  # piecewise functions in prose: left to the LLM judge
        answer = said.get(row["answer"], row["answer"])
        resp = f"<think> x </think><answer> Final Answer:{answer} </answer>"
        assert mathverse.score(row, resp)["correct"], row["sample_index"]
    # ...and a different option letter is not.
    row1 = next(r for r in text_only if r["sample_index"] == "1")
    assert not mathverse.score(row1, "<think> x </think><answer> Final Answer:A </answer>")[
        "correct"
    ]
    assert mathverse.parse_choices(row1["question"]) == ["40°", "60°", "120°", "140°"]


def test_dynamath_reader_scorer_and_official_table(realdata: Path, tmp_path: Path) -> None:
    rows = json.loads((realdata / "dynamath_sample.json").read_text())
    root = tmp_path / "dynamath"
    for row in rows:
        name = row["version"].split(" ")[0]
        folder = root if name == "seed" else root / "10trials" / name
        path = folder / "dataset.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[row["qid"]] = {k: v for k, v in row.items() if k not in ("qid", "version")}
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        img = folder / row["image"]
        if not img.exists():
            _tiny_png(img)
    res = read_benchmark("dynamath", root)
    assert len(res.rows) == 60  # the trials win over the seed file
    assert {r["variant"] for r in res.rows} == {"trial1", "trial2", "trial3"}
    for row in res.rows:  # the gold answer, said plainly, is correct under the official rules
        said = row["answer"] if row["answer_type"] != "float" else f"{float(row['answer']):.4f}"
        assert dynamath.score(row, f"<answer> Final Answer:{said} </answer>")["correct"], row

    # The official GPT-4o table: our worst-case aggregation over its correct/fail cells.
    table = _read_dynamath_csv(realdata / "dynamath_gpt4o_result_sample.csv")
    assert len(table) == 20
    cells_rows = [{"qid": q} for q, cells in table.items() for _ in cells]
    verdicts = [{"correct": c} for cells in table.values() for c in cells]
    worst = dynamath.extra_metrics(cells_rows, verdicts)["worst_case_accuracy"]
    assert worst == sum(all(c) for c in table.values()) / 20


def _read_dynamath_csv(path: Path) -> dict[str, list[bool]]:
    out = {}
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            qid = (rec.get("Question ID") or "").strip()
            if not qid.startswith("Q"):
                continue  # footer rows (# of correct per variant, A_avg) and blank rows
            cells = [rec[f"Variant {k}"].strip() for k in range(1, 11)]
            assert int(rec["# of correct per question"]) == cells.count("correct")
            out[qid[1:]] = [c == "correct" for c in cells]
    return out


def _tiny_png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "white").save(path, format="PNG")
