"""The sort-free top-k / top-p thresholds of ``processed_log_probs`` against the sorted reference and a float64
NumPy version of the definition: the same kept sets (ties included) and the same log-probs."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
import jax
import jax.numpy as jnp

from jackpot_jax.rollout import SamplingParams, processed_log_probs, processed_log_probs_reference, sample
from jackpot_jax.rollout import sampling
from jackpot_jax.rollout.sampling import BRACKET, TOP_K_CANDIDATES, argmax, block_maxima, inverse_cdf, top_k

fast = jax.jit(processed_log_probs)
reference = jax.jit(processed_log_probs_reference)
MARGIN = 1e-5  # rows whose masses come this close to top_p are the float rounding knife edge


def params(temperature, top_p, top_k):
    return SamplingParams(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                          jnp.asarray(top_k, jnp.int32))


def definition(logits, temperature, top_p, top_k):
    """log p_inf per row in float64 from the float32 scaled logits, and the distance of the masses that decide
    top-p from top_p (the knife edge where float32 sums in another order may decide otherwise)."""
    out, margins = np.full(logits.shape, -np.inf), np.full(len(logits), np.inf)
    for i, row in enumerate(np.asarray(logits, np.float32)):
        if temperature[i] <= 0:
            out[i, np.argmax(row)] = 0.0
            continue
        scaled = (row / np.float32(temperature[i])).astype(np.float64)
        if 0 < top_k[i] < len(row):
            scaled = np.where(scaled >= np.sort(scaled)[::-1][top_k[i] - 1], scaled, -np.inf)
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        if top_p[i] < 1:
            values = np.unique(scaled[np.isfinite(scaled)])
            before = np.array([p[scaled > v].sum() for v in values[:-1]])  # mass strictly more likely (the top's: 0)
            margins[i] = np.abs(before - top_p[i]).min(initial=np.inf)
            scaled = np.where(np.array([p[scaled > v].sum() for v in scaled]) < top_p[i], scaled, -np.inf)
        out[i] = scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
    return out, margins


def assert_same(logits, temperature, top_p, top_k, *, truth=True, fn=fast):
    p = params(temperature, top_p, top_k)
    got, want = np.asarray(fn(logits, p)), np.asarray(reference(logits, p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got, want)  # the same kept set gives the same log-probs bit for bit
    if truth:
        exact, margins = definition(logits, temperature, top_p, top_k)
        assert margins.min() > MARGIN, "the test rows must stay off the rounding knife edge"
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(exact))
        np.testing.assert_allclose(np.where(np.isfinite(exact), got, 0), np.where(np.isfinite(exact), exact, 0),
                                   atol=1e-5)
    return got


@pytest.mark.parametrize("vocab,scale", [(1000, 0.3), (1000, 3.0), (32768, 1.0)])
def test_mixed_rows_equal_the_reference_and_the_definition(rng, vocab, scale):
    rows = 32
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * scale, jnp.float32)
    temperature = np.where(np.arange(rows) % 7 == 6, 0.0, rng.choice([0.5, 1.0, 1.7], rows))
    top_p = np.array([1.0, 0.9, 0.5, 1e-3])[np.arange(rows) % 4]  # every top_p with every top_k
    top_k = np.array([0, 1, 5, TOP_K_CANDIDATES + 36, vocab, vocab + 7])[np.arange(rows) // 4 % 6]
    got = assert_same(logits, temperature, top_p, top_k, truth=vocab <= 1000)
    nucleus = np.isfinite(got).sum(-1)[(temperature > 0) & (top_p == 0.9) & (top_k == 0)]
    assert nucleus.size and (nucleus < vocab).all()  # the nucleus really truncates


def test_block_wise_extraction_and_the_listed_fast_path(rng):
    """Traced with a bracket of 4 tokens and 8 listed tokens, V = 2,000 (40 blocks of 50) takes every path of
    the search: the exact answer from the listed tokens, brackets listed from the blocks whose sums differ,
    blocks whose large sums could hide a token in rounding, and the whole-row listing when those are too many."""
    rows, vocab = 32, 2000
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "BRACKET", 4)
        patch.setattr(sampling, "TOP_K_CANDIDATES", 8)
        narrow = jax.jit(processed_log_probs)
        narrow.lower(jnp.zeros((rows, vocab)), params(*np.zeros((3, rows)))).compile()  # traced while patched
        narrow(jnp.zeros((rows, vocab)), params(*np.zeros((3, rows))))
    logits = rng.standard_normal((rows, vocab)) * rng.choice([0.3, 1.0, 3.0], (rows, 1))
    logits[8:12] = np.round(logits[8:12], 0)  # ties everywhere
    logits[12:16] = -13.0 + 0.5 * rng.standard_normal((4, vocab))  # tokens the block sums could hide ...
    logits[12:16, ::50] = 0.0  # ... beside 40 large ones, one per block: the whole-row listing
    logits = jnp.asarray(logits, jnp.float32)
    temperature = np.where(np.arange(rows) % 9 == 8, 0.0, 1.0)
    top_p = np.array([0.9, 0.5, 0.99, 1e-3])[np.arange(rows) % 4]
    top_p[12:16] = 1 - 5e-5  # the threshold among the small ones
    top_k = np.array([0, 0, 3, 0, 500, 20, 0, 0])[np.arange(rows) // 4 % 8]
    # against the sorted reference (at V = 2,000 many masses lie within 1e-5 of top_p for the float64 check)
    rest = np.r_[0:12, 16:rows]
    got = assert_same(logits[rest], temperature[rest], top_p[rest], top_k[rest], truth=False,
                      fn=lambda x, p: narrow(logits, params(temperature, top_p, top_k))[rest])
    assert (np.isfinite(got[:8]).sum(-1) < vocab).all()
    # a small token's share of the mass is ~4 float32 roundings of the sums: the kept sets may differ from the
    # reference only in tokens whose float64 mass before them is that close to top_p
    deep = slice(12, 16)
    ours = np.isfinite(np.asarray(narrow(logits, params(temperature, top_p, top_k))[deep]))
    theirs = np.isfinite(np.asarray(reference(logits[deep], params(temperature[deep], top_p[deep], top_k[deep]))))
    x = np.asarray(logits[deep], np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    before = np.array([[row_p[row > v].sum() for v in row] for row, row_p in zip(x, p)])
    assert (ours.sum(-1) > 40).all() and (np.abs(before - top_p[deep, None])[ours != theirs] < 1e-6).all()


def test_ties_at_the_top_k_boundary_are_kept():
    logits = np.tile(np.linspace(-3, 0, 400, dtype=np.float32), (4, 1))
    logits[:, 390:] = 5.0  # 10 tied maxima
    logits[:, 100:380:2] = 1.0  # 140 tied values right below
    top_k = [3, 10, 11, TOP_K_CANDIDATES + 20]  # inside the maxima, at their edge, inside the tied 1.0s (twice)
    got = assert_same(jnp.asarray(logits), [1.0] * 4, [1.0] * 4, top_k)
    np.testing.assert_array_equal(np.isfinite(got).sum(-1), [10, 10, 150, 150])


def test_ties_at_the_top_p_boundary_are_kept():
    """Four equal maxima with top_p = 0.3 keep all four; tie groups larger than the search's bracket sit on the
    boundary; exactly representable masses (equal logits, the rest -inf) sit on it exactly."""
    logits = np.tile(np.linspace(-4, -2, 1000, dtype=np.float32), (4, 1))
    logits[0, :4] = 0.0
    logits[1, :4] = 0.0
    logits[2:, 100:100 + 3 * BRACKET] = -1.0  # its mass before: that of the single 0.0 in rows 2 and 3
    logits[2:, 0] = 0.0
    top_p = [0.3, 1e-6, 0.6, 0.99]
    got = assert_same(jnp.asarray(logits), [1.0] * 4, top_p, [0] * 4)
    kept = np.isfinite(got).sum(-1)
    assert kept[0] >= 4 and kept[1] == 4 and kept[2] == 1 + 3 * BRACKET and kept[3] > 1 + 3 * BRACKET
    exact = np.full((3, 8), -np.inf, np.float32)
    exact[:, :4] = 0.0  # p = 1/4 each
    got = assert_same(jnp.asarray(exact), [1.0] * 3, [0.25, 0.5, 1e-6], [0] * 3, truth=False)
    np.testing.assert_array_equal(np.isfinite(got).sum(-1), [4, 4, 4])


def test_greedy_rows_are_the_point_mass_on_the_argmax(rng):
    logits = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
    got = assert_same(logits, [0.0] * 3, [1.0, 0.5, 0.9], [0, 0, 7])
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(np.asarray(logits), -1))
    np.testing.assert_array_equal(np.isfinite(got).sum(-1), [1, 1, 1])


def test_sample_draws_what_the_reference_distribution_gives(rng):
    """Same keys, same kept set: the same tokens as sampling from the reference log-probs, and their
    log-probs and top-k (the normalizer summed in another order: within float32 rounding)."""
    logits = jnp.asarray(rng.standard_normal((16, 500)) * 2, jnp.float32)
    p = params([1.0] * 16, [0.9] * 8 + [1.0] * 8, [0] * 4 + [20] * 4 + [0] * 4 + [20] * 4)
    keys = jax.random.split(jax.random.key(3), 16)
    drawn = sample(keys, logits, p, logprobs_top_k=5)
    logp = reference(logits, p)
    cdf = np.cumsum(np.exp(np.asarray(logp, np.float64)), -1)
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys), np.float64)
    np.testing.assert_array_equal(drawn.tokens, np.minimum(np.sum(cdf < (u * cdf[:, -1])[:, None], -1), 499))
    np.testing.assert_allclose(drawn.logprobs, np.asarray(logp)[np.arange(16), drawn.tokens], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(drawn.topk_ids, jax.lax.top_k(logp, 5)[1])
    np.testing.assert_allclose(drawn.topk_logprobs, jax.lax.top_k(logp, 5)[0], rtol=1e-6, atol=1e-6)


def test_two_level_top_k_and_inverse_cdf_equal_the_one_level_definitions(rng):
    """top_k is lax.top_k (values and ids; rounded rows full of ties, rows mostly -inf, V not a
    multiple of the blocks); inverse_cdf is the float64 inverse CDF, and never draws a token of
    probability 0, even at u -> 1."""
    v, k = 2003, 5  # 32 blocks of TOP_BLOCK: the two-level path
    x = np.round(rng.standard_normal((6, v)) * 2, 1).astype(np.float32)
    x[4, 7:] = -np.inf  # 7 tokens left, fewer than one block
    x[5, :] = -np.inf
    x[5, [3, 1900, 2002]] = 0.5
    values, ids = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)
    want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(ids, want_ids)
    p = np.exp(x - x.max(-1, keepdims=True))
    u = np.asarray(list(rng.uniform(size=4)) + [1 - 2.0 ** -24, 1 - 2.0 ** -24], np.float32)
    drawn, total = jax.jit(inverse_cdf)(jnp.asarray(p), jnp.asarray(u))
    drawn = np.asarray(drawn)
    cdf = np.cumsum(p.astype(np.float64), -1)
    np.testing.assert_array_equal(drawn[:4], np.sum(cdf[:4] < (u[:4] * cdf[:4, -1])[:, None], -1))
    assert p[np.arange(6), drawn].min() > 0 and drawn[5] == 2002
    np.testing.assert_allclose(total, cdf[:, -1], rtol=1e-6)
    given = jax.jit(lambda x: top_k(x, k, block_maxima(x)))(jnp.asarray(x))  # the maxima passed in
    np.testing.assert_array_equal(given[1], want_ids)
    x[1, [5, 900]] = np.nan  # argmax: the first maximum, the first NaN as numpy's
    np.testing.assert_array_equal(jax.jit(argmax)(jnp.asarray(x)), np.argmax(x, -1))


@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.05, 8.0), decimals=st.sampled_from([None, 0, 1]),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]), top_p=st.floats(1e-4, 1.0),
       top_k=st.sampled_from([0, 1, 2, 9, 63, 64, 65, 90, 127, 128, 200]))
def test_property_equals_the_definition(seed, scale, decimals, temperature, top_p, top_k):
    """Random rows (rounded ones are full of ties), one setting for all of them."""
    logits = np.random.default_rng(seed).standard_normal((4, 128)) * scale
    if decimals is not None:
        logits = np.round(logits, decimals)
    logits = jnp.asarray(logits, jnp.float32)
    args = [temperature] * 4, [top_p] * 4, [top_k] * 4
    assume(definition(logits, *args)[1].min() > MARGIN)
    assert_same(logits, *args)
