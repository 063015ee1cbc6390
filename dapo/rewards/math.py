"""The DAPO math verifier: find the answer, normalise it, compare; +1 correct, -1 wrong or no answer.

DAPO (arXiv 2503.14476, §2.4 and the DAPO-Math-17k prompt) asks for a last line ``Answer: $Answer`` and
scores it by exact match after the Minerva / hendrycks-MATH normalisation; verl's ``math_dapo`` looks
only at the last 300 characters of the response, so an early guess followed by rambling does not count.
This module keeps that contract and adds, on top:

- ``\\boxed{...}`` (or ``\\fbox{...}``) as a fallback answer format, with nested braces;
- a slightly more careful normaliser (thousands separators only in real thousands groupings, trailing
  unit words only after a value, ``a/b`` as ``\\frac{a}{b}``, ``0.50`` as ``0.5``);
- optional symbolic equivalence through ``math-verify`` (``0.75`` vs ``3/4``, intervals, sets), which
  can only turn a wrong verdict into a correct one, and runs under a time limit.

Everything before math-verify is linear in the (tail-bounded) input, so it cannot hang.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import NamedTuple

from dapo.rewards.limits import RewardTimeout, call_with_time_limit

TAIL_CHARS = 300
"""DAPO/verl look for the answer in this many trailing characters of the response."""


class MathScore(NamedTuple):
    score: float
    """+1.0 correct, -1.0 wrong or no answer."""
    correct: bool
    pred: str | None
    """The normalised predicted answer; None when the response has no answer in either format."""


# --------------------------------------------------------------------------------------------------
# extraction

_ANSWER_RE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, open_idx: int) -> str | None:
    """Content of the brace group opening at ``text[open_idx] == "{"``; None if it never closes."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces kept).

    ``\\boxed 5`` (no braces) gives ``5``. None when there is no box or the last one is unclosed.

    >>> last_boxed(r"so $\\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    """
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    if i < len(text) and text[i] == " ":
        token = text[i:].split(maxsplit=1)
        return token[0].split("$")[0] if token else None
    return None


def extract_answer(response: str, tail_chars: int | None = TAIL_CHARS) -> str | None:
    """The raw answer text of a response, or None.

    Looks only at the last ``tail_chars`` characters (None = all). The DAPO format wins: the text after
    the last ``Answer:`` (any case, to the end of its line; markdown ``**`` around it dropped). Else the
    content of the last ``\\boxed{}``.

    >>> extract_answer("2 + 2 = 4, so\\nAnswer: 4")
    '4'
    >>> extract_answer("the sum is $\\\\boxed{4}$"), extract_answer("no idea")
    ('4', None)
    """
    tail = response[-tail_chars:] if tail_chars else response
    matches = _ANSWER_RE.findall(tail)
    if matches:
        answer = matches[-1].strip().strip("*").strip()
        if answer:
            return answer
    boxed = last_boxed(tail)
    return boxed.strip() if boxed is not None and boxed.strip() else None


# --------------------------------------------------------------------------------------------------
# normalisation

_UNIT_WORDS = (
    "units", "unit", "square", "sq", "cubic", "cm", "mm", "km", "meters", "meter", "metres", "metre",
    "inches", "inch", "feet", "foot", "ft", "miles", "mile", "mph", "yards", "yard", "hours", "hour",
    "hrs", "minutes", "minute", "mins", "seconds", "second", "days", "day", "weeks", "week", "years",
    "year", "dollars", "dollar", "cents", "cent", "degrees", "degree", "points", "point", "ways",
    "students", "people", "integers", "digits", "pounds", "kg", "grams", "liters", "litres",
)
_TRAILING_UNITS_RE = re.compile(
    r"(?<=[\d}).])\s*(?:(?:%s)\b\s*)+(?:\^\{?[23]\}?)?$" % "|".join(_UNIT_WORDS), re.IGNORECASE
)
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox")
_SPACING_RE = re.compile(r"\\[,;:! ]|~|\{,\}|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])")
_DEGREES_RE = re.compile(r"\^\s*\{?\\circ\}?|\\circ|\\degree|°|\\%|%")
_FRACTION_RE = re.compile(r"(-?)(\d+)/(\d+)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def _unwrap(text: str, commands: tuple[str, ...]) -> str:
    """Replace every ``\\cmd{X}`` (cmd in ``commands``, X with balanced braces) by ``X``."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            for cmd in commands:
                j = i + len(cmd)
                if text.startswith(cmd, i) and text[j : j + 1] == "{":
                    inner = _braced(text, j)
                    if inner is not None:
                        out.append(_unwrap(inner, commands))
                        i = j + len(inner) + 2
                        break
            else:
                out.append(text[i])
                i += 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _strip_trailing_text_unit(text: str) -> str:
    """``5\\text{ cm}^2`` -> ``5``: a ``\\text{...}`` that ends the answer after a value is a unit."""
    core = text.rstrip()
    for power in ("^2", "^3", "^{2}", "^{3}"):
        if core.endswith(power):
            core = core[: -len(power)].rstrip()
    if not core.endswith("}"):
        return text
    start, command = max((core.rfind(c + "{"), c) for c in _TEXT_COMMANDS)
    if start <= 0:
        return text
    inner = core[start + len(command) + 1 : -1]
    value = core[:start].rstrip()
    if "{" in inner or "}" in inner or not re.search(r"[A-Za-z]", inner) or not value:
        return text
    return value


def _fix_shorthand(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{b}`` -> ``\\frac{1}{b}``, ``\\sqrt2`` -> ``\\sqrt{2}``."""
    out, i = [], 0
    while i < len(text):
        command = next((c for c in ("\\frac", "\\sqrt") if text.startswith(c, i)), None)
        if command is None:
            out.append(text[i])
            i += 1
            continue
        out.append(command)
        i += len(command)
        if command == "\\sqrt" and text.startswith("[", i) and "]" in text[i:]:  # \sqrt[3]{x}: keep the index
            close = text.index("]", i)
            out.append(text[i : close + 1])
            i = close + 1
        for _ in range(2 if command == "\\frac" else 1):
            if i >= len(text) or text[i] == "}":
                break
            if text[i] == "{":
                inner = _braced(text, i)
                if inner is None:
                    break
                out.append("{" + _fix_shorthand(inner) + "}")
                i += len(inner) + 2
            else:
                out.append("{" + text[i] + "}")
                i += 1
    return "".join(out)


def _canonical_number(text: str) -> str:
    """``+5`` -> ``5``, ``.5`` -> ``0.5``, ``2.50`` -> ``2.5``, ``3.0`` -> ``3``, ``-0`` -> ``0``."""
    sign = "-" if text.startswith("-") else ""
    body = text.lstrip("+-")
    if "." in body:
        body = body.rstrip("0").rstrip(".")
        if body.startswith("."):
            body = "0" + body
    body = body or "0"
    return body if body.strip("0.") == "" else sign + body


def normalize_answer(answer: str) -> str:
    """Minerva / hendrycks-MATH normalisation of a final answer, for exact comparison.

    Unwraps ``\\boxed``/``\\fbox``, keeps the text after the last ``=``, drops ``$``, spacing commands,
    ``\\left``/``\\right``, degrees and percent signs, trailing units (``\\text{ cm}``, ``5 dollars``),
    unwraps ``\\text{}``-like commands, removes whitespace, expands ``\\frac12`` and ``\\sqrt2``,
    writes ``a/b`` as ``\\frac{a}{b}``, drops thousands separators (``1,000``; not ``1,2,3``) and
    canonicalises plain decimals.

    >>> normalize_answer(r"x = \\boxed{\\dfrac12}")
    '\\\\frac{1}{2}'
    >>> normalize_answer("$1{,}000$ dollars."), normalize_answer("3/4"), normalize_answer("2.50")
    ('1000', '\\\\frac{3}{4}', '2.5')
    """
    s = answer.strip().replace("\u2212", "-")
    s = _unwrap(s, _BOX_COMMANDS)
    s = s.rsplit("=", 1)[-1]
    s = s.replace("\\$", "")
    if s.count("$") >= 2:  # "$5$ apples" -> the first math span
        s = s.split("$")[1]
    s = s.replace("$", "").strip().rstrip(".").rstrip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\mbox", "\\text")
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREES_RE.sub("", s)
    s = _strip_trailing_text_unit(s)
    s = _TRAILING_UNITS_RE.sub("", s)
    s = _unwrap(s, _TEXT_COMMANDS)
    s = "".join(s.split()).rstrip(".")
    s = _fix_shorthand(s)
    m = _FRACTION_RE.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _NUMBER_RE.fullmatch(s):
        s = _canonical_number(s)
    return s


_normalized_gold = functools.lru_cache(maxsize=4096)(normalize_answer)


# --------------------------------------------------------------------------------------------------
# symbolic equivalence (optional)

_MATH_VERIFY = None  # the module once imported; False when it is not installed
_INTEGER_RE = re.compile(r"-?\d+")


def _math_verify():
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        try:
            import math_verify
            import math_verify.grader
            import math_verify.parser

            # We impose our own time limit (call_with_time_limit), so math-verify's signal-based one is
            # off; these flags only silence its one-time warning about that.
            math_verify.parser.TIMEOUT_WARNING_SHOWN = True
            math_verify.grader.TIMEOUT_WARNING_SHOWN = True
            _MATH_VERIFY = math_verify
        except ImportError:
            _MATH_VERIFY = False
    return _MATH_VERIFY


def math_verify_available() -> bool:
    """Whether ``math-verify`` is installed (``pip install 'dapo[math]'``)."""
    return bool(_math_verify())


def _as_latex(text: str) -> str:
    # math-verify extracts from $...$ or \boxed{}; a bare answer is wrapped so it is read as LaTeX
    return text if "$" in text or "\\boxed" in text else f"${text}$"


@functools.lru_cache(maxsize=4096)
def _parsed_gold(ground_truth: str):
    # a prompt's ground truth is compared with all G responses of its group: parse it once
    return tuple(_math_verify().parse(_as_latex(ground_truth), parsing_timeout=None))


def _symbolic_equal(pred: str, ground_truth: str) -> bool:
    mv = _math_verify()
    gold = list(_parsed_gold(ground_truth))
    guess = mv.parse(_as_latex(pred), parsing_timeout=None)
    return bool(gold and guess and mv.verify(gold, guess, timeout_seconds=None))


_warned_no_math_verify = False


def score_math(
    response: str,
    ground_truth: str,
    use_math_verify: bool | None = None,
    timeout_s: float | None = 3.0,
    tail_chars: int | None = TAIL_CHARS,
) -> MathScore:
    """Score a response against a ground truth the DAPO way.

    response: the decoded completion. ground_truth: the reference answer (``"34"``, ``"\\frac{1}{2}"``).
    use_math_verify: also accept symbolically equal answers; None = only for non-integer ground truths
    (DAPO-Math-17k's are all integers, where exact match is the paper's rule). Without math-verify
    installed this is exact match, with a warning. timeout_s: limit on the math-verify step; past it
    the exact-match verdict stands. tail_chars: how much of the response's end to search (None = all).

    >>> score_math("... so x = 12.\\nAnswer: 12", "12")
    MathScore(score=1.0, correct=True, pred='12')
    >>> score_math("I think \\\\boxed{0.75}", "3/4", use_math_verify=False)
    MathScore(score=-1.0, correct=False, pred='0.75')
    """
    raw = extract_answer(response, tail_chars)
    if raw is None:
        return MathScore(-1.0, False, None)
    pred = normalize_answer(raw)
    gold = _normalized_gold(str(ground_truth))
    correct = bool(pred) and pred == gold
    if use_math_verify is None:
        use_math_verify = not _INTEGER_RE.fullmatch(gold)
    if not correct and use_math_verify and pred:
        if _math_verify():
            try:
                correct = call_with_time_limit(timeout_s, _symbolic_equal, raw, str(ground_truth))
            except RewardTimeout:
                correct = False
        else:
            global _warned_no_math_verify
            if not _warned_no_math_verify:
                warnings.warn("math-verify is not installed: math answers are compared by exact match "
                              "only (pip install 'dapo[math]')", stacklevel=2)
                _warned_no_math_verify = True
    return MathScore(1.0 if correct else -1.0, correct, pred)


def warm_up() -> None:
    """Import math-verify now (about a second), e.g. in a fresh reward worker before its first call."""
    _math_verify()


def vote_answer(response: str) -> str | None:
    """The answer a response gives, normalised, for the majority vote (maj@k) and sample logs.

    The DAPO math answer (``Answer: ...`` or ``\\boxed{...}``, normalised exactly as ``score_math``
    does, so it equals ``MathScore.pred``); failing that, the text after the last ':' (the built-in
    tasks' format, ``15,12,04:425``); None when there is neither.

    >>> vote_answer("so\\nAnswer: $1{,}000$"), vote_answer("15,12,04:425"), vote_answer("no idea")
    ('1000', '425', None)
    """
    raw = extract_answer(response)
    if raw is not None:
        return normalize_answer(raw)
    head, sep, tail = response.rpartition(":")
    return (" ".join(tail.split()) or None) if sep else None
