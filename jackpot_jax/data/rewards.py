"""Rewards for RL on math problems: answer extraction, a math-verify grader with a hard time limit,
a format reward, and a registry of reward functions.

Every reward function has the signature ``fn(completion: str, answer: str) -> float``.

Grading (``math_reward``, :class:`MathGrader`):

1. The final answer is extracted from the completion (:func:`extract_answer`): the last ``\\boxed{}``
   (or ``\\fbox{}``), else the GSM8K ``#### answer`` line, else the last match of a configured regex.
   No final answer means reward 0.0: the grader never guesses an answer from the running text.
2. The reference answer goes through the same extraction (a GSM8K solution ``... #### 72`` gives
   ``72``, a MATH solution its last box); a reference without a marker is used whole.
3. Both go through a thin normalization (:func:`normalize_answer`, each rule justified there) and are
   then parsed and compared by math-verify (``parse`` + ``verify``): LaTeX, fractions, roots,
   percentages, units in ``\\text{}``, sets, intervals and equations are math-verify's job.

Time limit. A pathological answer (``10^{10^{10^{10}}}``, a huge expression) can make SymPy run for
minutes. math-verify's own timeouts use ``signal.alarm``, which only works in the main thread (it
raises ``ValueError`` elsewhere) and cannot interrupt C code such as big-integer arithmetic. So the
grading runs in a persistent worker process (one per :class:`MathGrader`) and the caller waits at
most ``time_limit`` seconds per item, from any thread; past it the worker is killed, the reward is
0.0 (never an exception) and a fresh worker is started for the next item. Inside the worker,
math-verify's alarms stay on (there they run in the main thread) with a shorter budget, so most slow
items are interrupted cleanly without killing the worker. The worker is a plain ``python -c`` child
process (not ``multiprocessing``), so it never re-imports the caller's ``__main__`` nor forks a
multithreaded JAX process.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Callable

from jackpot_jax.data.arithmetic import solution_reward
from jackpot_jax.imports import import_object

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]

DEFAULT_TIME_LIMIT_S = 5.0
_STARTUP_TIMEOUT_S = 120.0  # the worker imports SymPy and math-verify once (about a second)

# ------------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (skipped) or a brace


def _boxes(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, in order;
    ``text[start:end]`` is the whole box.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped, so ``\\boxed{\\{1, 2\\}}`` is one group.
    One pass over ``text`` with a stack of open groups: linear time (a completion of thousands of
    unclosed boxes must not take quadratic time in the trainer, where rewards run in process)."""
    opens = {match.end() - 1: match.start() for match in _BOX_RE.finditer(text)}  # box's "{" -> its start
    if not opens:
        return []
    spans, stack = [], []
    for i in (m.start() for m in _BRACE_RE.finditer(text)):
        char = text[i]
        if char == "{":
            stack.append(opens.get(i))
        elif char == "}" and stack:
            start = stack.pop()
            if start is not None:
                spans.append((start, i + 1))
    return sorted(spans)


def _box_content(text: str, span: tuple[int, int]) -> str:
    start, end = span
    return text[_BOX_RE.match(text, start).end():end - 1].strip()


def extract_answer(completion: str, pattern: str | re.Pattern | None = None) -> str | None:
    """The final answer written in ``completion``, or None when it has none.

    In order of precedence: the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced
    braces, so nested ``\\frac{}{}`` and ``\\{ \\}`` are kept whole); else the rest of the line after
    the last ``####`` (GSM8K); else the last match of ``pattern`` (its first group if it has groups,
    the whole match otherwise). An empty answer counts as none.
    """
    boxes = _boxes(completion)
    if boxes:
        found = _box_content(completion, boxes[-1])
    elif "####" in completion:
        found = _GSM8K_RE.findall(completion)[-1].strip()
    elif pattern is not None:
        matches = list(re.finditer(pattern, completion))
        if not matches:
            return None
        last = matches[-1]
        found = (last.group(1) if last.re.groups else last.group(0)).strip()
    else:
        return None
    return found or None


# ------------------------------------------------------------------------------------------------
# Normalization: only what math-verify does not do itself (checked against math-verify 0.9)
# ------------------------------------------------------------------------------------------------

