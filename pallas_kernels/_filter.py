"""Per-token OBRS filter math (Algorithm 1, lines 18-24), plain jnp and valid inside a kernel.

The kernels' epilogues use these; the definitions they are tested against are
:func:`jackpot_jax.obrs.accept_prob`, :func:`~jackpot_jax.obrs.sample_mask` and
:func:`~jackpot_jax.obrs.jackpot_weights`. Inputs are per-token log-probabilities of the sampled
tokens; masks are float32 0/1 (what every backend stores natively).
"""
import jax.numpy as jnp

NEG_INF = float("-inf")


def accept(logp_inf, logp_target, log_lam, u, valid):
    """``(a, accepted)``: a(x) = min(1, p_target / (lam p_inf)) (eq. 3), 1 where p_inf = 0, and the
    Bernoulli draw ``u < a`` (``u`` uniform in [0, 1)) on valid tokens."""
    log_a = jnp.minimum(0.0, logp_target - log_lam - logp_inf)
    a = jnp.where(logp_inf == NEG_INF, 1.0, jnp.exp(log_a))
    return a, jnp.where((u < a) & (valid > 0), 1.0, 0.0)


def rho(z, log_kappa, logp_inf, logp_old, logp_new, log_lam, log_c1, log_c2, target_new: bool):
    """rho = min(kappa Z max(lam, p_target / p_inf), c1) [* min(p_old / p_new, c2) if p_target =
    p_new] (Algorithm 1, lines 23-24; ``p_target / p'_inf = Z max(lam, p_target / p_inf)``)."""
    logp_target = logp_new if target_new else logp_old
    log_rho = jnp.minimum(log_kappa + jnp.log(z) + jnp.maximum(log_lam, logp_target - logp_inf), log_c1)
    if target_new:
        log_rho = log_rho + jnp.minimum(logp_old - logp_new, log_c2)
    return jnp.exp(log_rho)
