"""Attention for training and prefill: the blockwise path against the dense definition evaluated in
float64 (values from NumPy loops, gradients by ``jax.grad`` of the dense reference in 64-bit mode), in
float32 and bfloat16, for packed segments with padding, cache prefill and one-token queries; tiles
skipped where no query sees a key; its compiled memory against the dense one's; the model through it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jackpot_jax.models import ModelConfig, Transformer
from pallas_kernels import attention as at

H, K, D = 4, 2, 16  # grouped-query: 2 query heads per key-value head


def numpy_attention(q, k, v, visible):
    """softmax over each query's visible keys, float64 loops; rows with none are left at 0."""
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, d))
    for r in range(b):
        for i in range(t):
            keys = np.flatnonzero(visible[r, i])
            for head in range(h):
                kv = head // (h // k.shape[1])
                scores = k[r, kv, keys] @ q[r, i, head] / np.sqrt(d)
                if keys.size:
                    w = np.exp(scores - scores.max())
                    out[r, i, head] = w @ v[r, kv, keys] / w.sum()
    return out


def packed():
    """Two rows of T = 37 (not a multiple of the 8-query or 16-key tiles): row 0 leading padding then
    two packed segments, row 1 one segment then trailing padding."""
    seg = np.ones((2, 37), np.int32)
    seg[0, :3], seg[0, 20:], seg[1, 30:] = 0, 2, 0
    return at.Mask.causal(jnp.asarray(seg)), 37


def over_cache(t):
    """``t`` new tokens written after 9 and 30 filled positions of a 40-position cache (row 0's
    chunk right-padded: only 3 of its tokens are real)."""
    lengths, real = np.array([9, 30]), np.array([min(t, 3), t])
    write = lengths[:, None] + np.arange(t)[None]
    return at.Mask.over_cache(jnp.asarray(write, jnp.int32), jnp.asarray(lengths + real), 40), 40


@pytest.mark.parametrize("case", ["packed", "prefill over a cache", "one token over a cache"])
def test_blockwise_equals_the_float64_definition_in_values_and_gradients(case):
    mask, s = {"packed": packed, "prefill over a cache": lambda: over_cache(5),
               "one token over a cache": lambda: over_cache(1)}[case]()
    t = mask.q_positions.shape[1]
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, t, H, D)), rng.standard_normal((2, K, s, D)), rng.standard_normal((2, K, s, D))
    visible = np.asarray(mask.dense())
    real = visible.any(-1)  # queries that see a key (the rest are padding)
    cot = rng.standard_normal((2, t, H, D)) * real[:, :, None, None]
    want = numpy_attention(q, k, v, visible)
    with jax.enable_x64(True):
        want_grads = jax.grad(lambda *a: jnp.sum(at.reference(*a, jnp.asarray(visible)) * cot), (0, 1, 2))(q, k, v)

    def run(dtype):
        f = lambda q, k, v: at.attention(q, k, v, mask, impl="blockwise", block_q=8, block_k=16)
        args = [jnp.asarray(x, dtype) for x in (q, k, v)]
        out, vjp = jax.vjp(f, *args)
        return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in vjp(jnp.asarray(cot, dtype))]

    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        out, grads = run(dtype)
        np.testing.assert_allclose(out[real], want[real], atol=tol, rtol=tol, err_msg=str(dtype))
        assert np.all(out[~real] == 0)
        for name, got, ref in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(got, np.asarray(ref), atol=tol * 4, rtol=tol, err_msg=f"d{name} {dtype}")


def test_tiles_no_query_sees_are_skipped_and_auto_keeps_dense_scores_for_short_sequences():
    mask = at.Mask.causal(jnp.ones((1, 64), jnp.int32))
    live = np.asarray(at.live_tiles(*mask.arrays(), 16, 16))
    np.testing.assert_array_equal(live, np.tril(np.ones((4, 4), bool)))  # causal: 10 of 16 tiles
    seg = jnp.asarray([[0] * 32 + [1] * 32])  # the first 32 queries are padding: their tiles are skipped too
    assert np.asarray(at.live_tiles(*at.Mask.causal(seg).arrays(), 16, 16)).sum() == 3
    with pytest.raises(ValueError, match="impl='flash' is not allowed: impl must be one of"):
        at.attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 1, 4, 8)), jnp.zeros((1, 1, 4, 8)),
                     at.Mask.causal(jnp.ones((1, 4), jnp.int32)), impl="flash")
    with pytest.raises(ValueError, match=r"mask shapes .* are not allowed: they must be \(\(1, 4\), \(1, 5\)"):
        at.attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 1, 5, 8)), jnp.zeros((1, 1, 5, 8)),
                     at.Mask.causal(jnp.ones((1, 4), jnp.int32)))
    with pytest.raises(ValueError, match=r"ModelConfig.attention_impl='dense' is not allowed: .* one of \("):
        ModelConfig(64, 64, 64, 1, 4, 2, attention_impl="dense")


def test_blockwise_memory_is_linear_in_t_where_the_dense_is_quadratic():
    """XLA's memory analysis of forward + backward (nothing runs): at T = 1,024 and 2,048 with 128-position
    tiles the blockwise scratch is a small fraction of the dense one, and doubles (not quadruples) with T."""
    def scratch(impl, t):
        mask = at.Mask.causal(jnp.ones((1, t), jnp.int32))
        loss = lambda q, k, v: jnp.sum(at.attention(q, k, v, mask, impl=impl, block_q=128, block_k=128))
        s = jax.ShapeDtypeStruct
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).trace(
            s((1, t, H, D), jnp.float32), s((1, K, t, D), jnp.float32), s((1, K, t, D), jnp.float32)).lower().compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense, tiled = [scratch("reference", t) for t in (1024, 2048)], [scratch("blockwise", t) for t in (1024, 2048)]
    assert tiled[0] < 0.1 * dense[0] and tiled[1] < 0.05 * dense[1], (tiled, dense)
    assert tiled[1] < 2.5 * tiled[0] and dense[1] > 3.5 * dense[0], (tiled, dense)


