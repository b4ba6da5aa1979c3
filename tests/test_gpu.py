"""The Pallas GPU kernels compiled by Triton on a real GPU, against the reference.

On the CPU the kernels only run interpreted (``tests/test_kernels.py``); this file runs them as
``impl="pallas"`` through the public ops on a CUDA device and compares with
:mod:`pallas_kernels.reference` evaluated in float64 on the CPU (token stats, normalizers), or with the
chunked path at full float32 precision on the GPU (the step statistics and their gradients; the
chunked path's own float64 agreement is checked beside). Every test is skipped where
``jax.default_backend()`` is not ``"gpu"`` (so in CI); on a GPU machine:

    python -m pytest -m gpu tests/test_gpu.py

Tolerances: XLA and Triton may run float32 products with TF32 inputs (10-bit mantissa), so the
log-probabilities of logits of size ~10 are compared at 2e-2 absolute and the normalizers and KL
at 2e-2 relative; padded columns and unwritten outputs would be off by far more.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels as pk

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Triton kernels)")]

# (N, D, V, vocab_size, k): a padded tail, a vocabulary that no block divides, a realistic head.
SHAPES = [(37, 64, 1000, 997, 5), (256, 256, 5003, 5003, 20), (512, 1024, 32768, 32700, 20)]
ATOL = 2e-2


def _problem(seed, n, d, v, scale=3.0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * scale / np.sqrt(d)).astype(np.float32)
    return h, w, rng


def _reference(fn, *args, **kwargs):
    """``fn`` with ``impl="reference"`` in float64 on the CPU: the truth for the GPU kernels."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        args = [jnp.asarray(a, jnp.float64 if a.dtype == np.float32 else a.dtype) if isinstance(a, np.ndarray) else a
                for a in args]
        out = fn(*args, impl="reference", **kwargs)
        return jax.tree.map(np.asarray, out)


def _close_topk(got_logp, got_ids, want_logp, want_ids):
    """Top-k lists equal up to TF32 rounding: ``want_*`` hold k + 1 entries (the (k+1)-th shows
    whether the k-th was a near-tie at the list's boundary); ids must agree wherever the reference's
    neighbours are further apart than the tolerance."""
    k = got_ids.shape[1]
    np.testing.assert_allclose(got_logp, want_logp[:, :k], atol=ATOL)
    gaps = np.abs(np.diff(want_logp, axis=-1))  # [N, k]: entry j to entry j + 1
    clear = gaps > 2 * ATOL
    clear[:, 1:] &= gaps[:, :-1] > 2 * ATOL
    np.testing.assert_array_equal(np.asarray(got_ids)[clear], np.asarray(want_ids)[:, :k][clear])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_triton_matches_float64_reference(shape, temperature):
    n, d, v, vocab_size, k = shape
    h, w, rng = _problem(0, n, d, v)
    targets = rng.integers(0, vocab_size, n).astype(np.int32)
    got = jax.jit(lambda h, w, t: pk.fused_token_stats(h, w, t, k, temperature=temperature, vocab_size=vocab_size,
                                                       impl="pallas"))(h, w, targets)
    want = _reference(pk.fused_token_stats, h, w, targets, k + 1, temperature=temperature, vocab_size=vocab_size)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], atol=ATOL)
    _close_topk(got[2], got[3], want[2], want[3])
    assert np.all(np.asarray(got[3]) < vocab_size)


