"""Pallas GPU kernel (Triton backend) for the forward pass of the token statistics.

Why Triton rather than Mosaic GPU: in JAX 0.10 ``pallas_call`` lowers to Triton by default on
NVIDIA GPUs, and one kernel serves Ampere and Hopper; the op is a tiled matmul followed by row
reductions, which Triton schedules well. Mosaic GPU (Hopper and newer, hand-managed WGMMA and TMA
pipelines) is the JAX team's recommended path and the Triton backend is maintained on a
best-effort basis (JAX 0.11 warns that it is deprecated). Measured on an H100 (2026-11-25,
BENCHMARKS.md): these kernels are correct (``tests/test_gpu.py``) but the step statistics with
them take 1.6x the chunked XLA path's time, which is why ``impl="auto"`` does not pick them; a
Mosaic GPU kernel is the next thing to try behind the same dispatch.

One program per block of ``bn`` tokens; it walks the vocabulary in blocks of ``bv`` columns, each
block's logits accumulated over ``bd``-wide slices of D on the tensor cores, and folds them into
the running logsumexp, the target's logit and a running top-k (the TPU kernel's merge,
:func:`pallas_kernels._online.merge_topk`). Loads past N, V or D are masked. The backward pass is
the chunked XLA one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import chunked
from pallas_kernels._online import NEG_INF, merge_topk, online_lse, union_mass


def _next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def _block_logits(h_ref, w_ref, i, j, n, d, v, bn, bv, bd):
    """Logits of token block ``i`` and vocabulary block ``j``, ``[bn, bv]`` float32, accumulated
    over ``bd``-wide slices of D; loads past N, D or V read zeros."""
    rows_ok = (i * bn + jnp.arange(bn)) < n
    cols_ok = (j * bv + jnp.arange(bv)) < v

    def d_slice(c, acc):
        d_ok = (c * bd + jnp.arange(bd)) < d
        hb = pltr.load(h_ref.at[pl.ds(i * bn, bn), pl.ds(c * bd, bd)], mask=rows_ok[:, None] & d_ok[None, :],
                       other=0.0)
        wb = pltr.load(w_ref.at[pl.ds(c * bd, bd), pl.ds(j * bv, bv)], mask=d_ok[:, None] & cols_ok[None, :],
                       other=0.0)
        return acc + jnp.dot(hb, wb, preferred_element_type=jnp.float32)

    return lax.fori_loop(0, pl.cdiv(d, bd), d_slice, jnp.zeros((bn, bv), jnp.float32))


def _kernel(targets_ref, h_ref, w_ref, logp_ref, lse_ref, topv_ref, topi_ref, *, n, d, v, vocab_size,
            k, kp, bn, bv, bd, scale):
    i = pl.program_id(0)
    rows = i * bn + jnp.arange(bn)
    row_ok = rows < n
    targets = pltr.load(targets_ref.at[pl.ds(i * bn, bn)], mask=row_ok, other=0).astype(jnp.float32)
    lane = lax.broadcasted_iota(jnp.int32, (bn, kp), 1).astype(jnp.float32)

    def vocab_block(j, carry):
        m, s, tgt, run_v, run_i = carry
        logits = _block_logits(h_ref, w_ref, i, j, n, d, v, bn, bv, bd) * scale
        cols = jnp.broadcast_to((j * bv + jnp.arange(bv)).astype(jnp.float32)[None, :], (bn, bv))
        logits = jnp.where(cols < vocab_size, logits, NEG_INF)

        m_new, s, _, _ = online_lse(m, s, logits, keepdims=False)
        hit = cols == targets[:, None]
        tgt = jnp.maximum(tgt, jnp.max(jnp.where(hit, logits, NEG_INF), axis=1))

        new_v, new_i = merge_topk(logits, cols, run_v, run_i, lane, k)
        return m_new, s, tgt, new_v, new_i

    init = (jnp.full((bn,), NEG_INF, jnp.float32), jnp.zeros((bn,), jnp.float32),
            jnp.full((bn,), NEG_INF, jnp.float32), jnp.full((bn, kp), NEG_INF, jnp.float32),
            jnp.zeros((bn, kp), jnp.float32))
    m, s, tgt, top_v, top_i = lax.fori_loop(0, pl.cdiv(v, bv), vocab_block, init)
    lse = m + jnp.log(s)
    pltr.store(lse_ref.at[pl.ds(i * bn, bn)], lse, mask=row_ok)
    pltr.store(logp_ref.at[pl.ds(i * bn, bn)], tgt - lse, mask=row_ok)
    pltr.store(topv_ref.at[pl.ds(i * bn, bn), :], top_v - lse[:, None], mask=row_ok[:, None])
    pltr.store(topi_ref.at[pl.ds(i * bn, bn), :], top_i.astype(jnp.int32), mask=row_ok[:, None])


def token_stats_forward(h, w, targets, k, *, temperature=1.0, vocab_size=None, block_n=32, block_v=128,
                        block_d=64, num_warps=4, num_stages=2, interpret=False):
    """``(logp [N], lse [N], topk_logp [N, k], topk_ids [N, k])`` as :func:`chunked.token_stats`."""
    n, d = h.shape
    v = w.shape[1]
    vocab_size = v if vocab_size is None else vocab_size
    kp = _next_pow2(max(k, 16))
    bn, bv, bd = (_next_pow2(b) for b in (block_n, block_v, block_d))
    kernel = functools.partial(_kernel, n=n, d=d, v=v, vocab_size=vocab_size, k=k, kp=kp, bn=bn, bv=bv,
                               bd=bd, scale=1.0 / temperature)
    logp, lse, top_v, top_i = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn),),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
                   jax.ShapeDtypeStruct((n, kp), jnp.float32), jax.ShapeDtypeStruct((n, kp), jnp.int32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(targets.astype(jnp.int32), h, w)
    return logp, lse, top_v[:, :k], top_i[:, :k]


def _normalizer_kernel(log_lam_ref, h_inf_ref, w_inf_ref, lse_inf_ref, h_tgt_ref, w_tgt_ref, lse_tgt_ref, z_topk_ref,
                       z_exact_ref, *, n, d_inf, d_tgt, v, vocab_size, k, kp, bn, bv, bd, scale_inf):
    i = pl.program_id(0)
    rows = i * bn + jnp.arange(bn)
    row_ok = rows < n
    log_lam = pltr.load(log_lam_ref.at[pl.ds(0, 1)])
    load_rows = lambda ref: pltr.load(ref.at[pl.ds(i * bn, bn)], mask=row_ok, other=0.0)
    lse_inf, lse_tgt = load_rows(lse_inf_ref), load_rows(lse_tgt_ref)
    lane = lax.broadcasted_iota(jnp.int32, (bn, kp), 1).astype(jnp.float32)

    def vocab_block(j, carry):
        m, s, inf_v, inf_i, inf_m, tgt_v, tgt_i, tgt_m = carry
        logits_inf = _block_logits(h_inf_ref, w_inf_ref, i, j, n, d_inf, v, bn, bv, bd) * scale_inf
        logits_tgt = _block_logits(h_tgt_ref, w_tgt_ref, i, j, n, d_tgt, v, bn, bv, bd)
        cols = jnp.broadcast_to((j * bv + jnp.arange(bv)).astype(jnp.float32)[None, :], (bn, bv))
        counted = cols < vocab_size
        logp_inf = jnp.where(counted, logits_inf - lse_inf[:, None], NEG_INF)
        logp_tgt = jnp.where(counted, logits_tgt - lse_tgt[:, None], NEG_INF)
        log_mass = jnp.minimum(logp_inf, logp_tgt - log_lam[:, None])  # eq. 4 summand
        m_new, s, _, _ = online_lse(m, s, log_mass, keepdims=True)
        inf_v, inf_i, inf_m = merge_topk(logp_inf, cols, inf_v, inf_i, lane, k, log_mass, inf_m)
        tgt_v, tgt_i, tgt_m = merge_topk(logp_tgt, cols, tgt_v, tgt_i, lane, k, log_mass, tgt_m)
        return m_new, s, inf_v, inf_i, inf_m, tgt_v, tgt_i, tgt_m

    neg = jnp.full((bn, kp), NEG_INF, jnp.float32)
    zeros = jnp.zeros((bn, kp), jnp.float32)
    init = (jnp.full((bn, 1), NEG_INF, jnp.float32), jnp.zeros((bn, 1), jnp.float32), neg, zeros, neg, neg, zeros, neg)
    m, s, _, inf_i, inf_m, _, tgt_i, tgt_m = lax.fori_loop(0, pl.cdiv(v, bv), vocab_block, init)
    pltr.store(z_exact_ref.at[pl.ds(i * bn, bn)], (s * jnp.exp(m))[:, 0], mask=row_ok)
    pltr.store(z_topk_ref.at[pl.ds(i * bn, bn)], union_mass(inf_i, inf_m, tgt_i, tgt_m, lane, k)[:, 0], mask=row_ok)


def obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, *, temperature_inf=1.0,
                    vocab_size=None, block_n=32, block_v=128, block_d=64, num_warps=4, num_stages=2,
                    interpret=False):
    """``(z_topk [N], z_exact [N])`` as :func:`chunked.obrs_normalizer`. Stop-gradient."""
    n = h_inf.shape[0]
    v = w_inf.shape[1]
    kp = _next_pow2(max(k, 16))
    bn, bv, bd = (_next_pow2(b) for b in (block_n, block_v, block_d))
    kernel = functools.partial(_normalizer_kernel, n=n, d_inf=h_inf.shape[1], d_tgt=h_tgt.shape[1], v=v,
                               vocab_size=v if vocab_size is None else vocab_size, k=k, kp=kp, bn=bn, bv=bv,
                               bd=bd, scale_inf=1.0 / temperature_inf)
    args = [lax.stop_gradient(x) for x in (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt)]
    return tuple(pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn),),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 2,
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(jnp.log(jnp.asarray(lam, jnp.float32)).reshape(1), *args))


def _two_model_kernel(targets_ref, h_a_ref, w_a_ref, h_b_ref, w_b_ref, lse_a_ref, lse_b_ref, kl_ref, t_a_ref,
                      t_b_ref, *, n, d_a, d_b, v, vocab_size, bn, bv, bd, scale_a, scale_b):
    i = pl.program_id(0)
    row_ok = (i * bn + jnp.arange(bn)) < n
    targets = pltr.load(targets_ref.at[pl.ds(i * bn, bn)], mask=row_ok, other=-1).astype(jnp.float32)

    def vocab_block(j, carry):
        m_a, s_a, u, m_b, s_b, t_a, t_b = carry
        cols = jnp.broadcast_to((j * bv + jnp.arange(bv)).astype(jnp.float32)[None, :], (bn, bv))
        counted = cols < vocab_size
        a = jnp.where(counted, _block_logits(h_a_ref, w_a_ref, i, j, n, d_a, v, bn, bv, bd) * scale_a, NEG_INF)
        b = jnp.where(counted, _block_logits(h_b_ref, w_b_ref, i, j, n, d_b, v, bn, bv, bd) * scale_b, NEG_INF)
        ma_new, s_a, weights, rescale = online_lse(m_a, s_a, a, keepdims=False)
        u = u * rescale + jnp.sum(weights * jnp.where(counted, a - b, 0.0), axis=1)
        mb_new, s_b, _, _ = online_lse(m_b, s_b, b, keepdims=False)
        hit = cols == targets[:, None]
        t_a = jnp.maximum(t_a, jnp.max(jnp.where(hit, a, NEG_INF), axis=1))
        t_b = jnp.maximum(t_b, jnp.max(jnp.where(hit, b, NEG_INF), axis=1))
        return ma_new, s_a, u, mb_new, s_b, t_a, t_b

    neg, zero = jnp.full((bn,), NEG_INF, jnp.float32), jnp.zeros((bn,), jnp.float32)
    m_a, s_a, u, m_b, s_b, t_a, t_b = lax.fori_loop(0, pl.cdiv(v, bv), vocab_block, (neg, zero, zero, neg, zero, neg, neg))
    lse_a, lse_b = m_a + jnp.log(s_a), m_b + jnp.log(s_b)
    for ref, value in ((lse_a_ref, lse_a), (lse_b_ref, lse_b), (kl_ref, u / s_a - lse_a + lse_b), (t_a_ref, t_a),
                       (t_b_ref, t_b)):
        pltr.store(ref.at[pl.ds(i * bn, bn)], value, mask=row_ok)


def two_model_pass(h_a, w_a, scale_a, h_b, w_b, scale_b, vocab_size, block_v=None, targets=None, *,
                   interpret=False, block_n=32, block_v_kernel=128, block_d=64, num_warps=4, num_stages=2):
    """:func:`chunked.two_model_pass` as a Triton kernel (``block_v`` is the chunked one's and unused
    here). Without ``targets`` the target logits are -inf."""
    n = h_a.shape[0]
    v = w_a.shape[1]
    bn, bv, bd = (_next_pow2(b) for b in (block_n, block_v_kernel, block_d))
    kernel = functools.partial(_two_model_kernel, n=n, d_a=h_a.shape[1], d_b=h_b.shape[1], v=v,
                               vocab_size=vocab_size, bn=bn, bv=bv, bd=bd, scale_a=scale_a, scale_b=scale_b)
    target_ids = jnp.full((n,), -1, jnp.int32) if targets is None else targets.astype(jnp.int32)
    return tuple(pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn),),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 5,
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(target_ids, h_a, w_a, h_b, w_b))


# The forward kernel with the chunked backward; top-k outputs are stop-gradient.
token_stats = chunked.with_chunked_backward(token_stats_forward)
