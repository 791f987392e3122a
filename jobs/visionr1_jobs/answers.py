"""Answer logic shared by the filter, the GRPO reward and eval scoring (method.md §4, §6, §7).

Three questions, one module:

* :func:`extract_answer` — the ``X`` of ``<answer> Final Answer:X </answer>`` (the paper's format),
  and :func:`extract_final`, the richer eval extraction with fallbacks (``Final Answer:``,
  ``\\boxed{}``, "the answer is", last option letter / last number).
* :func:`format_ok` — the format half of the hard formatting result reward.
* :func:`answers_match` — is a predicted answer equivalent to the gold one?

How :func:`answers_match` stays thread safe and time bounded without signals
----------------------------------------------------------------------------
math-verify bounds its own work with ``signal.alarm``, which only works on the main thread (off it,
the timeout silently does nothing and a pathological ``10^{10^{10}}`` hangs the caller). So:

1. Cheap exact paths run first in the caller's thread: normalised string equality, multiple-choice
   letter ↔ option text, plain numbers (units, ``%``, degrees and thousands separators stripped,
   relative tolerance 1e-6, or rounding to the gold's decimals when the prediction is more precise),
   and element-wise square-bracket / comma lists. These are pure Python with no unbounded step.
2. Inputs longer than :data:`MAX_SYMBOLIC_CHARS`, or with a huge exponent/factorial, never reach sympy.
3. Everything else goes to math-verify (``parsing_timeout=None``, ``timeout_seconds=None``) in a
   **separate worker process** (``python -m visionr1_jobs.answers``, a plain subprocess: no fork of
   a CUDA or threaded parent, no re-import of the caller's ``__main__``). The caller waits at most
   ``timeout_s`` for the reply (``select`` on the pipe); on expiry the worker is killed (SIGKILL
   from the parent: no signal handler runs in the caller) and restarted on the next call, and the
   answer counts as no match. The first call waits up to 30 s more for the worker's imports. One worker per process, guarded by a lock, so concurrent
   callers from many threads are serialised rather than racing on the pipe.
   ``timeout_s=None`` runs math-verify in-process instead (unbounded; only for trusted input).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata
from pathlib import Path
from typing import IO, NamedTuple

MAX_SYMBOLIC_CHARS = 400
"""Longer predictions or golds are compared by the exact paths only (sympy time grows fast)."""

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# --------------------------------------------------------------------------- extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FINAL_PREFIX = re.compile(r"^\s*final\s*answer\s*[:：]\s*", re.IGNORECASE)
_FINAL_ANY = re.compile(r"final\s*answer\s*(?:is)?\s*[:：]\s*", re.IGNORECASE)
# "(B) …", "B. …", "B) …" or "B: …" at the very start; a bare "A sphere" is an article.
_LEADING_OPTION = re.compile(r"^(?:\(([A-H])\)|([A-H])[.):])(?=[\s.,;:]|$)")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+|correct\s+)?answer\s+is|answer\s*[:：])\s*[:：]?\s*", re.IGNORECASE
)


def extract_answer(text: str) -> str | None:
    """The answer inside the last complete ``<answer>…</answer>`` of ``text``, or None.

    ``Final Answer:`` inside the tag is removed when present (any spacing or case); an answer tag
    without it yields its whole stripped content. An unclosed tag (a completion cut at the token
    budget) yields None, as does an empty answer.
    """
    if not text:
        return None
    found = _ANSWER_TAG.findall(text)
    if not found:
        return None
    inner = _FINAL_PREFIX.sub("", found[-1], count=1).strip()
    return inner or None


class Extraction(NamedTuple):
    """An extracted answer and the rule that found it (saved with every eval verdict)."""

    value: str | None
    method: str  # answer_tag | final_answer | boxed | answer_is | leading_option |
    # option_letter | last_number | none


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{…}`` (or ``\\fbox{…}``), or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def _line_after(text: str, match: re.Match[str]) -> str:
    rest = text[match.end() :]
    rest = re.split(r"\n|</answer>|<\|im_end\|>", rest, maxsplit=1)[0]
    return rest.strip()


def extract_final(text: str, multiple_choice: bool | None = None) -> Extraction:
    """Eval extraction: the answer tag, then ``Final Answer:``, ``\\boxed{}``, "the answer is …",
    and last-resort patterns (a trailing option letter for MC, the last number otherwise).

    ``multiple_choice`` picks the last-resort pattern; None tries the letter, then the number.
    A ``\\boxed{}`` inside the extracted value is unwrapped.
    """
    text = text or ""
    tagged = extract_answer(text)
    if tagged is not None:
        boxed = last_boxed(tagged)
        return Extraction(boxed if boxed else tagged, "answer_tag")
    finals = list(_FINAL_ANY.finditer(text))
    if finals:
        value = _line_after(text, finals[-1])
        value = last_boxed(value) or value
        if value:
            return Extraction(value, "final_answer")
    boxed = last_boxed(text)
    if boxed:
        return Extraction(boxed, "boxed")
    said = list(_ANSWER_IS.finditer(text))
    if said:
        value = _line_after(text, said[-1])
        value = re.sub(r"\.\s*$", "", value).strip()
        if value:
            return Extraction(value, "answer_is")
    stripped = text.strip()
    if multiple_choice is not False:
        # A response that opens with a marked option ("(B) A sphere has no base.") answers with
        # it; the trailing-letter pattern below would take the article "A" of its text instead.
        lead = _LEADING_OPTION.match(stripped)
        if lead:
            return Extraction(lead.group(1) or lead.group(2), "leading_option")
        letters = re.findall(r"(?:^|[\s(\[])([A-H])(?:[)\].:,]|\s|$)", stripped[-80:])
        if letters:
            return Extraction(letters[-1], "option_letter")
    if multiple_choice is not True:
        numbers = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", stripped)
        if numbers:
            return Extraction(numbers[-1], "last_number")
    return Extraction(None, "none")


# --------------------------------------------------------------------------- format

_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_FORMAT = re.compile(
    r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*",
    re.DOTALL | re.IGNORECASE,
)


def format_ok(text: str) -> bool:
    """True iff ``text`` is exactly ``<think>…</think><answer>…</answer>``.

    Whitespace is allowed around and between the two blocks, nothing else; each block appears once
    (no nested or repeated tags), both are non-empty, and a completion cut before ``</answer>``
    fails.
    """
    if not text:
        return False
    tags = [t.lower() for t in _TAG.findall(text)]
    if tags != ["<think>", "</think>", "<answer>", "</answer>"]:
        return False
    m = _FORMAT.fullmatch(text)
    return bool(m and m.group("think").strip() and m.group("answer").strip())


# --------------------------------------------------------------------------- normalisation

_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|掳")


def normalize_text(s: str) -> str:
    """Case-, width- and whitespace-insensitive form of a short answer (for exact comparison)."""
    s = unicodedata.normalize("NFKC", str(s))
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("~", " ")  # LaTeX non-breaking space, as in "\mathrm{~cm}"
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    s = s.replace("\\tfrac", "\\frac")
    for _ in range(3):
        s = _LATEX_WRAPPERS.sub(r"\1", s)
    s = s.strip().strip("\"'`").strip()
    s = re.sub(r"[.。]+$", "", s).strip()
    s = re.sub(r"\s+", " ", s)
    return s.casefold()


# Possessive (``++``): with a plain ``+`` inside the repeated group, a run of n letters can be
# split n ways over and over, so a tail that fails at its end ("5 abab…ab!", as a GRPO rollout
# may write) backtracked exponentially: 26 letters took 20 s, a 60-letter one hung a run.
_UNIT_TAIL = re.compile(
    r"(?:\s*+(?:[a-zA-Z\u00b5\u03bc]++\.?(?:\s*(?:\^\s*\{?\d\}?|[²³]))?|(?:\\?%)))+\s*$"
)
_NUM = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"^([-+]?)\\frac\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}$")


def to_number(s: str) -> float | None:
    """A plain number in ``s`` (units, %, degrees, ``$``, thousands commas stripped), or None.

    Accepts ``12``, ``-3.5``, ``1,000``, ``50%``, ``30^\\circ``, ``2191.7 metres``, ``3/4``,
    ``\\frac{3}{4}``, ``x = 5``; anything with more structure (``2\\sqrt{3}``, ``\\pi``) gives None.
    """
    t = normalize_text(s)
    t = _DEGREE.sub("", t)
    t = re.sub(r"^[a-z]\w*\s*=\s*", "", t)  # "x = 5"
    t = t.replace("\\%", "%").replace("−", "-").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:\s*\S.*)?", t):
        t = t.replace(",", "")
    m = _NUM.match(t)
    if m:
        tail = t[m.end() :]
        if not tail.strip() or _UNIT_TAIL.fullmatch(tail):
            try:
                return float(m.group(0))
            except ValueError:
                return None
        frac = re.fullmatch(r"\s*/\s*([-+]?\d+(?:\.\d+)?)\s*", tail)
        if frac and float(frac.group(1)) != 0:
            return float(m.group(0)) / float(frac.group(1))
        return None
    m2 = _FRAC.match(t.replace(" ", ""))
    if m2 and float(m2.group(3)) != 0:
        value = float(m2.group(2)) / float(m2.group(3))
        return -value if m2.group(1) == "-" else value
    return None


def _decimals(s: str) -> int:
    m = re.search(r"\.(\d+)", normalize_text(s))
    return len(m.group(1)) if m else 0


def numbers_match(pred: str, gold: str) -> bool | None:
    """Numeric comparison, or None when either side is not a plain number.

    Equal within a relative 1e-6, or — when the gold has d ≥ 1 decimals and the prediction more —
    equal after rounding the prediction to d decimals (gold ``1.5`` accepts ``1.498``).
    """
    g, p = to_number(gold), to_number(pred)
    if g is None or p is None:
        return None
    if abs(g - p) <= 1e-6 * max(1.0, abs(g)):
        return True
    d = _decimals(gold)
    if d >= 1 and _decimals(pred) > d:
        return abs(round(p, d) - g) <= 10 ** (-d - 3)
    return False


# --------------------------------------------------------------------------- multiple choice

_LETTER_FORMS = re.compile(
    r"^(?:\(|\[)?\s*(?:option|choice)?\s*\(?([A-Za-z])\s*(?:\)|\]|\.|:|：)?(?:\s+.*)?$",
    re.DOTALL | re.IGNORECASE,
)


def option_letter(pred: str, n_choices: int) -> int | None:
    """Index of the option letter ``pred`` names (``B``, ``(B)``, ``B.``, ``Option B``, ``B) text``)."""
    t = unicodedata.normalize("NFKC", pred).strip().replace("$", "").strip()
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    m = _LETTER_FORMS.match(t)
    if not m:
        return None
    letter = m.group(1)
    rest = t[m.end(1) :].strip()
    # A lone lower-case word letter ("a car") is not an option; "(b)", "b." and "b" are.
    if letter.islower() and rest and not rest.startswith((")", ".", ":", "]")):
        return None
    idx = _LETTERS.find(letter.upper())
    return idx if 0 <= idx < n_choices else None


def choice_indices(answer: str, choices: list[str]) -> set[int]:
    """Indices whose option text equals ``answer`` (a set: testmini has duplicate choices)."""
    key = normalize_text(answer)
    return {i for i, c in enumerate(choices) if normalize_text(c) == key}


def _choices_match(pred: str, gold: str, choices: list[str]) -> bool | None:
    n = len(choices)
    gold_idx = choice_indices(gold, choices)
    if not gold_idx:
        letter = option_letter(gold, n)
        if letter is None:
            return None  # gold is not an option: compare as a free-form answer
        gold_idx = {letter}
    gold_idx |= {
        i for i in range(n) if i not in gold_idx and choices[i] in {choices[j] for j in gold_idx}
    }
    # Option text first: choices can themselves look like letters ("(b)" in MathVista pid 849).
    pred_idx = choice_indices(pred, choices)
    if not pred_idx:
        letter = option_letter(pred, n)
        if letter is not None:
            pred_idx = {letter}
    if not pred_idx:
        # "B. 60°" style: a letter followed by the option text.
        m = re.match(r"^\(?([A-Za-z])[).:]\s*(.+)$", pred.strip(), re.DOTALL)
        if m:
            i = _LETTERS.find(m.group(1).upper())
            if 0 <= i < n and normalize_text(m.group(2)) == normalize_text(choices[i]):
                pred_idx = {i}
    if not pred_idx:
        for i, c in enumerate(choices):
            if i in gold_idx and numbers_match(pred, c):
                return True
        return False
    return bool(pred_idx & gold_idx)


# --------------------------------------------------------------------------- lists


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [x.strip() for x in out]


def _as_list(s: str) -> list[str] | None:
    t = normalize_text(s)
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    elif t.startswith(("(", "{", "\\{")):
        return None  # tuples, intervals and sets are math-verify's business
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
        return None  # thousands separators, not a list
    parts = _split_top(t)
    return parts if len(parts) > 1 else None


# --------------------------------------------------------------------------- math-verify worker

_SYMBOLIC_BLOWUP = re.compile(r"\^\s*\{?\s*\d{3,}|\d{3,}\s*!|\^\s*\{[^}]*\^")


def _mv_compare(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # It warns on every call that its signal timeouts are off; we bound time ourselves.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def wrap(s: str) -> str:
        return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"

    g = parse(wrap(gold), parsing_timeout=None)
    p = parse(wrap(pred), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _serve(stdin: IO[str], stdout: IO[str]) -> None:
    """Worker loop: one JSON ``[gold, pred]`` per line in, one ``true``/``false`` per line out."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import once, before the first request)

    for line in stdin:
        try:
            gold, pred = json.loads(line)
            result = _mv_compare(gold, pred)
        except Exception:
            result = False
        stdout.write("true\n" if result else "false\n")
        stdout.flush()


