"""Chunked XLA implementations: ``lax.scan`` over vocabulary blocks, never a tokens x vocab tensor.

Each op computes the logits of one block of columns, ``h @ w[:, block] / temperature`` (float32
accumulation), folds it into per-token running statistics (online logsumexp, a running top-k merge,
running sums), and moves on. Peak memory is O(N x block_v) for the block plus O(N x k) state,
instead of the O(N x V) of the materialized reference.

Blocks and a vocabulary that does not divide: block ``i`` reads columns ``[start_i, start_i +
block_v)`` with ``start_i = min(i * block_v, V - block_v)``, so the last block overlaps the one
before it instead of reading past the end; columns below ``i * block_v`` were already counted and
are masked out (``fresh``), as are columns ``>= vocab_size`` (a padded vocabulary). Nothing is padded
or copied.

Backward passes (custom VJPs) recompute each block's logits from ``h`` and ``w`` and keep only
per-token residuals (``lse``, KL), so no N x V array is saved between the passes either.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._online import online_lse
from pallas_kernels.logspace import normalizer
from pallas_kernels.reference import JackpotStats

NEG_INF = -jnp.inf


class _Blocks:
    """Static blocking of a vocabulary of ``V`` columns, ``vocab_size`` of them real."""

    def __init__(self, num_columns: int, block_v: int, vocab_size: int, min_block: int = 1):
        self.num_columns = num_columns
        self.size = min(max(block_v, min_block), num_columns)
        self.count = math.ceil(num_columns / self.size)
        self.vocab_size = vocab_size

    def start(self, i):
        return jnp.minimum(i * self.size, self.num_columns - self.size)

    def indices(self):
        """The block indices to scan over: int32, as the column ids and the top-k ids, also under
        ``jax_enable_x64`` (where ``jnp.arange`` would give int64 and a scan carry would change type)."""
        return jnp.arange(self.count, dtype=jnp.int32)

    def columns(self, i):
        """(start, global column ids [Bv] int32, mask of columns this block counts [Bv])."""
        start = self.start(i)
        cols = start + jnp.arange(self.size, dtype=jnp.int32)
        return start, cols, (cols >= i * self.size) & (cols < self.vocab_size)


def _logits(h, w, start, blocks, scale, counted):
    """``h @ w[:, start:start+Bv] * scale`` in float32, ``-inf`` where a column is not counted."""
    w_blk = lax.dynamic_slice_in_dim(w, start, blocks.size, axis=1)
    logits = jnp.dot(h, w_blk, preferred_element_type=jnp.float32) * scale
    return jnp.where(counted[None, :], logits, NEG_INF)


def _lse_update(m, s, logits):
    """Online logsumexp: fold a block ``[N, Bv]`` into running max ``m`` and scaled sum ``s``."""
    return online_lse(m, s, logits, keepdims=False)[:2]


def _lse(m, s):
    return jnp.where(s > 0, m + jnp.log(s), NEG_INF)


def _log_lam32(lam):
    """log lam in float32, the blocks' dtype: a float64 lam (under ``jax_enable_x64``) would turn the
    running sums of eq. 4 into float64 and change the scan's carry type."""
    return jnp.log(jnp.asarray(lam, jnp.float32))


def _take_in_block(running, logits, ids, start, i, size):
    """``running [N, m]`` with the block's ``logits [N, Bv]`` at column ``ids [N, m]`` where block
    ``i`` (from column ``start``) counts that column; elsewhere ``running`` as it was."""
    local = ids - start
    here = (ids >= i * size) & (local < size)
    return jnp.where(here, jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1), axis=-1), running)


def _topk_merge(values, payloads, block_values, block_payloads, k):
    """Merge a block's candidates into the running top-k; ``payloads`` ride along with values."""
    bk = min(k, block_values.shape[-1])
    block_top, idx = lax.top_k(block_values, bk)
    cand = jnp.concatenate([values, block_top], axis=-1)
    top, pick = lax.top_k(cand, k)
    merged = []
    for running, block in zip(payloads, block_payloads):
        block = jnp.take_along_axis(block, idx, axis=-1)
        merged.append(jnp.take_along_axis(jnp.concatenate([running, block], axis=-1), pick, axis=-1))
    return top, merged


