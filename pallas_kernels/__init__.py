"""OBRS statistics over the vocabulary without materializing the logits.

Inputs are hidden states ``h [N, D]`` (tokens flattened) and a model's unembedding ``w [D, V]``;
the logits of token ``n`` are ``h[n] @ w / temperature``. Columns ``>= vocab_size`` (a padded
vocabulary, e.g. 151,936 columns for 151,665 real tokens) are excluded: their probability is 0.

The kernels compute vocabulary reductions only, per token. The batch-level quantities of the
objective built on them (the OBRS mask, kappa, rho: they depend on the whole mini-batch) are
:mod:`jackpot_jax.obrs`'s. The log-space definitions the reductions compute, Z of eq. 4, its top-k
estimate and the distillation KL, are :mod:`pallas_kernels.logspace`; this package depends on JAX
alone.

Public ops (each jit- and shard-friendly: static ``k``, no host callbacks):
  * :func:`fused_token_stats`: per token, log p(target), lse, top-k log-probs and ids.
  * :func:`fused_obrs_normalizer`: Z_approx over the union of both top-k sets (section 4.4.1 of the
    paper, as :func:`pallas_kernels.logspace.topk_normalizer`) and, with ``exact``, the exact Z of
    eq. 4.
  * :func:`fused_distill_kl`: the per-token distillation KL of eq. 7 (or its reverse) over the
    full vocabulary.
  * :func:`fused_jackpot_stats`: all of the above for a policy and an actor in one call, the op an
    update step uses: one forward pass over the vocabulary (a second for the exact Z), one
    backward pass, and each model's weight gradient written once (separate ops would each produce
    a D x V gradient for the actor, summed afterwards).

Implementations, chosen by ``impl``:
  * ``"reference"``: materialized jnp over ``[N, V]``, built on :mod:`pallas_kernels.logspace`: the
    definition (:mod:`pallas_kernels.reference`).
  * ``"chunked"``: XLA ``lax.scan`` over vocabulary blocks with online logsumexp and a running top-k
    merge; memory linear in N (:mod:`pallas_kernels.chunked`).
  * ``"pallas"``: forward kernels, Mosaic on TPU (:mod:`pallas_kernels.pallas_tpu`) or Triton on
    GPU (:mod:`pallas_kernels.pallas_gpu`), for every op: the token stats, the normalizers, the
    two-model pass behind the distillation KL and the first pass of :func:`fused_jackpot_stats`;
    backward passes (and that op's second pass) are the chunked ones. On CPU the TPU kernels run
    interpreted (for tests). Both lower for their targets from a CPU host and match the reference
    interpreted; the Triton kernels also ran compiled on an H100 and match the float64 reference
    there (``tests/test_gpu.py``). The Mosaic TPU kernels have not run on TPU hardware.
  * ``"auto"``: ``"chunked"`` on every backend: on an H100 the chunked step statistics take 0.075 s
    against 0.119 s with the Triton forward (N=8192, D=2048, V=151,936, bfloat16; BENCHMARKS.md),
    and TPU is unmeasured.

Attention over a paged KV cache (decode) is :func:`pallas_kernels.paged_attention.paged_attention`,
with its own ``impl`` choices; the cache's memory operations are :mod:`pallas_kernels.paged`.
"""
from __future__ import annotations

import functools

import jax

from pallas_kernels import _validate, chunked, pallas_gpu, pallas_tpu, reference
from pallas_kernels.logspace import DIRECTIONS, check_choice, check_range, check_top_k

__all__ = ["fused_token_stats", "fused_obrs_normalizer", "fused_distill_kl", "fused_jackpot_stats", "JackpotStats",
           "IMPLS"]

JackpotStats = reference.JackpotStats

IMPLS = _validate.IMPLS

# Columns per vocabulary block of the chunked implementation, per backend.
_BLOCK_V = {"cpu": 2048, "gpu": 8192, "tpu": 8192}


def _resolve(impl, block_v):
    """The implementation and block size to run; "auto" is "chunked" (faster than the Triton
    kernels on an H100; see the module docstring)."""
    check_choice("impl", impl, IMPLS)
    impl = "chunked" if impl == "auto" else impl
    if block_v is None:
        block_v = _BLOCK_V.get(jax.default_backend(), 4096)
    elif not isinstance(block_v, int) or block_v < 1:
        raise ValueError(f"block_v={block_v!r} is not allowed: it must be a positive integer.")
    return impl, block_v


