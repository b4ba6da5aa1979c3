"""The Jackpot objective at mini-batch scope: eq. 5 (policy), eq. 6 + beta eq. 7 (actor), eq. 8.

One optimizer step consumes one mini-batch; lam (solved for a budget), the OBRS mask, kappa (section
4.4.2) and every loss denominator are statistics of that whole mini-batch (:func:`policy_scope`,
:func:`aggregation_weights`). Each loss is then a sum of per-token terms times per-token weights that
already hold the denominators, so the losses of any split into micro-batches add up to the mini-batch's
loss. The Bernoulli draws are keyed per token, by its row in the mini-batch and its position in the
completion (:func:`uniforms`). Per-token arrays are ``[B, T]``: log-probs of the sampled tokens, ``valid``
marking generated tokens; ``docs/training.md`` ("The estimator") states which tokens count where.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jackpot_jax import losses, obrs

MODES = ("on_policy", "off_policy", "tis", "tis_distill", "jackpot")


class Tokens(NamedTuple):
    """A mini-batch's sampled tokens ``[B, T]``, stop-gradient: what the modes' token weights read."""

    logp_inf: jax.Array  # log p_inf(x_t): the distribution x_t was drawn from
    logp_old: jax.Array  # log p_old(x_t): the policy at the start of the PPO step
    logp_new: jax.Array  # log p_new(x_t): the policy being optimized, at its current parameters
    valid: jax.Array  # bool: generated tokens
    u: jax.Array  # the token's uniform draw in [0, 1) for the OBRS mask (:func:`uniforms`)


class Scope(NamedTuple):
    """The policy loss's stop-gradient token weights over one mini-batch ``[B, T]``, and its scalars."""

    mask: jax.Array  # bool: the tokens eq. 5 counts (valid; and accepted, in jackpot mode)
    rho: jax.Array  # eq. 5's weight (Algorithm 1, lines 23-24; 1 or truncated IS in the baselines)
    weight: jax.Array  # aggregation weights of ``mask``: sum(weight * x) is x's mean over the counted tokens
    metrics: dict  # scalars over the mini-batch: lam, kappa, acceptance, Z, rho


def uniforms(key, valid):
    """``u [B, T]``: the uniform of row ``b``'s ``j``-th generated token is ``U[b, j]`` with ``U =
    uniform(key, [B, T])``, so a token's draw depends on its row and completion position alone (not on
    the micro-batch, the prompt's length or a completion window). float32, as :func:`obrs.sample_mask`."""
    b, t = valid.shape
    start = jnp.argmax(valid, axis=1)[:, None]
    u = jax.random.uniform(key, (b, t), jnp.float32)
    return jnp.take_along_axis(u, (jnp.arange(t)[None, :] - start) % t, axis=1)


def completion_positions(valid, width: int):
    """``[B, width]`` int32: each sequence's first ``width`` target positions from its first generated
    token (a completion's targets are contiguous and at most ``width`` long: ``rollout.max_new_tokens``);
    positions past ``T`` repeat the last one (:func:`window_valid` marks them). ``width`` 0: ``[B, T]``,
    every position."""
    b, t = valid.shape
    if not width:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos = jnp.argmax(valid, axis=1)[:, None] + jnp.arange(width)[None, :]
    return jnp.minimum(pos, t - 1).astype(jnp.int32)