def _topk_set_merge(top_set, own, other, ids, k):
    """Merge a block into one model's running top-k set ``(own [N, k], other [N, k], ids [N, k])``:
    ranked by its own values ``own [N, Bv]``, with the other model's ``other [N, Bv]`` and the
    column ``ids`` at the same columns riding along."""
    top, (top_other, top_ids) = _topk_merge(top_set[0], top_set[1:], own, (other, ids), k)
    return top, top_other, top_ids


def _init_topk_set(n, k):
    neg = jnp.full((n, k), NEG_INF, jnp.float32)
    return neg, neg, jnp.zeros((n, k), jnp.int32)


def topk_union(inf_set, tgt_set):
    """V_k = topk(p_inf) U topk(p_target) (section 4.4.1) from both top-k sets ``(own log-probs,
    the other model's log-probs, ids)`` ``[N, k]``: ``(logp_inf, logp_target)`` ``[N, 2k]`` on V_k,
    p_inf's k tokens then p_target's, with -inf on those already in p_inf's set (each token once).
    Z_approx = :func:`pallas_kernels.logspace.normalizer` of the two."""
    inf_own, inf_other, inf_ids = inf_set
    tgt_own, tgt_other, tgt_ids = tgt_set
    in_both = jnp.any(tgt_ids[:, :, None] == inf_ids[:, None, :], axis=-1)
    logp_inf = jnp.concatenate([inf_own, jnp.where(in_both, NEG_INF, tgt_other)], axis=-1)
    logp_tgt = jnp.concatenate([inf_other, jnp.where(in_both, NEG_INF, tgt_own)], axis=-1)
    return logp_inf, logp_tgt


# ----------------------------------------------------------------------------- token stats


def token_stats(h, w, targets, k, *, temperature=1.0, vocab_size=None, block_v=2048):
    """Per token: log-prob of ``targets``, lse, top-k log-probs and ids. See the package docs."""
    vocab_size = w.shape[1] if vocab_size is None else vocab_size
    logp, lse, topk_logp, topk_ids = _token_stats(h, w, targets, k, float(temperature), vocab_size, block_v)
    return logp, lse, lax.stop_gradient(topk_logp), topk_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _token_stats(h, w, targets, k, temperature, vocab_size, block_v):
    return _token_stats_fwd(h, w, targets, k, temperature, vocab_size, block_v)[0]


def _token_stats_fwd(h, w, targets, k, temperature, vocab_size, block_v):
    n = h.shape[0]
    blocks = _Blocks(w.shape[1], block_v, vocab_size, min_block=k)
    scale = 1.0 / temperature

    def body(carry, i):
        m, s, target_logit, top_v, top_i = carry
        start, cols, counted = blocks.columns(i)
        logits = _logits(h, w, start, blocks, scale, counted)
        m, s = _lse_update(m, s, logits)
        target_logit = _take_in_block(target_logit[:, None], logits, targets[:, None], start, i, blocks.size)[:, 0]
        ids = jnp.broadcast_to(cols[None, :], logits.shape)
        top_v, (top_i,) = _topk_merge(top_v, (top_i,), logits, (ids,), k)
        return (m, s, target_logit, top_v, top_i), None

    neg, zero = jnp.full((n,), NEG_INF, jnp.float32), jnp.zeros((n,), jnp.float32)
    init = (neg, zero, neg, jnp.full((n, k), NEG_INF, jnp.float32), jnp.zeros((n, k), jnp.int32))
    (m, s, target_logit, top_v, top_i), _ = lax.scan(body, init, blocks.indices())
    lse = _lse(m, s)
    out = (target_logit - lse, lse, top_v - lse[:, None], top_i)
    return out, (h, w, targets, lse)


