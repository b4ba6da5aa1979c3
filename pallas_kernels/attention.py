"""Grouped-query attention for training and prefill: ``q [B, T, H, d]`` over ``k, v [B, K, S, d]``,
softmax(q k^T / sqrt(d)) v with float32 softmax statistics, under an O(T) :class:`Mask` (causal by
position, packed segments, segment 0 padding; a query that sees no key gets an unspecified finite row).

``impl``: ``"reference"`` (dense ``[B, H, T, S]`` scores); ``"blockwise"`` (XLA, every backend: an online
softmax over tiles, tiles no query sees skipped, a custom VJP that recomputes them: O(T) memory);
``"pallas"`` (self-attention only, ``Mask.aligned``: JAX's Pallas flash attention, Mosaic TPU
:func:`tpu_flash` or Triton :func:`gpu_flash`; not yet run on hardware); ``"auto"``: dense while T and S
are at most :data:`DENSE_MAX_LENGTH`, else "pallas" on TPU / GPU where it applies, else blockwise
(BENCHMARKS.md: on XLA:CPU blockwise is as fast from there on and 2-4x faster beyond 1,024).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

from pallas_kernels.logspace import check_choice

IMPLS = ("auto", "reference", "blockwise", "pallas")
F32 = jnp.float32
BLOCK = 512  # query and key positions per tile of the blockwise path
DENSE_MAX_LENGTH = 256  # "auto" keeps the dense scores while T and S are at most this (it compiles faster)
FLASH_BLOCK = 128  # the Pallas kernels' tiles (JAX's defaults); T is padded to a multiple


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["aligned"],
                   data_fields=["q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids"])
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees, in O(T): positions and segment ids of the queries ``[B, T]`` and
    of the keys ``[B, S]`` (integers; segment 0 is padding). ``aligned`` (static): the queries are
    the keys (T == S, positions their indices), what the Pallas flash kernels take."""
    q_positions: jax.Array
    kv_positions: jax.Array
    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    aligned: bool = False

    def arrays(self) -> tuple:
        return self.q_positions, self.kv_positions, self.q_segment_ids, self.kv_segment_ids

    @classmethod
    def causal(cls, segment_ids) -> "Mask":
        """Self-attention of ``[B, T]`` packed segments: each token sees its segment up to itself."""
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
        return cls(index, index, segment_ids, segment_ids, aligned=True)

    @classmethod
    def over_cache(cls, write_index, ends, max_len: int) -> "Mask":
        """Queries written at ``write_index [B, T]`` of a cache whose first ``ends [B]`` positions
        are filled (of ``max_len``): each sees the filled keys up to its own position."""
        keys = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (write_index.shape[0], max_len))
        return cls(write_index.astype(jnp.int32), keys, jnp.ones(write_index.shape, jnp.int32),
                   (keys < ends[:, None]).astype(jnp.int32))

    def dense(self):
        """``[B, T, S]`` booleans."""
        return ((self.kv_positions[:, None, :] <= self.q_positions[:, :, None])
                & (self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :])
                & (self.kv_segment_ids[:, None, :] != 0))


def attention(q, k, v, mask: Mask, *, impl="auto", block_q=None, block_k=None):
    """``[B, T, H, d]`` in q's dtype; see the module docstring. Tiles default to :data:`BLOCK`."""
    check_choice("impl", impl, IMPLS)
    _check_shapes(q, k, v, mask)
    backend = jax.default_backend()
    if impl == "auto":
        if max(q.shape[1], k.shape[2]) <= DENSE_MAX_LENGTH:
            impl = "reference"
        else:
            impl = "pallas" if backend in ("gpu", "tpu") and flash_unsupported(q, mask) is None else "blockwise"
    if impl == "reference":
        return reference(q, k, v, mask.dense())
    if impl == "blockwise":
        return blockwise(q, k, v, mask, block_q=block_q or BLOCK, block_k=block_k or BLOCK)
    reason = flash_unsupported(q, mask)
    if reason is not None:
        raise ValueError(f"impl='pallas' is not allowed here: {reason}; use impl 'blockwise' or 'auto'.")
    if backend == "gpu":
        return gpu_flash(q, k, v, mask)
    if backend != "tpu":
        raise ValueError(f"impl='pallas' is not allowed on {backend}: the flash kernels run on TPU and GPU; use impl "
                         "'blockwise' or 'auto' (tests interpret them under pltpu.force_tpu_interpret_mode).")
    return tpu_flash(q, k, v, mask)


