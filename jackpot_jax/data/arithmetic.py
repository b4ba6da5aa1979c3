"""A procedurally generated, verifiable arithmetic task for the CPU demo and the tests.

Pure Python (no TensorFlow): :func:`generate_problem` draws one problem from a ``random.Random``,
:func:`make_split` draws a split deterministically from a seed. The TFDS builder
``jackpot_arithmetic`` (:mod:`jackpot_jax.data.builders`) wraps :func:`make_split`.

Difficulty is the number of operations; ``form`` how the problem is written:

- ``form="word"``, ``difficulty=1``: one operation on numbers below 100, ``"What is 7 + 5?"``
  (``+``, ``-`` with a non-negative result, ``*`` on 2..12).
- ``form="word"``, ``difficulty=k >= 2``: a ``k``-step word problem, ``"Ann has 3 apples, buys 4 more,
  then gives away 2. How many apples does Ann have?"``; each step adds 1..10, removes 1..10 (never
  more than there is) or doubles / triples (only while the count is 1..30).
- ``form="expression"``: ``difficulty`` additions and subtractions of numbers below 50, evaluated
  left to right, ``"What is 12 + 30 - 7?"``; every partial result is non-negative. Short prompts,
  several steps, and every step's arithmetic is in every train split (unlike the ``*`` facts of
  ``difficulty=1``, which a split of its 121 can hold back from train).

Every answer is a unique non-negative integer. The solution shows one line per step and ends with
``\\boxed{N}``: ``"3 + 4 = 7. 7 - 2 = 5. \\boxed{5}"``; :func:`solution_reward` grades a
completion on that whole form (every step checked), not on its final answer alone. Prompts stay
short (tiny models, small vocabularies). Each problem dict also carries its structure (``start``,
``steps``) so that answers can be recomputed independently (:func:`evaluate`).
"""
from __future__ import annotations

import random
import re
from typing import Iterable

MAX_DRAWS_PER_PROBLEM = 50  # make_split gives up past count * this many draws (space too small)
FORMS = ("word", "expression")
EXPRESSION_MAX = 49  # operands of expression problems are 0..EXPRESSION_MAX

NAMES = ("Ann", "Bob", "Sam", "Tom", "Eva", "Max", "Lia", "Ben", "Amy", "Joe", "Kim", "Leo")
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "balls", "cups", "shells", "stamps")
_ADD_VERBS = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUB_VERBS = ("gives away {n}", "loses {n}", "sells {n}")
_MUL_VERBS = {2: "doubles them", 3: "triples them"}


def _check_difficulty(difficulty) -> None:
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty < 1:
        raise ValueError(f"difficulty={difficulty!r} is not allowed: difficulty must be an integer >= 1 "
                         "(the number of operations).")