def token_stats_bwd(k, temperature, vocab_size, block_v, residuals, cotangents):
    """d logp_t / d logits_j = 1[j = t] - p_j and d lse / d logits_j = p_j; top-k carry none."""
    h, w, targets, lse = residuals
    g_logp, g_lse = cotangents[0], cotangents[1]
    blocks = _Blocks(w.shape[1], block_v, vocab_size, min_block=k)
    scale = 1.0 / temperature

    def dlogits_fn(i, start, cols, counted):
        logp = _logits(h, w, start, blocks, scale, counted) - lse[:, None]
        return (_dlogits_stats(logp, cols, targets, counted, g_logp, g_lse) * scale,)

    ((dh, dw),) = _recompute_grads(((h, w),), blocks, dlogits_fn)
    return dh, dw, None


def with_chunked_backward(forward):
    """A token-stats op whose forward pass is ``forward(h, w, targets, k, *, temperature,
    vocab_size, interpret)`` (a Pallas kernel) and whose backward pass is the chunked one above."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
    def stats(h, w, targets, k, temperature, vocab_size, block_v, interpret):
        return stats_fwd(h, w, targets, k, temperature, vocab_size, block_v, interpret)[0]

    def stats_fwd(h, w, targets, k, temperature, vocab_size, block_v, interpret):
        out = forward(h, w, targets, k, temperature=temperature, vocab_size=vocab_size, interpret=interpret)
        return out, (h, w, targets, out[1])

    def stats_bwd(k, temperature, vocab_size, block_v, interpret, residuals, cotangents):
        return token_stats_bwd(k, temperature, vocab_size, block_v, residuals, cotangents)

    stats.defvjp(stats_fwd, stats_bwd)

    def op(h, w, targets, k, *, temperature=1.0, vocab_size=None, block_v=2048, interpret=False):
        """Per token: log-prob of ``targets``, lse, top-k log-probs (stop-gradient) and ids."""
        vocab_size = w.shape[1] if vocab_size is None else vocab_size
        logp, lse, topk_logp, topk_ids = stats(h, w, targets, k, float(temperature), vocab_size, block_v,
                                               interpret)
        return logp, lse, lax.stop_gradient(topk_logp), topk_ids

    return op


def _dlogits_stats(logp, cols, targets, counted, g_logp, g_lse):
    """Cotangent of the logits from those of logp(target) and lse: d logp_t / d logit_j =
    1[j = t] - p_j, d lse / d logit_j = p_j."""
    p = jnp.exp(logp)
    onehot = (cols[None, :] == targets[:, None]) & counted[None, :]
    return g_logp[:, None] * (onehot - p) + g_lse[:, None] * p


_token_stats.defvjp(_token_stats_fwd, token_stats_bwd)


def _recompute_grads(models, blocks, dlogits_fn):
    """Backward over vocabulary blocks for ``models = ((h, w), ...)``; ``dlogits_fn(i, start, cols,
    counted)`` returns one ``[N, Bv]`` cotangent of the raw logits per model. dh accumulates in
    float32; each block's dw is complete within its iteration (summed over all tokens by the
    matmul) and written once, in w's dtype, so no float32 copy of w's gradient is ever held."""

    def body(carry, i):
        start, cols, counted = blocks.columns(i)
        fresh = (cols >= i * blocks.size)[None, :]
        out = []
        for (h, w), (dh, dw), dlogits in zip(models, carry, dlogits_fn(i, start, cols, counted)):
            dlogits = jnp.where(counted[None, :], dlogits, 0.0)
            w_blk = lax.dynamic_slice_in_dim(w, start, blocks.size, axis=1)
            dh = dh + jnp.dot(dlogits.astype(w.dtype), w_blk.T, preferred_element_type=jnp.float32)
            dw_blk = jnp.dot(h.T, dlogits.astype(h.dtype), preferred_element_type=jnp.float32)
            old = lax.dynamic_slice_in_dim(dw, start, blocks.size, axis=1)
            dw_blk = jnp.where(fresh, dw_blk.astype(dw.dtype), old)
            out.append((dh, lax.dynamic_update_slice_in_dim(dw, dw_blk, start, axis=1)))
        return tuple(out), None

    init = tuple((jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype)) for h, w in models)
    grads, _ = lax.scan(body, init, blocks.indices())
    return tuple((dh.astype(h.dtype), dw) for (h, _), (dh, dw) in zip(models, grads))


# ----------------------------------------------------------------------------- OBRS normalizer


def obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, exact, *,
                    temperature_inf=1.0, vocab_size=None, block_v=2048):
    """Z_approx over the union of both top-k sets (and the exact Z) in one pass. Stop-gradient."""
    vocab_size = w_inf.shape[1] if vocab_size is None else vocab_size
    blocks = _Blocks(w_inf.shape[1], block_v, vocab_size, min_block=k)
    args = [lax.stop_gradient(x) for x in (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt)]
    z_exact, inf_set, tgt_set = _obrs_normalizer(*args, _log_lam32(lam), k, exact, 1.0 / temperature_inf, blocks)
    return normalizer(*topk_union(inf_set, tgt_set), lam), z_exact


def _obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, log_lam, k, exact, scale_inf, blocks):
    """One pass: Z_exact (or None) and both top-k sets, p_inf's and p_target's, each ``(own
    log-probs, the other model's log-probs, ids)`` ``[N, k]`` (see :func:`topk_union`)."""
    n = h_inf.shape[0]

    def body(carry, i):
        m, s, inf_set, tgt_set = carry
        start, cols, counted = blocks.columns(i)
        logp_inf = _logits(h_inf, w_inf, start, blocks, scale_inf, counted) - lse_inf[:, None]
        logp_tgt = _logits(h_tgt, w_tgt, start, blocks, 1.0, counted) - lse_tgt[:, None]
        if exact:
            m, s = _lse_update(m, s, jnp.minimum(logp_inf, logp_tgt - log_lam))  # eq. 4 summand
        ids = jnp.broadcast_to(cols[None, :], logp_inf.shape)
        inf_set = _topk_set_merge(inf_set, logp_inf, logp_tgt, ids, k)
        tgt_set = _topk_set_merge(tgt_set, logp_tgt, logp_inf, ids, k)
        return (m, s, inf_set, tgt_set), None

    init = (jnp.full((n,), NEG_INF, jnp.float32), jnp.zeros((n,), jnp.float32), _init_topk_set(n, k),
            _init_topk_set(n, k))
    (m, s, inf_set, tgt_set), _ = lax.scan(body, init, blocks.indices())
    return (jnp.exp(_lse(m, s)) if exact else None), inf_set, tgt_set


# ----------------------------------------------------------------------------- distillation KL


def distill_kl(h_teacher, w_teacher, h_student, w_student, direction="forward", *,
               vocab_size=None, block_v=2048, pass_fn=None):
    """Per-token KL between teacher and student softmaxes; gradient to the student only.
    ``pass_fn`` computes the forward pass (:func:`two_model_pass`, or a Pallas kernel's)."""
    vocab_size = w_teacher.shape[1] if vocab_size is None else vocab_size
    pass_fn = pass_fn or two_model_pass
    return _distill_kl(lax.stop_gradient(h_teacher), lax.stop_gradient(w_teacher), h_student,
                       w_student, direction == "forward", vocab_size, block_v, pass_fn)


def two_model_pass(h_a, w_a, scale_a, h_b, w_b, scale_b, vocab_size, block_v, targets=None, k=0,
                   given_ids=(None, None)):
    """(lse_a, lse_b, KL(p_a || p_b), target logit of a, of b) ``[N]`` each, in one pass over the
    vocabulary; the target logits are -inf without ``targets``. The Pallas kernels provide the
    same function, without ``k``; with ``k`` two more outputs, the top-k sets of a and of b, or
    for a model whose top-k ids are given, the other model's logits at them (see
    :func:`_two_model_pass`)."""
    blocks = _Blocks(w_a.shape[1], block_v, vocab_size, min_block=max(k, 1))
    return _two_model_pass(h_a, w_a, scale_a, h_b, w_b, scale_b, blocks, targets, k, given_ids)


def _two_model_pass(h_a, w_a, scale_a, h_b, w_b, scale_b, blocks, targets=None, k=0, given_ids=(None, None)):
    """One pass over both models' logits a and b: their lse, KL(p_a || p_b) = E_{p_a}[a - b] -
    lse_a + lse_b (online, like the lse), given ``targets`` both models' target logits, and, with
    ``k``, each model's top-k set ``(own logits, the other model's logits, ids)`` ``[N, k]``, ranked
    by its own logits: the top-k of its log-probs, found before the lse is known (section 4.4.1).
    ``given_ids = (ids_a, ids_b)``: a model whose top-k ids ``[N, k]`` are known (p_inf's, stored by
    the rollout: Algorithm 1, phase 1) gets no running top-k merge; its output is instead the other
    model's logits at those ids ``[N, k]``, gathered in the block that holds each."""
    n = h_a.shape[0]

    def body(carry, i):
        (m_a, s_a, u, m_b, s_b, t_a, t_b), sets = carry
        start, cols, counted = blocks.columns(i)
        a = _logits(h_a, w_a, start, blocks, scale_a, counted)
        b = _logits(h_b, w_b, start, blocks, scale_b, counted)
        m_new, s_a, weights, rescale = online_lse(m_a, s_a, a, keepdims=False)
        u = u * rescale + jnp.sum(weights * jnp.where(counted[None, :], a - b, 0.0), axis=-1)
        m_b, s_b = _lse_update(m_b, s_b, b)
        if targets is not None:
            t_a = _take_in_block(t_a[:, None], a, targets[:, None], start, i, blocks.size)[:, 0]
            t_b = _take_in_block(t_b[:, None], b, targets[:, None], start, i, blocks.size)[:, 0]
        if k:
            ids = jnp.broadcast_to(cols[None, :], a.shape)
            sets = tuple(_topk_set_merge(top, own, other, ids, k) if given is None
                         else _take_in_block(top, other, given, start, i, blocks.size)
                         for top, own, other, given in zip(sets, (a, b), (b, a), given_ids))
        return ((m_new, s_a, u, m_b, s_b, t_a, t_b), sets), None

    neg, zero = jnp.full((n,), NEG_INF, jnp.float32), jnp.zeros((n,), jnp.float32)
    sets = tuple(_init_topk_set(n, k) if given is None else jnp.full((n, k), NEG_INF, jnp.float32)
                 for given in given_ids) if k else ()
    ((m_a, s_a, u, m_b, s_b, t_a, t_b), sets), _ = lax.scan(body, ((neg, zero, zero, neg, zero, neg, neg), sets),
                                                            blocks.indices())
    lse_a, lse_b = _lse(m_a, s_a), _lse(m_b, s_b)
    return (lse_a, lse_b, u / s_a - lse_a + lse_b, t_a, t_b) + sets


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _distill_kl(h_t, w_t, h_s, w_s, forward, vocab_size, block_v, pass_fn):
    return _distill_kl_fwd(h_t, w_t, h_s, w_s, forward, vocab_size, block_v, pass_fn)[0]


def _distill_kl_fwd(h_t, w_t, h_s, w_s, forward, vocab_size, block_v, pass_fn):
    if forward:  # KL(p_teacher || p_student)
        lse_t, lse_s, kl, _, _ = pass_fn(h_t, w_t, 1.0, h_s, w_s, 1.0, vocab_size, block_v)
    else:  # KL(p_student || p_teacher)
        lse_s, lse_t, kl, _, _ = pass_fn(h_s, w_s, 1.0, h_t, w_t, 1.0, vocab_size, block_v)
    return kl, (h_t, w_t, h_s, w_s, lse_t, lse_s, kl)


def _distill_kl_bwd(forward, vocab_size, block_v, pass_fn, residuals, g):
    """Forward KL: d/d b_j = p_s,j - p_t,j. Reverse KL: d/d b_j = p_s,j (log p_s,j - log p_t,j - KL)."""
    h_t, w_t, h_s, w_s, lse_t, lse_s, kl = residuals
    blocks = _Blocks(w_t.shape[1], block_v, vocab_size)

    def dlogits_fn(i, start, cols, counted):
        logp_t = _logits(h_t, w_t, start, blocks, 1.0, counted) - lse_t[:, None]
        logp_s = _logits(h_s, w_s, start, blocks, 1.0, counted) - lse_s[:, None]
        return (_dlogits_kl(logp_t, logp_s, kl, g, forward, counted),)

    ((dh_s, dw_s),) = _recompute_grads(((h_s, w_s),), blocks, dlogits_fn)
    return jnp.zeros_like(h_t), jnp.zeros_like(w_t), dh_s, dw_s


def _dlogits_kl(logp_t, logp_s, kl, g, forward, counted):
    """Cotangent of the student's logits. Forward KL(t || s): p_s - p_t. Reverse KL(s || t):
    p_s (log p_s - log p_t - KL)."""
    p_s = jnp.exp(logp_s)
    if forward:
        return g[:, None] * (p_s - jnp.exp(logp_t))
    log_ratio = jnp.where(counted[None, :], logp_s - logp_t, 0.0)
    return g[:, None] * p_s * (log_ratio - kl[:, None])


_distill_kl.defvjp(_distill_kl_fwd, _distill_kl_bwd)


# ----------------------------------------------------------------------------- all statistics


def jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, *, temperature_actor=1.0, exact=False,
                  direction="forward", vocab_size=None, block_v=2048, pass_fn=None, normalizers=True, inf_topk=None):
    """Policy and actor token stats, the OBRS normalizers and the distillation KL; each model's dw is
    written once. One forward pass over the vocabulary collects both top-k sets (by raw logits) with
    the lse and the KL, and Z_approx follows from them (section 4.4.1); the exact Z (``exact``) and
    a Pallas first pass (``pass_fn``, which collects no top-k) take a second forward pass. One
    backward pass. Without ``normalizers`` no top-k is collected and Z is not computed.

    ``inf_topk = (ids, logp)`` ``[N, K >= k]``: p_inf's top-k as the rollout stored it (Algorithm
    1, phase 1; sorted descending, so the first k are its top-k): the pass then merges only the
    policy's running top-k and gathers the policy's logits at p_inf's ids, and V_k takes p_inf's
    log-probs there from ``logp`` (one pass, not with ``exact`` or ``pass_fn``)."""
    vocab_size = w_pol.shape[1] if vocab_size is None else vocab_size
    blocks = _Blocks(w_pol.shape[1], block_v, vocab_size, min_block=k)
    scale_act = 1.0 / float(temperature_actor)
    one_pass = normalizers and not exact and pass_fn is None
    if inf_topk is not None and not one_pass:
        raise ValueError("inf_topk replaces the actor's top-k merge of the one pass: it needs normalizers=True, "
                         "exact=False and the chunked first pass (no pass_fn).")
    sg = lax.stop_gradient
    inf_ids, inf_logp = (None, None) if inf_topk is None else (inf_topk[0][:, :k], sg(inf_topk[1][:, :k]))
    logp_new, lse_new, logp_act, lse_act, kl, sets = _jackpot_core(
        h_pol, w_pol, h_act, w_act, targets, inf_ids, scale_act, direction == "forward", vocab_size, blocks.size,
        pass_fn or two_model_pass, k if one_pass else 0)
    if not normalizers:
        return JackpotStats(logp_new, lse_new, None, None, logp_act, lse_act, None, None, None, None, kl)
    if one_pass:
        z_exact, (act_set, new_set) = None, sg(sets)
        if inf_topk is not None:  # the core gave log p_new at p_inf's ids
            act_set = (inf_logp, act_set, inf_ids)
    else:
        z_exact, act_set, new_set = _obrs_normalizer(sg(h_act), sg(w_act), sg(lse_act), sg(h_pol), sg(w_pol),
                                                     sg(lse_new), _log_lam32(lam), k, exact, scale_act, blocks)
    vk_logp_act, vk_logp_new = topk_union(act_set, new_set)
    return JackpotStats(logp_new, lse_new, new_set[0], new_set[2], logp_act, lse_act, act_set[0], act_set[2],
                        normalizer(vk_logp_act, vk_logp_new, lam), z_exact, kl, vk_logp_act, vk_logp_new)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _jackpot_core(h_pol, w_pol, h_act, w_act, targets, inf_ids, scale_act, forward, vocab_size, block_v, pass_fn,
                  k):
    return _jackpot_core_fwd(h_pol, w_pol, h_act, w_act, targets, inf_ids, scale_act, forward, vocab_size,
                             block_v, pass_fn, k)[0]