@pytest.mark.parametrize("shape", SHAPES)
def test_obrs_normalizer_triton_matches_float64_reference(shape):
    n, d, v, vocab_size, k = shape
    h_inf, w_inf, rng = _problem(1, n, d, v)
    h_tgt = h_inf + 0.3 * rng.normal(size=h_inf.shape).astype(np.float32)
    w_tgt = w_inf + 0.3 * rng.normal(size=w_inf.shape).astype(np.float32) / np.sqrt(d)
    targets = rng.integers(0, vocab_size, n).astype(np.int32)
    lse = jax.jit(lambda h, w: pk.fused_token_stats(h, w, targets, 1, vocab_size=vocab_size, impl="reference")[1])
    lse_inf, lse_tgt = np.asarray(lse(h_inf, w_inf)), np.asarray(lse(h_tgt, w_tgt))  # the same for both paths
    args = (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, 0.5, k, True)
    got = jax.jit(lambda *a: pk.fused_obrs_normalizer(*a, 0.5, k, True, vocab_size=vocab_size, impl="pallas"))(
        *args[:6])
    want = _reference(pk.fused_obrs_normalizer, *args, vocab_size=vocab_size)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-2, err_msg="z_exact")
    # z_topk jumps where rounding moves a near-tie across a top-k boundary (see the jackpot test)
    close = np.isclose(got[0], want[0], rtol=2e-2)
    assert close.mean() > 0.98, close.mean()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_jackpot_stats_triton_forward_and_gradients_match_reference(shape, direction):
    n, d, v, vocab_size, k = shape
    h_pol, w_pol, rng = _problem(2, n, d, v)
    h_act, w_act, _ = _problem(3, n, d, v, scale=2.0)
    targets = rng.integers(0, vocab_size, n).astype(np.int32)
    g = rng.normal(size=(4, n)).astype(np.float32)
    opts = dict(temperature_actor=0.8, exact=True, direction=direction, vocab_size=vocab_size)

    def objective(impl):
        def f(h_pol, w_pol, h_act, w_act):
            s = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, 0.5, impl=impl, **opts)
            loss = jnp.sum(g[0] * s.logp_new + g[1] * s.lse_new + g[2] * s.logp_actor + g[3] * s.distill_kl)
            return loss, s
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, got), got_grads = objective("pallas")(h_pol, w_pol, h_act, w_act)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = objective("chunked")(h_pol, w_pol, h_act, w_act)
    for name in ("logp_new", "lse_new", "logp_actor", "lse_actor"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=ATOL, err_msg=name)
    for name in ("distill_kl", "z_exact"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-2, atol=1e-3, err_msg=name)
    # z_topk jumps where rounding moves a near-tie across a top-k boundary: compare where both
    # paths picked the same top-k sets (nearly every token)
    same = np.ones(n, bool)
    for name in ("topk_ids_new", "topk_ids_actor"):
        same &= np.all(np.sort(getattr(got, name), -1) == np.sort(getattr(want, name), -1), axis=-1)
    assert same.mean() > 0.95, same.mean()
    np.testing.assert_allclose(got.z_topk[same], want.z_topk[same], rtol=2e-2, atol=1e-3, err_msg="z_topk")
    for got_g, want_g in zip(got_grads, want_grads):
        scale = float(np.max(np.abs(want_g)))
        np.testing.assert_allclose(got_g, want_g, atol=2e-2 * scale)
    # the chunked path itself, at full float32 precision, against the float64 reference
    want64 = _reference(pk.fused_jackpot_stats, h_pol, w_pol, h_act, w_act, targets, k, 0.5, **opts)
    np.testing.assert_allclose(want.distill_kl, want64.distill_kl, rtol=1e-3, atol=1e-5)


def test_paged_attention_triton_matches_the_reference_at_a_qwen3_1p7b_decode_shape():
    """JAX's Triton paged attention (``impl="pallas"``, what ``"auto"`` picks for bfloat16 pools) of 64
    sequences of mixed lengths (0 to the table's 1,024 positions) over scattered pages, H=16, K=8,
    head_dim 128, against the float32 reference on the same bfloat16 values."""
    from pallas_kernels import paged_attention as pa  # noqa: PLC0415

    b, width, page_size = 64, 64, 16
    rng = np.random.default_rng(0)
    pool = lambda: jnp.asarray(rng.standard_normal((8, b * width + 1, page_size, 128)), jnp.bfloat16)
    q, k_pool, v_pool = jnp.asarray(rng.standard_normal((b, 16, 128)), jnp.bfloat16), pool(), pool()
    table = jnp.asarray(rng.permutation(np.arange(1, b * width + 1)).reshape(b, width), jnp.int32)
    lengths = jnp.asarray(np.r_[0, 1, 1024, rng.integers(1, 1025, b - 3)], jnp.int32)
    run = jax.jit(pa.paged_attention, static_argnames="impl")
    got = np.asarray(run(q, k_pool, v_pool, table, lengths, impl="pallas"), np.float32)
    want = np.asarray(run(q, k_pool, v_pool, table, lengths, impl="reference"), np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert np.all(got[0] == 0)
    np.testing.assert_array_equal(np.asarray(run(q, k_pool, v_pool, table, lengths, impl="auto")), got)


def test_flash_attention_triton_matches_the_blockwise_path_in_values_and_gradients():
    """JAX's Triton flash attention (``impl="pallas"``, what ``"auto"`` picks beyond 256 tokens) on packed,
    padded rows of T = 700 (padded to 768), GQA 16 / 8 heads of 128, bfloat16: values and gradients of the
    blockwise XLA path at full float32 precision."""
    from pallas_kernels import attention as at  # noqa: PLC0415

    rng = np.random.default_rng(0)
    seg = np.ones((2, 700), np.int32)
    seg[0, 300:], seg[1, 650:] = 2, 0
    mask = at.Mask.causal(jnp.asarray(seg))
    real = np.asarray(seg != 0)
    q = jnp.asarray(rng.standard_normal((2, 700, 16, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, 8, 700, 128)), jnp.bfloat16) for _ in range(2))
    cot = jnp.asarray(rng.standard_normal((2, 700, 16, 128)) * real[:, :, None, None], jnp.bfloat16)

    def run(impl):
        out, vjp = jax.vjp(lambda q, k, v: at.attention(q, k, v, mask, impl=impl), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(cot))]

    got = run("pallas")
    with jax.default_matmul_precision("highest"):
        want = run("blockwise")
    np.testing.assert_allclose(got[0][real], want[0][real], atol=2e-2)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, atol=5e-2 * float(np.max(np.abs(w))))
