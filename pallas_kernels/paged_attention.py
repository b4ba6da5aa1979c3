"""Decode attention over a paged KV cache (the layout of :mod:`pallas_kernels.paged`): ``q [B, H, d]``,
each sequence's newest position, against its first ``lengths[b]`` keys (clipped to the table's
``W * page_size``), softmax(q k^T / sqrt(d)) v with float32 probabilities; length 0 gives zeros.

``impl``: ``"reference"`` (the definition in float32), ``"xla"`` (the table's W pages gathered for every
sequence, the queries of each key-value head in one product), ``"pallas"``: a kernel that reads only a
sequence's pages up to its length. On TPU (and interpreted on CPU) JAX's Pallas TPU ``paged_attention``
(pages by DMA; head_dim a multiple of 128, page_size of 16, :func:`tpu_unsupported`; it rounds K and V to
bfloat16; lowered for TPU, not yet run on TPU hardware); on GPU JAX's Pallas Triton ``paged_attention``
(:func:`gpu_kernel`, :func:`gpu_unsupported`; lowered for CUDA, not yet run on a GPU). ``"auto"``:
"pallas" on TPU and GPU for bfloat16 pools of a shape it allows, else "xla".
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention

from pallas_kernels import paged
from pallas_kernels.logspace import check_choice

IMPLS = ("auto", "reference", "xla", "pallas")
F32 = jnp.float32
TPU_BLOCK_KEYS = 512  # keys per compute block of the TPU kernel at most (its own test's block)
GPU_BLOCK_KEYS = 128  # keys per compute block of the GPU kernel (JAX's default: 8 pages of 16)
GPU_SPLITS = 16  # the GPU kernel's partitions of a sequence's pages at most (JAX's default)


def paged_attention(q, k_pool, v_pool, page_table, lengths, *, impl="auto"):
    """Each sequence's query ``q [B, H, d]`` against its first ``lengths[b]`` keys of the pools
    ``[K, num_pages, page_size, d]`` under ``page_table [B, W]``: ``[B, H, d]`` in q's dtype."""
    check_choice("impl", impl, IMPLS)
    _check_shapes(q, k_pool, v_pool, page_table, lengths)
    width, page_size = page_table.shape[1], k_pool.shape[2]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, width * page_size)
    backend = jax.default_backend()
    unsupported = gpu_unsupported if backend == "gpu" else tpu_unsupported
    if impl == "auto":
        exact = k_pool.dtype == v_pool.dtype == jnp.bfloat16
        impl = "pallas" if backend in ("gpu", "tpu") and exact and unsupported(q, k_pool) is None else "xla"
    if impl == "reference":
        return reference(q, k_pool, v_pool, page_table, lengths)
    if impl == "xla":
        return xla(q, k_pool, v_pool, page_table, lengths)
    reason = unsupported(q, k_pool)
    if reason is not None:
        raise ValueError(f"impl='pallas' is not allowed here: {reason}; use impl 'xla' or 'auto'.")
    if backend == "gpu":
        return gpu_kernel(q, k_pool, v_pool, page_table, lengths)
    return tpu_kernel(q, k_pool, v_pool, page_table, lengths, interpret=backend != "tpu")


def _check_shapes(q, k_pool, v_pool, page_table, lengths):
    if q.ndim != 3 or k_pool.ndim != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"q {q.shape}, k_pool {k_pool.shape} and v_pool {v_pool.shape} are not allowed: q must be "
                         "[B, H, d] and both pools [K, num_pages, page_size, d].")
    (b, h, d), (kv_heads, head_dim) = q.shape, (k_pool.shape[0], k_pool.shape[3])
    if d != head_dim or h % kv_heads:
        raise ValueError(f"q {q.shape} and pools {k_pool.shape} are not allowed: they must share head_dim and H "
                         "must be a multiple of K.")
    if page_table.ndim != 2 or page_table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page_table {page_table.shape} and lengths {lengths.shape} are not allowed: they must be "
                         f"[B, W] and [B] with B={b}.")
    if not jnp.issubdtype(page_table.dtype, jnp.integer) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"page_table ({page_table.dtype}) and lengths ({lengths.dtype}) must be integers.")


def _length_mask(lengths, width, page_size):
    """``[B, W * P]``: key ``j`` of sequence ``b`` is one of its ``lengths[b]``."""
    return jnp.arange(width * page_size)[None, :] < lengths[:, None]


def _masked_softmax(scores, mask):
    """softmax over the last axis where ``mask``; a row with no key gets all zeros (no NaN)."""
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def reference(q, k_pool, v_pool, page_table, lengths):
    """The definition, in float32 (lengths in ``[0, W * P]``)."""
    b, h, d = q.shape
    group = h // k_pool.shape[0]
    k = jnp.repeat(paged.gather(k_pool, page_table).astype(F32), group, axis=1)  # [B, H, S, d]
    v = jnp.repeat(paged.gather(v_pool, page_table).astype(F32), group, axis=1)
    scores = jnp.einsum("bhd,bhsd->bhs", q.astype(F32), k) / math.sqrt(d)
    mask = _length_mask(lengths, page_table.shape[1], k_pool.shape[2])[:, None, :]
    return jnp.einsum("bhs,bhsd->bhd", _masked_softmax(scores, mask), v).astype(q.dtype)


