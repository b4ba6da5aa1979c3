"""The Jackpot objective: GRPO advantages, PPO, truncated IS, distillation KL, aggregation.

Equation numbers are the paper's (``shared/JACKPOT.md``). Per-token inputs are ``[B, T]`` (sequences
by positions) with a boolean ``valid`` mask for padding; per-sequence advantages may be given as
``[B]``. Log-probabilities are of the sampled tokens unless a name says ``full``. Padded positions
may hold any value, including ``-inf`` or NaN: they are zeroed before any arithmetic, so neither the
loss nor its gradient can be poisoned by them.

The distillation KL (``kl_divergence``, ``distill_kl``, eq. 7) is a vocabulary reduction, defined beside the
kernels that compute it, in :mod:`pallas_kernels.logspace`, and used from here.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jackpot_jax import obrs
from pallas_kernels.logspace import distill_kl, kl_divergence

Aggregation = Literal["token_mean", "seq_mean_token_mean"]
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def grpo_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
    """GRPO advantages: A_i = (R_i - mean_g R) / (std_g R + eps) within each group.

    ``rewards`` is ``[B]`` with ``B = num_prompts * group_size``, the ``group_size`` samples of a
    prompt contiguous. ``std`` is the unbiased sample standard deviation (as ``torch.std``, used by
    common GRPO implementations); ``normalize_std=False`` keeps only the mean baseline (Dr. GRPO).
    A group whose rewards are all equal gets advantage exactly 0.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {rewards.shape}.")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size={group_size!r} is not allowed: GRPO needs an integer >= 2.")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards has {rewards.shape[0]} entries, not a multiple of group_size={group_size}."
        )
    groups = rewards.reshape(-1, group_size)
    centered = groups - jnp.mean(groups, axis=-1, keepdims=True)
    if normalize_std:
        centered = centered / (jnp.std(groups, axis=-1, ddof=1, keepdims=True) + eps)
    no_spread = jnp.all(groups == groups[:, :1], axis=-1, keepdims=True)
    return jnp.where(no_spread, 0.0, centered).reshape(-1)


def _per_token(advantages, like):
    advantages = jnp.asarray(advantages)
    return advantages[..., None] if advantages.ndim == jnp.ndim(like) - 1 else advantages


