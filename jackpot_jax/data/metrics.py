"""Evaluation metrics over n sampled completions per problem: Mean@k and Pass@k.

Both are the unbiased estimators computed from all n >= k samples of a problem (not from the first
k), then averaged over problems:

- Pass@k = 1 - C(n - c, k) / C(n, k) for a problem with c correct samples out of n (Chen et al.
  2021, "Evaluating Large Language Models Trained on Code", eq. 1): the probability that at least one
  of k samples drawn without replacement from the n is correct. With n == k it is the plain "any of
  the k is correct".
- Mean@k = the mean reward of the n samples: the expected mean reward of k samples drawn without
  replacement from the n (each sample is in a random k-subset with probability k / n), so it does not
  depend on k beyond requiring n >= k.
"""
from __future__ import annotations

import math
from typing import Sequence


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer with {low} <= {name} <= {high}"
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem with ``c`` correct samples out of ``n``: 1 - C(n-c, k) / C(n, k).

    Computed from exact integer binomials (Python's int / int division rounds correctly), so it is
    stable for any n. Requires 1 <= k <= n and 0 <= c <= n.
    """
    _check_int("n", n, 1)
    _check_int("c", c, 0, n)
    _check_int("k", k, 1, n)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _check_rewards(rewards: Sequence[Sequence[float]], k: int) -> None:
    _check_int("k", k, 1)
    if len(rewards) == 0:
        raise ValueError("rewards is empty: give one list of sample rewards per problem.")
    for i, problem in enumerate(rewards):
        if len(problem) < k:
            raise ValueError(f"Problem {i} has {len(problem)} samples; Mean@k / Pass@k need n >= k={k}.")
        if any(r not in (0, 1) for r in problem):
            raise ValueError(f"Problem {i} has rewards other than 0 / 1: {list(problem)[:8]}.")


def mean_at_k(rewards: Sequence[Sequence[float]], k: int) -> float:
    """Mean@k: the mean over problems of each problem's mean reward over its n >= k samples."""
    _check_rewards(rewards, k)
    return sum(sum(problem) / len(problem) for problem in rewards) / len(rewards)


def at_k_metrics(rewards: Sequence[Sequence[float]], k: int) -> dict[str, float]:
    """``{"mean@k": ..., "pass@k": ...}`` (the keys are literal) from per-problem lists of 0 / 1
    rewards, each with n >= k samples (n may differ between problems); see the module docstring for
    the estimators."""
    _check_rewards(rewards, k)
    pass_k = sum(pass_at_k(len(problem), int(sum(problem)), k) for problem in rewards) / len(rewards)
    return {"mean@k": mean_at_k(rewards, k), "pass@k": pass_k}
