"""A paged KV cache's two memory operations, in XLA: writing new keys / values into their pages, and
gathering a batch's live pages into the dense layout attention reads.

The pool of one layer is ``[kv_heads, num_pages, page_size, head_dim]`` (the layout of JAX's Pallas
TPU ``paged_attention``, so that kernel reads it as it is); ``page_table [B, W]`` lists each
sequence's pages in order. Page 0 is scratch: table entries no sequence owns point to it, and a
write past a sequence's last table entry lands there, so a finished or empty slot that keeps
decoding never touches another sequence's pages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCRATCH_PAGE = 0


def page_of(page_table, positions, page_size: int):
    """``(page, offset)`` of ``positions [B, T]`` under ``page_table [B, W]`` (positions past the
    table: the scratch page)."""
    slot = positions // page_size
    width = page_table.shape[1]
    page = jnp.take_along_axis(page_table, jnp.clip(slot, 0, width - 1), axis=1)
    return jnp.where(slot < width, page, SCRATCH_PAGE), positions % page_size


def write(pool, new, page_table, positions):
    """``pool [K, N, P, d]`` with ``new [B, K, T, d]`` written at ``positions [B, T]``: a scatter
    of ``B x T x K`` rows of ``d``, in place when the pool is donated."""
    page, offset = page_of(page_table, positions, pool.shape[2])
    heads = jnp.arange(pool.shape[0])[None, :, None]
    return pool.at[heads, page[:, None, :], offset[:, None, :]].set(new.astype(pool.dtype))


def gather(pool, page_table):
    """The pages of ``page_table [B, W]`` as ``[B, K, W * P, d]``: position ``j`` of sequence
    ``b`` is row ``j % P`` of its page ``j // P``."""
    return gather_by_head(pool, page_table).transpose(1, 0, 2, 3)


def gather_by_head(pool, page_table):
    """:func:`gather` in the pool's head-major order, ``[K, B, W * P, d]``: whole pages copied,
    nothing transposed."""
    kv_heads, _, page_size, head_dim = pool.shape
    b, width = page_table.shape
    return jnp.take(pool, page_table.reshape(-1), axis=1).reshape(kv_heads, b, width * page_size, head_dim)


def write_prefix(pool, part, pages):
    """``part [R, K, S, d]`` (the first S positions of R sequences, contiguous) into their pages
    ``pages [R, ceil(S / P)]``; the last page's positions past S get zeros."""
    kv_heads, _, page_size, head_dim = pool.shape
    r, _, length, _ = part.shape
    width = pages.shape[1]
    part = jnp.pad(part, ((0, 0), (0, 0), (0, width * page_size - length), (0, 0)))
    part = part.reshape(r, kv_heads, width, page_size, head_dim).transpose(1, 0, 2, 3, 4)
    return pool.at[:, pages].set(part.astype(pool.dtype))
