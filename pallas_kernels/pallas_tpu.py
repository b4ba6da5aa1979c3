"""Pallas TPU (Mosaic) kernel for the forward pass of the token statistics.

Grid ``(token blocks, vocabulary blocks)``: token blocks are independent ("parallel"); the
vocabulary axis is a sequential reduction ("arbitrary") whose per-token state lives in VMEM scratch
(running max and sum of the online logsumexp, the target's logit, a running top-k). Each step
multiplies an ``[bn, D]`` block of ``h`` by a ``[D, bv]`` block of ``w`` on the MXU, so only the
``[bn, bv]`` logits block exists at any time. Partial blocks (N or V not a multiple of the block)
are masked: columns ``>= vocab_size`` are ``-inf``; rows past N are computed and dropped.

The top-k is kept sorted in the first ``k`` of 128 lanes and merged with each block by
:func:`pallas_kernels._online.merge_topk` (``lax.top_k`` has no Mosaic lowering); ids are carried as
float32, which Mosaic reduces natively.

The backward pass is the chunked XLA one (:mod:`pallas_kernels.chunked`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import chunked
from pallas_kernels._online import NEG_INF, merge_topk, online_lse, union_mass

LANES = 128


def _round_up(x, m):
    return (x + m - 1) // m * m


def _tiling(n, v, vocab_size, k, block_n, block_v):
    """(real vocab size, token block, vocabulary block, grid) for ``N`` tokens and ``V`` columns."""
    if k > LANES:
        raise ValueError(f"k={k} is not allowed for the Pallas TPU kernel: k must be <= {LANES}.")
    bn = min(block_n, _round_up(n, 8))
    bv = min(_round_up(block_v, LANES), _round_up(v, LANES))
    return (v if vocab_size is None else vocab_size), bn, bv, (pl.cdiv(n, bn), pl.cdiv(v, bv))


def _row(i, j):
    return i, 0


def _kernel(targets_ref, h_ref, w_ref, logp_ref, lse_ref, topv_ref, topi_ref,
            m_sc, s_sc, tgt_sc, topv_sc, topi_sc, *, block_v, vocab_size, k, scale):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        tgt_sc[...] = jnp.full(tgt_sc.shape, NEG_INF, jnp.float32)
        topv_sc[...] = jnp.full(topv_sc.shape, NEG_INF, jnp.float32)
        topi_sc[...] = jnp.zeros(topi_sc.shape, jnp.float32)

    logits = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32) * scale
    cols = (j * block_v + lax.broadcasted_iota(jnp.int32, logits.shape, 1)).astype(jnp.float32)
    logits = jnp.where(cols < vocab_size, logits, NEG_INF)

    m_sc[...], s_sc[...], _, _ = online_lse(m_sc[...], s_sc[...], logits, keepdims=True)

    # the target's logit lives in exactly one block
    hit = cols == targets_ref[...].astype(jnp.float32)
    tgt_sc[...] = jnp.maximum(tgt_sc[...], jnp.max(jnp.where(hit, logits, NEG_INF), axis=1, keepdims=True))

    # merge the block into the running top-k
    run_v, run_i = topv_sc[...], topi_sc[...]
    lane = lax.broadcasted_iota(jnp.int32, run_v.shape, 1).astype(jnp.float32)
    new_v, new_i = merge_topk(logits, cols, run_v, run_i, lane, k)
    topv_sc[...] = new_v
    topi_sc[...] = new_i

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse = m_sc[...] + jnp.log(s_sc[...])
        lse_ref[...] = lse
        logp_ref[...] = tgt_sc[...] - lse
        topv_ref[...] = topv_sc[...] - lse
        topi_ref[...] = topi_sc[...].astype(jnp.int32)


def token_stats_forward(h, w, targets, k, *, temperature=1.0, vocab_size=None, block_n=128,
                        block_v=512, interpret=False):
    """``(logp [N], lse [N], topk_logp [N, k], topk_ids [N, k])`` as :func:`chunked.token_stats`."""
    n, d = h.shape
    vocab_size, bn, bv, grid = _tiling(n, w.shape[1], vocab_size, k, block_n, block_v)
    column = pl.BlockSpec((bn, 1), _row)
    kernel = functools.partial(_kernel, block_v=bv, vocab_size=vocab_size, k=k, scale=1.0 / temperature)
    logp, lse, top_v, top_i = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[column, pl.BlockSpec((bn, d), _row), pl.BlockSpec((d, bv), lambda i, j: (0, j))],
        out_specs=[column, column, pl.BlockSpec((bn, LANES), _row), pl.BlockSpec((bn, LANES), _row)],
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32), jax.ShapeDtypeStruct((n, 1), jnp.float32),
                   jax.ShapeDtypeStruct((n, LANES), jnp.float32), jax.ShapeDtypeStruct((n, LANES), jnp.int32)],
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.float32),
                        pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, LANES), jnp.float32),
                        pltpu.VMEM((bn, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(targets.reshape(n, 1).astype(jnp.int32), h, w)
    return logp[:, 0], lse[:, 0], top_v[:, :k], top_i[:, :k]


def _normalizer_kernel(log_lam_ref, h_inf_ref, w_inf_ref, lse_inf_ref, h_tgt_ref, w_tgt_ref, lse_tgt_ref, z_topk_ref,
                       z_exact_ref, m_sc, s_sc, inf_v, inf_i, inf_m, tgt_v, tgt_i, tgt_m, *, block_v, vocab_size, k,
                       scale_inf):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        for ref in (inf_v, inf_m, tgt_v, tgt_m):
            ref[...] = jnp.full(ref.shape, NEG_INF, jnp.float32)
        inf_i[...] = jnp.zeros(inf_i.shape, jnp.float32)
        tgt_i[...] = jnp.zeros(tgt_i.shape, jnp.float32)

    dot = lambda h_ref, w_ref: jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    logp_inf = dot(h_inf_ref, w_inf_ref) * scale_inf - lse_inf_ref[...]
    logp_tgt = dot(h_tgt_ref, w_tgt_ref) - lse_tgt_ref[...]
    cols = (j * block_v + lax.broadcasted_iota(jnp.int32, logp_inf.shape, 1)).astype(jnp.float32)
    counted = cols < vocab_size
    logp_inf = jnp.where(counted, logp_inf, NEG_INF)
    logp_tgt = jnp.where(counted, logp_tgt, NEG_INF)
    log_mass = jnp.minimum(logp_inf, logp_tgt - log_lam_ref[...])  # eq. 4 summand

    m_sc[...], s_sc[...], _, _ = online_lse(m_sc[...], s_sc[...], log_mass, keepdims=True)

    lane = lax.broadcasted_iota(jnp.int32, inf_v.shape, 1).astype(jnp.float32)
    for v_ref, i_ref, m_ref, logp in ((inf_v, inf_i, inf_m, logp_inf), (tgt_v, tgt_i, tgt_m, logp_tgt)):
        v_ref[...], i_ref[...], m_ref[...] = merge_topk(logp, cols, v_ref[...], i_ref[...], lane, k,
                                                        log_mass, m_ref[...])

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        z_exact_ref[...] = s_sc[...] * jnp.exp(m_sc[...])
        z_topk_ref[...] = union_mass(inf_i[...], inf_m[...], tgt_i[...], tgt_m[...], lane, k)


def obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, *, temperature_inf=1.0,
                    vocab_size=None, block_n=128, block_v=512, interpret=False):
    """``(z_topk [N], z_exact [N])`` as :func:`chunked.obrs_normalizer` (both always computed: the
    exact sum costs one reduction per block on top of the two matmuls). Stop-gradient."""
    n = h_inf.shape[0]
    vocab_size, bn, bv, grid = _tiling(n, w_inf.shape[1], vocab_size, k, block_n, block_v)
    column = pl.BlockSpec((bn, 1), _row)
    column_block = lambda d: pl.BlockSpec((d, bv), lambda i, j: (0, j))
    kernel = functools.partial(_normalizer_kernel, block_v=bv, vocab_size=vocab_size, k=k,
                               scale_inf=1.0 / temperature_inf)
    state = [pltpu.VMEM((bn, LANES), jnp.float32)] * 6
    args = [lax.stop_gradient(x) for x in (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt)]
    z_topk, z_exact = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((1, 1), lambda i, j: (0, 0)),
                  pl.BlockSpec((bn, h_inf.shape[1]), _row), column_block(h_inf.shape[1]), column,
                  pl.BlockSpec((bn, h_tgt.shape[1]), _row), column_block(h_tgt.shape[1]), column],
        out_specs=[column, column],
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.float32)] + state,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(jnp.log(jnp.asarray(lam, jnp.float32)).reshape(1, 1), args[0], args[1], args[2].reshape(n, 1), args[3],
      args[4], args[5].reshape(n, 1))
    return z_topk[:, 0], z_exact[:, 0]


def _two_model_kernel(targets_ref, h_a_ref, w_a_ref, h_b_ref, w_b_ref, lse_a_ref, lse_b_ref, kl_ref, t_a_ref,
                      t_b_ref, m_a, s_a, u, m_b, s_b, t_a, t_b, *, block_v, vocab_size, scale_a, scale_b):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref in (m_a, m_b, t_a, t_b):
            ref[...] = jnp.full(ref.shape, NEG_INF, jnp.float32)
        for ref in (s_a, u, s_b):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    dot = lambda h_ref, w_ref: jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    a, b = dot(h_a_ref, w_a_ref) * scale_a, dot(h_b_ref, w_b_ref) * scale_b
    cols = (j * block_v + lax.broadcasted_iota(jnp.int32, a.shape, 1)).astype(jnp.float32)
    counted = cols < vocab_size
    a, b = jnp.where(counted, a, NEG_INF), jnp.where(counted, b, NEG_INF)

    # online lse of a with E_{p_a}[a - b] rescaled alongside, and online lse of b
    m_a[...], s_a[...], weights, rescale = online_lse(m_a[...], s_a[...], a, keepdims=True)
    u[...] = u[...] * rescale + jnp.sum(weights * jnp.where(counted, a - b, 0.0), axis=1, keepdims=True)
    m_b[...], s_b[...], _, _ = online_lse(m_b[...], s_b[...], b, keepdims=True)

    hit = cols == targets_ref[...].astype(jnp.float32)
    t_a[...] = jnp.maximum(t_a[...], jnp.max(jnp.where(hit, a, NEG_INF), axis=1, keepdims=True))
    t_b[...] = jnp.maximum(t_b[...], jnp.max(jnp.where(hit, b, NEG_INF), axis=1, keepdims=True))

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_a = m_a[...] + jnp.log(s_a[...])
        lse_b = m_b[...] + jnp.log(s_b[...])
        lse_a_ref[...], lse_b_ref[...] = lse_a, lse_b
        kl_ref[...] = u[...] / s_a[...] - lse_a + lse_b
        t_a_ref[...], t_b_ref[...] = t_a[...], t_b[...]


def two_model_pass(h_a, w_a, scale_a, h_b, w_b, scale_b, vocab_size, block_v=None, targets=None, *,
                   interpret=False, block_n=128, block_v_kernel=512):
    """:func:`chunked.two_model_pass` as a Pallas TPU kernel (``block_v`` is the chunked one's and
    unused here). Without ``targets`` the target logits are -inf."""
    n = h_a.shape[0]
    vocab_size, bn, bv, grid = _tiling(n, w_a.shape[1], vocab_size, 1, block_n, block_v_kernel)
    column = pl.BlockSpec((bn, 1), _row)
    column_block = lambda d: pl.BlockSpec((d, bv), lambda i, j: (0, j))
    kernel = functools.partial(_two_model_kernel, block_v=bv, vocab_size=vocab_size, scale_a=scale_a,
                               scale_b=scale_b)
    target_ids = jnp.full((n,), -1, jnp.int32) if targets is None else targets.astype(jnp.int32)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[column, pl.BlockSpec((bn, h_a.shape[1]), _row), column_block(h_a.shape[1]),
                  pl.BlockSpec((bn, h_b.shape[1]), _row), column_block(h_b.shape[1])],
        out_specs=[column] * 5,
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 5,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 7,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(target_ids.reshape(n, 1), h_a, w_a, h_b, w_b)
    return tuple(x[:, 0] for x in outs)


# The forward kernel with the chunked backward; top-k outputs are stop-gradient.
token_stats = chunked.with_chunked_backward(token_stats_forward)
