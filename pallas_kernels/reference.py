"""Materialized references: the definitions the streaming implementations must match.

They form the full ``[N, V]`` logits, so they cost O(N x V) memory; they are built on
:mod:`jackpot_jax.obrs` and :mod:`jackpot_jax.losses` and differentiate with plain autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jackpot_jax import losses, obrs


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
    z_topk = obrs.topk_normalizer(logp_inf, logp_tgt, lam, k)
    return z_topk, (obrs.normalizer(logp_inf, logp_tgt, lam) if exact else None)


def distill_kl(h_teacher, w_teacher, h_student, w_student, direction="forward", *, vocab_size=None):
    vocab_size = w_teacher.shape[1] if vocab_size is None else vocab_size
    logp_teacher = jax.nn.log_softmax(_logits(h_teacher, w_teacher, 1.0, vocab_size))
    logp_student = jax.nn.log_softmax(_logits(h_student, w_student, 1.0, vocab_size))
    return losses.distill_kl(logp_teacher, logp_student, direction)
