"""Numeric evaluation of short LaTeX / plain math expressions, without sympy.

The rule-based judges need "what number is ``2\\sqrt{3}``?" and "are ``y=2x+1`` and ``2y=4x+2`` the
same line?" thousands of times per second. This module turns a short expression into a Python
arithmetic expression and evaluates its AST with a whitelist (numbers, + - * / ^, a few functions,
single-letter variables), so evaluation is bounded: exponents are capped and nothing is executed.
Expressions with variables are compared by evaluation at fixed random points.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections.abc import Callable

MAX_CHARS = 300
MAX_EXPONENT = 64.0

_FUNCS: dict[str, Callable[[float], float]] = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "ln": math.log,
    "log": math.log10,
    "exp": math.exp,
    "arcsin": math.asin,
    "arccos": math.acos,
    "arctan": math.atan,
}
_CONSTS = {"pi": math.pi}


class NotNumeric(ValueError):
    """The text is not an expression this module evaluates."""


def _braced(s: str, i: int) -> tuple[str, int]:
    """The brace-matched group starting at ``s[i] == '{'``; returns (content, index after)."""
    depth, j = 0, i
    while j < len(s):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1 : j], j + 1
        j += 1
    raise NotNumeric("unbalanced braces")


def _arg(s: str, i: int) -> tuple[str, int]:
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] == "{":
        return _braced(s, i)
    if i < len(s):
        return s[i], i + 1
    raise NotNumeric("missing argument")


def _latex_to_py(s: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(s):
        if s.startswith(("\\frac", "\\dfrac", "\\tfrac"), i):
            i = s.index("frac", i) + 4
            num, i = _arg(s, i)
            den, i = _arg(s, i)
            out.append(f"(({_latex_to_py(num)})/({_latex_to_py(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            root = None
            if i < len(s) and s[i] == "[":
                j = s.index("]", i)
                root, i = s[i + 1 : j], j + 1
            body, i = _arg(s, i)
            inner = _latex_to_py(body)
            out.append(f"(({inner})**(1/({_latex_to_py(root)})))" if root else f"sqrt({inner})")
        elif s[i] == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m:
                i += 1
                continue
            name = m.group(1)
            i += len(m.group(0))
            if name in ("cdot", "times"):
                out.append("*")
            elif name == "div":
                out.append("/")
            elif name in _CONSTS or name in _FUNCS:
                out.append(f" {name} ")
            elif name in ("left", "right", "displaystyle", "mathrm", "text", "mathbf"):
                continue
            else:
                raise NotNumeric(f"unsupported command \\{name}")
        elif s[i] == "^":
            arg, i = _arg(s, i + 1)
            out.append(f"**({_latex_to_py(arg)})")
        elif s[i] in "{}":
            out.append("(" if s[i] == "{" else ")")
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([a-zA-Z]+)|(\*\*|[-+*/()]))")


def _implicit_mul(py: str) -> str:
    """Insert ``*`` for juxtaposition: ``2 sqrt(3)``, ``2x``, ``)(``, ``x y``."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    py = py.strip()
    while pos < len(py):
        m = _TOKEN.match(py, pos)
        if not m or m.end() == pos:
            raise NotNumeric(f"unexpected {py[pos : pos + 10]!r}")
        pos = m.end()
        if m.group(1):
            tokens.append(("num", m.group(1)))
        elif m.group(2):
            word = m.group(2)
            if word in _FUNCS or word in _CONSTS:
                tokens.append(("func" if word in _FUNCS else "name", word))
            else:
                tokens.extend(("name", ch) for ch in word)  # "xy" is x*y
        else:
            tokens.append(("op", m.group(3)))
    out: list[str] = []
    prev: tuple[str, str] | None = None
    for tok in tokens:
        value_end = prev is not None and (prev[0] in ("num", "name") or prev[1] == ")")
        value_start = tok[0] in ("num", "name", "func") or tok[1] == "("
        if value_end and value_start and not (prev and prev[0] == "func"):
            out.append("*")
        out.append(tok[1])
        prev = tok
    return " ".join(out)


_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _eval(node: ast.AST, env: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTS:
            return _CONSTS[node.id]
        if node.id in env:
            return env[node.id]
        raise NotNumeric(f"free variable {node.id}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXPONENT or abs(a) > 1e12:
                raise NotNumeric("exponent too large")
            r = a**b
            if isinstance(r, complex):
                raise NotNumeric("complex value")
            return float(r)
        fn = _BINOPS.get(type(node.op))
        if fn is None:
            raise NotNumeric("unsupported operator")
        return fn(a, b)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        fn = _FUNCS.get(node.func.id)
        if fn is not None:
            return fn(_eval(node.args[0], env))
    raise NotNumeric("unsupported expression")


def compile_expr(text: str) -> ast.Expression:
    """Parse ``text`` (LaTeX or plain) into a whitelisted AST; raises NotNumeric."""
    s = text.strip().strip("$").strip()
    if not s or len(s) > MAX_CHARS:
        raise NotNumeric("empty or too long")
    s = s.replace("π", "\\pi ").replace("√", "\\sqrt").replace("×", "*").replace("·", "*")
    s = s.replace("−", "-").replace("\\left", "").replace("\\right", "")
    py = _implicit_mul(_latex_to_py(s))
    try:
        tree = ast.parse(py, mode="eval")
    except SyntaxError as exc:
        raise NotNumeric(f"syntax: {exc.msg}") from exc
    return tree


def variables(tree: ast.AST) -> set[str]:
    return {
        n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and n.id not in _CONSTS and n.id not in _FUNCS
    }


def evaluate(text: str, env: dict[str, float] | None = None) -> float:
    """The value of a closed expression (``2\\sqrt{3}``, ``\\frac{\\pi}{2}``); raises NotNumeric."""
    tree = compile_expr(text)
    try:
        value = _eval(tree, env or {})
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        raise NotNumeric(str(exc)) from exc
    if math.isnan(value) or math.isinf(value):
        raise NotNumeric("not finite")
    return value


def try_evaluate(text: str) -> float | None:
    try:
        return evaluate(text)
    except NotNumeric:
        return None


_POINTS = [
    {
        v: random.Random(seed * 31 + k).uniform(0.3, 2.7)
        for k, v in enumerate("abcdefghijklmnopqrstuvwxyz")
    }
    for seed in range(5)
]


def same_function(a: str, b: str, rel_tol: float = 1e-6) -> bool | None:
    """Do two expressions with variables agree at fixed random points? None if not evaluable."""
    try:
        ta, tb = compile_expr(a), compile_expr(b)
    except NotNumeric:
        return None
    if variables(ta) != variables(tb):
        return False if variables(ta) and variables(tb) else None
    try:
        for env in _POINTS:
            va, vb = _eval(ta, env), _eval(tb, env)
            if not math.isclose(va, vb, rel_tol=rel_tol, abs_tol=1e-9):
                return False
    except (NotNumeric, ZeroDivisionError, OverflowError, ValueError):
        return None
    return True


def same_equation(a: str, b: str) -> bool | None:
    """``lhs=rhs`` equations equal up to a nonzero constant factor (``y=2x+1`` ~ ``2y=4x+2``)."""
    if a.count("=") != 1 or b.count("=") != 1:
        return None
    try:
        la, ra = a.split("=")
        lb, rb = b.split("=")
        ta = compile_expr(f"({la})-({ra})")
        tb = compile_expr(f"({lb})-({rb})")
    except NotNumeric:
        return None
    if variables(ta) != variables(tb) or not variables(ta):
        return None
    ratios = []
    try:
        for env in _POINTS:
            va, vb = _eval(ta, env), _eval(tb, env)
            if abs(vb) < 1e-12:
                if abs(va) > 1e-9:
                    return False
                continue
            ratios.append(va / vb)
    except (NotNumeric, ZeroDivisionError, OverflowError, ValueError):
        return None
    return (
        bool(ratios)
        and all(math.isclose(r, ratios[0], rel_tol=1e-6) for r in ratios)
        and (abs(ratios[0]) > 1e-12)
    )
