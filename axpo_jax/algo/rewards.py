"""Binary answer rewards (docs/AXPO.md §1: "Reward: binary answer correctness r ∈ {0,1}. No format reward, no tool
reward").

Pipeline: `extract_answer` takes the content of the last `\\boxed{…}` inside the last `<answer>…</answer>` block
(delegating to `axpo_jax.tools.protocol.extract_answer`, the single place that parses the policy's protocol); a
scorer compares it with the reference; `binary_reward` dispatches by kind and returns 0.0 or 1.0. A response with
no answer (no block, no complete `\\boxed{}`, or an empty box) scores 0.

Scorers (each `scorer(prediction, reference, ...) -> bool`; a reference may be a string or a sequence of accepted
strings, any of which counts):

- "exact":   equality after `normalize_text` (whitespace collapsed, case folded, trailing periods dropped,
             `\\text{…}`-style wrappers unwrapped, `$` removed).
- "numeric": both sides parsed by `parse_number` (ints, floats, scientific notation, thousands separators,
             `a/b`, `\\frac{a}{b}`, percentages; a trailing unit is read off) and compared with a tolerance; when
             either side is not a number, falls back to "exact".
- "choice":  multiple-choice letters: `(B)`, `B.`, `b`, `option B`, `B) text` → "B".
- "math":    a small safe expression evaluator (numbers, + - * / ^, sqrt, pi, parentheses/braces, `\\frac`,
             implicit multiplication; a trailing unit is read off) compared numerically; non-numeric expressions
             fall back to exact match with all whitespace removed. Model text is never passed to `eval`.
- "f1":      SQuAD-style token F1 ≥ a threshold (search answers).
- "judge":   a caller-provided `Judge` (e.g. an LLM) scores ≥ a threshold.

Unstated in the paper (it only says "binary answer correctness"), chosen here and exposed in `RewardConfig`:
- numeric tolerance: `math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)`: tight enough that 3.14 ≠ π, loose enough
  that float round-off and 4-significant-digit answers match.
- percentages: "50%" is accepted as 50 or 0.5 (graders disagree on whether the % is part of the value; datasets
  write both). A side without % is taken literally.
- units ("numeric" and "math"): references often omit units that answers write ("12 cm" for "12"), and the other
  way round. A trailing unit is read off when what remains is a number/expression; a unit on one side only is
  ignored; units on both sides must agree after normalization ("12 meters" = "12 m", "12 cm" ≠ "12 m"; nothing is
  converted). One- and two-letter units come from a fixed list (so "2x" stays algebra); longer words count as units
  ("12 apples") unless they change the value ("million", "squared", "percent"). See `numeric_match`.
- f1 threshold: 0.5 (the usual "F1 > 0.5 means answered" cut for open-domain QA; binary as AXPO requires).
- judge threshold: 0.5; a judge's exception propagates (a silent 0 would corrupt the reward signal).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from axpo_jax.tools.protocol import ANSWER_CLOSE, ANSWER_OPEN, closing_brace
from axpo_jax.tools.protocol import extract_answer as _extract_boxed_answer

__all__ = [
    "KINDS",
    "Judge",
    "RewardConfig",
    "binary_reward",
    "choice_match",
    "evaluate_math",
    "exact_match",
    "extract_answer",
    "f1_match",
    "math_match",
    "normalize_text",
    "numeric_match",
    "parse_choice",
    "parse_number",
    "score_answer",
    "token_f1",
]

Reference = str | Sequence[str]


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction


def extract_answer(text: str, *, require_boxed: bool = True) -> str | None:
    """The answer the policy gave: the content of the last `\\boxed{…}` in the last `<answer>…</answer>` block.

    Braces nest (`\\boxed{\\frac{1}{2}}` → `\\frac{1}{2}`); the closing `</answer>` may be missing at the end of the
    text. None when there is no answer block, no complete box, or the box is empty (unanswered → reward 0).

    `require_boxed=False` also accepts a block without a box (`<answer>42</answer>` → "42"); the paper's format
    (§1) always boxes, so the default is strict.
    """
    answer = _extract_boxed_answer(text)
    if answer is None and not require_boxed:
        start = text.rfind(ANSWER_OPEN)
        if start != -1:
            answer = text[start + len(ANSWER_OPEN):]
            end = answer.find(ANSWER_CLOSE)
            if end != -1:
                answer = answer[:end]
            answer = answer.strip()
    if answer is None or not answer.strip():
        return None
    return answer.strip()


# ----------------------------------------------------------------------------------------------------------------
# Text normalization

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{")
_LATEX_SPACES = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u00f7": "/", "\u00a0": " ", "\u2009": " "}


def _unwrap_text_commands(s: str) -> str:
    """`\\text{km}` → `km` (balanced braces; repeated until none is left)."""
    for _ in range(64):  # bounded: each pass removes one wrapper
        m = _WRAPPER_RE.search(s)
        if m is None:
            return s
        end = closing_brace(s, m.end() - 1)
        if end is None:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + s[m.end():end] + s[end + 1:]
    return s


def _basic_clean(s: str) -> str:
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = _unwrap_text_commands(s)
    s = s.replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = _LATEX_SPACES.sub(" ", s)
    return s


def normalize_text(s: str) -> str:
    """Normalization for exact match: unicode minus/×, `\\text{…}`-style wrappers unwrapped, `$` and LaTeX spacing
    removed, whitespace collapsed, lower-cased, trailing periods (and surrounding whitespace) stripped."""
    s = _basic_clean(s)
    s = " ".join(s.split()).lower()
    return s.rstrip(". ").strip()


def _references(reference: Reference) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    refs = [r for r in reference if isinstance(r, str)]
    if not refs:
        raise ValueError("reference must be a string or a non-empty sequence of strings")
    return refs


def exact_match(prediction: str, reference: Reference) -> bool:
    """True when `normalize_text(prediction)` equals the normalized reference (any of them)."""
    p = normalize_text(prediction)
    return any(p == normalize_text(r) for r in _references(reference))


# ----------------------------------------------------------------------------------------------------------------
# Numbers

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac")
_SPACED_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_SPACE_NOT_BETWEEN_DIGITS = re.compile(r"(?<!\d)\s+|\s+(?!\d)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")


def _plain_number(s: str) -> float | None:
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    if _THOUSANDS.fullmatch(s):
        return float(s.replace(",", ""))
    return None


def _parse_number_ex(text: str) -> tuple[float, bool] | None:
    """(value as written, had a percent sign) or None."""
    s = _basic_clean(text)
    s = _DEGREES.sub("", s)
    s = s.replace("{,}", ",").strip()
    if _SPACED_THOUSANDS.fullmatch(s):
        s = s.replace(" ", "")
    s = _SPACE_NOT_BETWEEN_DIGITS.sub("", s)  # "- 1 / 2" → "-1/2", but "2 3" stays two numbers
    s = s.rstrip(".")
    percent = False
    if s.endswith("\\%"):
        s, percent = s[:-2], True
    elif s.endswith("%"):
        s, percent = s[:-1], True
    while len(s) >= 2 and s[0] == "{" and closing_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    if not s:
        return None
    value = _plain_number(s)
    if value is None:
        m = _FRAC.match(s)
        if m and m.end() < len(s) and s[m.end()] == "{":
            end_a = closing_brace(s, m.end())
            second_opens = end_a is not None and end_a + 1 < len(s) and s[end_a + 1] == "{"
            if second_opens and closing_brace(s, end_a + 1) == len(s) - 1:
                a = _plain_number(s[m.end() + 1:end_a])
                b = _plain_number(s[end_a + 2:-1])
                if a is not None and b is not None and b != 0:
                    value = a / b * (-1.0 if m.group(1) == "-" else 1.0)
        elif s.count("/") == 1:
            a_text, b_text = s.split("/")
            a, b = _plain_number(a_text), _plain_number(b_text)
            if a is not None and b is not None and b != 0:
                value = a / b
    if value is None or not math.isfinite(value):
        return None
    return value, percent


def parse_number(text: str) -> float | None:
    """The number a string writes, or None.

    Accepts ints, floats, scientific notation, thousands separators (`1,234.5`, LaTeX `1{,}234`), fractions `a/b`
    and `\\frac{a}{b}` (also `\\dfrac`, `\\tfrac`, a leading sign), percentages (`12.5%`, `12.5\\%` → 0.125),
    `$…$`, `\\text{…}` wrappers and degree marks. Anything else (units, words, expressions) → None; see
    `evaluate_math` for expressions. `numeric_match` and `math_match` read a trailing unit off before calling it.
    """
    parsed = _parse_number_ex(text)
    if parsed is None:
        return None
    value, percent = parsed
    return value / 100.0 if percent else value


def _number_readings(text: str) -> list[float] | None:
    parsed = _parse_number_ex(text)
    if parsed is None:
        return None
    value, percent = parsed
    return [value, value / 100.0] if percent else [value]


def _close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


# ----------------------------------------------------------------------------------------------------------------
# Trailing units ("12 cm", "12\\text{ cm}^2", "5 km/h", "45^\\circ"): read as the number, never converted

# Unit symbols recognised as written (case matters: "mg" is not "Mg"), mapped to one spelling for comparison.
# One- and two-letter words are accepted as units only from this table, because short letter runs after a number
# are far more often variables ("2x", "3ab") than units.
_UNIT_SYMBOLS = {
    "mm": "mm", "cm": "cm", "m": "m", "km": "km", "in": "in", "ft": "ft", "yd": "yd", "mi": "mi",
    "g": "g", "kg": "kg", "mg": "mg", "lb": "lb", "lbs": "lb", "oz": "oz",
    "s": "s", "sec": "s", "ms": "ms", "min": "min", "h": "h", "hr": "h", "hrs": "h",
    "l": "L", "L": "L", "ml": "mL", "mL": "mL", "cc": "cc", "deg": "deg", "rad": "rad", "kph": "km/h", "mph": "mi/h",
}
# Spelled-out unit names (lower case, singular) → the symbol above, so "12 meters" and "12 m" name the same unit.
_UNIT_NAMES = {
    "millimeter": "mm", "millimetre": "mm", "centimeter": "cm", "centimetre": "cm", "meter": "m", "metre": "m",
    "kilometer": "km", "kilometre": "km", "inch": "in", "foot": "ft", "feet": "ft", "yard": "yd", "mile": "mi",
    "gram": "g", "kilogram": "kg", "milligram": "mg", "pound": "lb", "ounce": "oz", "second": "s",
    "millisecond": "ms", "minute": "min", "hour": "h", "liter": "L", "litre": "L", "milliliter": "mL",
    "millilitre": "mL", "degree": "deg", "radian": "rad", "dollar": "dollar", "usd": "dollar",
}
# Words of three or more letters are otherwise accepted as a unit ("12 apples", "3 people", "5 units", "7 dollars":
# counting answers write the counted noun, and a whitelist of nouns can never be complete), except these, which
# change the value ("1.2 million" is not 1.2, "3 squared" is 9) or are mathematics rather than a unit ("2 sin").
_VALUE_CHANGING_WORDS = frozenset({
    "hundred", "thousand", "million", "billion", "trillion", "lakh", "crore", "dozen", "score", "mil",
    "percent", "percentage", "pct", "permille", "squared", "cubed", "half", "halves", "third", "quarter",
    "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth", "thirteenth",
    "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth", "thirtieth",
    "fortieth", "fiftieth", "sixtieth", "hundredth", "thousandth", "millionth", "grand", "gross", "pair", "basis",
    "bps", "sqrt", "root", "sin", "cos", "tan", "cot", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "exp", "mod", "factorial", "inf", "infinity",
    # words that qualify or negate the number rather than name what it counts ("12 not", "5 negative", "1 over")
    "not", "wrong", "incorrect", "negative", "minus", "plus", "over", "times", "less", "more", "than", "and",
    "approx", "approximately", "about", "around", "nearly", "roughly", "almost", "least", "most",
})
# "square cm", "sq units", "cubic meters" raise the following word to a power; "per" divides by it.
_POWER_PREFIXES = {"square": "2", "sq": "2", "cubic": "3"}
_SUPERSCRIPT_POWERS = {"\u00b2": "^2", "\u00b3": "^3"}

_UNIT_FACTOR = r"[A-Za-z]+(?:\s*\^\s*(?:\{\s*[23]\s*\}|[23]))?"
# at most four factors ("square meters per second"); not started inside a word or a LaTeX command ("3\pi")
_TRAILING_UNIT = re.compile(
    rf"(?<![A-Za-z\\^_]){_UNIT_FACTOR}(?:(?:\s*/\s*|\s+){_UNIT_FACTOR}){{0,3}}$")
_UNIT_TOKEN = re.compile(r"(?P<sep>\s*/\s*|\s*)(?P<word>[A-Za-z]+)(?:\s*\^\s*\{?\s*(?P<power>[23])\s*\}?)?")
_TRAILING_DEGREES = re.compile(rf"(?:{_DEGREES.pattern})\s*(?P<scale>[CF])?$")
_ESCAPED_DOLLAR = "\\$"
_MAX_UNIT_TEXT_CHARS = 400  # answers with a unit are short; longer text is not searched for one


def _singular(word: str) -> str:
    """"meters" → "meter", "inches" → "inch"; words ending in -ss/-us/-is are left alone ("celsius")."""
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("ch", "sh", "x")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _canonical_unit(unit_text: str, *, separated: bool) -> str | None:
    """One spelling for a unit expression ("square meters" → "m^2", "km per hour" → "km/h"), or None when the
    words are not unit-like (see `_UNIT_SYMBOLS`, `_VALUE_CHANGING_WORDS`).

    `separated`: a space (or a `\\text{}`-style wrapper) stands between the number and the unit. Without one only
    known units are taken, and never a lone one-letter unit: "12cm" and "5m/s" are units, "2m" and "2m^2" stay
    algebra (as "2x" does)."""
    parts: list[str] = []
    words: list[str] = []
    pending_power: str | None = None
    divide_next = False
    all_known = True
    for token in _UNIT_TOKEN.finditer(unit_text):
        word, power = token.group("word"), token.group("power")
        if token.group("sep").strip() == "/":
            divide_next = True
        lower = word.lower()
        if lower == "per":
            if not parts:  # "12 per" names no unit
                return None
            divide_next = True
            continue
        if lower in _POWER_PREFIXES and power is None:
            pending_power = _POWER_PREFIXES[lower]
            continue
        if lower in ("squared", "cubed") and parts and pending_power is None:
            # "cm squared" = cm^2 (a "squared" right after the number is arithmetic and is rejected below)
            parts[-1] = parts[-1].split("^")[0] + ("^2" if lower == "squared" else "^3")
            continue
        if word in _UNIT_SYMBOLS:
            name = _UNIT_SYMBOLS[word]
        elif lower in _VALUE_CHANGING_WORDS or len(word) <= 2:
            return None
        else:
            singular = _singular(lower)
            all_known = all_known and singular in _UNIT_NAMES
            if singular in _VALUE_CHANGING_WORDS:
                return None
            name = _UNIT_NAMES.get(singular, singular)
        power = power or pending_power
        pending_power = None
        words.append(word)
        parts.append(("/" if divide_next else "") + name + (f"^{power}" if power else ""))
        divide_next = False
    if not parts or pending_power is not None or divide_next:
        return None
    if not separated and (not all_known or (len(words) == 1 and len(words[0]) == 1)):
        return None
    return "*".join(parts).replace("*/", "/")


def _split_unit(text: str) -> tuple[str, str | None] | None:
    """`text` (cleaned as `normalize_text` does, case kept) without a trailing unit or currency sign, and the unit's
    canonical spelling; None when there is neither (the caller then reads `text` as it did before units).

    "12\\text{ cm}^2" → ("12", "cm^2"), "5 km/h" → ("5", "km/h"), "45^\\circ" → ("45", "deg"), "\\$12" →
    ("12", "dollar"), "12 dollars" → ("12", "dollar"), "2x" → None. A bare `$` is a math delimiter (removed
    everywhere, as `normalize_text` does, so "$12$" stays a plain 12); only the escaped `\\$` is a currency sign,
    read as the unit "dollar" when no unit word follows the number."""
    if len(text) > _MAX_UNIT_TEXT_CHARS:
        return None
    s = text
    had_currency = _ESCAPED_DOLLAR in s
    s = s.replace(_ESCAPED_DOLLAR, " ")
    for superscript, power in _SUPERSCRIPT_POWERS.items():
        s = s.replace(superscript, power)
    # a wrapper separates like a space: "2\text{m}" is 2 metres, "2m" may be algebra
    s = _WRAPPER_RE.sub(lambda m: " " + m.group(0), s)
    s = _basic_clean(s).strip().rstrip(".").rstrip()
    degrees = _TRAILING_DEGREES.search(s)
    if degrees is not None:
        scale = degrees.group("scale")
        return s[:degrees.start()].strip(), "deg" + (scale or "")
    unit_match = _TRAILING_UNIT.search(s)
    if unit_match is not None:
        separated = unit_match.start() > 0 and s[unit_match.start() - 1].isspace()
        unit = _canonical_unit(unit_match.group(0), separated=separated)
        if unit is not None:
            return s[:unit_match.start()].strip(), unit
    return (s.strip(), "dollar") if had_currency else None


def _units_conflict(unit_a: str | None, unit_b: str | None) -> bool:
    """Both sides name a unit and not the same one ("12 cm" vs "12 m"): no conversion is attempted, so the pair is
    not compared as numbers. A unit on one side only is dropped (references often omit it, answers often add it)."""
    return unit_a is not None and unit_b is not None and unit_a != unit_b


def _readings_with_unit(text: str, read: Callable[[str], list[float] | None]) -> tuple[list[float], str | None] | None:
    """`read(text without its unit)` and the unit, when a unit splits off and what remains reads as a value;
    otherwise `read(text)` with no unit (exactly the reading from before units were handled), or None."""
    split = _split_unit(text)
    if split is not None and split[0]:
        value_text, unit = split
        readings = read(value_text)
        if readings is not None:
            return readings, unit
    readings = read(text)
    return (readings, None) if readings is not None else None


def numeric_match(prediction: str, reference: Reference, *, rel_tol: float = 1e-4, abs_tol: float = 1e-9) -> bool:
    """Numbers compared with `math.isclose(rel_tol, abs_tol)`; a percentage may be read as written or divided by
    100 ("50%" matches "50" and "0.5"). When either side does not parse as a number, falls back to `exact_match`
    (so a non-numeric reference still works).

    Units: a trailing unit is read off (`_split_unit`) when what remains parses as a number: "12 cm",
    "12\\text{ cm}^2", "5 km/h", "45^\\circ", "12 meters", "7 apples" (any word of 3+ letters except ones that
    change the value, "million", "squared", "percent", ...; 1-2 letter units only from a known list, so "2x" is
    not 2). A unit on one side only is ignored ("12 cm" matches "12"); units on both sides must be the same after
    normalization ("12 meters" = "12 m", but "12 cm" ≠ "12 m": nothing is converted). A pair that is not
    compared as numbers falls back to `exact_match`, as before. A leading `\\$` is a currency sign; a bare `$`
    is a math delimiter and was always ignored."""
    pred = _readings_with_unit(prediction, _number_readings)
    for ref in _references(reference):
        refv = _readings_with_unit(ref, _number_readings)
        if pred is not None and refv is not None and not _units_conflict(pred[1], refv[1]):
            if any(_close(a, b, rel_tol, abs_tol) for a in pred[0] for b in refv[0]):
                return True
            if pred[1] is None and refv[1] is None:
                continue  # two plain numbers that differ: no text fallback (as before units were read)
        if exact_match(prediction, ref):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice

_CHOICE_PATTERNS = [
    # "B", "(B)", "B.", "B)", "[B]", "B:"
    re.compile(r"[(\[]?\s*([a-z])\s*[)\]]?\s*[.:)]?"),
    # "option B", "choice (b)", "answer: B", "the answer is (B)."  (+ optional trailing option text after . or ))
    re.compile(r"(?:the\s+)?(?:correct\s+)?(?:option|choice|answer)(?:\s+is)?\s*[:\-]?\s*[(\[]?\s*([a-z])\s*[)\]]?"
               r"(?:\s*[.:)]\s*.*)?"),
    # "(B) 42", "B. 42", "B) 42", "B: 42": a letter marked as a label, then the option's text
    re.compile(r"[(\[]\s*([a-z])\s*[)\]]\s*.+"),
    re.compile(r"([a-z])\s*[.:)]\s+.+"),
]


def parse_choice(text: str) -> str | None:
    """The option letter a string names (upper case), or None.

    `(B)`, `B.`, `b`, `[B]`, `option B`, `Choice (B)`, `answer: B`, `B. 42`, `(B) 42` → "B". A bare word ("A man")
    is not a choice: a letter followed by text must be marked as a label (`(B) text`, `B. text`, `B) text`).
    """
    s = normalize_text(text)
    for pattern in _CHOICE_PATTERNS:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1).upper()
    return None


def choice_match(prediction: str, reference: Reference) -> bool:
    """The first reference is the answer: an option letter, or (some datasets store it so) the option's text; the
    others are texts of the right option (`eval.benchmarks.base.choice_references` gives [letter, option text]).

    A prediction that names a letter (`parse_choice`) is right when it names the answer's letter; one that does
    not is right when it equals a reference's text (`exact_match`). The later references are never read as
    letters: an option whose text looks like one ("C", "II") would otherwise make its look-alike letter right.
    """
    refs = _references(reference)
    predicted, answer = parse_choice(prediction), parse_choice(refs[0])
    if predicted is not None:
        return predicted == answer
    return any(exact_match(prediction, ref) for ref in refs if ref is not refs[0] or answer is None)


# ----------------------------------------------------------------------------------------------------------------
# Math expressions: a recursive-descent evaluator over a token list (never eval)

_MAX_EXPR_CHARS = 400
_MAX_DEPTH = 40
_MAX_ABS = 1e300

_TOKEN_RE = re.compile(
    r"\s*(?:"
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<cmd>\\[a-zA-Z]+)"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op>\*\*|[-+*/^(){}\[\]])"
    r")"
)
_COMMAND_ALIASES = {"\\cdot": "*", "\\times": "*", "\\ast": "*", "\\div": "/", "\\dfrac": "\\frac",
                    "\\tfrac": "\\frac", "**": "^", "\u221a": "\\sqrt", "\u03c0": "\\pi"}


class _MathError(Exception):
    pass


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens = []
    i = 0
    s = s.replace("\u221a", "\\sqrt").replace("\u03c0", "\\pi")
    while i < len(s):
        if s[i].isspace():
            i += 1
            continue
        m = _TOKEN_RE.match(s, i)
        if m is None or m.end() == i:
            raise _MathError(f"unexpected character {s[i]!r}")
        i = m.end()
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "word":
            if value not in ("sqrt", "pi"):
                raise _MathError(f"unknown name {value!r}")
            kind, value = "cmd", "\\" + value
        value = _COMMAND_ALIASES.get(value, value)
        if value in ("*", "/", "^"):
            kind = "op"
        elif kind == "cmd" and value not in ("\\frac", "\\sqrt", "\\pi"):
            raise _MathError(f"unsupported command {value!r}")
        tokens.append((kind, value))
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary | <implicit> power)* ;
    unary := ('+'|'-') unary | power ; power := atom ('^' unary)? ; atom := number | (expr) | {expr} | [expr]
    | \\frac g g | \\sqrt[n]? g | \\pi, where g is a braced group or an atom. `-2^2` = -4 and `2^3^2` = 2^9."""

    _CLOSE = {"(": ")", "{": "}", "[": "]"}

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _MathError("unexpected end")
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        if self.take()[1] != value:
            raise _MathError(f"expected {value!r}")

    def parse(self) -> float:
        value = self.expr()
        if self.peek() is not None:
            raise _MathError(f"trailing {self.peek()[1]!r}")
        return value

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _MathError("nested too deeply")

    def expr(self) -> float:
        self._enter()
        value = self.term()
        while (tok := self.peek()) is not None and tok[1] in ("+", "-"):
            self.take()
            rhs = self.term()
            value = value + rhs if tok[1] == "+" else value - rhs
            _check(value)
        self.depth -= 1
        return value

    def term(self) -> float:
        value = self.unary()
        while (tok := self.peek()) is not None:
            if tok[1] in ("*", "/"):
                self.take()
                rhs = self.unary()
                if tok[1] == "/":
                    if rhs == 0:
                        raise _MathError("division by zero")
                    value = value / rhs
                else:
                    value = value * rhs
            elif tok[1] in ("(", "{", "[") or (tok[0] == "cmd"):
                # implicit multiplication: 2\sqrt{3}, 2(3+1), 3\pi; never two bare numbers ("2 3")
                value = value * self.power()
            else:
                break
            _check(value)
        return value

    def unary(self) -> float:
        tok = self.peek()
        if tok is not None and tok[1] in ("+", "-"):
            self.take()
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if tok[1] == "-" else value
        return self.power()

    def power(self) -> float:
        base = self.atom()
        tok = self.peek()
        if tok is not None and tok[1] == "^":
            self.take()
            self._enter()
            exponent = self.unary()
            self.depth -= 1
            try:
                value = math.pow(base, exponent)
            except (OverflowError, ValueError, ZeroDivisionError) as e:
                raise _MathError(str(e)) from None
            return _check(value)
        return base

    def group(self) -> float:
        tok = self.peek()
        if tok is not None and tok[1] == "{":
            return self.atom()
        if tok is not None and tok[0] == "num" and len(tok[1]) > 1 and tok[1].isdigit():
            # \frac12 / \sqrt2x: LaTeX takes one digit as the argument
            self.take()
            self.tokens.insert(self.i, ("num", tok[1][1:]))
            return float(tok[1][0])
        return self.atom()

    def atom(self) -> float:
        self._enter()
        kind, value = self.take()
        if kind == "num":
            result = float(value)
        elif value in self._CLOSE:
            result = self.expr()
            self.expect(self._CLOSE[value])
        elif value == "\\pi":
            result = math.pi
        elif value == "\\frac":
            num = self.group()
            den = self.group()
            if den == 0:
                raise _MathError("division by zero")
            result = num / den
        elif value == "\\sqrt":
            index = 2.0
            tok = self.peek()
            if tok is not None and tok[1] == "[":
                self.take()
                index = self.expr()
                self.expect("]")
            radicand = self.group()
            if radicand < 0 or index == 0:
                raise _MathError("sqrt of a negative number")
            try:
                result = math.sqrt(radicand) if index == 2.0 else math.pow(radicand, 1.0 / index)
            except (OverflowError, ValueError) as e:
                raise _MathError(str(e)) from None
        else:
            raise _MathError(f"unexpected {value!r}")
        self.depth -= 1
        return _check(result)