def _pallas_kernel():
    """The Pallas kernel module for this backend, and whether it must run interpreted (CPU)."""
    backend = jax.default_backend()
    return (pallas_gpu if backend == "gpu" else pallas_tpu), backend not in ("gpu", "tpu")


@functools.lru_cache(maxsize=None)
def _pallas_two_model_pass():
    """This backend's Pallas two-model pass, one object per process (it keys traced computations)."""
    kernel, interpret = _pallas_kernel()
    return functools.partial(kernel.two_model_pass, interpret=interpret)


def fused_token_stats(h, w, targets, k: int, *, temperature=1.0, vocab_size=None, impl="auto",
                      block_v=None):
    """Per token ``n``: ``(logp [N], lse [N], topk_logp [N, k], topk_ids [N, k])``.

    ``logp[n] = log softmax(h[n] @ w / temperature)[targets[n]]``, ``lse`` the log-normalizer of
    the tempered logits, and the top-k of the same log-distribution (ids int32, best first).
    Differentiable in ``h`` and ``w`` through ``logp`` and ``lse``; the top-k is stop-gradient.
    The chunked backward recomputes the vocabulary blocks and saves no N x V residual.
    """
    impl, block_v = _resolve(impl, block_v)
    vocab_size = _validate.head("h", h, "w", w, vocab_size)
    _validate.targets(targets, h.shape[0])
    check_top_k(k, vocab_size)
    _validate.temperature("temperature", temperature)
    if impl == "reference":
        return reference.token_stats(h, w, targets, k, temperature=temperature, vocab_size=vocab_size)
    if impl == "pallas":
        kernel, interpret = _pallas_kernel()
        return kernel.token_stats(h, w, targets, k, temperature=temperature, vocab_size=vocab_size,
                                  interpret=interpret)
    return chunked.token_stats(h, w, targets, k, temperature=temperature, vocab_size=vocab_size,
                               block_v=block_v)


def fused_obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k: int,
                          exact: bool = False, *, temperature_inf=1.0, vocab_size=None,
                          impl="auto", block_v=None):
    """``(z_topk [N], z_exact [N] or None)`` for p_inf = softmax(h_inf @ w_inf / temperature_inf)
    and p_target = softmax(h_tgt @ w_tgt), given their ``lse`` from :func:`fused_token_stats`.

    ``z_topk`` sums min(p_inf, p_target / lam) over topk(p_inf) U topk(p_target) (each token once);
    ``z_exact`` over the whole vocabulary (eq. 4). Both are stop-gradient. ``lam`` may be traced.
    """
    impl, block_v = _resolve(impl, block_v)
    vocab_size = _validate.two_heads("inf", h_inf, w_inf, "tgt", h_tgt, w_tgt, vocab_size)
    _validate.per_token("lse_inf", lse_inf, h_inf.shape[0])
    _validate.per_token("lse_tgt", lse_tgt, h_inf.shape[0])
    check_top_k(k, vocab_size)
    _validate.temperature("temperature_inf", temperature_inf)
    check_range("lam", lam, lambda v: v > 0, "> 0")
    args = (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, exact)
    if impl == "reference":
        return reference.obrs_normalizer(*args, temperature_inf=temperature_inf, vocab_size=vocab_size)
    if impl == "pallas":
        kernel, interpret = _pallas_kernel()
        z_topk, z_exact = kernel.obrs_normalizer(*args[:-1], temperature_inf=temperature_inf,
                                                 vocab_size=vocab_size, interpret=interpret)
        return z_topk, (z_exact if exact else None)
    return chunked.obrs_normalizer(*args, temperature_inf=temperature_inf, vocab_size=vocab_size,
                                   block_v=block_v)


def fused_distill_kl(h_teacher, w_teacher, h_student, w_student, direction: str = "forward", *,
                     vocab_size=None, impl="auto", block_v=None):
    """Per-token KL over the full vocabulary ``[N]``: ``forward`` is eq. 7, KL(p_teacher ||
    p_student); ``reverse`` is KL(p_student || p_teacher). Differentiable in the student's ``h`` and
    ``w`` only; the teacher (the policy) is stop-gradient. With ``impl="pallas"`` the forward pass
    is a Pallas kernel and the backward the chunked one."""
    impl, block_v = _resolve(impl, block_v)
    check_choice("direction", direction, DIRECTIONS)
    vocab_size = _validate.two_heads("teacher", h_teacher, w_teacher, "student", h_student, w_student,
                                     vocab_size)
    if impl == "reference":
        return reference.distill_kl(h_teacher, w_teacher, h_student, w_student, direction,
                                    vocab_size=vocab_size)
    pass_fn = _pallas_two_model_pass() if impl == "pallas" else None
    return chunked.distill_kl(h_teacher, w_teacher, h_student, w_student, direction,
                              vocab_size=vocab_size, block_v=block_v, pass_fn=pass_fn)