def xla(q, k_pool, v_pool, page_table, lengths):
    """The table's pages gathered head-major (:func:`paged.gather_by_head`, no transpose), the
    scores of each key-value head as ``k [S, d] @ q^T [d, G]`` (the keys as they lie: 2.3x faster
    on XLA:CPU than ``q @ k^T``, which transposes them); products in q's dtype, accumulation and
    probabilities in float32 (lengths in ``[0, W * P]``)."""
    b, h, d = q.shape
    kv_heads, width, page_size = k_pool.shape[0], page_table.shape[1], k_pool.shape[2]
    k = paged.gather_by_head(k_pool, page_table).astype(q.dtype)  # [K, B, S, d]
    v = paged.gather_by_head(v_pool, page_table).astype(q.dtype)
    q = q.reshape(b, kv_heads, h // kv_heads, d).transpose(1, 0, 2, 3)  # [K, B, G, d]
    scores = jnp.einsum("kbsd,kbgd->kbsg", k, q, preferred_element_type=F32) * (1.0 / math.sqrt(d))
    mask = _length_mask(lengths, width, page_size)[None, :, None, :]
    weights = _masked_softmax(jnp.swapaxes(scores, -1, -2), mask).astype(v.dtype)  # [K, B, G, S]
    out = jnp.einsum("kbgs,kbsd->kbgd", weights, v)
    return out.transpose(1, 0, 2, 3).reshape(b, h, d)


def tpu_unsupported(q, k_pool) -> str | None:
    """Why the TPU kernel cannot take this shape (None: it can). Its blocks tile ``[keys, head_dim]``
    in (sublane, lane) = (16 for bfloat16, 128) units, as JAX's own tests use it."""
    head_dim, page_size = q.shape[-1], k_pool.shape[2]
    if head_dim % 128:
        return f"the Pallas TPU kernel needs head_dim a multiple of 128, got {head_dim}"
    if page_size % 16:
        return f"the Pallas TPU kernel needs page_size a multiple of 16, got {page_size}"
    return None


def pages_per_block(width: int, page_size: int) -> int:
    """The TPU kernel's pages per compute block: the largest divisor of the table's ``width`` (the
    kernel requires one) whose block holds at most :data:`TPU_BLOCK_KEYS` keys, or 1."""
    return max([n for n in range(1, width + 1) if width % n == 0 and n * page_size <= TPU_BLOCK_KEYS] or [1])


def tpu_kernel(q, k_pool, v_pool, page_table, lengths, *, interpret: bool = False):
    """JAX's Pallas TPU paged attention (``interpret``: simulated on CPU). The kernel does not scale
    q: it gets q / sqrt(d) in float32 (the model's scaling). Lengths must be in ``[0, W * P]``: the
    kernel reads a sequence's table entries up to its length, into the next row past ``W``."""
    scaled = q.astype(F32) * (1.0 / math.sqrt(q.shape[-1]))
    block = pages_per_block(page_table.shape[1], k_pool.shape[2])
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        out = tpu_paged_attention(scaled, k_pool, v_pool, lengths.astype(jnp.int32), page_table.astype(jnp.int32),
                                  pages_per_compute_block=block)
    return out.astype(q.dtype)


def gpu_unsupported(q, k_pool) -> str | None:
    """Why the GPU kernel cannot take this shape (None: it can): Triton's blocks and products need
    power-of-two sizes of at least 16 (its query block is 16 heads of a group, padded)."""
    head_dim, page_size = q.shape[-1], k_pool.shape[2]
    power = lambda n: n & (n - 1) == 0
    if head_dim < 16 or not power(head_dim):
        return f"the Pallas GPU kernel needs head_dim a power of two >= 16, got {head_dim}"
    if not power(page_size):
        return f"the Pallas GPU kernel needs page_size a power of two, got {page_size}"
    return None


def gpu_blocks(width: int, page_size: int) -> tuple[int, int, int]:
    """The GPU kernel's ``(pages per compute block, splits, padded width)``: blocks of
    :data:`GPU_BLOCK_KEYS` keys (at least a page), up to :data:`GPU_SPLITS` partitions of the
    table, which is padded to a multiple of both (padding lies past every length: never read)."""
    block = max(1, GPU_BLOCK_KEYS // page_size)
    splits = max(1, min(GPU_SPLITS, -(-width // block)))
    return block, splits, -(-width // (block * splits)) * block * splits


def gpu_kernel(q, k_pool, v_pool, page_table, lengths, *, interpret: bool = False):
    """JAX's Pallas Triton paged attention (``interpret``: simulated on CPU): each sequence's pages
    split over partitions, blocks past its length skipped, partial softmaxes merged. Gets q / sqrt(d)
    (scaled in float32) and the table padded by :func:`gpu_blocks`; lengths in ``[0, W * P]``."""
    scaled = (q.astype(F32) * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
    block, splits, width = gpu_blocks(page_table.shape[1], k_pool.shape[2])
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, width - page_table.shape[1])),
                    constant_values=paged.SCRATCH_PAGE)
    out = gpu_paged_attention(scaled, k_pool, v_pool, table, lengths.astype(jnp.int32),
                              pages_per_compute_block=block, k_splits=splits, interpret=interpret)
    return out.astype(q.dtype)