def test_the_model_through_blockwise_attention_equals_the_dense_one():
    """A one-layer model (head_dim 8, GQA) on packed, padded rows: logits and parameter gradients of
    ``attention_impl="blockwise"`` (8-position tiles, patched) equal the dense path's; prefill over a
    cache too."""
    config = ModelConfig(64, 32, 64, 1, 4, 2)
    seg = jnp.asarray([[1] * 10 + [2] * 9 + [0] * 2, [0] * 4 + [1] * 17], jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 21)), jnp.int32)
    real = np.asarray(seg != 0)

    def run(impl):
        model = Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(m(tokens, segment_ids=seg)), 0))
        logits = model(tokens, segment_ids=seg)
        grads = nnx.grad(loss)(model)
        cache = model.init_cache(2, 32)
        h, _ = model.hidden_states(tokens, attention_mask=jnp.asarray(real, jnp.int32), cache=cache)
        return np.asarray(logits), jax.tree.leaves(nnx.state(grads)), np.asarray(h)

    original = at.BLOCK
    at.BLOCK = 8
    try:
        tiled = run("blockwise")
    finally:
        at.BLOCK = original
    dense = run("reference")
    np.testing.assert_allclose(tiled[0][real], dense[0][real], atol=1e-5, rtol=1e-5)
    for got, want in zip(tiled[1], dense[1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(tiled[2][real], dense[2][real], atol=1e-5, rtol=1e-5)


def test_the_pallas_flash_kernels_interpreted_equal_blockwise_and_lower_for_tpu_and_cuda():
    """JAX's Pallas TPU and Triton flash attention simulated on this CPU on packed, padded rows of T = 150
    (padded to 256: two of their 128-position tiles) with GQA: values and gradients of the blockwise
    path's; then forward + backward lowered for TPU and CUDA at a Qwen3-8B attention shape (T = 2,048)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    seg = np.ones((1, 150), np.int32)
    seg[0, :3], seg[0, 60:] = 0, 2
    mask = at.Mask.causal(jnp.asarray(seg))
    real = np.asarray(mask.dense()).any(-1)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, 150, 2, 16), (1, 1, 150, 16),
                                                                                 (1, 1, 150, 16)))
    cot = jnp.asarray(rng.standard_normal((1, 150, 2, 16)) * real[:, :, None, None], jnp.float32)
    run = lambda f: jax.vjp(f, q, k, v)[0:2]
    want, want_vjp = run(lambda q, k, v: at.attention(q, k, v, mask, impl="blockwise"))
    want_grads = want_vjp(cot)
    with pltpu.force_tpu_interpret_mode():
        tpu, tpu_vjp = run(lambda q, k, v: at.tpu_flash(q, k, v, mask))
        tpu_grads = tpu_vjp(cot)
    gpu, gpu_vjp = run(lambda q, k, v: at.gpu_flash(q, k, v, mask, interpret=True))
    for name, out, grads in (("tpu", tpu, tpu_grads), ("gpu", gpu, gpu_vjp(cot))):
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5, err_msg=name)
        for got, ref in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, err_msg=name)

    s = jax.ShapeDtypeStruct
    kv = s((1, 8, 2048, 128), jnp.bfloat16)
    shapes = (s((1, 2048, 32, 128), jnp.bfloat16), kv, kv, s((1, 2048), jnp.int32))
    for kernel, platform, marker in ((at.tpu_flash, "tpu", "tpu_custom_call"), (at.gpu_flash, "cuda", "triton")):
        loss = lambda q, k, v, seg: jnp.sum(kernel(q, k, v, at.Mask.causal(seg)).astype(jnp.float32))
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
        assert text.count(marker) >= 2, platform  # the forward and the backward kernels
    with pytest.raises(ValueError, match="take self-attention .Mask.causal., not queries over a cache"):
        at.attention(q[:, :5], k, v, at.Mask.over_cache(jnp.zeros((1, 5), jnp.int32), jnp.full((1,), 5), 150),
                     impl="pallas")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="impl='pallas' is not allowed on cpu"):
            at.attention(q, k, v, mask, impl="pallas")


def test_blockwise_attention_on_an_fsdp_x_tensor_mesh_equals_the_one_device_dense_model():
    """tiny-qwen3 sharded over (data, fsdp, tensor) = (2, 2, 2) of the 8 fake devices, blockwise attention
    in 4-position tiles (patched) over padded rows: the logits and the gradients of the one-device dense model."""
    from jackpot_jax.models import preset, sharding  # noqa: PLC0415

    config = preset("tiny-qwen3", attention_impl="blockwise")
    m = sharding.make_mesh(2, 2, 2)
    model = sharding.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), m)
    dense = Transformer(config.replace(attention_impl="reference"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (4, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None, :] < np.array([11, 6, 3, 9])[:, None], jnp.int32)
    loss = lambda m: jnp.sum(jnp.where(mask[..., None] != 0, m(tokens, attention_mask=mask), 0.0) ** 2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def sharded(state):
        with sharding.activation_sharding(m):
            model = nnx.merge(graphdef, state)
            return model(tokens, attention_mask=mask), nnx.state(nnx.grad(loss)(model))

    original = at.BLOCK
    at.BLOCK = 4
    try:
        logits, grads = sharded(state)
    finally:
        at.BLOCK = original
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(dense(tokens, attention_mask=mask))[real],
                               atol=2e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(nnx.state(nnx.grad(loss)(dense)))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-4)