def at_positions(x, positions):
    """A per-token array ``[B, T, ...]`` taken at :func:`completion_positions` ``[B, W]``: ``[B, W, ...]``."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def window_valid(valid, positions):
    """``valid`` at ``positions``, False where a position repeats (past the sequence's end)."""
    first = jnp.argmax(valid, axis=1)[:, None] + jnp.arange(positions.shape[1])[None, :]
    return at_positions(valid, positions) & (first == positions)


def aggregation_weights(mask, mode: losses.Aggregation = "token_mean"):
    """``w [B, T]`` with ``sum(w * x) == losses.masked_mean(x, mask, mode)`` for every ``x``: the
    denominators of a mean over the counted tokens, computed once over the mini-batch (0 off ``mask``)."""
    obrs.check_choice("mode", mode, losses.AGGREGATIONS)
    mask = jnp.asarray(mask, bool)
    counted = mask.astype(float)  # float32, or float64 under x64
    if mode == "token_mean":
        return counted / jnp.maximum(jnp.sum(counted), 1.0)
    per_seq = jnp.sum(counted, axis=-1, keepdims=True)
    seqs = jnp.maximum(jnp.sum(per_seq > 0), 1).astype(counted.dtype)
    return counted / jnp.maximum(per_seq, 1.0) / seqs


# ----------------------------------------------------------------------------- token weights by mode


def uniform_weights(tokens: Tokens):
    """``on_policy`` / ``off_policy``: every valid token, weight 1 (``off_policy``: no correction)."""
    return tokens.valid, jnp.ones_like(tokens.logp_inf), {}


def tis_weights(tokens: Tokens, c1):
    """``tis`` / ``tis_distill``: every valid token, weight min(p_old / p_inf, c1) (truncated IS)."""
    return tokens.valid, losses.truncated_is(tokens.logp_old - tokens.logp_inf, c1), {}


def jackpot_weights(tokens: Tokens, z_topk, z_exact, *, lam, c1, c2, target, exact: bool):
    """``jackpot``: OBRS over the mini-batch (eq. 3-5, section 4.4): the mask ``u < a(x)``, kappa from
    the mini-batch's accept count and Z_approx (top-k), rho with Z_t = kappa Z_approx, or the exact Z
    uncalibrated (``exact``). ``z_topk`` / ``z_exact`` ``[B, T]`` are Z per token at ``lam``."""
    valid = tokens.valid
    z = z_exact if exact else z_topk
    f = obrs.obrs_filter(tokens.u, tokens.logp_inf, tokens.logp_old, tokens.logp_new, jnp.where(valid, z, 0.0),
                         valid, lam=lam, c1=c1, c2=c2, target=target, calibrate=not exact)
    metrics = {"obrs/lam": jnp.asarray(lam, jnp.float32), "obrs/kappa": f.kappa,
               "obrs/accept_prob_mean": losses.masked_mean(f.accept_prob, valid),
               "obrs/z_topk_mean": losses.masked_mean(z_topk, valid)}
    if exact:
        metrics["obrs/z_exact_mean"] = losses.masked_mean(z_exact, valid)
    return f.accepted, f.rho, metrics


def obrs_lam(cfg, tokens: Tokens, lam_old):
    """lam of the mini-batch's OBRS: the one whose mean acceptance towards p_new is
    ``cfg.target_accept`` over the mini-batch's tokens (Thm. 3.4), else ``cfg.lam``; towards p_old,
    ``lam_old`` (solved once per rollout batch, where Z towards p_old is computed)."""
    if cfg.p_target == "old":
        return lam_old
    if cfg.target_accept > 0:
        return obrs.solve_lambda(tokens.logp_inf, tokens.logp_new, cfg.target_accept, tokens.valid)
    return cfg.lam


def policy_scope(cfg, tokens: Tokens, z_topk=None, z_exact=None, lam=None) -> Scope:
    """The :class:`Scope` of a mini-batch in ``cfg.mode`` (``cfg``: a
    :class:`~jackpot_jax.train.step.StepConfig`); ``z_*`` and ``lam`` (of :func:`obrs_lam`) only in
    jackpot mode. Everything is stop-gradient."""
    obrs.check_choice("mode", cfg.mode, MODES)
    tokens = Tokens(*(jax.lax.stop_gradient(x) for x in tokens))
    if cfg.mode == "jackpot":
        mask, rho, metrics = jackpot_weights(tokens, z_topk, z_exact, lam=lam, c1=cfg.c1, c2=cfg.c2,
                                             target=cfg.p_target, exact=cfg.z == "exact")
    elif cfg.mode in ("tis", "tis_distill"):
        mask, rho, metrics = tis_weights(tokens, cfg.c1)
    else:
        mask, rho, metrics = uniform_weights(tokens)
    rho = jnp.where(mask, rho, 0.0)
    metrics.update({"obrs/accept_rate": losses.masked_mean(mask, tokens.valid),
                    "obrs/rho_mean": losses.masked_mean(rho, mask), "obrs/rho_max": jnp.max(rho)})
    return Scope(mask, rho, aggregation_weights(mask, cfg.aggregation), metrics)


# ----------------------------------------------------------------------------- the losses


def policy_loss(logp_new, logp_old, logp_inf, advantages, rho, weight, valid_weight, *, eps_low, eps_high, clip):
    """Eq. 5 on (part of) a mini-batch: ``sum_t weight_t rho_t PPO_t(r = p_new / p_old, A)``, summed over
    the parts the mini-batch's mean over its counted tokens. ``logp_*`` ``[B, T]`` (0 off the valid
    tokens), ``advantages`` ``[B]``; ``rho`` and ``weight`` a :class:`Scope`'s at these tokens,
    ``valid_weight`` the aggregation weights of the valid tokens. Gradient through ``logp_new`` only.
    Returns ``(loss, metrics)``: parts of the mini-batch's, summed over the parts as well."""
    ppo, clipped = losses.ppo_token_loss(logp_new, logp_old, advantages, eps_low=eps_low, eps_high=eps_high,
                                         clip=clip)
    loss = jnp.sum(weight * rho * ppo)
    log_ratio = jax.lax.stop_gradient(logp_new) - logp_inf  # k3 estimator of KL(p_inf || p_new), sampled tokens
    return loss, {"loss/policy": loss, "policy/clip_frac": jnp.sum(jnp.where(clipped, weight, 0.0)),
                  "mismatch/kl_inf_new": jnp.sum(valid_weight * (jnp.expm1(log_ratio) - log_ratio))}


def actor_loss(logp_actor, logp_actor_old, logp_inf, advantages, distill_kl, weight, *, beta, tis_cap,
               eps_low=0.2, eps_high=0.2, clip=True, ppo_weight=1.0):
    """The actor's loss on (part of) a mini-batch, ``ppo_weight`` * eq. 6 + beta * eq. 7, with ``weight``
    ``[B, T]`` the aggregation weights of the mini-batch's valid tokens (every one of them, accepted or
    not, is distilled). eq. 6: PPO on the actor's ratio p_omega / p_omega_old weighted by
    SG(min(p_omega_old / p_inf, C)); eq. 7: ``distill_kl`` per token. Returns ``(loss, metrics)``."""
    obrs.check_range("beta", beta, lambda v: v >= 0, ">= 0")
    obrs.check_range("ppo_weight", ppo_weight, lambda v: v >= 0, ">= 0")
    tis = jax.lax.stop_gradient(losses.truncated_is(logp_actor_old - logp_inf, tis_cap))
    ppo, _ = losses.ppo_token_loss(logp_actor, logp_actor_old, advantages, eps_low=eps_low, eps_high=eps_high,
                                   clip=clip)
    ppo_loss = jnp.sum(weight * tis * ppo)
    distill = jnp.sum(weight * distill_kl)
    return ppo_weight * ppo_loss + beta * distill, {"loss/actor_ppo": ppo_loss, "loss/distill": distill}