# "1\,000", "1\ 000", "1~000", "1 000" (and Unicode thin spaces): math-verify reads "1\,000" as a
# product "1*0". Only a separator followed by exactly three digits is removed, so "2 3" stays two
# numbers. ("1,000" and "1{,}000" are already read as 1000 by math-verify.)
_DIGIT_GROUP_SEP_RE = re.compile(r"(?<=\d)(?:\\[,;: !]|~|\s)(?=\d{3}(?!\d))")
# "18 dollars", "4 apples": math-verify drops units written as \text{...} but reads bare words as
# products of symbols (5*d*o*l*l*a*r*s). A number followed by nothing but plain words is the number.
# "percent" is left alone: math-verify turns it into \%.
_NUMBER_THEN_WORDS_RE = re.compile(
    r"(?P<number>[-+]?\d[\d,]*(?:\.\d+)?)\s+(?!perc|pct)[A-Za-z]+(?:[\s.]+[A-Za-z]+)*\.?")


def normalize_answer(text: str) -> str:
    """Thin clean-up of an extracted answer before math-verify parses it.

    - ``$`` and ``\\$`` are removed: a currency sign (GSM8K ``#### $18``) or math delimiters around
      a ``####`` answer; math-verify removes them too, but only after our rules below have run.
    - A sentence's final period is removed (``#### 18.``): math-verify does not parse ``18.``.
    - Thousands separators that are spaces (``1\\,000``) are removed, and a number followed only by
      plain words (``18 dollars``) becomes the number; see the regexes' comments.
    """
    text = text.replace("\\$", "").replace("$", "").strip()
    text = re.sub(r"(?<=[^.])\.$", "", text).strip()
    text = _DIGIT_GROUP_SEP_RE.sub("", text)
    words = _NUMBER_THEN_WORDS_RE.fullmatch(text)
    return words.group("number") if words else text


# ------------------------------------------------------------------------------------------------
# Grading (runs in the worker process)
# ------------------------------------------------------------------------------------------------


def _parse(answer: str, alarm_s: int):
    from math_verify import parse

    return parse("\\boxed{" + normalize_answer(answer) + "}", parsing_timeout=alarm_s)


def _grade(completion: str, answer: str, pattern: str | None = None, alarm_s: int = 5) -> float:
    """1.0 if the final answer of ``completion`` equals ``answer`` per math-verify, else 0.0.

    Runs in the calling process with only math-verify's own ``signal.alarm`` timeouts of
    ``alarm_s`` seconds per parse / comparison, so it only works in a main thread: it is the body of
    the worker process behind :class:`MathGrader`.
    """
    from math_verify import verify

    predicted = extract_answer(completion, pattern)
    if predicted is None:
        return 0.0
    reference = extract_answer(answer)
    gold = _parse(answer if reference is None else reference, alarm_s)
    target = _parse(predicted, alarm_s)
    if not gold or not target:
        return 0.0
    return 1.0 if verify(gold, target, timeout_seconds=alarm_s) else 0.0


def _serve() -> None:
    """Worker loop: one JSON request per line on stdin, one reward per line on the protocol pipe."""
    importlib.import_module("math_verify")  # before "ready", so that no item pays for the import

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are reported by the parent
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed to stdout goes to stderr, not into the protocol
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        try:
            reward = _grade(**json.loads(line))
        except Exception:  # a bug must not kill the worker: log it, and the item gets 0.0
            logger.exception("grading failed")
            reward = 0.0
        protocol.write(f"{reward}\n")
        protocol.flush()


# ------------------------------------------------------------------------------------------------
# The caller's side: a worker process with a hard deadline
# ------------------------------------------------------------------------------------------------

