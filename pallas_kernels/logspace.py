"""The log-space definitions the kernels compute and are tested against.

The vocabulary reductions of the Jackpot paper (``shared/JACKPOT.md``) over full log-distributions
``[..., V]`` (the vocabulary is the last axis; ``-inf`` entries, a padded vocabulary, are allowed):
the OBRS normalizer Z of eq. 4, its top-k estimate of section 4.4.1 and the distillation KL of
eq. 7; and the argument checks they share. Plain JAX, no import of ``jackpot_jax``: the kernels'
package depends on JAX alone, and :mod:`jackpot_jax.obrs` and :mod:`jackpot_jax.losses` import
these definitions from here. No probability ratio is formed by dividing probabilities.

Checks raise ``ValueError`` naming the argument and what is allowed when the value is known at
trace time; tracers pass unchecked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DIRECTIONS = ("forward", "reverse")


def _concrete(value):
    """``value`` as a NumPy array, or None when it is only known at run time (a tracer)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_range(name: str, value, is_allowed, allowed: str) -> None:
    """Raise ``ValueError`` if a concrete ``value`` fails ``is_allowed``; tracers pass unchecked."""
    concrete = _concrete(value)
    if concrete is None:
        return
    with np.errstate(invalid="ignore"):
        ok = np.all(is_allowed(concrete))
    if not ok:
        shown = concrete.item() if concrete.size == 1 else f"an array with values {concrete.ravel()[:4]}..."
        raise ValueError(f"{name}={shown} is not allowed: {name} must be {allowed}.")


def check_choice(name: str, value, allowed) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be one of {allowed}.")


def check_top_k(k, vocab: int) -> None:
    """``k`` must be a static integer with ``1 <= k <= vocab``."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k={k!r} is not allowed: k must be an integer with 1 <= k <= V={vocab}.")


def log_lam(lam):
    """log lam, after checking ``lam > 0`` (the OBRS threshold of eq. 3-4)."""
    check_range("lam", lam, lambda v: v > 0, "> 0")
    return jnp.log(lam)


def log_min_mass(logp_inf, logp_target, log_lam):
    """log min(p_inf(x), p_target(x) / lam): the unnormalized accepted mass of eq. 4."""
    return jnp.minimum(logp_inf, logp_target - log_lam)


def log_normalizer(logp_inf, logp_target, lam):
    """log Z with Z = sum_x min(p_inf(x), p_target(x) / lam) over the last axis  (eq. 4)."""
    return jax.nn.logsumexp(log_min_mass(logp_inf, logp_target, log_lam(lam)), axis=-1)


def normalizer(logp_inf, logp_target, lam):
    """Exact Z of eq. 4 over the last (vocabulary) axis; also the expected acceptance rate
    sum_x p_inf(x) a(x). Inputs are full log-distributions ``[..., V]``; returns ``[...]``."""
    return jnp.exp(log_normalizer(logp_inf, logp_target, lam))


def topk_normalizer(logp_inf, logp_target, lam, k: int):
    """Z_approx = sum over V_k = topk(p_inf) U topk(p_target) of min(p_inf, p_target / lam)
    (section 4.4.1). V_k is a set union: a token in both top-k sets counts once.

    Z_approx <= Z always. ``k`` is static; ``1 <= k <= V``.
    """
    check_top_k(k, jnp.shape(logp_inf)[-1])
    log_lambda = log_lam(lam)
    _, ids_inf = jax.lax.top_k(logp_inf, k)
    _, ids_target = jax.lax.top_k(logp_target, k)

    def log_mass_at(ids):
        take = lambda logp: jnp.take_along_axis(logp, ids, axis=-1)
        return log_min_mass(take(logp_inf), take(logp_target), log_lambda)

    in_both = jnp.any(ids_target[..., :, None] == ids_inf[..., None, :], axis=-1)
    terms = jnp.concatenate(
        [log_mass_at(ids_inf), jnp.where(in_both, -jnp.inf, log_mass_at(ids_target))], axis=-1
    )
    return jnp.exp(jax.nn.logsumexp(terms, axis=-1))


def kl_divergence(logp, logq):
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)) over the last axis, from log-probabilities;
    0 log 0 = 0, and +inf where p > 0 = q. Gradients stay finite at -inf entries."""
    support = logp > -jnp.inf
    log_ratio = jnp.where(support, logp - jnp.where(support, logq, 0.0), 0.0)
    return jnp.sum(jnp.where(support, jnp.exp(logp) * log_ratio, 0.0), axis=-1)


def distill_kl(logp_teacher_full, logp_student_full, direction: str = "forward"):
    """Per-position distillation KL between full log-distributions ``[..., V]`` -> ``[...]``.

    ``forward`` is eq. 7, KL(SG(p_teacher) || p_student); ``reverse`` is KL(p_student ||
    SG(p_teacher)), the paper's "TIS + reverse KL" baseline. The teacher (the policy, p_new) never
    receives gradient.
    """
    check_choice("direction", direction, DIRECTIONS)
    teacher = jax.lax.stop_gradient(logp_teacher_full)
    if direction == "forward":
        return kl_divergence(teacher, logp_student_full)
    return kl_divergence(logp_student_full, teacher)
