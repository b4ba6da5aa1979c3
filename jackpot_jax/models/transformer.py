"""A Flax NNX decoder-only transformer: Llama 3.x, Qwen2 / Qwen2.5 and Qwen3 dense by config.

Pre-norm blocks (RMSNorm) with grouped-query attention (RoPE, optional q/k/v bias, optional q/k
RMSNorm per head) and a SwiGLU MLP; tied or untied unembedding. Every parameter carries its
logical axis names (``logical_axes`` metadata) for :mod:`jackpot_jax.models.sharding`.

The forward pass exposes the final hidden states and the unembedding separately
(:meth:`Transformer.hidden_states`, :meth:`Transformer.unembedding`), because the vocabulary
kernels (:mod:`pallas_kernels`) take ``h`` and ``w`` and never form the logits; ``model(tokens)``
returns the logits ``[B, T, V]`` for convenience. A :class:`KVCache` (contiguous) or a
:class:`PagedKVCache` (a pool of pages and a page table) serves prefill and decode with
per-sequence lengths.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.models.config import ModelConfig
from jackpot_jax.models.sharding import constrain
from pallas_kernels import paged
from pallas_kernels.attention import Mask, attention
from pallas_kernels.paged_attention import paged_attention

F32 = jnp.float32


def param(value, axes):
    """A parameter with its logical axis names (one per dimension)."""
    assert len(axes) == np.ndim(value), (axes, np.shape(value))
    return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
    """``x @ kernel [+ bias]``, kernel ``[in, out]``, computed in ``dtype``."""

    def __init__(self, d_in, d_out, axes, *, bias, dtype, param_dtype, rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = param(init(rngs.params(), (d_in, d_out), param_dtype), axes)
        self.bias = param(jnp.zeros((d_out,), param_dtype), axes[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        # One [tokens, in] x [in, out] product: on XLA:CPU the weight gradient of a 3-D input is
        # ~3x slower (its cotangent gets transposed first).
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(x.shape[:-1] + y.shape[-1:])
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalized in float32 and cast back to ``x``'s dtype before the scale
    (as Hugging Face's Llama / Qwen RMSNorm)."""

    def __init__(self, dim, eps, *, param_dtype, axes=("norm",)):
        self.scale = param(jnp.ones((dim,), param_dtype), axes)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(F32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim / 2]`` (float64), with linear or llama3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # low frequencies: divided
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # in between: interpolated
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotate ``x [B, T, heads, head_dim]`` by ``positions [B, T]`` (halves convention)."""
    angles = positions.astype(F32)[:, :, None] * jnp.asarray(inv_freq, F32)  # [B, T, hd/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _cache_write(cache, new, write_index):
    """``cache [B, K, S, d]`` with ``new [B, K, T, d]`` written at positions ``write_index [B, T]``
    (positions past S are dropped): a scatter of ``B x T`` rows, in place when the cache is
    donated."""
    rows = jnp.arange(cache.shape[0])[:, None, None]
    heads = jnp.arange(cache.shape[1])[None, :, None]
    return cache.at[rows, heads, write_index[:, None, :]].set(new.astype(cache.dtype), mode="drop")


class KVCache(NamedTuple):
    """Keys and values of every layer, ``[B, kv_heads, S, head_dim]`` each (the layout attention
    reads without a transpose), and ``lengths [B]``: how many positions of each sequence (slot) are
    filled."""

    k: tuple
    v: tuple
    lengths: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        dtype = dtype or config.jnp_dtype
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class PagedKVCache(NamedTuple):
    """Keys and values of every layer in a pool of pages, ``[kv_heads, num_pages, page_size,
    head_dim]`` each, ``page_table [B, W]`` (each sequence's pages in order; see
    :mod:`pallas_kernels.paged`) and ``lengths [B]``. Attention reads the ``W`` pages of the table,
    so a step costs what the table spans, not what the pool holds."""

    k: tuple
    v: tuple
    page_table: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, num_pages: int, page_size: int, batch: int, dtype=None) -> "PagedKVCache":
        shape = (config.num_key_value_heads, num_pages, page_size, config.head_dim)
        dtype = dtype or config.jnp_dtype
        layers = range(config.num_hidden_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.zeros((batch, 1), jnp.int32), jnp.zeros((batch,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size


class PagedLayer(NamedTuple):
    """One layer's part of a :class:`PagedKVCache` in a forward pass: its pools, the page table and
    ``lengths [B]``, the positions each sequence holds once this pass's tokens are written."""

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    lengths: jax.Array


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs):
        c = config
        opts = dict(dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, rngs=rngs)
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = Dense(c.hidden_size, q_dim, ("embed", "q_heads"), bias=c.attention_bias, **opts)
        self.k_proj = Dense(c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias, **opts)
        self.v_proj = Dense(c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias, **opts)
        self.o_proj = Dense(q_dim, c.hidden_size, ("q_heads", "embed"), bias=False, **opts)
        norm = dict(param_dtype=c.jnp_param_dtype, axes=("head_dim",))
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm) if c.qk_norm else None
        self.heads = (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(c))  # static
        self.attention_impl, self.paged_attention_impl = c.attention_impl, c.paged_attention_impl

    def __call__(self, x, positions, mask, kv=None, write_index=None):
        """``mask`` (a :class:`pallas_kernels.attention.Mask`) says which keys each query sees; attention
        is :func:`pallas_kernels.attention.attention`. With ``kv = (k, v)`` (one layer of a
        :class:`KVCache`) or a :class:`PagedLayer` the new keys and values are written at
        ``write_index [B, T]`` first and attention runs over the cache; returns ``(out, new kv or
        None)``. A decode step (a paged cache, T == 1) runs :func:`pallas_kernels.paged_attention.
        paged_attention` over each sequence's ``kv.lengths`` keys (the mask's ``keys < ends``);
        prefill gathers the table's pages for dense attention."""
        b, t, _ = x.shape
        num_heads, num_kv, head_dim = self.heads
        q = self.q_proj(x).reshape(b, t, num_heads, head_dim)
        k = self.k_proj(x).reshape(b, t, num_kv, head_dim)
        v = self.v_proj(x).reshape(b, t, num_kv, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
        if isinstance(kv, PagedLayer):
            table = kv.page_table
            kv = kv._replace(k=paged.write(kv.k, k, table, write_index), v=paged.write(kv.v, v, table, write_index))
            if t == 1:
                out = paged_attention(q[:, 0], kv.k, kv.v, table, kv.lengths, impl=self.paged_attention_impl)
                return self.o_proj(out.reshape(b, t, num_heads * head_dim)), kv
            k, v = paged.gather(kv.k, table), paged.gather(kv.v, table)
        elif kv is not None:
            k, v = _cache_write(kv[0], k, write_index), _cache_write(kv[1], v, write_index)
            kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.attention_impl)
        return self.o_proj(out.reshape(b, t, num_heads * head_dim)), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs):
        c = config
        opts = dict(bias=False, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, rngs=rngs)
        self.gate_proj = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **opts)
        self.up_proj = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **opts)
        self.down_proj = Dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **opts)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs):
        norm = dict(param_dtype=config.jnp_param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, write_index=None):
        attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, write_index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _block_forward(block, x, positions, mask, kv, write_index):
    return block(x, positions, mask, kv, write_index)


