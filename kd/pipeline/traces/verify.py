"""Final-answer extraction and checking for math-style problems (GSM8K and the like).

    from kd.pipeline.traces.verify import extract_answer, extract_reference, answers_match
    answers_match(extract_answer(completion), extract_reference(record["answer"]))

Used by `kd gen-traces` (keep only traces whose answer is right) and `kd eval` (answer accuracy).
Checking is deliberately forgiving about form (``$1,200.00`` equals ``1200``, ``\\frac{3}{4}``
equals ``0.75``, ``2(x+1)`` equals ``2x+2``) and strict about value. Nothing here raises on odd
model output: a string that cannot be understood simply does not match.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_LAST_NUMBER_RE = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*(?:\d+))?")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_UNIT_SUFFIX_RE = re.compile(rf"^((?:{_NUMBER})(?:\s*/\s*\d+)?)\s*(?:%|[a-zA-Z][a-zA-Z .'-]*)$")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SIMPLE_FRAC_RE = re.compile(r"\\[dt]?frac(\d)(\d)")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")

# sympy's parse_expr evaluates Python, and the strings come from a model: only arithmetic
# characters and a few known function names may reach it (see _to_sympy).
_SAFE_EXPR_RE = re.compile(r"^[0-9a-zA-Z+\-*/^().\s]*$")
_SAFE_NAMES = {"sqrt", "pi", "exp", "log", "sin", "cos", "tan", "E", "I"}
_MAX_SYMBOLIC_CHARS = 120


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (and ``\\fbox{...}``) in order, with nested braces balanced."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


def normalize_answer(text: str) -> str:
    """Canonical surface form of an answer: no $/commas/%/trailing period/units, LaTeX text unwrapped."""
    s = text.strip()
    boxed = find_boxed(s)
    if boxed:
        s = boxed[-1].strip()
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\left", "").replace("\\right", "").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.rstrip(".。!").strip()
    s = s.strip("*").strip()  # markdown bold around an answer
    # "x = 5" -> "5": a single-variable left side names the unknown, it is not part of the value.
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)
    unit = _UNIT_SUFFIX_RE.match(s)
    if unit:
        s = unit.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    if re.fullmatch(r"[-+]?\d+\.\d*", s):  # 12.50 -> 12.5, 12.0 -> 12
        s = s.rstrip("0").rstrip(".") or "0"
    return s.lstrip("+")


def extract_reference(answer_field: str | int | float | None) -> str | None:
    """The reference answer of a prompt record: GSM8K's ``"...\\n#### 1,234"`` -> ``"1234"``.

    A bare number or string is normalised (see normalize_answer); a boxed answer is unboxed.
    None (or an empty string) means the record has no reference.
    """
    if answer_field is None or isinstance(answer_field, bool):
        return None
    if isinstance(answer_field, (int, float)):
        return normalize_answer(repr(answer_field) if isinstance(answer_field, float) else str(answer_field))
    text = str(answer_field)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        text = tail.splitlines()[0] if tail else ""
    elif find_boxed(text):
        text = find_boxed(text)[-1]
    result = normalize_answer(text)
    return result or None


def question_and_reference(record: dict) -> tuple[object, str | None]:
    """The question and extracted reference answer of a prompt record, for gen-traces and eval alike.

    Record shapes: GSM8K (``question``/``answer``), ``prompt`` with ``answer`` or ``reference``, or a
    conversation (``conversations``/``messages``: the first user turn, and a top-level ``reference``
    or ``answer``, else ``meta.reference`` as `kd gen-traces` writes it). The question is returned
    as found (the caller says what is wrong with it); the reference is None when there is none.
    """
    if "question" in record:
        question, answer = record["question"], record.get("answer")
    elif "prompt" in record:
        question, answer = record["prompt"], record.get("answer", record.get("reference"))
    else:
        turns = record.get("conversations", record.get("messages"))
        if not isinstance(turns, list):
            return None, None
        question = next((t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        answer = record.get("reference", record.get("answer", meta.get("reference")))
    usable = isinstance(answer, (str, int, float)) and not isinstance(answer, bool)
    return question, extract_reference(answer) if usable else None


def extract_answer(text: str, strict: bool = False) -> str | None:
    """A model's final answer, normalised; None if it gave none.

    Looked for in this order, the last occurrence winning each time: ``\\boxed{...}`` (nested braces
    balanced), GSM8K's ``#### N``, ``answer is N`` / ``Answer: N``. Unless `strict`, the fallback is
    the last number anywhere in the text: small models often end with "... so she has 12 apples"
    and never state an answer formally; strict=True turns that guess off.
    """
    if not text:
        return None
    boxed = [b for b in find_boxed(text) if b.strip()]
    if boxed:
        return normalize_answer(boxed[-1]) or None
    hashes = _HASH_RE.findall(text)
    if hashes:
        found = normalize_answer(hashes[-1])
        if found:
            return found
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        found = _first_value(stated[-1])
        if found:
            return found
    if strict:
        return None
    numbers = _LAST_NUMBER_RE.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def _first_value(phrase: str) -> str | None:
    """The value at the start of "answer is ..." text: up to the sentence end, units dropped."""
    phrase = re.split(r"(?<!\d)\.(?:\s|$)|\.\s|;|,\s", phrase.strip(), maxsplit=1)[0]
    value = normalize_answer(phrase)
    if not value:
        return None
    if _to_number(value) is not None:
        return value
    lead = re.match(rf"({_NUMBER})\s+[a-zA-Z]{{2,}}", value)  # "12 because ..." -> "12"; "2x+2" stays
    if lead:
        return normalize_answer(lead.group(1))
    return value if len(value) <= 40 else None


def _to_number(s: str) -> Fraction | None:
    """Exact value of a plain number, a/b, \\frac{a}{b} or a percentage; None otherwise."""
    s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    s = _SIMPLE_FRAC_RE.sub(r"\1/\2", s).replace(" ", "")
    s = s.removesuffix("%")
    m = re.fullmatch(r"\(?([-+]?\d*\.?\d+)\)?/\(?([-+]?\d*\.?\d+)\)?", s)
    try:
        if m:
            den = Fraction(m.group(2))
            return Fraction(m.group(1)) / den if den else None
        if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _latex_to_plain(s: str) -> str:
    s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\pi", "pi")
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    return s


def _to_sympy(s: str):
    """A sympy expression for a short arithmetic/algebra string, or None (never evaluates arbitrary code)."""
    plain = _latex_to_plain(s)
    if len(plain) > _MAX_SYMBOLIC_CHARS or not _SAFE_EXPR_RE.match(plain) or "__" in plain:
        return None
    for name in re.findall(r"[a-zA-Z]+", plain):
        if len(name) > 1 and name not in _SAFE_NAMES:
            return None
    # 9**9**9 would make sympy build a huge integer and hang: allow one small power at most.
    if plain.count("**") > 1 or re.search(r"\*\*\s*\(?\s*\d{4,}", plain):
        return None
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application,)
    return parse_expr(plain, transformations=transformations, evaluate=True)


def answers_match(answer: str, reference: str) -> bool:
    """Whether a model's answer equals the reference in value.

    Tried in order: normalised string equality; exact numeric equality (``$1,234.00`` == ``1234``,
    ``3/4`` == ``\\frac{3}{4}`` == ``0.75``, relative tolerance 1e-6 for decimals); symbolic
    equality with sympy (``simplify(a - b) == 0``) for expressions; never raises.
    """
    try:
        if answer is None or reference is None:
            return False
        a, r = normalize_answer(str(answer)), normalize_answer(str(reference))
        if not a or not r:
            return False
        if a == r or a.replace(" ", "").lower() == r.replace(" ", "").lower():
            return True
        a_num, r_num = _to_number(a), _to_number(r)
        if a_num is not None and r_num is not None:
            return abs(a_num - r_num) <= Fraction(1, 10**6) * max(1, abs(r_num))
        return _symbolic_equal(a, r)
    except Exception:  # odd model output must never crash a generation run
        return False


def _symbolic_equal(a: str, r: str) -> bool:
    import sympy

    try:
        a_expr, r_expr = _to_sympy(a), _to_sympy(r)
        if a_expr is None or r_expr is None:
            return False
        return bool(sympy.simplify(a_expr - r_expr) == 0)
    except Exception:  # sympy raises many types (SympifyError, TypeError, TokenError, ...)
        return False
