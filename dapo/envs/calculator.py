"""The built-in calculator tools (``--tools calculator``): exact integer and decimal arithmetic, no ``eval``.

    <tool>mul(347, 86)</tool>          -> 29842
    <tool>calc("(12 + 3) * 4")</tool>  -> 60

``calc`` parses its expression with :mod:`ast` and walks only number literals, ``+ - * / // % **``, unary
signs and parentheses: a name, a call, an attribute or anything else is refused with an error saying so, so a
model's text never runs as code. Sizes are bounded (``MAX_DIGITS``, ``MAX_EXPONENT``) so that ``9**9**9`` is
an error, not a worker stuck for minutes (the tool's time limit would stop it, at that cost every call).
"""
from __future__ import annotations

import ast
import operator
from fractions import Fraction

MAX_DIGITS = 100
"""Longest integer (in digits) an argument, an intermediate or a result may have."""
MAX_EXPONENT = 64
"""Largest exponent ``**`` accepts."""

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _number(x: object, what: str) -> int | Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float, Fraction)):
        raise TypeError(f"{what} must be a number, got {type(x).__name__} {x!r}")
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be finite, got {x!r}")
        x = Fraction(x).limit_denominator(10**12)
    return _bounded(x, what)


def _bounded(x: int | Fraction, what: str) -> int | Fraction:
    ints = (x,) if isinstance(x, int) else (x.numerator, x.denominator)
    if any(abs(i) >= 10**MAX_DIGITS for i in ints):
        raise ValueError(f"{what} has more than {MAX_DIGITS} digits")
    return x


def _show(x: int | Fraction) -> str:
    """An integer as is; a fraction as an exact decimal when it has one, else to 12 significant digits."""
    if isinstance(x, int) or x.denominator == 1:
        return str(int(x))
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1 and x.denominator <= 10**12:  # terminates within 12 places
        s = f"{float(x):.12f}".rstrip("0")
        if Fraction(s) == x:
            return s
    return f"{float(x):.12g}"


def mul(a: int | float, b: int | float) -> str:
    """Multiply two numbers exactly.

    Args:
        a: the first factor (an integer or a decimal)
        b: the second factor (an integer or a decimal)

    Returns:
        The product, exactly (a decimal cut to 12 significant digits only when it has no exact one).

    >>> mul(347, 86)
    '29842'
    >>> mul(-12, 0.5)
    '-6'
    """
    return _show(_bounded(_number(a, "a") * _number(b, "b"), "the product"))


def _eval(node: ast.AST) -> int | Fraction:
    if isinstance(node, ast.Constant):
        return _number(node.value, f"the literal {node.value!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ZeroDivisionError("division by zero")
        if isinstance(node.op, ast.Pow):
            if not (isinstance(right, int) or right.denominator == 1) or abs(right) > MAX_EXPONENT:
                raise ValueError(f"** takes a whole exponent of at most {MAX_EXPONENT} in size, got {_show(right)}")
            right = int(right)
            if right < 0 and left == 0:
                raise ZeroDivisionError("0 to a negative power")
            left = Fraction(left) if right < 0 else left
        if isinstance(node.op, ast.Div):
            left = Fraction(left)
        return _bounded(_BINARY[type(node.op)](left, right), "an intermediate result")
    raise ValueError(f"calc accepts numbers, + - * / // % ** and parentheses, not {type(node).__name__}")


def calc(expr: str) -> str:
    """Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses.

    Args:
        expr: the expression, e.g. "(12 + 3) * 4"

    Returns:
        Its value: fractions are kept until the end, then shown as an exact decimal where there is one.

    >>> calc("(12 + 3) * 4")
    '60'
    >>> calc("1 / 8 - 2**-1")
    '-0.375'
    """
    if not isinstance(expr, str):
        raise TypeError(f"calc takes the expression as a string, got {type(expr).__name__}")
    if len(expr) > 1000:
        raise ValueError(f"expression of {len(expr)} characters: at most 1000")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None
    return _show(_eval(tree.body))