def _check(value: float) -> float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > _MAX_ABS:
        raise _MathError("not a finite real number")
    return value


def evaluate_math(text: str) -> float | None:
    """The value of a small arithmetic expression, or None when it is not one.

    Supports numbers, `+ - * / ^` (and `**`, `\\cdot`, `\\times`, `\\div`), parentheses/braces/brackets, `sqrt(x)`,
    `\\sqrt{x}`, `\\sqrt[n]{x}`, `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`, `\\frac12`), `pi`/`\\pi`, and implicit
    multiplication (`2\\sqrt{3}`, `3\\pi`, `2(1+1)`). A whole-string number in any `parse_number` form (percent,
    thousands separators) is accepted too. Variables, functions other than sqrt, and anything else → None.

    Safe on model text: a hand-written recursive-descent parser (no `eval`), at most 400 characters and 40 levels
    of nesting, real float arithmetic only (`math.pow`; overflow, complex results, division by zero → None).
    """
    number = parse_number(text)
    if number is not None:
        return number
    s = _DEGREES.sub("", _basic_clean(text)).strip().rstrip(".")
    if not s or len(s) > _MAX_EXPR_CHARS:
        return None
    try:
        return _Parser(_tokenize(s)).parse()
    except (_MathError, RecursionError):
        return None