class _Worker:
    """One math-verify child process (``python -m visionr1_jobs.answers``), restarted after a
    timeout or a crash. A plain subprocess rather than multiprocessing: no fork of a CUDA/threaded
    parent and no re-import of the caller's ``__main__``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.warm = False

    def _start(self) -> None:
        src = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visionr1_jobs.answers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        self.warm = False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for fh in (proc.stdin, proc.stdout):
                if fh is not None:
                    with contextlib.suppress(OSError):
                        fh.close()

    def compare(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """math-verify's verdict, or None when it did not answer within ``timeout_s``."""
        with self.lock:
            for _attempt in range(2):
                if self.proc is None or self.proc.poll() is not None:
                    self.stop()
                    self._start()
                proc = self.proc
                assert proc is not None and proc.stdin is not None and proc.stdout is not None
                try:
                    proc.stdin.write(json.dumps([gold, pred]) + "\n")
                    proc.stdin.flush()
                    # The first request also pays the child's import of sympy and math-verify.
                    wait = timeout_s + (0.0 if self.warm else _STARTUP_S)
                    ready, _, _ = select.select([proc.stdout], [], [], wait)
                    if ready:
                        line = proc.stdout.readline()
                        if line:
                            self.warm = True
                            return line.strip() == "true"
                except (OSError, ValueError):
                    pass
                else:
                    if not ready:
                        self.stop()  # timed out: kill the stuck sympy computation
                        return None
                self.stop()  # crashed: restart once
            return False