def _jackpot_core_fwd(h_pol, w_pol, h_act, w_act, targets, inf_ids, scale_act, forward, vocab_size, block_v,
                      pass_fn, k):
    """The first pass: per token logp_new, lse_new, logp_actor, lse_actor, the distillation KL and,
    with ``k`` (the chunked pass only), the actor's and the policy's top-k sets in log-probs (see
    :func:`topk_union`), else None; given p_inf's top-k ids ``inf_ids`` ``[N, k]``, the actor's set
    is only log p_new at those ids ``[N, k]``."""
    top_k = {"k": k, "given_ids": (None, inf_ids) if forward else (inf_ids, None)} if k else {}
    if forward:  # KL(p_new || p_actor)
        lse_new, lse_act, kl, t_new, t_act, *sets = pass_fn(h_pol, w_pol, 1.0, h_act, w_act, scale_act,
                                                            vocab_size, block_v, targets, **top_k)
        sets = sets[::-1]
    else:  # KL(p_actor || p_new)
        lse_act, lse_new, kl, t_act, t_new, *sets = pass_fn(h_act, w_act, scale_act, h_pol, w_pol, 1.0,
                                                            vocab_size, block_v, targets, **top_k)
    if sets:  # raw logits to log-probs: (actor's set, policy's set)
        act_set, (new_own, act_other, new_ids) = sets
        if inf_ids is None:
            act_own, new_other, act_ids = act_set
            act_set = (act_own - lse_act[:, None], new_other - lse_new[:, None], act_ids)
        else:
            act_set = act_set - lse_new[:, None]
        sets = (act_set, (new_own - lse_new[:, None], act_other - lse_act[:, None], new_ids))
    out = (t_new - lse_new, lse_new, t_act - lse_act, lse_act, kl, sets or None)
    return out, (h_pol, w_pol, h_act, w_act, targets, lse_new, lse_act, kl)