def ppo_token_loss(logp_new, logp_old, advantages, *, eps_low: float = 0.2,
                   eps_high: float = 0.2, clip: bool = True):
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = p_new / p_old.

    The inner term of eq. 5 and eq. 6 (negated, to minimize); asymmetric clipping with
    ``eps_low`` / ``eps_high``, or plain ``-r A`` with ``clip=False``. Returns ``(loss, clipped)``,
    ``clipped`` marking tokens where the clipped branch is active (its gradient is zero).
    """
    obrs.check_range("eps_low", eps_low, lambda v: (v >= 0) & (v < 1), "in [0, 1)")
    obrs.check_range("eps_high", eps_high, lambda v: v >= 0, ">= 0")
    advantages = _per_token(advantages, logp_new)
    ratio = jnp.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    if not clip:
        return -unclipped, jnp.zeros(jnp.shape(unclipped), bool)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


def truncated_is(log_ratio, cap):
    """F(x) = min(x, C) of eq. 5-6, taking log x; returns x truncated at ``cap`` (linear space)."""
    obrs.check_range("cap", cap, lambda v: v > 0, "> 0")
    return jnp.exp(jnp.minimum(log_ratio, jnp.log(cap)))


def masked_mean(values, mask, mode: Aggregation = "token_mean"):
    """Aggregate per-token ``values [B, T]`` over the tokens where ``mask`` holds.

    ``token_mean``: sum over counted tokens / number of counted tokens in the batch.
    ``seq_mean_token_mean``: each sequence's mean over its counted tokens, then the mean over the
    sequences that have at least one. Only counted tokens enter any denominator, and a batch with
    none gives 0, never NaN. For the policy the mask is ``valid & accepted``: dividing by accepted
    tokens is the expectation under p'_inf that the OBRS weight corrects (eq. 5).
    """
    obrs.check_choice("mode", mode, AGGREGATIONS)
    mask = jnp.asarray(mask, bool)
    values = jnp.where(mask, values, 0.0)
    if mode == "token_mean":
        return jnp.sum(values) / jnp.maximum(jnp.sum(mask), 1)
    per_seq_count = jnp.sum(mask, axis=-1)
    per_seq = jnp.sum(values, axis=-1) / jnp.maximum(per_seq_count, 1)
    return jnp.sum(per_seq) / jnp.maximum(jnp.sum(per_seq_count > 0), 1)


def _masked_stats(values, mask):
    """Mean and max of ``values`` over ``mask`` (0 when the mask is empty)."""
    mean = masked_mean(values, mask)
    return mean, jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, values, -jnp.inf)), 0.0)


def jackpot_policy_loss(logp_new, logp_old, logp_inf, advantages, valid, z_approx, key, *,
                        lam, c1: float, c2: float, target: obrs.Target = "new",
                        calibrate: bool = True, eps_low: float = 0.2, eps_high: float = 0.2,
                        clip: bool = True, aggregation: Aggregation = "token_mean"):
    """The OBRS-adjusted PPO policy loss of eq. 5 (Algorithm 1, lines 18-25).

    L = mean over accepted valid tokens of SG(rho) * PPO(r = p_new / p_old, A), with the OBRS mask
    ~ Bernoulli(a(x)) drawn from ``key`` and rho from :func:`obrs.jackpot_weights` using
    Z_t = kappa * ``z_approx`` (``calibrate=False`` uses ``z_approx`` as is, e.g. an exact Z).
    Gradient flows only through ``logp_new``'s PPO ratio. Returns ``(loss, metrics)``.
    """
    valid = jnp.asarray(valid, bool)
    logp_new, logp_old, logp_inf, z_approx = (
        jnp.where(valid, x, 0.0) for x in (logp_new, logp_old, logp_inf, z_approx)
    )
    advantages = jnp.where(valid, _per_token(advantages, logp_new), 0.0)
    f = obrs.obrs_filter(key, logp_inf, logp_old, logp_new, z_approx, valid, lam=lam, c1=c1,
                         c2=c2, target=target, calibrate=calibrate)
    ppo, clipped = ppo_token_loss(logp_new, logp_old, advantages, eps_low=eps_low,
                                  eps_high=eps_high, clip=clip)
    loss = masked_mean(f.rho * ppo, f.accepted, aggregation)
    rho_mean, rho_max = _masked_stats(f.rho, f.accepted)
    metrics = {
        "policy/loss": loss,
        "policy/accept_rate": masked_mean(f.accepted, valid),
        "policy/accept_prob_mean": masked_mean(f.accept_prob, valid),
        "policy/kappa": f.kappa,
        "policy/z_mean": masked_mean(f.z, valid),
        "policy/rho_mean": rho_mean,
        "policy/rho_max": rho_max,
        "policy/clip_frac": masked_mean(clipped, f.accepted),
    }
    return loss, metrics


def actor_loss(logp_actor, logp_actor_old, logp_inf, advantages, valid, distill_kl_per_token, *,
               beta: float, tis_cap: float, eps_low: float = 0.2, eps_high: float = 0.2,
               clip: bool = True, aggregation: Aggregation = "token_mean", ppo_weight: float = 1.0):
    """The actor's loss, ``ppo_weight`` * eq. 6 + beta * eq. 7 (``ppo_weight=0``: distillation only).

    eq. 6: PPO on the actor's own ratio p_omega / p_omega_old, weighted by the truncated IS
    SG(min(p_omega_old / p_inf, C)) that corrects the rollout engine's sampling distribution.
    eq. 7: ``distill_kl_per_token`` ``[B, T]`` from :func:`distill_kl` (or a fused kernel), averaged
    over valid positions: every position, accepted or not, is distilled towards the policy.
    Returns ``(loss, metrics)``.
    """
    obrs.check_range("beta", beta, lambda v: v >= 0, ">= 0")
    obrs.check_range("ppo_weight", ppo_weight, lambda v: v >= 0, ">= 0")
    valid = jnp.asarray(valid, bool)
    logp_actor, logp_actor_old, logp_inf = (
        jnp.where(valid, x, 0.0) for x in (logp_actor, logp_actor_old, logp_inf)
    )
    advantages = jnp.where(valid, _per_token(advantages, logp_actor), 0.0)
    distill_kl_per_token = jnp.where(valid, distill_kl_per_token, 0.0)
    tis = jax.lax.stop_gradient(truncated_is(logp_actor_old - logp_inf, tis_cap))
    ppo, clipped = ppo_token_loss(logp_actor, logp_actor_old, advantages, eps_low=eps_low,
                                  eps_high=eps_high, clip=clip)
    ppo_loss = masked_mean(tis * ppo, valid, aggregation)
    distill = masked_mean(distill_kl_per_token, valid, aggregation)
    loss = ppo_weight * ppo_loss + beta * distill
    metrics = {
        "actor/loss": loss,
        "actor/ppo_loss": ppo_loss,
        "actor/distill_kl": distill,
        "actor/tis_mean": masked_mean(tis, valid),
        "actor/clip_frac": masked_mean(clipped, valid),
    }
    return loss, metrics