def _block_forward_remat(block, x, positions, mask, kv, write_index):
    """:func:`_block_forward` whose activations are recomputed in the backward pass. A pure
    ``jax.checkpoint`` over the block's state (blocks hold no mutable state), so it also runs
    inside other transformations (``lax.map`` / ``lax.scan`` bodies), where ``nnx.remat`` refuses."""
    graphdef, state = nnx.split(block)

    def pure(state, x, positions, mask, kv, write_index):
        return _block_forward(nnx.merge(graphdef, state), x, positions, mask, kv, write_index)

    return jax.checkpoint(pure)(state, x, positions, mask, kv, write_index)


def segment_positions(segment_ids):
    """Positions restarting at 0 at the start of each segment (run of equal ids) in every row."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Transformer(nnx.Module):
    """The decoder. ``model(tokens)`` -> logits ``[B, T, V]`` (float32); see
    :meth:`hidden_states` for padding, packing, positions and the KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = jax.nn.initializers.normal(0.02)
        self.embed_tokens = param(init(rngs.params(), (config.vocab_size, config.hidden_size),
                                       config.jnp_param_dtype), ("vocab", "embed"))
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.jnp_param_dtype)
        self.lm_head = None if config.tie_word_embeddings else param(
            init(rngs.params(), (config.hidden_size, config.vocab_size), config.jnp_param_dtype), ("embed", "vocab"))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` positions."""
        return KVCache.init(self.config, batch, max_len)

    def init_paged_cache(self, num_pages: int, page_size: int, batch: int) -> PagedKVCache:
        """An empty :class:`PagedKVCache`: a pool of ``num_pages`` pages for ``batch`` sequences."""
        return PagedKVCache.init(self.config, num_pages, page_size, batch)

    def unembedding(self):
        """``w [D, V]``: logits are ``h @ w`` (the transposed embedding when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, attention_mask=None, cache=None):
        """Final hidden states ``h [B, T, D]`` (after the last norm) and the updated cache.

        Without a cache: ``segment_ids [B, T]`` (int; 0 is padding) or ``attention_mask [B, T]``
        (1 real, 0 padding, as Hugging Face's) restrict attention to keys of the same segment;
        positions default to each token's offset within its segment, so packed sequences and left
        padding both get positions from 0. With a :class:`KVCache`: ``tokens`` are appended at each
        sequence's ``lengths`` (``attention_mask`` marks the real ones of a right-padded chunk), at
        positions ``lengths + t``; attention runs over the filled part of the cache.
        """
        b, t = tokens.shape
        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            if positions is None:
                positions = segment_positions(segment_ids)
            mask = Mask.causal(segment_ids.astype(jnp.int32))
            write_index, caches = None, [None] * len(self.layers)
        else:
            new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            write_index = cache.lengths[:, None] + jnp.arange(t)[None, :]
            positions = write_index if positions is None else positions
            ends = cache.lengths + jnp.sum(new, axis=1)
            mask = Mask.over_cache(write_index, ends, cache.max_len)
            paged_cache = isinstance(cache, PagedKVCache)
            caches = [PagedLayer(k, v, cache.page_table, ends) if paged_cache else (k, v)
                      for k, v in zip(cache.k, cache.v)]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.jnp_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        forward = _block_forward_remat if self.config.remat else _block_forward
        new_kv = []
        for block, kv in zip(self.layers, caches):
            x, kv = forward(block, x, positions, mask, kv, write_index)
            x = constrain(x, ("batch", "length", "embed"))
            new_kv.append(kv)
        h = self.norm(x)
        if cache is None:
            return h, None
        new_k, new_v = tuple(kv[0] for kv in new_kv), tuple(kv[1] for kv in new_kv)
        return h, cache._replace(k=new_k, v=new_v, lengths=ends.astype(jnp.int32))

    def logits(self, h):
        """``h @ w`` in float32: ``[..., V]``."""
        return jnp.dot(h, self.unembedding().astype(h.dtype), preferred_element_type=F32)

    def __call__(self, tokens, *, positions=None, segment_ids=None, attention_mask=None):
        h, _ = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask)
        return self.logits(h)