def _jackpot_core_bwd(scale_act, forward, vocab_size, block_v, pass_fn, k, residuals, cotangents):
    """The top-k sets get no cotangent (stop-gradient, like Z)."""
    h_pol, w_pol, h_act, w_act, targets, lse_new, lse_act, kl = residuals
    g_logp_new, g_lse_new, g_logp_act, g_lse_act, g_kl, _ = cotangents
    blocks = _Blocks(w_pol.shape[1], block_v, vocab_size)

    def dlogits_fn(i, start, cols, counted):
        logp_new = _logits(h_pol, w_pol, start, blocks, 1.0, counted) - lse_new[:, None]
        logp_act = _logits(h_act, w_act, start, blocks, scale_act, counted) - lse_act[:, None]
        d_pol = _dlogits_stats(logp_new, cols, targets, counted, g_logp_new, g_lse_new)
        d_act = (_dlogits_stats(logp_act, cols, targets, counted, g_logp_act, g_lse_act)
                 + _dlogits_kl(lax.stop_gradient(logp_new), logp_act, kl, g_kl, forward, counted))
        return d_pol, d_act * scale_act

    (dh_pol, dw_pol), (dh_act, dw_act) = _recompute_grads(((h_pol, w_pol), (h_act, w_act)), blocks, dlogits_fn)
    return dh_pol, dw_pol, dh_act, dw_act, None, None


_jackpot_core.defvjp(_jackpot_core_fwd, _jackpot_core_bwd)