def apply(value: int, op: str, operand: int) -> int:
    """``value op operand`` for ``op`` in ``"+"``, ``"-"``, ``"*"``."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"op={op!r} is not allowed: op must be one of ('+', '-', '*').")


def evaluate(start: int, steps: Iterable[tuple[str, int]]) -> int:
    """The value of ``start`` after applying ``steps`` (``(op, operand)`` pairs) left to right."""
    value = start
    for op, operand in steps:
        value = apply(value, op, operand)
    return value


def _solution(start: int, steps: list[tuple[str, int]]) -> str:
    lines, value = [], start
    for op, operand in steps:
        new = apply(value, op, operand)
        lines.append(f"{value} {op} {operand} = {new}.")
        value = new
    return " ".join(lines + [f"\\boxed{{{value}}}"])


def _one_step(rng: random.Random) -> tuple[int, list[tuple[str, int]], str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
    return a, [(op, b)], f"What is {a} {op} {b}?"


def _word_problem(rng: random.Random, difficulty: int) -> tuple[int, list[tuple[str, int]], str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(2, 20)
    steps, clauses = [], []
    for _ in range(difficulty):
        kinds = ["+"] * 2 + (["-"] * 2 if value > 0 else []) + (["*"] if 1 <= value <= 30 else [])
        op = rng.choice(kinds)
        if op == "+":
            operand = rng.randint(1, 10)
            clause = rng.choice(_ADD_VERBS).format(n=operand)
        elif op == "-":
            operand = rng.randint(1, min(10, value))
            clause = rng.choice(_SUB_VERBS).format(n=operand)
        else:
            operand = rng.choice((2, 3))
            clause = _MUL_VERBS[operand]
        value = apply(value, op, operand)
        steps.append((op, operand))
        clauses.append(clause)
    story = ", ".join(clauses[:-1] + [f"then {clauses[-1]}"])
    return start, steps, f"{name} has {start} {item}, {story}. How many {item} does {name} have?"


def _expression(rng: random.Random, difficulty: int) -> tuple[int, list[tuple[str, int]], str]:
    while True:  # redraw until every partial result is >= 0
        start = value = rng.randint(0, EXPRESSION_MAX)
        steps = [(rng.choice("+-"), rng.randint(0, EXPRESSION_MAX)) for _ in range(difficulty)]
        for op, operand in steps:
            value = apply(value, op, operand)
            if value < 0:
                break
        else:
            text = " ".join(f"{op} {operand}" for op, operand in steps)
            return start, steps, f"What is {start} {text}?"


def generate_problem(rng: random.Random, difficulty: int, form: str = "word") -> dict:
    """One problem drawn from ``rng`` with ``difficulty`` operations, written in ``form``.

    Returns ``{"problem", "answer", "solution"}`` (strings; ``answer`` is the integer in decimal) plus
    the structure: ``"start"`` (int) and ``"steps"`` (list of ``(op, operand)``), so that
    ``evaluate(start, steps) == int(answer)``.
    """
    _check_difficulty(difficulty)
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not allowed: form must be one of {FORMS}.")
    if form == "expression":
        start, steps, problem = _expression(rng, difficulty)
    else:
        start, steps, problem = _one_step(rng) if difficulty == 1 else _word_problem(rng, difficulty)
    answer = evaluate(start, steps)
    return {"problem": problem, "answer": str(answer), "solution": _solution(start, steps),
            "start": start, "steps": steps}


def make_split(seed: int, count: int, difficulty: int, *, form: str = "word",
               exclude: Iterable[str] = ()) -> list[dict]:
    """``count`` distinct problems (by text) in ``form`` drawn deterministically from
    ``random.Random(seed)``.

    Problems whose text is in ``exclude`` (e.g. the test split's problems, when drawing train) are
    skipped, so splits drawn with ``exclude`` are disjoint. Raises ``ValueError`` if ``count``
    distinct problems cannot be found (a space too small for ``count`` at this difficulty).
    """
    _check_difficulty(difficulty)
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} is not allowed: count must be an integer >= 0.")
    rng = random.Random(seed)
    excluded = set(exclude)
    seen: set[str] = set()
    problems: list[dict] = []
    draws = 0
    while len(problems) < count:
        if draws >= MAX_DRAWS_PER_PROBLEM * max(count, 1):
            raise ValueError(f"make_split(seed={seed}, count={count}, difficulty={difficulty}): only "
                             f"{len(problems)} distinct problems found in {draws} draws; ask for fewer "
                             "problems or a higher difficulty.")
        draws += 1
        problem = generate_problem(rng, difficulty, form)
        if problem["problem"] in seen or problem["problem"] in excluded:
            continue
        seen.add(problem["problem"])
        problems.append(problem)
    return problems


_NUMBER = r"(\d{1,18})"  # the task's numbers are small; a longer one is wrong (and int() of 4,300+ digits raises)
_STEP = rf"{_NUMBER} ([-+*]) {_NUMBER} = {_NUMBER}\."
_SOLUTION_RE = re.compile(rf"(?:{_STEP} )+\\boxed\{{{_NUMBER}\}}")


def solution_reward(completion: str, answer: str) -> float:
    """1.0 when ``completion`` (surrounding whitespace aside) is a worked solution in exactly the
    form of this task's solutions, every step ``a op b = c.`` is right, each step starts from the
    previous result, and the boxed number is the last result and equals ``answer``; else 0.0.

    Stricter than :func:`jackpot_jax.data.rewards.math_reward`, which reads only the final box: RL
    on that reward is free to corrupt the worked line that a small model computes its answer with
    (``"52 - 20 = . \\boxed{32}"`` earns 1.0 there, 0.0 here). Registered as ``"arithmetic"``.
    """
    text = completion.strip()
    if _SOLUTION_RE.fullmatch(text) is None:
        return 0.0
    steps = re.findall(_STEP, text)
    value = None
    for a, op, b, c in steps:
        if (value is not None and int(a) != value) or apply(int(a), op, int(b)) != int(c):
            return 0.0
        value = int(c)
    boxed = int(text[text.rindex("{") + 1:-1])
    return 1.0 if boxed == value and str(boxed) == answer.strip() else 0.0
