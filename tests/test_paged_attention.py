"""Decode attention over a paged KV cache: every implementation against a float64 NumPy reference,
JAX's Pallas TPU and GPU kernels interpreted on this CPU and lowered for TPU and CUDA, and the model's
decode step through each implementation against the contiguous cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jackpot_jax.models import KVCache, ModelConfig, PagedKVCache, Transformer
from pallas_kernels import paged_attention as pa

# B=4 sequences, H=4 query heads over K=2 key-value heads, head_dim 128 and pages of 16 (what the TPU
# kernel allows), W=4 pages each (64 positions) scattered over a pool of 20. Lengths: not a page
# multiple, 0, one page, and past the table (a finished slot that keeps decoding: clipped to 64).
B, H, K, D, P, W, NUM_PAGES = 4, 4, 2, 128, 16, 4, 20
LENGTHS = np.array([37, 0, 16, 70], np.int32)
# impl="pallas" is the TPU kernel here (interpreted) and on a TPU, the Triton kernel on a GPU, whose float32
# products may be TF32 and whose shapes differ (tested on their own below).
NOT_ON_GPU = pytest.mark.skipif(jax.default_backend() == "gpu", reason="impl='pallas' is the Triton kernel on GPU")


@pytest.fixture(scope="module")
def case():
    """(q, k_pool, v_pool, page_table) as float32 holding bfloat16 values (the TPU kernel rounds K and V
    to bfloat16: exact here), and the float64 reference output."""
    rng = np.random.default_rng(0)
    bf16 = lambda shape: np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16), np.float64)
    q, k_pool, v_pool = bf16((B, H, D)), bf16((K, NUM_PAGES, P, D)), bf16((K, NUM_PAGES, P, D))
    table = rng.permutation(np.arange(1, NUM_PAGES))[:B * W].reshape(B, W).astype(np.int32)
    return (q, k_pool, v_pool, table), numpy_reference(q, k_pool, v_pool, table, LENGTHS)


def numpy_reference(q, k_pool, v_pool, table, lengths):
    """softmax(q k / sqrt(d)) v over each sequence's first min(length, W * P) keys, in float64."""
    out = np.zeros(q.shape, np.float64)
    group = q.shape[1] // k_pool.shape[0]
    for b, length in enumerate(np.minimum(lengths, table.shape[1] * k_pool.shape[2])):
        for h in range(q.shape[1]):
            keys = k_pool[h // group, table[b]].reshape(-1, q.shape[2])[:length]
            values = v_pool[h // group, table[b]].reshape(-1, q.shape[2])[:length]
            if length:
                scores = keys @ q[b, h] / np.sqrt(q.shape[2])
                weights = np.exp(scores - scores.max())
                out[b, h] = weights @ values / weights.sum()
    return out


def run(impl, arrays, dtype=jnp.float32):
    q, k_pool, v_pool = (jnp.asarray(a, dtype) for a in arrays[:3])
    table = jnp.asarray(arrays[3])
    return jax.jit(lambda *args: pa.paged_attention(*args, impl=impl))(q, k_pool, v_pool, table, jnp.asarray(LENGTHS))


@pytest.mark.parametrize("impl", ["reference", "xla", "auto", pytest.param("pallas", marks=NOT_ON_GPU)])
def test_every_impl_equals_the_float64_reference(case, impl):
    arrays, want = case
    got = run(impl, arrays)
    assert got.shape == (B, H, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[1] == 0)  # length 0: zeros


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bfloat16_inputs_give_bfloat16_within_its_rounding(case, impl):
    arrays, want = case
    got = run(impl, arrays, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2)


def decode_shapes():
    """Abstract ``(q, k_pool, v_pool, page_table, lengths)`` of a Qwen3-1.7B decode step: 64 sequences,
    H=16, K=8, head_dim 128, tables of 64 pages of 16, bfloat16 pools."""
    b, width, pages = 64, 64, 64 * 64 + 1
    s = jax.ShapeDtypeStruct
    pool = s((8, pages, 16, 128), jnp.bfloat16)
    return s((b, 16, 128), jnp.bfloat16), pool, pool, s((b, width), jnp.int32), s((b,), jnp.int32)


def test_the_tpu_kernel_lowers_for_tpu_at_a_qwen3_1p7b_decode_shape():
    """H=16, K=8, head_dim 128, pages of 16, 64 sequences of up to 1,024 positions, bfloat16 pools:
    Pallas -> Mosaic from this CPU host (compiling and running need a TPU)."""
    lowered = jax.jit(pa.tpu_kernel).trace(*decode_shapes()).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
    assert pa.pages_per_block(64, 16) == 32  # 512 keys a block


def test_the_gpu_kernel_interpreted_equals_the_float64_reference_and_lowers_for_cuda(case):
    """JAX's Triton paged attention, simulated here at the case's shape (its W = 4 table padded to one
    block of 8 pages) and at W = 24 (3 splits of 8 pages), then lowered for CUDA at the Qwen3-1.7B decode
    shape of the TPU test (compiling and running need a GPU)."""
    arrays, want = case
    q, k_pool, v_pool = (jnp.asarray(a, jnp.float32) for a in arrays[:3])
    lengths = jnp.asarray(np.minimum(LENGTHS, W * P))  # what paged_attention passes
    got = pa.gpu_kernel(q, k_pool, v_pool, jnp.asarray(arrays[3]), lengths, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[1] == 0)
    assert pa.gpu_blocks(4, 16) == (8, 1, 8) and pa.gpu_blocks(24, 16) == (8, 3, 24)
    assert pa.gpu_blocks(1024, 16) == (8, 16, 1024) and pa.gpu_blocks(3, 4) == (32, 1, 32)
    rng = np.random.default_rng(2)
    pool = lambda: jnp.asarray(rng.standard_normal((K, 3 * 24 + 1, P, D)), jnp.float32)
    k_long, v_long = pool(), pool()
    table = rng.permutation(np.arange(1, 3 * 24 + 1)).reshape(3, 24).astype(np.int32)
    lengths = np.array([384, 200, 1], np.int32)
    got = pa.gpu_kernel(q[:3], k_long, v_long, jnp.asarray(table), jnp.asarray(lengths), interpret=True)
    want = numpy_reference(np.asarray(q[:3], np.float64), np.asarray(k_long, np.float64),
                           np.asarray(v_long, np.float64), table, lengths)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    lowered = jax.jit(pa.gpu_kernel).trace(*decode_shapes()).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_pages_per_block_divides_the_table():
    assert [pa.pages_per_block(w, p) for w, p in ((64, 16), (63, 16), (7, 128), (1, 1024))] == [32, 21, 1, 1]


def test_the_gpu_kernel_rejects_what_triton_does_not_allow():
    pool = jnp.zeros((2, 5, 16, 48))
    assert pa.gpu_unsupported(jnp.zeros((2, 4, 48)), pool) == ("the Pallas GPU kernel needs head_dim a power of two "
                                                                ">= 16, got 48")
    assert "page_size a power of two, got 12" in pa.gpu_unsupported(jnp.zeros((2, 4, 64)), jnp.zeros((2, 5, 12, 64)))
    assert pa.gpu_unsupported(jnp.zeros((2, 4, 64)), jnp.zeros((2, 5, 8, 64))) is None


@NOT_ON_GPU
def test_pallas_rejects_shapes_the_kernel_does_not_allow_and_auto_falls_back():
    q, table, lengths = jnp.zeros((2, 4, 64)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    pool = jnp.zeros((2, 5, 16, 64))
    with pytest.raises(ValueError, match="needs head_dim a multiple of 128, got 64; use impl 'xla' or 'auto'"):
        pa.paged_attention(q, pool, pool, table, lengths, impl="pallas")
    q, pool = jnp.zeros((2, 4, 128)), jnp.zeros((2, 5, 8, 128))
    with pytest.raises(ValueError, match="needs page_size a multiple of 16, got 8"):
        pa.paged_attention(q, pool, pool, table, lengths, impl="pallas")
    with pytest.raises(ValueError, match="impl='flash' is not allowed: impl must be one of"):
        pa.paged_attention(q, pool, pool, table, lengths, impl="flash")
    with pytest.raises(ValueError, match="H must be a multiple of K"):
        pa.paged_attention(jnp.zeros((2, 3, 128)), pool, pool, table, lengths)
    with pytest.raises(ValueError, match=r"ModelConfig.paged_attention_impl='flash' is not allowed: .* one of \("):
        ModelConfig(64, 64, 64, 1, 4, 2, paged_attention_impl="flash")


@NOT_ON_GPU
def test_the_model_decodes_through_xla_and_pallas_as_through_the_contiguous_cache():
    """Prefill (gathered pages) then one decode step (paged_attention) of a one-layer model with
    head_dim 128, bfloat16 caches (the TPU kernel's K / V exactly), scattered pages, lengths 5, 16
    (the step opens a page) and 9: the hidden states of the contiguous cache's."""
    config = ModelConfig(64, 64, 64, 1, 4, 2, head_dim=128)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (3, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None] < np.array([5, 16, 9])[:, None], jnp.int32)
    step = jnp.asarray(rng.integers(0, 64, (3, 1)), jnp.int32)

    @nnx.jit
    def decode(model, cache):
        _, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache)
        return model.hidden_states(step, cache=cache)[0]

    contiguous = Transformer(config, rngs=nnx.Rngs(0))
    want = decode(contiguous, KVCache.init(config, 3, 32, jnp.bfloat16))
    table = jnp.asarray([[5, 2], [7, 1], [3, 6]], jnp.int32)
    for impl in ("xla", "pallas"):
        model = Transformer(config.replace(paged_attention_impl=impl), rngs=nnx.Rngs(0))
        cache = PagedKVCache.init(model.config, 8, 16, 3, jnp.bfloat16)._replace(page_table=table)
        np.testing.assert_allclose(np.asarray(decode(model, cache)), np.asarray(want), rtol=1e-5, atol=1e-5,
                                   err_msg=impl)
