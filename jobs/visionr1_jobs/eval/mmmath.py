"""MM-Math scoring: the rules of the official ``AutoScoringJudge`` (Vision-R1's VLMEvalKit copy).

The official judge needs ``sympy.parse_latex`` with antlr4 4.11 (it fails to even start with the
4.13 runtime installed here, tests/data/realdata/README.md §6). We follow its rules (preprocess both
sides, exact match, comma lists as multisets with ``\\pm`` expanded, intervals, numbers within
1.01 × precision with the ×100 / ÷100 percent variants, closed expressions evaluated numerically,
expressions with variables and equations compared at random points) with our own bounded
evaluator (:mod:`visionr1_jobs.eval.latexnum`) in place of sympy. The official verdicts on
``mmmath_autoscoringjudge_cases.json`` are reproduced (tests/test_eval_mmmath.py).
"""

from __future__ import annotations

import re
from typing import Any

from visionr1_jobs.eval.common import as_list, require, verdict
from visionr1_jobs.eval.latexnum import NotNumeric, compile_expr, same_equation, same_function
from visionr1_jobs.eval.latexnum import evaluate as num_eval
from visionr1_jobs.eval.latexnum import variables as free_vars

NAME = "mmmath"
REQUIRED = ("answer",)
PRECISION = 1e-2

_UNIT_STRINGS = (
    "\\text{cm}^2",
    "\\text{cm}",
    "\\,cm",
    "\\text{ cm}",
    "cm",
    "\\text{分米}^2",
    "cm^{2}",
    "\\ \\text{m}",
    "\\text{米}",
)
_SIGNALS = {
    "\\left": "",
    "\\right": "",
    "厘米": "",
    "，": ",",
    "$": "",
    "（": "(",
    "）": ")",
    "\\infty": "oo",
    "\\colon ": ":",
    "＋": "+",
    "\\, ": "",
    "\\,": "",
    "^\\circ": "",
    "^{\\circ}": "",
}
_END_CHARS = "\n,.:;^_=+`!@#%^&*~，。"
_CHINESE = r"[\u4e00-\u9fff]+"


class PreprocessError(ValueError):
    """Unbalanced braces in a ``\\boxed{``: the official judge answers False."""


