"""Rewards (answer extraction, the math-verify grader and its time limit, the format reward, the
registry) and the Mean@k / Pass@k metrics."""
import itertools
import random
import pathlib
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from jackpot_jax.data import arithmetic, metrics, rewards

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# (completion, reference answer, verdict a careful human grader gives). Written by hand for this
# test; the grader's code never sees this list. Completions carry their final answer in a box or on
# a GSM8K "####" line (answers without one are covered by the extraction tests).
FIXTURE = [
    # Fractions.
    ("So the probability is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", 1),
    ("\\boxed{0.5}", "\\frac12", 1),
    ("\\boxed{1/2}", "0.5", 1),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1),
    ("\\boxed{2/1}", "\\frac{1}{2}", 0),
    ("\\boxed{\\frac{3}{2}}", "\\frac{2}{3}", 0),
    ("\\boxed{0.05}", "0.5", 0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0),
    # LaTeX and symbolic forms.
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1),
    ("\\boxed{\\sqrt{2}}", "2", 0),
    ("\\boxed{\\frac{\\pi}{3}}", "\\frac{\\pi}{6}", 0),
    ("\\boxed{3.14}", "\\pi", 0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1),
    ("\\boxed{x^2+1}", "(x+1)^2", 0),
    ("\\boxed{x = 3}", "3", 1),
    ("\\boxed{2^{10}}", "1024", 1),
    ("\\boxed{10^2}", "2^{10}", 0),
    ("The side is $\\fbox{7}$.", "7", 1),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1),
    # Units and percentages.
    ("\\boxed{5\\text{ cm}}", "5", 1),
    ("\\boxed{12 \\text{ dollars}}", "12", 1),
    ("She earns 18 dollars a day.\n#### 18 dollars", "18", 1),
    ("\\boxed{\\$18}", "18", 1),
    ("#### $18.00", "#### 18", 1),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{4 \\text{ apples}}", "5", 0),
    ("\\boxed{15\\%}", "15\\%", 1),
    ("\\boxed{0.15}", "15\\%", 1),
    ("\\boxed{25 percent}", "25\\%", 1),
    ("\\boxed{1.5\\%}", "15\\%", 0),
    # Thousands separators.
    ("\\boxed{1,000}", "1000", 1),
    ("\\boxed{1{,}000}", "1000", 1),
    ("\\boxed{1\\,000}", "1000", 1),
    ("#### 1,000", "#### 1000", 1),
    ("\\boxed{1,000,000}", "1000000", 1),
    ("\\boxed{1,234.5}", "1234.5", 1),
    ("\\boxed{100}", "1,000", 0),
    ("\\boxed{10,000}", "1000", 0),
    ("\\boxed{1000}", "1,000,000", 0),
    ("\\boxed{12,345}", "1234.5", 0),
    # Negative numbers.
    ("\\boxed{-3}", "-3", 1),
    ("\\boxed{- 7}", "-7", 1),
    ("\\boxed{-(-4)}", "4", 1),
    ("#### -12", "#### -12", 1),
    ("\\boxed{3}", "-3", 0),
    ("\\boxed{-3}", "3", 0),
    ("\\boxed{-0.5}", "\\frac{1}{2}", 0),
    # Sets and intervals.
    ("\\boxed{[1, 2)}", "[1,2)", 1),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty, 2]", 1),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1),
    ("\\boxed{-1, 1}", "\\pm 1", 1),
    ("\\boxed{(3, -2)}", "(3, -2)", 1),
    ("\\boxed{x \\in [0, 1]}", "[0,1]", 1),
    ("\\boxed{[0,1] \\cup [2,3]}", "[0,1]\\cup[2,3]", 1),
    ("\\boxed{[1, 2]}", "[1,2)", 0),
    ("\\boxed{(1, 2)}", "[1, 2]", 0),
    ("\\boxed{(-\\infty, 2)}", "(-\\infty, 2]", 0),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", 0),
    ("\\boxed{1}", "\\pm 1", 0),
    ("\\boxed{(-2, 3)}", "(3, -2)", 0),
    # GSM8K references (a full solution ending in "#### 72") and completions.
    ("48 / 2 = 24 in May, and 48 + 24 = 72.\n#### 72", GSM8K_SOLUTION, 1),
    ("In total \\boxed{72} clips.", GSM8K_SOLUTION, 1),
    ("#### 72\nI hope this helps.", "#### 72", 1),
    ("#### 3,600", "He pays 3600 in total.\n#### 3600", 1),
    ("#### 7", GSM8K_SOLUTION, 0),
    ("#### 27", GSM8K_SOLUTION, 0),
    # Other wrong answers that look right; the last box is the answer.
    ("\\boxed{12}", "21", 0),
    ("\\boxed{0.1}", "0.01", 0),
    ("\\boxed{1.0}", "1", 1),
    ("I first guessed \\boxed{5}, but rechecking gives \\boxed{6}.", "6", 1),
    ("\\boxed{6}. Wait, that is wrong: the answer is \\boxed{5}.", "6", 0),
]