_STARTUP_S = 30.0
_WORKER = _Worker()
atexit.register(_WORKER.stop)


def _symbolic(pred: str, gold: str, timeout_s: float | None) -> bool | None:
    """math-verify's verdict, or None when it ran out of ``timeout_s``."""
    if len(pred) > MAX_SYMBOLIC_CHARS or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    if _SYMBOLIC_BLOWUP.search(pred) or _SYMBOLIC_BLOWUP.search(gold):
        return False
    if timeout_s is None:
        try:
            return _mv_compare(gold, pred)
        except Exception:
            return False
    return _WORKER.compare(gold, pred, timeout_s)


def symbolic_match(pred: str, gold: str, timeout_s: float | None = 5.0) -> bool:
    """math-verify equivalence of ``pred`` and ``gold`` (LaTeX or plain), bounded by ``timeout_s``.

    See the module docstring for how the bound is enforced. Over-long or exponent-bomb input is
    refused (False) before sympy sees it.
    """
    return bool(_symbolic(pred, gold, timeout_s))


# --------------------------------------------------------------------------- the judge


class MatchResult(NamedTuple):
    """A verdict and whether it is a timeout: ``timed_out`` is True only when math-verify was
    stopped at its bound (``matched`` is then False). A comparison that was merely slow (the
    first one also waits for the worker's imports) and came back False is a plain mismatch."""

    matched: bool
    timed_out: bool = False