def boxed_or_last_line(text: str) -> str:
    """Every ``\\boxed{…}`` content, each followed by ``,``; else the ``$…$`` pieces of the last
    line; else the whole text (official step 1)."""
    out = []
    for m in re.finditer(r"\\boxed\{", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            raise PreprocessError("Mismatched braces in LaTeX string.")
        out.append(text[m.end() : i - 1] + ",")
    if out:
        return "".join(out)
    last = text.strip().split("\n")[-1]
    dollars = re.findall(r"\$(.*?)\$", last)
    return "".join(d + "," for d in dollars) if dollars else text


def clean(expr: str) -> str:
    """Official step 1b: units, special symbols, ``\\sin30``, end characters, ``\\mathrm{}``."""
    for unit in _UNIT_STRINGS:
        expr = expr.replace(unit, "")
    expr = re.sub(r"(.+)m$", r"\1", expr.strip())
    if "\\in " in expr:
        expr = expr.split("\\in ")[1]
    for signal, repl in _SIGNALS.items():
        expr = expr.replace(signal, repl)
    expr = re.sub(r"(\\sin|\\cos|\\tan)(\d+)", r"\1((\2/180)\\pi)", expr)
    expr = expr.strip(_END_CHARS)  # a character set, as the official judge strips
    return re.sub(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}", r"\1", expr)


def preprocess(ground_truth: str, prediction: str) -> tuple[str, str]:
    return clean(boxed_or_last_line(ground_truth)), clean(boxed_or_last_line(prediction))


def _split_commas(expr: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(expr[start:i].strip())
            start = i + 1
    if start < len(expr):
        parts.append(expr[start:].strip())
    return parts


def _expand_pm(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if "\\pm" in item:
            out += [item.replace("\\pm", "+"), item.replace("\\pm", "-")]
        else:
            out.append(item)
    return out


def _numeric_equal(gt: str, pred: str, precision: float) -> bool:
    ref, val = float(gt), float(pred)
    return any(abs(k - val) <= precision * 1.01 for k in (ref / 100, ref, ref * 100))


def _expression_equal(gt: str, pred: str, precision: float) -> bool:
    gt = gt.split("=")[1].strip() if "=" in gt else gt.strip()
    pred = pred.split("=")[1].strip() if "=" in pred else pred.strip()
    if gt == pred:
        return True
    try:
        tg, tp = compile_expr(gt), compile_expr(pred)
    except NotNumeric:
        return False
    vg, vp = free_vars(tg), free_vars(tp)
    if bool(vg) != bool(vp):
        return False
    if not vg:
        try:
            return abs(num_eval(gt) - num_eval(pred)) <= precision * 1.01
        except NotNumeric:
            return False
    return bool(same_function(gt, pred, rel_tol=1e-3))


def _interval_equal(gt: str, pred: str, precision: float) -> bool:
    if gt == pred:
        return True
    left, right = gt.split("\\cup"), pred.split("\\cup")
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        a, b = a.strip(), b.strip()
        if not a or not b or a[0] != b[0] or a[-1] != b[-1]:
            return False
        for x, y in zip(a.strip("[]()").split(","), b.strip("[]()").split(","), strict=False):
            if not _expression_equal(x, y, precision):
                return False
    return True


def _is_interval(expr: str) -> bool:
    return expr.startswith(("(", "[")) and expr.endswith((")", "]"))


def items_equal(gt: str, pred: str, precision: float = PRECISION) -> bool:
    """One list item (official ``is_equal``): string, interval, number, expression, equation."""
    if gt == pred and gt != "":
        return True
    if _is_interval(gt) and _is_interval(pred):
        try:
            if _interval_equal(gt, pred, precision):
                return True
        except (ValueError, IndexError):
            return False
    try:
        if _numeric_equal(gt, pred, precision):
            return True
    except (ValueError, OverflowError):
        pass
    if not ("=" in gt and "=" in pred) and _expression_equal(gt, pred, precision):
        return True
    return bool(same_equation(gt, pred))


def judge(ground_truth: str, prediction: str, precision: float = PRECISION) -> bool:
    """The official verdict for (ground truth, model solution); never raises."""
    try:
        gt, pred = preprocess(ground_truth, prediction)
    except PreprocessError:
        return False
    if gt == pred:
        return True
    if not re.fullmatch(_CHINESE, gt):
        gt = re.sub(_CHINESE, "", gt)
    if not re.fullmatch(_CHINESE, pred):
        pred = re.sub(_CHINESE, "", pred)
    if gt.count("<") == 2:
        gt = "(" + gt.split("<")[0] + ", " + gt.split("<")[-1] + ")"
    if pred.count("<") == 2:
        pred = "(" + pred.split("<")[0] + ", " + pred.split("<")[-1] + ")"
    left = _expand_pm(_split_commas(gt))
    right = _expand_pm(_split_commas(pred))
    if len(left) != len(right):
        return False
    remaining = list(right)
    for item in left:
        for j, other in enumerate(remaining):
            if items_equal(item, other, precision):
                del remaining[j]
                break
        else:
            return False
    return True


def score(row: dict[str, Any], response: str) -> dict[str, Any]:
    """The official MM-Math path: judge(answer, answer-tag content or the full response)."""
    from visionr1_jobs.answers import extract_answer

    require(row, REQUIRED, NAME)
    tagged = extract_answer(response or "")
    extracted, method = (tagged, "answer_tag") if tagged is not None else (response or "", "full")
    try:
        pre = boxed_or_last_line(extracted)
        prediction = clean(pre)
    except PreprocessError:
        prediction = None
    correct = judge(str(row["answer"]), extracted)
    return verdict(row, response, extracted, method, prediction, correct)


def groups(row: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for field in ("difficulty", "year", "knowledge_l1", "knowledge_l2"):
        labels = as_list(row.get(field))
        if labels:
            out[field] = labels
    return out


def prompt(row: dict[str, Any]) -> str:
    return str(row["question"])
