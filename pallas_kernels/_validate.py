"""Input checks shared by every implementation: bad input fails here, with a ValueError that names
the argument, never deep inside JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.logspace import check_range

IMPLS = ("auto", "reference", "chunked", "pallas")


def _float_matrix(name, x):
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {jnp.shape(x)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {x.dtype}; it must be a floating dtype (float32, bfloat16, float16).")


def head(h_name, h, w_name, w, vocab_size):
    """Hidden states ``h [N, D]`` and an unembedding ``w [D, V]``; returns the real vocab size."""
    _float_matrix(h_name, h)
    _float_matrix(w_name, w)
    if h.shape[1] != w.shape[0]:
        raise ValueError(f"{h_name} has D={h.shape[1]} but {w_name} has D={w.shape[0]}: "
                         f"{h_name} [N, D] and {w_name} [D, V] must agree on D.")
    num_columns = w.shape[1]
    if vocab_size is None:
        return num_columns
    if not isinstance(vocab_size, (int, np.integer)) or not 1 <= vocab_size <= num_columns:
        raise ValueError(f"vocab_size={vocab_size!r} is not allowed: it must be an integer in "
                         f"[1, {num_columns}] (the columns of {w_name}).")
    return int(vocab_size)


def same_tokens(a_name, a, b_name, b):
    """Two models' hidden states: the same N tokens (their widths D may differ)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} has N={a.shape[0]} tokens but {b_name} has N={b.shape[0]}: "
                         "both models must see the same tokens.")


def same_vocab(a_name, a, b_name, b):
    """Two models' unembeddings: the same V columns (one shared tokenizer)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has V={a.shape[1]} columns but {b_name} has V={b.shape[1]}: "
                         "both models must share one vocabulary.")


def two_heads(a, h_a, w_a, b, h_b, w_b, vocab_size):
    """Two models (names ``a``, ``b``) over the same tokens and one shared vocabulary; each has
    its own width D. Returns the real vocab size."""
    vocab_size = head(f"h_{a}", h_a, f"w_{a}", w_a, vocab_size)
    same_vocab(f"w_{a}", w_a, f"w_{b}", w_b)
    head(f"h_{b}", h_b, f"w_{b}", w_b, vocab_size)
    same_tokens(f"h_{a}", h_a, f"h_{b}", h_b)
    return vocab_size


def targets(t, n):
    if jnp.ndim(t) != 1 or t.shape[0] != n or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array of shape [{n}], got {t.dtype} {jnp.shape(t)}.")


def per_token(name, x, n):
    if jnp.shape(x) != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {jnp.shape(x)}.")


def inf_topk(topk, n, k):
    """p_inf's stored top-k ``(ids, logp)``: integer ids and float log-probs, both ``[n, K]`` with
    ``K >= k``."""
    if not isinstance(topk, (tuple, list)) or len(topk) != 2:
        raise ValueError(f"inf_topk must be a pair (ids, logp) of [{n}, K] arrays, got {type(topk).__name__}.")
    ids, logp = topk
    if jnp.ndim(ids) != 2 or ids.shape[0] != n or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"inf_topk ids must be an integer array [{n}, K], got {ids.dtype} {jnp.shape(ids)}.")
    if jnp.shape(logp) != ids.shape or not jnp.issubdtype(logp.dtype, jnp.floating):
        raise ValueError(f"inf_topk logp must be a float array of the ids' shape {ids.shape}, got {logp.dtype} "
                         f"{jnp.shape(logp)}.")
    if ids.shape[1] < k:
        raise ValueError(f"inf_topk holds K={ids.shape[1]} tokens per position, fewer than k={k}: V_k needs "
                         f"p_inf's top-{k}.")


def temperature(name, t):
    """A static positive number (the sampling temperature is fixed per run, not traced)."""
    try:
        float(t)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise ValueError(f"{name} must be a static Python number (it is fixed per run), got {t!r}.") from None
    check_range(name, t, lambda v: v > 0, "> 0")