def match_answers(
    pred: str, gold: str, choices: list[str] | None = None, timeout_s: float | None = 5.0
) -> MatchResult:
    """:func:`answers_match`, telling a wrong answer apart from a comparison that timed out."""
    timeouts: list[bool] = []
    try:
        ok = _match(pred, gold, choices, timeout_s, timeouts)
    except Exception:
        ok = False
    return MatchResult(ok, not ok and bool(timeouts))


def answers_match(
    pred: str, gold: str, choices: list[str] | None = None, timeout_s: float | None = 5.0
) -> bool:
    """Is ``pred`` an equivalent answer to ``gold``? Never raises; thread safe; time bounded.

    Order: normalised text equality; multiple choice (when ``choices`` are given or the gold is a
    bare option letter) with letter ↔ option text; numbers (units/%/degrees stripped, tolerance);
    element-wise lists; then math-verify (fractions, roots, π, sets, intervals, equations) in a
    killable worker bounded by ``timeout_s`` seconds (None: in-process, unbounded). A timeout
    counts as no match; :func:`match_answers` says which it was.
    """
    return match_answers(pred, gold, choices, timeout_s).matched


def _match(
    pred: str,
    gold: str,
    choices: list[str] | None,
    timeout_s: float | None,
    timeouts: list[bool],
) -> bool:
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if not pred.strip() or not gold.strip():
        return False
    np_, ng = normalize_text(pred), normalize_text(gold)
    if np_ == ng:
        return True
    if choices:
        verdict = _choices_match(pred, gold, [str(c) for c in choices])
        if verdict is not None:
            return verdict
    elif re.fullmatch(r"\(?[A-Z]\)?", gold.strip()):
        letter = option_letter(pred, 26)
        return letter is not None and _LETTERS[letter] == gold.strip().strip("()")
    if np_.replace(" ", "") == ng.replace(" ", ""):
        return True
    num = numbers_match(pred, gold)
    if num is not None:
        return num
    gl, pl = _as_list(gold), _as_list(pred)
    if gl is not None and pl is not None:
        return len(gl) == len(pl) and all(
            _match(p, g, None, timeout_s, timeouts) for p, g in zip(pl, gl, strict=True)
        )
    verdict = _symbolic(pred, gold, timeout_s)
    if verdict is None:
        timeouts.append(True)
    return bool(verdict)


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
