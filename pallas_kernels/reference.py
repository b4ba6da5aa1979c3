"""Materialized references: the definitions the streaming implementations must match.

They form the full ``[N, V]`` logits, so they cost O(N x V) memory; they are built on the log-space
definitions of :mod:`pallas_kernels.logspace` and differentiate with plain autodiff.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import logspace


class JackpotStats(NamedTuple):
    """Everything one update step needs from the vocabulary. Differentiable: ``logp_new``,
    ``lse_new`` (policy); ``logp_actor``, ``lse_actor``, ``distill_kl`` (actor). The rest is
    stop-gradient; the top-k lists and the normalizers are None when computed without them."""

    logp_new: jax.Array  # [N] policy log p_new(target)
    lse_new: jax.Array  # [N]
    topk_logp_new: jax.Array  # [N, k]
    topk_ids_new: jax.Array  # [N, k]
    logp_actor: jax.Array  # [N] actor log p(target) at temperature_actor
    lse_actor: jax.Array  # [N]
    topk_logp_actor: jax.Array  # [N, k]
    topk_ids_actor: jax.Array  # [N, k]
    z_topk: jax.Array  # [N] Z_approx over the union of both top-k sets (actor = p_inf, policy = target)
    z_exact: jax.Array | None  # [N] exact Z of eq. 4, when asked for
    distill_kl: jax.Array  # [N] eq. 7 (forward) or its reverse, policy teacher, actor student
    vk_logp_actor: jax.Array | None = None  # [N, 2k] both models' log-probs on V_k = topk(actor) U topk(policy),
    vk_logp_new: jax.Array | None = None  # each token once (-inf on repeats): z_topk = logspace.normalizer of the two


def _logits(h, w, scale, vocab_size):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32) * scale
    return jnp.where(jnp.arange(w.shape[1]) < vocab_size, logits, -jnp.inf)


def token_stats(h, w, targets, k, *, temperature=1.0, vocab_size=None):
    vocab_size = w.shape[1] if vocab_size is None else vocab_size
    logits = _logits(h, w, 1.0 / temperature, vocab_size)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp_all = logits - lse[:, None]
    logp = jnp.take_along_axis(logp_all, targets[:, None], axis=-1)[:, 0]
    topk_logp, topk_ids = lax.top_k(lax.stop_gradient(logp_all), k)
    return logp, lse, topk_logp, topk_ids


def obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, exact, *,
                    temperature_inf=1.0, vocab_size=None):
    vocab_size = w_inf.shape[1] if vocab_size is None else vocab_size
    h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt = (
        lax.stop_gradient(x) for x in (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt))
    logp_inf = _logits(h_inf, w_inf, 1.0 / temperature_inf, vocab_size) - lse_inf[:, None]
    logp_tgt = _logits(h_tgt, w_tgt, 1.0, vocab_size) - lse_tgt[:, None]
    z_topk = logspace.topk_normalizer(logp_inf, logp_tgt, lam, k)
    return z_topk, (logspace.normalizer(logp_inf, logp_tgt, lam) if exact else None)


def distill_kl(h_teacher, w_teacher, h_student, w_student, direction="forward", *, vocab_size=None):
    vocab_size = w_teacher.shape[1] if vocab_size is None else vocab_size
    logp_teacher = jax.nn.log_softmax(_logits(h_teacher, w_teacher, 1.0, vocab_size))
    logp_student = jax.nn.log_softmax(_logits(h_student, w_student, 1.0, vocab_size))
    return logspace.distill_kl(logp_teacher, logp_student, direction)


def jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, *, temperature_actor=1.0, exact=False,
                  direction="forward", vocab_size=None, normalizers=True, inf_topk=None):
    """With ``inf_topk = (ids, logp)`` ``[N, K >= k]`` (p_inf's top-k, best first), V_k takes p_inf's
    top-k ids and log-probs from its first k columns instead of the actor's own top-k."""
    vocab_size = w_pol.shape[1] if vocab_size is None else vocab_size
    logp_new, lse_new, topk_new, ids_new = token_stats(h_pol, w_pol, targets, k, vocab_size=vocab_size)
    logp_act, lse_act, topk_act, ids_act = token_stats(h_act, w_act, targets, k, temperature=temperature_actor,
                                                       vocab_size=vocab_size)
    logp_new_all = jax.nn.log_softmax(_logits(h_pol, w_pol, 1.0, vocab_size))
    logp_act_all = jax.nn.log_softmax(_logits(h_act, w_act, 1.0 / temperature_actor, vocab_size))
    sg = lax.stop_gradient
    z_exact = logspace.normalizer(sg(logp_act_all), sg(logp_new_all), lam) if exact else None
    kl = logspace.distill_kl(logp_new_all, logp_act_all, direction)
    if not normalizers:
        return JackpotStats(logp_new, lse_new, None, None, logp_act, lse_act, None, None, None, None, kl)
    if inf_topk is not None:
        ids_act, topk_act = inf_topk[0][:, :k], sg(inf_topk[1][:, :k])
    repeated = jnp.any(ids_new[:, :, None] == ids_act[:, None, :], axis=-1)
    on_vk = lambda logp, at_ids_act: sg(jnp.concatenate([at_ids_act, jnp.where(
        repeated, -jnp.inf, jnp.take_along_axis(logp, ids_new, axis=-1))], axis=-1))
    vk_act = on_vk(logp_act_all, topk_act)
    vk_new = on_vk(logp_new_all, jnp.take_along_axis(logp_new_all, ids_act, axis=-1))
    z_topk = (logspace.normalizer(vk_act, vk_new, lam) if inf_topk is not None
              else logspace.topk_normalizer(sg(logp_act_all), sg(logp_new_all), lam, k))
    return JackpotStats(logp_new, lse_new, topk_new, ids_new, logp_act, lse_act, topk_act, ids_act,
                        z_topk, z_exact, kl, vk_act, vk_new)