def fused_jackpot_stats(h_policy, w_policy, h_actor, w_actor, targets, k: int, lam, *,
                        temperature_actor=1.0, exact: bool = False, direction: str = "forward",
                        normalizers: bool = True, inf_topk=None, vocab_size=None, impl="auto",
                        block_v=None) -> JackpotStats:
    """All vocabulary statistics of one update step, as a :class:`JackpotStats`.

    The policy is p_new = softmax(h_policy @ w_policy); the actor is p_inf = softmax(h_actor @
    w_actor / temperature_actor), both as :func:`fused_token_stats`. ``z_topk``/``z_exact`` are
    :func:`fused_obrs_normalizer` with the actor as p_inf and the policy as target;
    ``distill_kl`` is :func:`fused_distill_kl` with the policy as teacher and the actor (at its
    temperature) as student; ``vk_logp_actor``/``vk_logp_new`` both models' log-probs on V_k, so
    that ``z_topk`` at a lam chosen afterwards is ``logspace.normalizer(vk_logp_actor, vk_logp_new,
    lam)``. Gradients: the policy's through ``logp_new`` and ``lse_new``; the actor's through
    ``logp_actor``, ``lse_actor`` and ``distill_kl``.

    Passes over the vocabulary (chunked): the first gives both lse, the target log-probs, the KL
    and both top-k sets (ranked by raw logits: the same tokens as by log-probs), so the top-k Z
    needs no other; ``exact`` takes a second one (Z_exact needs both lse inside its sum). With
    ``impl="pallas"`` the first forward pass (both lse, targets, KL) is a Pallas kernel; a second
    (normalizers and top-k lists) and the backward pass are chunked. ``normalizers=False``
    collects no top-k and computes no Z (``z_*``, ``topk_*`` and ``vk_*`` are None).

    ``inf_topk = (ids, logp)`` ``[N, K]``, ``K >= k``: p_inf's top-k ids and log-probs as the
    rollout stored them with each sampled token (Algorithm 1, phase 1), most likely first (as
    :func:`jax.lax.top_k` returns them; the first k are used). Then the one pass merges only the
    policy's running top-k and V_k, ``z_topk`` and ``topk_*_actor`` take p_inf's top-k from
    ``inf_topk`` (with p_new at those ids from the pass), not from the actor's logits: one
    ``lax.top_k`` per vocabulary block instead of two. Only with ``impl`` "reference", "chunked"
    or "auto", ``normalizers`` and not ``exact``.
    """
    impl, block_v = _resolve(impl, block_v)
    check_choice("direction", direction, DIRECTIONS)
    vocab_size = _validate.two_heads("policy", h_policy, w_policy, "actor", h_actor, w_actor, vocab_size)
    _validate.targets(targets, h_policy.shape[0])
    check_top_k(k, vocab_size)
    _validate.temperature("temperature_actor", temperature_actor)
    check_range("lam", lam, lambda v: v > 0, "> 0")
    if inf_topk is not None:
        _validate.inf_topk(inf_topk, h_policy.shape[0], k)
        if impl == "pallas" or exact or not normalizers:
            raise ValueError(f"inf_topk is not allowed with impl={impl!r}, exact={exact}, normalizers={normalizers}: "
                             "it replaces the actor's top-k of the chunked one pass, which needs impl 'chunked' "
                             "(or 'reference'), normalizers=True and exact=False.")
    args = (h_policy, w_policy, h_actor, w_actor, targets, k, lam)
    opts = dict(temperature_actor=temperature_actor, exact=exact, direction=direction, vocab_size=vocab_size,
                normalizers=normalizers, inf_topk=inf_topk)
    if impl == "reference":
        return reference.jackpot_stats(*args, **opts)
    pass_fn = _pallas_two_model_pass() if impl == "pallas" else None
    return chunked.jackpot_stats(*args, block_v=block_v, pass_fn=pass_fn, **opts)