def test_fixture_is_large_and_balanced():
    assert len(FIXTURE) >= 60
    assert sum(v for *_, v in FIXTURE) >= 20 and sum(1 - v for *_, v in FIXTURE) >= 20


@pytest.mark.parametrize("completion, answer, verdict", FIXTURE)
def test_math_reward_matches_a_careful_human(completion, answer, verdict):
    assert rewards.math_reward(completion, answer) == float(verdict)


@pytest.mark.parametrize("completion, expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("a \\boxed{1} then \\fbox{\\{1, 2\\}} end", "\\{1, 2\\}"),
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),
    ("work...\n#### 1,000\nextra text", "1,000"),
    ("a #### 1 and then\n#### 2", "2"),
    ("\\boxed{7}\n#### 8", "7"),  # a box wins over ####
    ("The answer is 42.", None),
    ("\\boxed{ }", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert rewards.extract_answer(completion) == expected


def test_extract_answer_with_a_pattern():
    pattern = r"[Aa]nswer:\s*(\S+)"
    assert rewards.extract_answer("Answer: 3. No wait, answer: 4", pattern) == "4"
    assert rewards.extract_answer("Answer: 3 then \\boxed{5}", pattern) == "5"
    assert rewards.extract_answer("no answer here", pattern) is None
    assert rewards.extract_answer("x = 12", r"\d+") == "12"  # no group: the whole match
    grader = rewards.MathGrader(pattern=pattern)
    try:
        assert grader("So, answer: 1,000", "1000") == 1.0
        assert grader("So, answer: 100", "1000") == 0.0
    finally:
        grader.close()


def test_no_final_answer_scores_zero():
    assert rewards.math_reward("The answer is 72.", "#### 72") == 0.0
    assert rewards.math_reward("\\boxed{}", "0") == 0.0


def test_normalize_answer():
    assert rewards.normalize_answer("$18.") == "18"
    assert rewards.normalize_answer("1\\,000\\,000") == "1000000"
    assert rewards.normalize_answer("2 3") == "2 3"
    assert rewards.normalize_answer("1,000 dollars.") == "1,000"
    assert rewards.normalize_answer("25 percent") == "25 percent"  # math-verify reads percent


# A power tower makes SymPy run for minutes; math-verify's alarm interrupts it inside the worker.
POWER_TOWER = "\\boxed{9^{9^{10}}}"
# A regex with catastrophic backtracking runs in C and ignores the alarm: only the kill stops it.
BACKTRACKING_PATTERN = r"(a+)+$"
BACKTRACKING_TEXT = "a" * 40 + "!"


def _timed(fn, *args):
    start = time.monotonic()
    return fn(*args), time.monotonic() - start


def _in_thread(fn, *args):
    result = []
    thread = threading.Thread(target=lambda: result.append(_timed(fn, *args)))
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.parametrize("run", [_timed, _in_thread], ids=["main_thread", "worker_thread"])
def test_time_limit_gives_zero_quickly(run):
    assert rewards.math_reward("\\boxed{2}", "2") == 1.0  # the shared worker is up
    reward, seconds = run(rewards.math_reward, POWER_TOWER, "1")
    assert reward == 0.0 and seconds < rewards.DEFAULT_TIME_LIMIT_S + 3
    assert run(rewards.math_reward, "\\boxed{2}", "2")[0] == 1.0


@pytest.mark.parametrize("run", [_timed, _in_thread], ids=["main_thread", "worker_thread"])
def test_hard_time_limit_kills_a_stuck_worker(run):
    grader = rewards.MathGrader(time_limit=1.0, pattern=BACKTRACKING_PATTERN)
    try:
        assert grader("\\boxed{2}", "2") == 1.0
        reward, seconds = run(grader, BACKTRACKING_TEXT, "1")
        assert reward == 0.0 and seconds < 4
        assert run(grader, "\\boxed{2}", "2")[0] == 1.0  # a fresh worker took over
    finally:
        grader.close()


def test_math_grader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="time_limit"):
        rewards.MathGrader(time_limit=0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        rewards.MathGrader(pattern="(")


def test_importing_the_package_is_light():
    code = ("import sys, jackpot_jax.data.rewards, jackpot_jax.data.metrics; "
            "heavy = {'tensorflow', 'tensorflow_datasets', 'math_verify', 'sympy', 'jax'}; "
            "heavy &= set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


@pytest.mark.parametrize("completion, expected", [
    ("Thus $\\boxed{4}$.", 1.0),
    ("\\[ x = \\boxed{\\frac{1}{2}} \\]", 1.0),
    ("\\boxed{4}\n", 1.0),
    ("no box at all", 0.0),
    ("\\boxed{3} or \\boxed{4}", 0.0),  # two answers
    ("\\boxed{}", 0.0),  # empty
    ("\\boxed{4} because 2 + 2 = 4", 0.0),  # not final
    ("\\boxed{\\frac{1}{2}", 0.0),  # unbalanced
    ("#### 4", 0.0),
])
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion) == expected
    assert rewards.format_reward(completion, "ignored") == expected


@pytest.mark.parametrize("completion, answer, expected", [
    (" 52 - 20 = 32. \\boxed{32}", "32", 1.0),
    ("52 - 20 = 32. \\boxed{32}\n", "32", 1.0),  # surrounding whitespace is fine
    (" 3 + 4 = 7. 7 * 2 = 14. 14 - 5 = 9. \\boxed{9}", "9", 1.0),
    (" 52 - 20 = . \\boxed{32}", "32", 0.0),  # math_reward gives 1.0: the worked line is broken
    (" 52 - 20 = 32. \\boxed{ 32}", "32", 0.0),  # not the task's form
    (" 52 - 20 = 32.  \\boxed{32}", "32", 0.0),
    (" 52 - 20 = 33. \\boxed{32}", "32", 0.0),  # a wrong step
    (" 52 - 20 = 32. \\boxed{33}", "33", 0.0),  # box is not the last result
    (" 52 - 20 = 32. \\boxed{32}", "33", 0.0),  # wrong answer
    (" 3 + 4 = 7. 6 - 1 = 5. \\boxed{5}", "5", 0.0),  # a step that does not start from the result
    (" \\boxed{32}", "32", 0.0),  # no step
    (" 7 / 7 = 1. \\boxed{1}", "1", 0.0),
    (" " + "9" * 100_000 + " + 1 = 2. \\boxed{2}", "2", 0.0),  # a number past int()'s 4,300 digits: 0, not a raise
])
def test_arithmetic_solution_reward(completion, answer, expected):
    assert rewards.get_reward("arithmetic")(completion, answer) == expected


def test_arithmetic_solution_reward_accepts_every_generated_solution_and_no_altered_one():
    rng = random.Random(0)
    for difficulty in (1, 2, 3, 4):
        for _ in range(200):
            problem = arithmetic.generate_problem(rng, difficulty)
            solution = " " + problem["solution"]
            assert arithmetic.solution_reward(solution, problem["answer"]) == 1.0, problem
            digit = rng.choice([i for i, ch in enumerate(solution) if ch.isdigit()])
            altered = solution[:digit] + str((int(solution[digit]) + 1) % 10) + solution[digit + 1:]
            assert arithmetic.solution_reward(altered, problem["answer"]) == 0.0, altered


def test_registry(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))
    assert rewards.get_reward("math") is rewards.math_reward
    assert rewards.get_reward("format") is rewards.format_reward
    assert rewards.get_reward("jackpot_jax.data.rewards:format_reward") is rewards.format_reward
    assert rewards.get_reward("jackpot_jax.data.rewards:MathGrader.close") is rewards.MathGrader.close

    def length_reward(completion, answer):
        return float(len(completion) < 100)

    rewards.register_reward("short", length_reward)
    rewards.register_reward("short", length_reward)  # the same function again is fine
    assert rewards.get_reward("short")("hi", "") == 1.0
    assert rewards.registered_rewards() == ["arithmetic", "format", "math", "short"]
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("short", rewards.format_reward)
    with pytest.raises(ValueError, match="import path"):
        rewards.register_reward("a:b", length_reward)
    with pytest.raises(TypeError, match="callable"):
        rewards.register_reward("number", 3)


