"""Answer extraction and the binary scorers (axpo_jax/algo/rewards.py)."""

import builtins

import pytest

from axpo_jax.algo import rewards as R


def answer(content: str) -> str:
    return f"<think>reasoning</think><answer>\\boxed{{{content}}}</answer>"


# ---------------------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("text, expected", [
    (answer("42"), "42"),
    (answer("\\frac{1}{2}"), "\\frac{1}{2}"),                                # nested braces
    (answer("\\sqrt{\\frac{a}{b}}"), "\\sqrt{\\frac{a}{b}}"),
    ("<answer>\\boxed{1}</answer> then <answer>\\boxed{2}</answer>", "2"),   # last answer block
    ("<answer>first \\boxed{1} then \\boxed{ 3 }</answer>", "3"),           # last box of the block, stripped
    ("<answer>\\boxed{7}", "7"),                                             # closing tag missing at the end
    ("\\boxed{5} outside any answer block", None),
    ("<answer>42</answer>", None),                                           # no box: strict by default
    ("<answer>\\boxed{}</answer>", None),                                    # empty box = unanswered
    ("<answer>\\boxed{   }</answer>", None),
    ("<answer>\\boxed{\\frac{1}{2}</answer>", None),                         # unbalanced braces
    ("no answer at all", None),
    ("<answer>\\boxed{1}</answer><answer>\\boxed{2", None),                 # last block has no complete box
])
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


def test_extract_answer_unboxed_when_allowed():
    assert R.extract_answer("<answer> 42 </answer>", require_boxed=False) == "42"
    assert R.extract_answer("<answer>  </answer>", require_boxed=False) is None
    assert R.extract_answer(answer("7"), require_boxed=False) == "7"


# ---------------------------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("pred, ref", [
    ("Paris", "paris"),
    ("  New   York ", "new york"),
    ("blue.", "Blue"),
    ("\\text{Blue}", "blue"),
    ("$x$", "x"),
    ("\\textbf{red} ", "RED."),
])
def test_exact_match_normalizes(pred, ref):
    assert R.exact_match(pred, ref)


@pytest.mark.parametrize("pred, ref", [("Paris", "London"), ("newyork", "new york"), ("1", "1.0")])
def test_exact_match_rejects(pred, ref):
    assert not R.exact_match(pred, ref)


# ---------------------------------------------------------------------------------------------------------------
# numeric


@pytest.mark.parametrize("text, value", [
    ("42", 42.0), ("-3.5", -3.5), ("+7", 7.0), (".5", 0.5), ("1e3", 1000.0), ("1,234,567.5", 1234567.5),
    ("1{,}000", 1000.0), ("1 000 000", 1e6), ("3/4", 0.75), ("-1/2", -0.5), ("\\frac{3}{8}", 0.375),
    ("-\\dfrac{1}{4}", -0.25), ("12.5%", 0.125), ("50\\%", 0.5), ("$2.5$", 2.5), ("\\text{7}", 7.0),
    ("90^\\circ", 90.0), ("45°", 45.0), ("3.", 3.0), ("\u22125", -5.0),
])
def test_parse_number(text, value):
    assert R.parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "2 3", "1,2", "5 cm", "1/0", "", "x/2", "1/2/3", "\\frac{1}{0}"])
def test_parse_number_rejects(text):
    assert R.parse_number(text) is None


@pytest.mark.parametrize("pred, ref, ok", [
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("1,000", "1000", True),
    ("50%", "0.5", True), ("50%", "50", True),           # a percentage reads as written or /100
    ("50", "0.5", False),                                # no % → literal
    ("3.14159", "3.1416", True),                         # |Δ|/3.14 = 2.7e-6 < 1e-4
    ("3.14", "3.14159265", False),                       # |Δ|/3.14 = 5.1e-4 > 1e-4
    ("1e-12", "0", True),                                # abs_tol 1e-9
    ("-2", "2", False),
    ("seven", "Seven", True),                            # non-numeric → exact-match fallback
    ("7", ["6", "7.0"], True),                           # any reference
])
def test_numeric_match(pred, ref, ok):
    assert R.numeric_match(pred, ref) is ok