_WORKER_CODE = "from jackpot_jax.data.rewards import _serve; _serve()"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MathGrader:
    """``grader(completion, answer) -> float``: the grading described in the module docstring, in a
    worker process, with a hard wall-clock limit per item.

    Safe to call from any thread (calls are serialized; make one grader per thread to grade in
    parallel). ``time_limit`` (seconds) bounds each item from the moment it is sent to a ready
    worker; past it the reward is 0.0 and the worker is replaced. ``pattern`` is the regex for
    answers without a box or ``####`` (see :func:`extract_answer`).
    """

    def __init__(self, time_limit: float = DEFAULT_TIME_LIMIT_S, pattern: str | None = None):
        if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0):
            raise ValueError(f"time_limit={time_limit!r} is not allowed: time_limit must be a number > 0.")
        if pattern is not None:
            try:
                re.compile(pattern)  # fail here, not in the worker
            except re.error as err:
                raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {err}") from err
        self.time_limit = float(time_limit)
        self.pattern = pattern
        # math-verify's alarms take whole seconds; a third of the limit leaves room for the parses
        # and the comparison before the hard deadline.
        self._alarm_s = max(1, int(time_limit / 3))
        self._lock = threading.Lock()
        self._worker: subprocess.Popen | None = None

    def __call__(self, completion: str, answer: str) -> float:
        request = json.dumps({"completion": completion, "answer": answer, "pattern": self.pattern,
                              "alarm_s": self._alarm_s}) + "\n"
        with self._lock:
            worker = self._ready_worker()
            try:
                _write_all(worker, request)
            except BrokenPipeError:  # the worker died between items: start a new one, once
                self._stop()
                worker = self._ready_worker()
                _write_all(worker, request)
            reply = _read_line(worker, time.monotonic() + self.time_limit)
            if reply is None:
                logger.warning("Grading took over %.1f s (or the worker died); reward 0.0.", self.time_limit)
                self._stop()
                return 0.0
            return float(reply)

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            self._stop()

    def _ready_worker(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            self._worker = _start_worker()
        return self._worker

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker.stdin.close()
            self._worker.stdout.close()
            self._worker = None


def _start_worker() -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    worker = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0, env=env)
    if _read_line(worker, time.monotonic() + _STARTUP_TIMEOUT_S) != "ready":
        worker.kill()
        worker.wait()
        raise RuntimeError("The math-verify grading worker did not start (see its error above); "
                           "is math-verify installed (pip install 'math-verify>=0.9')?")
    return worker


def _write_all(worker: subprocess.Popen, text: str) -> None:
    """Write ``text`` to the worker's stdin (unbuffered: a single ``os.write`` may be partial)."""
    view = memoryview(text.encode())
    while view:
        view = view[os.write(worker.stdin.fileno(), view):]


def _read_line(worker: subprocess.Popen, deadline: float) -> str | None:
    """The next line the worker writes, stripped; None at the deadline or if the worker exits."""
    fd, data = worker.stdout.fileno(), b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.decode().strip()


_default_grader: MathGrader | None = None
_default_grader_lock = threading.Lock()


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the reference ``answer``, else 0.0.

    Uses a shared :class:`MathGrader` with the default time limit (``DEFAULT_TIME_LIMIT_S``); a
    timeout gives 0.0. Callable from any thread.
    """
    global _default_grader
    with _default_grader_lock:
        if _default_grader is None:
            _default_grader = MathGrader()
            atexit.register(_default_grader.close)
    return _default_grader(completion, answer)


_FORMAT_TAIL_RE = re.compile(r"(?:\s|\$|\.|\\\]|\\\))*")


def format_reward(completion: str, answer: str | None = None) -> float:
    """1.0 when ``completion`` ends with exactly one boxed final answer, else 0.0.

    Exactly one means: one ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces in the whole
    completion, its content not empty, and after it only whitespace, ``.``, ``$``, ``\\]`` or ``\\)``
    (the end of the sentence or of the math environment). ``answer`` is ignored (it is there so that
    every reward has the same signature); correctness is :func:`math_reward`'s job.
    """
    del answer
    boxes = _boxes(completion)
    if len(boxes) != 1 or len(_BOX_RE.findall(completion)) != 1:
        return 0.0
    content_ok = bool(_box_content(completion, boxes[0]))
    tail_ok = _FORMAT_TAIL_RE.fullmatch(completion, boxes[0][1]) is not None
    return 1.0 if content_ok and tail_ok else 0.0


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFn] = {"math": math_reward, "format": format_reward, "arithmetic": solution_reward}


def register_reward(name: str, fn: RewardFn) -> None:
    """Register ``fn(completion, answer) -> float`` under ``name`` (no ``:``; not already taken)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name={name!r} is not allowed: a reward name is a non-empty string without "
                         "':' (that form is an import path).")
    if not callable(fn):
        raise TypeError(f"The reward {name!r} must be callable as fn(completion, answer); got {fn!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"A different reward is already registered as {name!r}.")
    _REGISTRY[name] = fn


def registered_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name_or_path: str) -> RewardFn:
    """The reward registered as ``name_or_path``, or the object at an import path ``"pkg.mod:fn"``
    (``"pkg.mod:obj.attr"`` works too)."""
    if ":" not in name_or_path:
        if name_or_path not in _REGISTRY:
            raise ValueError(f"Unknown reward {name_or_path!r}. Registered rewards: "
                             f"{', '.join(registered_rewards())}; or give an import path "
                             "'package.module:function'.")
        return _REGISTRY[name_or_path]
    fn = import_object(name_or_path, "reward")
    if not callable(fn):
        raise TypeError(f"The reward {name_or_path!r} is not callable: {fn!r}.")
    return fn
