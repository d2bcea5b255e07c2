"""Final-answer extraction and checking for math-style problems (GSM8K and the like).

    from kd.pipeline.traces.verify import extract_answer, extract_reference, answers_match
    answers_match(extract_answer(completion), extract_reference(record["answer"]))

Used by `kd gen-traces` (keep only traces whose answer is right), `kd eval --generate` and on-policy
rounds (answer accuracy). Equality of value is decided by Hugging Face's `math-verify` (the verifier
of open-r1 and TRL's accuracy rewards): ``\\frac{3}{4}`` equals ``0.75``, ``2(x+1)`` equals ``2x+2``.
What stays here is what math-verify does not do: GSM8K's ``#### 1,234`` references, the record
shapes kd reads, kd's rules for a completion's final answer (boxed, ``####``, "answer is", last
number) and a surface clean-up (``$1,200.00``, ``18 dollars``, ``72.``) before the comparison.
Nothing here raises on odd model output, and no model string is evaluated as Python: math-verify
reads LaTeX with an ANTLR grammar (latex2sympy2_extended) and gives sympy's ``parse_expr`` (which
does ``eval``) only strings of digits and operators, a path kd does not even enable.
"""

from __future__ import annotations

import logging
import re
import threading

from kd.errors import KdError

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_LAST_NUMBER_RE = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*(?:\d+))?")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_UNIT_SUFFIX_RE = re.compile(rf"^((?:{_NUMBER})(?:\s*/\s*\d+)?)\s*(?:%|[a-zA-Z][a-zA-Z .'-]*)$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?|[-+]?\d+\s*/\s*[-+]?\d+")
_WORDS_RE = re.compile(r"[a-zA-Z][a-zA-Z' -]*[a-zA-Z]")

# Cost guards before math-verify. Its timeouts are signal.alarm, which works only in the main
# thread; elsewhere they are off and these guards alone keep 9^{9^{9^9}} (sympy builds the integer)
# or 999999! from hanging a run. They apply in the main thread too: a timeout of seconds on each odd
# answer would still stall a run over thousands of samples.
_MAX_CHARS = 200
_POWER_TOWER_RE = re.compile(r"(?:\^|\*\*)\s*[({]?\s*\d+(?:\.\d+)?\s*(?:\^|\*\*)")  # 9^9^9, 2^{3^{4}}
_BIG_EXPONENT_RE = re.compile(r"(?:\^|\*\*)\s*[({]?\s*[-+]?\d{6,}")  # 2^{2024} is fine, 9^{999999} is not
_BIG_FACTORIAL_RE = re.compile(r"\d{6,}\s*\}?\s*!")
_TIMEOUT_S = 5  # per math-verify parse/verify call, main thread only

# math-verify logs a warning when timeouts are off and an error per timed-out comparison; for kd
# either is an answer that does not match, so its loggers stay quiet.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


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
    if _PLAIN_NUMBER_RE.fullmatch(value):
        return value
    lead = re.match(rf"({_NUMBER})\s+[a-zA-Z]{{2,}}", value)  # "12 because ..." -> "12"; "2x+2" stays
    if lead:
        return normalize_answer(lead.group(1))
    return value if len(value) <= 40 else None


def answers_match(answer: str, reference: str) -> bool:
    """Whether a model's answer equals the reference in value.

    Both sides are normalised (see normalize_answer); equal strings (ignoring case and spaces)
    match; otherwise math-verify decides (numbers, fractions, percentages, LaTeX, algebra, sets).
    Answers made of words only (``Paris``) match by string alone: as algebra ``Paris`` is the
    product ``P*a*r*i*s`` and would equal any anagram. Never raises.
    """
    try:
        if answer is None or reference is None:
            return False
        a, r = normalize_answer(str(answer)), normalize_answer(str(reference))
        if not a or not r:
            return False
        if a.replace(" ", "").lower() == r.replace(" ", "").lower():
            return True
        if _WORDS_RE.fullmatch(a) and _WORDS_RE.fullmatch(r):
            return False
        if _too_costly(a) or _too_costly(r):
            return False
    except Exception:  # odd model output must never crash a generation run
        return False
    return _math_verify_equal(a, r)


def _too_costly(s: str) -> bool:
    """Whether sympy could spend minutes on a string: too long, a power tower, a big exponent or factorial."""
    return len(s) > _MAX_CHARS or any(p.search(s) for p in (_POWER_TOWER_RE, _BIG_EXPONENT_RE, _BIG_FACTORIAL_RE))


def _as_latex(s: str) -> str:
    """An answer as math-verify's LaTeX extraction finds it: boxed, with 1e3 written out (LaTeX reads e as a symbol)."""
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d{1,3}", s):
        s = format(float(s), "f").rstrip("0").rstrip(".")
    return f"\\boxed{{{s}}}"


def _math_verify_equal(answer: str, reference: str) -> bool:
    try:
        from math_verify import LatexExtractionConfig, parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as exc:  # not swallowed: without it every answer would silently count as wrong
        raise KdError(f"answer checking needs math-verify: pip install 'math-verify[antlr4_13_2]' ({exc})") from exc

    # signal.alarm works only in the main thread: elsewhere math-verify raises unless its timeouts
    # are off (None), and then the guards must bound the work: _too_costly, and no power of a power.
    seconds = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    if seconds is None and (_nested_power(answer) or _nested_power(reference)):
        return False
    config = [LatexExtractionConfig()]
    try:
        gold = parse(_as_latex(reference), extraction_config=config, parsing_timeout=seconds)
        pred = parse(_as_latex(answer), extraction_config=config, parsing_timeout=seconds)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=seconds))
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return False


def _nested_power(s: str) -> bool:
    """Whether a power is raised to a power: ``(x^y)^z``, ``x^{y^z}``, ``x^y^z`` (also with ``**``).

    Those are the shapes that make sympy build numbers of billions of digits ((9^{99999})^{99999}),
    which nothing can interrupt off the main thread. A few real answers have them (``e^{-x^2}``):
    off the main thread they count as wrong, in the main thread math-verify's timeout bounds them.
    """
    s = s.replace("**", "^")
    group_has_power = [False]  # per open bracket (index 0: the whole string)
    group_is_exponent = [False]
    prev = ""  # the last character that is not a space
    closed_power = False  # the group that just closed contained a power
    in_exponent_number = False  # inside an exponent written without braces: the 9s of ^99
    for ch in s:
        if ch.isspace():
            continue
        if ch == "^":
            if (prev in ")}]" and closed_power) or in_exponent_number or any(group_is_exponent):
                return True
            group_has_power = [True] * len(group_has_power)
        elif ch in "({[":
            group_has_power.append(False)
            group_is_exponent.append(prev == "^")
        elif ch in ")}]" and len(group_has_power) > 1:
            closed_power = group_has_power.pop()
            group_is_exponent.pop()
        in_exponent_number = (prev == "^" and ch not in "({[") or (in_exponent_number and (ch.isdigit() or ch == "."))
        prev = ch
    return False
