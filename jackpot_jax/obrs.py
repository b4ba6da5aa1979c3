"""Optimal Budgeted Rejection Sampling (OBRS): sections 3 and 4 of the Jackpot paper.

Notation (see ``shared/JACKPOT.md``): ``p_inf`` is the distribution a token was sampled from (the
actor, after temperature / top-p), ``p_old`` the policy at the start of the PPO step, ``p_new`` the
policy being optimized, and ``p_target`` whichever of the two OBRS aligns ``p_inf`` towards.

Every function takes log-probabilities and works in log space; no probability ratio is ever formed
by dividing probabilities. All functions are pure, jit-able and batched over leading axes. Where an
input is a full distribution, the vocabulary is the last axis; ``-inf`` entries (a padded
vocabulary) are allowed. A token with ``p_inf(x) = 0`` can never be proposed, so its acceptance
probability is defined as 1 (it never matters).

Static arguments (``lam``, ``k``, ``c1``, ``c2``, ``target_accept``, ``target``) are checked when their
value is known at trace time and raise ``ValueError`` naming the argument and the allowed range.

Z's vocabulary reductions (``log_normalizer``, ``normalizer``, ``topk_normalizer``: eq. 4, section 4.4.1)
are defined beside the kernels that compute them, in :mod:`pallas_kernels.logspace`, and used from here.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.logspace import (check_choice, check_range, log_lam, log_min_mass, log_normalizer, normalizer,
                                   topk_normalizer)

__all__ = ["TARGETS", "ObrsFilter", "Target", "accept_prob", "accepted_log_distribution", "check_choice", "check_range",
           "jackpot_weights", "kappa", "log_accept_prob", "log_normalizer", "normalizer", "obrs_filter", "sample_mask",
           "solve_lambda", "topk_normalizer"]

Target = Literal["old", "new"]
TARGETS = ("old", "new")


def log_accept_prob(logp_target, logp_inf, lam):
    """log a(x) = min(0, log p_target(x) - log lam - log p_inf(x))  (eq. 3)."""
    log_a = jnp.minimum(0.0, logp_target - log_lam(lam) - logp_inf)
    return jnp.where(logp_inf == -jnp.inf, 0.0, log_a)


def accept_prob(logp_target, logp_inf, lam):
    """a(x) = min(1, p_target(x) / (lam * p_inf(x)))  (eq. 3), elementwise."""
    return jnp.exp(log_accept_prob(logp_target, logp_inf, lam))


def sample_mask(key, accept_prob):
    """The OBRS rejection mask: ``True`` (accepted) with probability ``accept_prob``, elementwise.

    The uniforms are always drawn in float32 so that the mask for a given key does not depend on
    whether 64-bit mode is on. Rejected tokens leave the loss; the trajectory itself is kept.
    """
    u = jax.random.uniform(key, jnp.shape(accept_prob), dtype=jnp.float32)
    return u < accept_prob


def accepted_log_distribution(logp_inf, logp_target, lam):
    """log p'_inf(x) = log min(p_inf(x), p_target(x) / lam) - log Z: what accepted tokens follow
    (eq. 4). Full log-distributions ``[..., V]`` in and out."""
    log_mass = log_min_mass(logp_inf, logp_target, log_lam(lam))
    return log_mass - log_normalizer(logp_inf, logp_target, lam)[..., None]


def kappa(z_approx, accepted, valid):
    """kappa = abar_hat / mean_t Z_approx_t, the batch-level de-biasing of section 4.4.2.

    ``abar_hat`` is the empirical acceptance rate (#accepted / #proposed) over the valid tokens;
    padding (``valid == False``) never counts. ``accepted`` is the Bernoulli mask, or, for a lower
    variance estimate of the same mean, the acceptance probabilities a(x_t) themselves.
    ``kappa * Z_approx_t`` is the calibrated Z_t used in the weights. Returns 1 when the batch has
    no valid token. Stop-gradient.
    """
    valid = jnp.asarray(valid, bool)
    num_valid = jnp.sum(valid)
    denom = jnp.maximum(num_valid, 1)
    abar_hat = jnp.sum(jnp.where(valid, accepted, 0)) / denom
    z_mean = jnp.sum(jnp.where(valid, z_approx, 0.0)) / denom
    ok = (num_valid > 0) & (z_mean > 0)
    return jax.lax.stop_gradient(jnp.where(ok, abar_hat / jnp.where(ok, z_mean, 1.0), 1.0))


def solve_lambda(logp_inf, logp_target, target_accept, valid=None, *, full_vocab: bool = False,
                 num_iters: int = 64):
    """The lam whose mean acceptance equals ``target_accept``: the budget form of OBRS (Thm. 3.4).

    Two readings of "mean acceptance", by ``full_vocab``:
      * ``False`` (default): inputs are the *sampled* tokens' log-probs ``[...]``; solves
        ``mean_t a(x_t) = target_accept`` over the valid tokens. Its expectation is mean_t Z_t, so
        this is what a trainer can afford: it needs no vocabulary-sized tensor.
      * ``True``: inputs are full log-distributions ``[..., V]`` and ``valid`` marks positions;
        solves ``mean_t Z_t(lam) = target_accept`` exactly (Z_t = sum_x p_inf a, eq. 4).
    Either way one lam is returned for the whole batch (vmap for one lam per position).

    Method: bisection on log lam for ``num_iters`` halvings of a bracket that provably contains the
    root. Mean acceptance is non-increasing in log lam with slope of magnitude <= 1 (d a / d log lam
    is -a or 0), so after the loop the acceptance error is at most the final bracket width plus
    rounding: below 1e-5 in float32 and 1e-10 in float64 at the default 64 iterations. Acceptance is
    flat at 1 for lam <= min p_target/p_inf; there the largest such lam is returned. A budget higher
    than reachable (p_target = 0 where p_inf > 0) returns the lam of the highest reachable one.
    lam is a hyper-parameter of the loss, so it carries no gradient.
    """
    check_range("target_accept", target_accept, lambda v: (v > 0) & (v <= 1), "in (0, 1]")
    return _solve_lambda(logp_inf, logp_target, target_accept, valid, full_vocab, num_iters)


# Jitted once per shape: called eagerly, a fresh fori_loop body would be compiled on every call.
@functools.partial(jax.jit, static_argnums=(4, 5))
def _solve_lambda(logp_inf, logp_target, target_accept, valid, full_vocab, num_iters):
    logp_inf, logp_target = (jax.lax.stop_gradient(jnp.asarray(x)) for x in (logp_inf, logp_target))
    log_w = logp_inf if full_vocab else jnp.zeros_like(logp_inf)  # weight of each entry
    log_w = jnp.where(logp_inf == -jnp.inf, -jnp.inf, log_w)  # never proposed: no weight
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        log_w = jnp.where(valid[..., None] if full_vocab else valid, log_w, -jnp.inf)
    num_rows = jnp.sum(jnp.isfinite(jax.nn.logsumexp(log_w, axis=-1) if full_vocab else log_w))
    log_w = log_w - jnp.log(jnp.maximum(num_rows, 1))
    counted = log_w > -jnp.inf
    log_r = jnp.where(counted, logp_target - logp_inf, -jnp.inf)

    def log_mean_accept(log_lam):
        return jax.nn.logsumexp(log_w + jnp.minimum(0.0, log_r - log_lam))

    # At log lam = hi, mean acceptance <= exp(-hi) sum w exp(log_r) = target; at lo it is maximal.
    log_target = jnp.log(target_accept)
    hi = jax.nn.logsumexp(log_w + log_r) - log_target
    hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
    lo = jnp.min(jnp.where(counted & (log_r > -jnp.inf), log_r, jnp.inf))
    lo = jnp.minimum(jnp.where(jnp.isfinite(lo), lo, hi), hi)

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = log_mean_accept(mid) >= log_target
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_iters, halve, (lo, hi))
    return jnp.exp(0.5 * (lo + hi))


def jackpot_weights(logp_new, logp_inf, logp_old, z, lam, c1, c2, target: Target = "new"):
    """rho = min(Z * max(lam, p_target / p_inf), c1) * min(p_old / p_target, c2)

    Algorithm 1, lines 23-24: the stop-gradient weight of eq. 5, where ``Z * max(lam, p_target /
    p_inf) = p_target / p'_inf`` is the OBRS importance weight truncated at ``c1`` (``F``), and
    ``p_old / p_target`` maps the target back to PPO's old policy (identically 1 when
    ``target == "old"``). ``z`` is the (calibrated) normalizer Z_t per token.
    """
    check_choice("target", target, TARGETS)
    log_lambda = log_lam(lam)
    check_range("c1", c1, lambda v: v > 0, "> 0")
    check_range("c2", c2, lambda v: v > 0, "> 0")
    logp_target = logp_new if target == "new" else logp_old
    log_w_obrs = jnp.log(z) + jnp.maximum(log_lambda, logp_target - logp_inf)
    log_rho = jnp.minimum(log_w_obrs, jnp.log(c1))
    if target == "new":
        log_rho = log_rho + jnp.minimum(logp_old - logp_new, jnp.log(c2))
    return jax.lax.stop_gradient(jnp.exp(log_rho))


class ObrsFilter(NamedTuple):
    """Per-token output of OBRS for one batch (Algorithm 1, lines 18-24)."""

    accept_prob: jax.Array  # a(x_t), eq. 3
    accepted: jax.Array  # Bernoulli(a(x_t)) and valid
    kappa: jax.Array  # batch calibration, scalar (section 4.4.2)
    z: jax.Array  # Z_t used in the weights: kappa * Z_approx_t, or Z_approx_t uncalibrated
    rho: jax.Array  # jackpot_weights


def obrs_filter(u, logp_inf, logp_old, logp_new, z_approx, valid, *, lam, c1, c2,
                target: Target = "new", calibrate: bool = True) -> ObrsFilter:
    """OBRS on the sampled tokens of a batch: acceptance, mask, kappa, Z_t and rho.

    Inputs are the sampled tokens' log-probs under p_inf, p_old and p_new, ``z_approx`` per token (the
    top-k estimate, or the exact Z with ``calibrate=False``) and ``u``, each token's uniform draw in
    [0, 1): accepted where ``u < a(x)``. kappa is over every valid token given, so pass the whole batch
    it is defined on. Everything returned is stop-gradient: the policy's gradient flows only through
    its PPO term (eq. 5).
    """
    check_choice("target", target, TARGETS)
    logp_inf, logp_old, logp_new = (jax.lax.stop_gradient(x) for x in (logp_inf, logp_old, logp_new))
    valid = jnp.asarray(valid, bool)
    logp_target = logp_new if target == "new" else logp_old
    a = accept_prob(logp_target, logp_inf, lam)
    accepted = (u < a) & valid
    k = kappa(z_approx, accepted, valid)
    z = jax.lax.stop_gradient(k * z_approx if calibrate else jnp.asarray(z_approx))
    rho = jackpot_weights(logp_new, logp_inf, logp_old, z, lam, c1, c2, target)
    return ObrsFilter(accept_prob=a, accepted=accepted, kappa=k, z=z, rho=rho)
