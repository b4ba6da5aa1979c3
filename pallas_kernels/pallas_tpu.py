"""Pallas TPU (Mosaic) kernel for the forward pass of the token statistics.

Grid ``(token blocks, vocabulary blocks)``: token blocks are independent ("parallel"); the
vocabulary axis is a sequential reduction ("arbitrary") whose per-token state lives in VMEM scratch
(running max and sum of the online logsumexp, the target's logit, a running top-k). Each step
multiplies an ``[bn, D]`` block of ``h`` by a ``[D, bv]`` block of ``w`` on the MXU, so only the
``[bn, bv]`` logits block exists at any time. Partial blocks (N or V not a multiple of the block)
are masked: columns ``>= vocab_size`` are ``-inf``; rows past N are computed and dropped.

The top-k is kept sorted in the first ``k`` of 128 lanes and merged with each block by
:func:`pallas_kernels._topk.merge_topk` (``lax.top_k`` has no Mosaic lowering); ids are carried as
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
from pallas_kernels._topk import NEG_INF, merge_topk

LANES = 128


def _round_up(x, m):
    return (x + m - 1) // m * m


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

    # online logsumexp
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    s_sc[...] = s_sc[...] * jnp.exp(m_old - m_safe) + jnp.sum(jnp.exp(logits - m_safe), axis=1, keepdims=True)
    m_sc[...] = m_new

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
    v = w.shape[1]
    vocab_size = v if vocab_size is None else vocab_size
    if k > LANES:
        raise ValueError(f"k={k} is not allowed for the Pallas TPU kernel: k must be <= {LANES}.")
    bn = min(block_n, _round_up(n, 8))
    bv = min(_round_up(block_v, LANES), _round_up(v, LANES))
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
    row = lambda i, j: (i, 0)
    column = pl.BlockSpec((bn, 1), row)
    kernel = functools.partial(_kernel, block_v=bv, vocab_size=vocab_size, k=k, scale=1.0 / temperature)
    logp, lse, top_v, top_i = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[column, pl.BlockSpec((bn, d), row), pl.BlockSpec((d, bv), lambda i, j: (0, j))],
        out_specs=[column, column, pl.BlockSpec((bn, LANES), row), pl.BlockSpec((bn, LANES), row)],
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32), jax.ShapeDtypeStruct((n, 1), jnp.float32),
                   jax.ShapeDtypeStruct((n, LANES), jnp.float32), jax.ShapeDtypeStruct((n, LANES), jnp.int32)],
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, 1), jnp.float32),
                        pltpu.VMEM((bn, 1), jnp.float32), pltpu.VMEM((bn, LANES), jnp.float32),
                        pltpu.VMEM((bn, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(targets.reshape(n, 1).astype(jnp.int32), h, w)
    return logp[:, 0], lse[:, 0], top_v[:, :k], top_i[:, :k]


# The forward kernel with the chunked backward; top-k outputs are stop-gradient.
token_stats = chunked.with_chunked_backward(token_stats_forward)
