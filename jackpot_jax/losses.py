"""The objective's building blocks: GRPO advantages, PPO, truncated IS, distillation KL, aggregation.

Equation numbers are the paper's (``shared/JACKPOT.md``). Per-token inputs are ``[B, T]`` (sequences
by positions) with a boolean ``valid`` mask for padding; per-sequence advantages may be given as
``[B]``. Log-probabilities are of the sampled tokens unless a name says ``full``. The losses built
from them, at a mini-batch's scope, are :mod:`jackpot_jax.train.objective`'s.

The distillation KL (``kl_divergence``, ``distill_kl``, eq. 7) is a vocabulary reduction, defined beside the
kernels that compute it, in :mod:`pallas_kernels.logspace`, and used from here.
"""
from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from jackpot_jax import obrs
from pallas_kernels.logspace import distill_kl, kl_divergence

__all__ = ["AGGREGATIONS", "Aggregation", "distill_kl", "grpo_advantages", "kl_divergence", "masked_mean",
           "ppo_token_loss", "truncated_is"]

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