def test_numeric_tolerance_is_configurable():
    assert R.numeric_match("3.14", "3.14159265", rel_tol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# choice


@pytest.mark.parametrize("text, letter", [
    ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B)", "B"), ("[C]", "C"), ("option B", "B"), ("Option (d)", "D"),
    ("The answer is (C).", "C"), ("answer: A", "A"), ("B. 42 apples", "B"), ("(D) 12 cm", "D"), ("\\text{(B)}", "B"),
])
def test_parse_choice(text, letter):
    assert R.parse_choice(text) == letter


@pytest.mark.parametrize("text", ["A man", "BC", "42", "option", ""])
def test_parse_choice_rejects(text):
    assert R.parse_choice(text) is None


def test_choice_match():
    assert R.choice_match("(b)", "B")
    assert R.choice_match("option C", "(C)")
    assert not R.choice_match("A", "B")
    assert R.choice_match("blue", "Blue")           # reference is not a letter → exact match
    assert not R.choice_match("A man", "A")


@pytest.mark.parametrize("prediction, ok", [
    ("A", True), ("(a)", True), ("blue", True), ("(A) blue", True),  # the letter, or the option's text
    ("C", False), ("(C) C", False), ("B", False), ("(B) blue", False),
])
def test_choice_match_reads_only_the_first_reference_as_a_letter(prediction, ok):
    # choice_references' [letter, option text] for options ["blue", ...]; and for an option whose text looks like
    # a letter (options ["C", "A", "D", "B"], answer A: references ["A", "C"]) a "C" names option C, a wrong one
    assert R.choice_match(prediction, ["A", "blue"] if "blue" in prediction else ["A", "C"]) == ok
    # options ["I", "II", ...], answer A: "I" names option I; "II" is no letter, so it restates option B's text
    assert not R.choice_match("I", ["A", "I"]) and R.choice_match("(A) I", ["A", "I"])
    assert R.choice_match("II", ["B", "II"]) and not R.choice_match("II", ["A", "I"])


# ---------------------------------------------------------------------------------------------------------------
# math


@pytest.mark.parametrize("text, value", [
    ("1+2*3", 7.0), ("(1+2)*3", 9.0), ("2^10", 1024.0), ("2**3", 8.0), ("-2^2", -4.0),   # ^ binds tighter
    ("2^3^2", 512.0),                                                                  # right associative
    ("2^-1", 0.5), ("\\frac{1}{2}+\\frac{1}{3}", 5 / 6), ("\\frac12", 0.5), ("sqrt(16)", 4.0),
    ("\\sqrt{2}^2", 2.0), ("\\sqrt[3]{27}", 3.0), ("2\\sqrt{3}", 2 * 3 ** 0.5), ("3\\pi", 3 * 3.141592653589793),
    ("2(3+1)", 8.0), ("6 \\div 4", 1.5), ("3 \\times 4", 12.0), ("\\left(1+1\\right)\\cdot 2", 4.0),
    ("{1+2}^{2}", 9.0), ("\\dfrac{\\sqrt{3}}{2}", 3 ** 0.5 / 2), ("1,000", 1000.0), ("25%", 0.25),
])
def test_evaluate_math(text, value):
    assert R.evaluate_math(text) == pytest.approx(value)


@pytest.mark.parametrize("text", [
    "x+1", "2 3", "1/0", "sqrt(-1)", "(-8)^(1/3)", "2^100000", "9^9^9", "(" * 60 + "1" + ")" * 60, "1+" * 300 + "1",
    "__import__('os').system('true')", "exp(1)", "1 +", "()", "\\frac{1}", "\\unknown{2}",
])
def test_evaluate_math_rejects(text):
    assert R.evaluate_math(text) is None


def test_evaluate_math_never_calls_eval(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called on model text")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert R.evaluate_math("\\frac{1}{2}+2^2") == 4.5
    assert R.math_match("2^{-1}", "0.5")


@pytest.mark.parametrize("pred, ref, ok", [
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True), ("0.8660254", "\\frac{\\sqrt{3}}{2}", True),
    ("2^{-1}", "\\frac{1}{2}", True), ("x = 3", "3", True), ("\\frac{2}{4}", "0.5", True),
    ("2\\pi", "6.2831853", True), ("\\sqrt{2}", "1.41", False),
    ("(1, 2)", "(1,2)", True),            # not evaluable → whitespace-free exact match
    ("x^2+1", "x^2 + 1", True), ("x^2+1", "x^2+2", False), ("1/3", "0.333", False),
])
def test_math_match(pred, ref, ok):
    assert R.math_match(pred, ref) is ok