_ASSIGNMENT = re.compile(r"^\s*[a-zA-Z]\w*\s*=\s*(?P<rhs>[^=]+)$")


def _strip_assignment(s: str) -> str:
    s = _basic_clean(s)
    m = _ASSIGNMENT.match(s)
    return m.group("rhs") if m else s


def _math_readings(text: str) -> list[float] | None:
    """The values `math_match` compares, after dropping a leading `x =`: `parse_number`'s readings (both for a
    percentage), else `evaluate_math`."""
    text = _strip_assignment(text)
    readings = _number_readings(text)
    if readings is not None:
        return readings
    value = evaluate_math(text)
    return [value] if value is not None else None


def math_match(prediction: str, reference: Reference, *, rel_tol: float = 1e-4, abs_tol: float = 1e-9) -> bool:
    """Expression equivalence by value: `evaluate_math` on both sides (after dropping a leading `x =`), compared with
    `math.isclose`; `\\frac{1}{2}`, `0.5`, `1/2` and `2^{-1}` all match. When either side does not evaluate (a
    variable, an interval, a set), the whitespace-free `normalize_text` forms must be equal. A percentage is read as
    written or /100, as in `numeric_match`.

    Units follow `numeric_match`'s rules, with an expression before the unit: "36\\pi \\text{ cm}^2" is 36π,
    "x = 5 m" is 5. A unit is only taken off when the rest evaluates, and never out of a LaTeX command or a letter
    run ("3\\pi" is still 3π; "2x", "2m" and "2m^2" are still algebra, not 2)."""
    # the unit is split off the raw text (before `_strip_assignment` cleans away a currency `\\$`): "x = 5 m" → 5
    p_text = _strip_assignment(prediction)
    p_readings = _readings_with_unit(prediction, _math_readings)
    for ref in _references(reference):
        r_text = _strip_assignment(ref)
        r_readings = _readings_with_unit(ref, _math_readings)
        if p_readings is not None and r_readings is not None and not _units_conflict(p_readings[1], r_readings[1]):
            if any(_close(a, b, rel_tol, abs_tol) for a in p_readings[0] for b in r_readings[0]):
                return True
            if p_readings[1] is None and r_readings[1] is None:
                continue  # two values that differ: no text fallback (as before units were read)
        if "".join(normalize_text(p_text).split()) == "".join(normalize_text(r_text).split()):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Token F1 (SQuAD)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _squad_tokens(s: str) -> list[str]:
    s = _basic_clean(s).lower()
    s = "".join(c for c in s if c not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return s.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1: lower-case, drop punctuation and articles (a/an/the), split on whitespace, F1 of the
    token multisets. When either side has no tokens, 1.0 if both are empty else 0.0."""
    p, r = _squad_tokens(prediction), _squad_tokens(reference)
    if not p or not r:
        return float(p == r)
    common = collections.Counter(p) & collections.Counter(r)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(r)
    return 2 * precision * recall / (precision + recall)


def f1_match(prediction: str, reference: Reference, *, threshold: float = 0.5) -> bool:
    """max over references of `token_f1` ≥ threshold."""
    return max(token_f1(prediction, r) for r in _references(reference)) >= threshold


# ----------------------------------------------------------------------------------------------------------------
# Judge and dispatch


@runtime_checkable
class Judge(Protocol):
    """A model (or anything) that grades answers needing judgment: `judge(question, reference, prediction)` returns
    a score in [0, 1]; `binary_reward` thresholds it at `RewardConfig.judge_threshold`."""

    def __call__(self, question: str, reference: str, prediction: str) -> float: ...


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Knobs of the scorers (all unstated in the paper; see the module docstring for why these defaults)."""

    rel_tol: float = 1e-4
    abs_tol: float = 1e-9
    f1_threshold: float = 0.5
    judge_threshold: float = 0.5
    require_boxed: bool = True


KINDS = ("exact", "numeric", "choice", "math", "f1", "judge")


def score_answer(answer: str, reference: Reference, kind: str, *, question: str | None = None,
                 judge: Judge | Callable[[str, str, str], float] | None = None,
                 config: RewardConfig = RewardConfig()) -> bool:
    """Whether an already extracted answer is correct under `kind` (one of `KINDS`). An empty answer (an empty
    `\\boxed{}`) is never correct, whatever the reference."""
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
    if not answer.strip():
        return False
    if kind == "exact":
        return exact_match(answer, reference)
    if kind == "numeric":
        return numeric_match(answer, reference, rel_tol=config.rel_tol, abs_tol=config.abs_tol)
    if kind == "choice":
        return choice_match(answer, reference)
    if kind == "math":
        return math_match(answer, reference, rel_tol=config.rel_tol, abs_tol=config.abs_tol)
    if kind == "f1":
        return f1_match(answer, reference, threshold=config.f1_threshold)
    if kind == "judge":
        if judge is None:
            raise ValueError('kind="judge" needs a judge')
        for ref in _references(reference):
            score = float(judge(question or "", ref, answer))
            if math.isfinite(score) and score >= config.judge_threshold:
                return True
        return False
    raise AssertionError(f"score_answer has no branch for the reward kind {kind!r}")


def binary_reward(prediction_text: str, reference: Reference, kind: str = "exact", *, question: str | None = None,
                  judge: Judge | Callable[[str, str, str], float] | None = None,
                  config: RewardConfig = RewardConfig()) -> float:
    """AXPO.md §1 reward: 1.0 when the response's final answer (`extract_answer`) is correct under `kind`, else
    0.0. An unanswered response (no `<answer>` block, no complete `\\boxed{}`, an empty box) scores 0.0.

    `kind` ∈ {"exact", "numeric", "choice", "math", "f1", "judge"}; an unknown kind is a configuration error
    (ValueError). `reference` may be a list of accepted answers.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
    answer = extract_answer(prediction_text, require_boxed=config.require_boxed)
    if answer is None:
        return 0.0
    return 1.0 if score_answer(answer, reference, kind, question=question, judge=judge, config=config) else 0.0