def _check_shapes(q, k, v, mask):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} are not allowed: q must be [B, T, H, d] and "
                         "k, v [B, K, S, d].")
    (b, t, h, d), (kb, kv_heads, s, kd) = q.shape, k.shape
    if kb != b or kd != d or h % kv_heads:
        raise ValueError(f"q {q.shape} and k {k.shape} are not allowed: they must share B and d, and H must be a "
                         "multiple of K.")
    want = ((b, t), (b, s), (b, t), (b, s))
    if tuple(x.shape for x in mask.arrays()) != want:
        raise ValueError(f"mask shapes {tuple(x.shape for x in mask.arrays())} are not allowed: they must be {want} "
                         "(q_positions, kv_positions, q_segment_ids, kv_segment_ids).")


def reference(q, k, v, mask):
    """The dense definition for a ``[B, T, S]`` boolean mask. Each key-value head's query group is
    one ``[G * T, d]`` matrix, so both products are batched matmuls over (B, K) reading k and v in
    place (2.5x faster on XLA:CPU than ``jax.nn.dot_product_attention``'s layout at B=4, T=256,
    H=12, K=4). A query with no visible key gets uniform weights, never NaN."""
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=F32) * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None], scores.reshape(b, kv_heads, g, t, s), jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kv_heads, g * t, s).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def blockwise(q, k, v, mask: Mask, *, block_q=BLOCK, block_k=BLOCK):
    """The tiled path: T and S padded to whole tiles (padding is segment 0), queries grouped per
    key-value head ``[B, K, G, T, d]``, :func:`_flash` over the live tiles."""
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    bq, bk = min(block_q, t), min(block_k, k.shape[2])
    q = _pad_to(q, bq, 1)
    tp = q.shape[1]
    q = q.reshape(b, tp, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    k, v = _pad_to(k, bk, 2), _pad_to(v, bk, 2)
    q_pos, q_seg = (_pad_to(x.astype(jnp.int32), bq, 1) for x in mask.arrays()[::2])
    kv_pos, kv_seg = (_pad_to(x.astype(jnp.int32), bk, 1) for x in mask.arrays()[1::2])
    out = _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


def _pad_to(x, multiple: int, axis: int):
    """``x`` zero-padded at the end of ``axis`` to a multiple of ``multiple`` (segment 0: padding)."""
    extra = -x.shape[axis] % multiple
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def live_tiles(q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    """``[nq, nk]``: tile (i, j) holds a visible key for some row (a causal bound: the block's
    smallest real key position at most its query block's largest real position)."""
    big = jnp.iinfo(jnp.int32).max
    q_top = jnp.max(jnp.where(q_seg != 0, q_pos, -big).reshape(q_pos.shape[0], -1, bq), axis=(0, 2))
    kv_low = jnp.min(jnp.where(kv_seg != 0, kv_pos, big).reshape(kv_pos.shape[0], -1, bk), axis=(0, 2))
    return kv_low[None, :] <= q_top[:, None]


def _schedule(live):
    """For each row of ``live [n, m]``: its live columns first, in order, and how many there are."""
    return jnp.argsort(~live, axis=1, stable=True).astype(jnp.int32), jnp.sum(live, axis=1, dtype=jnp.int32)


def _tile(q_pos, kv_pos, q_seg, kv_seg, i, j, bq, bk):
    """The ``[B, 1, 1, bq, bk]`` mask of tile (i, j)."""
    qp, qs = (_slice(x, i * bq, bq, 1) for x in (q_pos, q_seg))
    kp, ks = (_slice(x, j * bk, bk, 1) for x in (kv_pos, kv_seg))
    visible = (kp[:, None, :] <= qp[:, :, None]) & (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    return visible[:, None, None]


def _scores(q_i, k_j, visible):
    """Scaled scores of a tile, -inf where not visible: ``[B, K, G, bq, bk]`` float32."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=F32) * (1.0 / math.sqrt(q_i.shape[-1]))
    return jnp.where(visible, scores, -jnp.inf)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    return _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)[0]


def _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    """``q [B, K, G, T, d]``: the output and the log-normalizer ``lse [B, K, G, T]`` (+inf where a
    query sees no key), one query block at a time over its live key blocks (an online softmax)."""
    meta = (q_pos, kv_pos, q_seg, kv_seg)
    order, count = _schedule(live_tiles(*meta, bq, bk))
    acc_shape = q.shape[:3] + (bq,)

    def query_block(i, carry):
        out, lse = carry
        q_i = _slice(q, i * bq, bq, 3)

        def key_block(n, state):
            acc, m, l = state
            j = order[i, n]
            scores = _scores(q_i, _slice(k, j * bk, bk, 2), _tile(*meta, i, j, bq, bk))
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(scores - m_safe[..., None])
            rescale = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), _slice(v, j * bk, bk, 2),
                            preferred_element_type=F32)
            return acc * rescale[..., None] + pv, m_new, l * rescale + jnp.sum(p, axis=-1)

        init = (jnp.zeros(acc_shape + q.shape[-1:], F32), jnp.full(acc_shape, -jnp.inf, F32), jnp.zeros(acc_shape, F32))
        acc, m, l = jax.lax.fori_loop(0, count[i], key_block, init)
        seen = l > 0
        block = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(out.dtype)
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return (jax.lax.dynamic_update_slice_in_dim(out, block, i * bq, 3),
                jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * bq, 3))

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:4], F32))
    out, lse = jax.lax.fori_loop(0, q.shape[3] // bq, query_block, init)
    return out, lse


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    out, lse = _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_bwd(bq, bk, residuals, d_out):
    """One key block at a time over its live query blocks: p recomputed from lse, then
    dv = p^T do, ds = p (do v^T - rowsum(do o)), dk = ds^T q / sqrt(d), dq += ds k / sqrt(d)."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    meta = (q_pos, kv_pos, q_seg, kv_seg)
    order, count = _schedule(live_tiles(*meta, bq, bk).T)
    delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)  # [B, K, G, T]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def key_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)

        def query_block(n, state):
            dq, dk_j, dv_j = state
            i = order[j, n]
            q_i, do_i = _slice(q, i * bq, bq, 3), _slice(d_out, i * bq, bq, 3)
            lse_i, delta_i = _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3)
            p = jnp.exp(_scores(q_i, k_j, _tile(*meta, i, j, bq, bk)) - lse_i[..., None])
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i, preferred_element_type=F32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=F32)
            ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i, preferred_element_type=F32) * scale
            dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j, preferred_element_type=F32) * scale
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i * bq, bq, 3) + dq_i, i * bq, 3)
            return dq, dk_j, dv_j

        zeros = jnp.zeros(k_j.shape, F32)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, count[j], query_block, (dq, zeros, zeros))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dk_j.astype(dk.dtype), j * bk, 2),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * bk, 2))

    init = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    dq, dk, dv = jax.lax.fori_loop(0, k.shape[2] // bk, key_block, init)
    return dq.astype(q.dtype), dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_unsupported(q, mask: Mask) -> str | None:
    """Why the Pallas flash kernels cannot take this call (None: they can)."""
    if not mask.aligned:
        return "the Pallas flash kernels take self-attention (Mask.causal), not queries over a cache"
    if q.shape[-1] % 128 and jax.default_backend() == "tpu":
        return f"the Pallas TPU flash kernel needs head_dim a multiple of 128, got {q.shape[-1]}"
    if q.shape[-1] < 16:
        return f"the Pallas flash kernels need head_dim >= 16, got {q.shape[-1]}"
    return None


def _flash_inputs(q, k, v, mask):
    """T padded to a multiple of :data:`FLASH_BLOCK` (padding: segment 0, after every real token, so
    causality hides it), k and v repeated over each query group (the kernels take H key-value heads)."""
    group = q.shape[2] // k.shape[1]
    k, v = (jnp.repeat(_pad_to(x, FLASH_BLOCK, 2), group, axis=1) for x in (k, v))  # [B, H, T', d]
    return _pad_to(q, FLASH_BLOCK, 1), k, v, _pad_to(mask.q_segment_ids.astype(jnp.int32), FLASH_BLOCK, 1)


def tpu_flash(q, k, v, mask: Mask):
    """JAX's Pallas TPU flash attention (causal, segment ids). On CPU it runs interpreted under
    ``pltpu.force_tpu_interpret_mode()`` held while its forward and backward are traced."""
    t, d = q.shape[1], q.shape[-1]
    q, k, v, seg = _flash_inputs(q, k, v, mask)
    out = tpu_attention.flash_attention(q.transpose(0, 2, 1, 3), k, v, segment_ids=tpu_attention.SegmentIds(seg, seg),
                                        causal=True, sm_scale=1.0 / math.sqrt(d))
    return out.transpose(0, 2, 1, 3)[:, :t]


def gpu_flash(q, k, v, mask: Mask, *, interpret: bool = False):
    """JAX's Pallas Triton flash attention (``mha``: causal, segment ids, a Triton backward;
    ``interpret``: simulated on CPU)."""
    t, d = q.shape[1], q.shape[-1]
    q, k, v, seg = _flash_inputs(q, k, v, mask)
    out = gpu_attention.mha(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg, sm_scale=1.0 / math.sqrt(d),
                            causal=True, interpret=interpret)
    return out[:, :t]