@pytest.mark.parametrize("name, message", [
    ("nope", "Unknown reward 'nope'. Registered rewards: arithmetic, format, math"),
    ("no_such_module_xyz:f", "Cannot import the module 'no_such_module_xyz'"),
    ("jackpot_jax.data.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
    ("jackpot_jax.data.rewards:DEFAULT_TIME_LIMIT_S", "is not callable"),
])
def test_registry_errors(name, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")):
        rewards.get_reward(name)


# Hand computation for k = 2 on this table (n samples per problem, c correct):
#   A = [1, 0, 1, 0]: n=4, c=2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6;  mean = 2/4 = 1/2
#   B = [0, 0, 0]:    n=3, c=0: pass@2 = 1 - C(3,2)/C(3,2) = 0;              mean = 0
#   C = [1, 0, 0]:    n=3, c=1: pass@2 = 1 - C(2,2)/C(3,2) = 1 - 1/3 = 2/3;  mean = 1/3
#   D = [1, 1]:       n=2, c=2: pass@2 = 1 - C(0,2)/C(2,2) = 1 - 0 = 1;      mean = 1
#   pass@2 = (5/6 + 0 + 2/3 + 1) / 4 = (15/6) / 4 = 5/8
#   mean@2 = (1/2 + 0 + 1/3 + 1) / 4 = (11/6) / 4 = 11/24
# and for k = 1, pass@1 = c/n per problem, so pass@1 = mean@1 = 11/24.
TABLE = [[1, 0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1]]


def test_metrics_match_the_hand_computation():
    assert metrics.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert metrics.pass_at_k(3, 1, 2) == pytest.approx(2 / 3)
    assert metrics.at_k_metrics(TABLE, 2) == pytest.approx({"mean@k": 11 / 24, "pass@k": 5 / 8})
    assert metrics.at_k_metrics(TABLE, 1) == pytest.approx({"mean@k": 11 / 24, "pass@k": 11 / 24})
    assert metrics.mean_at_k(TABLE, 2) == pytest.approx(11 / 24)


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in range(1, 8)
                                     for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_is_the_subset_average(n, c, k):
    """Unbiased: the fraction of k-subsets of the n samples with at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    expected = Fraction(sum(any(s) for s in subsets), len(subsets))
    assert metrics.pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-15)


def test_pass_at_k_is_stable_for_large_n():
    assert metrics.pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-12)
    # C(n-3, k) / C(n, k) = (n-k)(n-k-1)(n-k-2) / (n(n-1)(n-2))
    expected = 1 - (9500 * 9499 * 9498) / (10_000 * 9999 * 9998)
    assert metrics.pass_at_k(10_000, 3, 500) == pytest.approx(expected, rel=1e-12)
    assert metrics.pass_at_k(5_000, 4_999, 1) == pytest.approx(4999 / 5000, rel=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.pass_at_k(3, 1, 4), "k=4 is not allowed"),
    (lambda: metrics.pass_at_k(3, 4, 1), "c=4 is not allowed"),
    (lambda: metrics.pass_at_k(0, 0, 1), "n=0 is not allowed"),
    (lambda: metrics.pass_at_k(3, "1", 1), "c='1' is not allowed"),
    (lambda: metrics.at_k_metrics([[1, 0], [1]], 2), "Problem 1 has 1 samples"),
    (lambda: metrics.at_k_metrics([[1, 0.5]], 1), "rewards other than 0 / 1"),
    (lambda: metrics.at_k_metrics([], 1), "rewards is empty"),
])
def test_metrics_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