# ---------------------------------------------------------------------------------------------------------------
# f1


def test_token_f1_hand_computed():
    # pred tokens [eiffel, tower, in, paris] ("the" dropped), ref [eiffel, tower]: overlap 2,
    # P = 2/4 = .5, R = 2/2 = 1, F1 = 2·.5·1/(.5+1) = .6667
    assert R.token_f1("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    assert R.token_f1("a b c", "d e") == 0.0
    assert R.token_f1("The", "a") == 1.0          # both empty after dropping articles
    assert R.token_f1("", "x") == 0.0
    # multiset: pred [x, x], ref [x]: overlap 1, P = .5, R = 1 → .6667
    assert R.token_f1("x x", "x") == pytest.approx(2 / 3)


def test_f1_match_threshold():
    assert R.f1_match("The Eiffel Tower in Paris", "Eiffel Tower")             # .667 ≥ .5
    assert not R.f1_match("The Eiffel Tower in Paris", "Eiffel Tower", threshold=0.7)
    assert not R.f1_match("Louvre museum in Paris France", "Eiffel Tower")
    assert R.f1_match("tower", ["nothing", "Eiffel Tower"])                     # .667 on the second


# ---------------------------------------------------------------------------------------------------------------
# judge and dispatch


class KeywordJudge:
    def __init__(self):
        self.calls = []

    def __call__(self, question, reference, prediction):
        self.calls.append((question, reference, prediction))
        return 0.9 if reference.lower() in prediction.lower() else 0.1


def test_judge_protocol_and_threshold():
    judge = KeywordJudge()
    assert isinstance(judge, R.Judge)
    assert R.binary_reward(answer("it is a cat"), "cat", "judge", question="what?", judge=judge) == 1.0
    assert judge.calls == [("what?", "cat", "it is a cat")]
    assert R.binary_reward(answer("a dog"), "cat", "judge", judge=judge) == 0.0
    strict = R.RewardConfig(judge_threshold=0.95)
    assert R.binary_reward(answer("it is a cat"), "cat", "judge", judge=judge, config=strict) == 0.0
    assert R.binary_reward("no answer", "cat", "judge", judge=judge) == 0.0
    assert R.binary_reward(answer("x"), "x", "judge", judge=lambda q, r, p: float("nan")) == 0.0


def test_judge_errors_propagate():
    def broken(q, r, p):
        raise RuntimeError("judge down")

    with pytest.raises(RuntimeError):
        R.binary_reward(answer("x"), "x", "judge", judge=broken)
    with pytest.raises(ValueError):
        R.binary_reward(answer("x"), "x", "judge")


@pytest.mark.parametrize("text, ref, kind, expected", [
    (answer("Paris."), "paris", "exact", 1.0),
    (answer("1/2"), "0.5", "numeric", 1.0),
    (answer("0.49"), "0.5", "numeric", 0.0),
    (answer("(C)"), "C", "choice", 1.0),
    (answer("\\frac{\\sqrt{3}}{2}"), "\\sqrt{3}/2", "math", 1.0),
    (answer("Eiffel Tower"), "the Eiffel Tower", "f1", 1.0),
    ("<answer>42</answer>", "42", "exact", 0.0),           # unanswered (no box) → 0
    ("I think 42", "42", "numeric", 0.0),
    (answer(""), "", "exact", 0.0),                        # empty box is unanswered even for an empty reference
    (answer("8"), ["7", "8"], "numeric", 1.0),
])
def test_binary_reward(text, ref, kind, expected):
    value = R.binary_reward(text, ref, kind)
    assert value == expected and isinstance(value, float)


def test_binary_reward_unknown_kind():
    with pytest.raises(ValueError):
        R.binary_reward(answer("1"), "1", "fuzzy")
    with pytest.raises(ValueError):
        R.binary_reward("unanswered", "1", "fuzzy")   # configuration errors surface even without an answer


@pytest.mark.parametrize("kind", [k for k in R.KINDS if k != "judge"])
def test_an_empty_answer_is_never_correct(kind):
    # the rollout keeps an empty \boxed{} as its answer ("" ended the turn); scoring it must not match an empty
    # or blank reference
    assert not R.score_answer("", "", kind) and not R.score_answer("  ", [" ", ""], kind)
    with pytest.raises(ValueError, match="unknown reward kind"):
        R.score_answer("", "", "fuzzy")


# ---------------------------------------------------------------------------------------------------------------
# units (numeric and math): a trailing unit is read off; one-sided units are ignored, differing units never match


@pytest.mark.parametrize("pred, ref, ok", [
    ("12 cm", "12", True), ("12", "12 cm", True), ("12cm", "12", True), ("12\\text{ cm}", "12", True),
    ("12\\text{ cm}^2", "12", True), ("12 \\mathrm{cm}^2", "12", True), ("12\\,\\text{cm}", "12", True),
    ("12 cm²", "12 cm^2", True), ("$12$ cm", "12", True), ("12 meters", "12", True), ("12 cm.", "12", True),
    ("3.5 km/h", "3.5", True), ("5 km/h", "5", True), ("5 m/s^2", "5", True), ("5m/s", "5", True),
    ("-\\frac{1}{2} m", "-0.5", True), ("1,000 kg", "1000", True),
    ("45^\\circ", "45", True), ("45 degrees", "45°", True),
    ("12 meters", "12 m", True), ("5 km per hour", "5 km/h", True), ("5 kph", "5 km/h", True),    # same unit
    ("12 square units", "12 units^2", True), ("12 cm squared", "12 cm^2", True), ("3 hours", "3 h", True),
    ("12 apples", "12", True), ("12 units", "12", True),          # a word of 3+ letters counts as a unit
    ("\\$12", "12", True), ("\\$10", "10 dollars", True),        # an escaped dollar sign is the unit "dollar"
    ("12 cm", "12 m", False), ("12 cm", "12 cm^2", False), ("2 h", "2 s", False),    # no unit conversion
    ("12 apples", "12 oranges", False), ("\\$10", "10 cents", False), ("45°C", "45°F", False),
    ("12 apples", "13", False), ("12 cm", "13", False), ("12 cm", ["13", "12 m"], False),
    ("2x", "2", False), ("2m", "2", False), ("2m^2", "2", False), ("2ab", "2", False), ("3xyz", "3", False),
    ("12 CM", "12", False),                                      # short letter runs only from the known units
    ("12 million", "12", False), ("1.2 million dollars", "1.2", False), ("3 squared", "3", False),
    ("50 percent", "50", False), ("5 sin x", "5", False),       # words that change the value are not units
    ("12 per", "12", False), ("12 square", "12", False), ("cm", "12", False), ("5 m or 6 m", "5", False),
    ("12 cm", "12 cm", True), ("x \\text{ cm}", "x cm", True),   # text fallback as before
    # words that change, qualify or negate the value are no unit (a review's list of false positives)
    ("3 elevenths", "3", False), ("12 bps", "12", False), ("12 basis points", "12", False), ("3 grand", "3", False),
    ("2 pairs", "2", False), ("12 not", "12", False), ("5 negative", "5", False), ("1 over", "1", False),
    ("5 and", "5", False), ("12 or 13", "12", False), ("12 to 15 cm", "12", False), ("12 cm 5 mm", "12", False),
])
@pytest.mark.parametrize("kind", ["numeric", "math"])
def test_units_are_read_off_the_number(kind, pred, ref, ok):
    assert R.score_answer(pred, ref, kind) is ok


@pytest.mark.parametrize("pred, ref, ok", [
    ("3\\pi", "9.42477796", True), ("36\\pi \\text{ cm}^2", "113.097336", True),   # \pi is no unit
    ("2\\sqrt{3} m", "3.4641016", True), ("x = 5 cm", "5", True), ("x = 5", "5 km/h", True),
    ("2x", "2", False), ("2 x", "2", False), ("y = 2x", "2", False), ("3 pi", "3", False),
])
def test_math_units_leave_expressions_alone(pred, ref, ok):
    assert R.math_match(pred, ref) is ok


@pytest.mark.parametrize("kind", ["exact", "choice"])
def test_units_do_not_change_the_other_kinds(kind):
    assert not R.score_answer("12 cm", "12", kind)
    assert R.score_answer("12 cm", "12 cm", kind)


def test_parse_number_still_rejects_units():
    # units are read off by the matchers; parse_number keeps its contract (a number, nothing else)
    assert R.parse_number("12 cm") is None and R.parse_number("12\\text{ cm}") is None
