"""jackpot_jax.obrs against float64 NumPy references written from the equations (tests/reference.py).

Our functions run in float32 on the float32-rounded inputs; the references run in float64 on those
same values, so the tolerances measure only our arithmetic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax import obrs
from tests import reference
from tests.conftest import VOCABS, random_log_dists


def f32(x):
    return np.asarray(x, np.float32)


def dist_pair(rng, vocab, lead=(2, 3)):
    """(logp_inf, logp_target) in float32, with -inf padding and near-zero p_inf when V allows."""
    padded = 1 if vocab > 2 else 0
    tiny = 2 if vocab > 8 else 0
    logp_inf = f32(random_log_dists(rng, lead, vocab, padded=padded, tiny=tiny))
    logp_target = f32(random_log_dists(rng, lead, vocab, padded=padded))
    return logp_inf, logp_target


def probs(*logps):
    return [np.exp(np.asarray(x, np.float64)) for x in logps]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_accept_prob_matches_reference(rng, vocab, lam):
    logp_inf, logp_target = dist_pair(rng, vocab)
    got = obrs.accept_prob(logp_target, logp_inf, lam)
    want = reference.accept_prob(*probs(logp_target, logp_inf), lam)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= 1))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_normalizer_matches_reference(rng, vocab, lam):
    logp_inf, logp_target = dist_pair(rng, vocab)
    got = obrs.normalizer(logp_inf, logp_target, lam)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, reference.normalizer(*probs(logp_inf, logp_target), lam), rtol=1e-5)


@pytest.mark.parametrize("vocab", VOCABS)
def test_topk_normalizer_matches_reference(rng, vocab):
    logp_inf, logp_target = dist_pair(rng, vocab)
    for k in sorted({1, min(5, vocab), min(20, vocab), vocab}):
        got = obrs.topk_normalizer(logp_inf, logp_target, 0.7, k)
        want = reference.topk_normalizer(logp_inf, logp_target, 0.7, k)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"k={k}")


def test_topk_union_counts_shared_tokens_once():
    # Both distributions put their top-2 on tokens {0, 1}: the union has 2 tokens, not 4.
    logp_inf = jnp.log(jnp.array([0.5, 0.3, 0.1, 0.1]))
    logp_target = jnp.log(jnp.array([0.4, 0.4, 0.1, 0.1]))
    got = obrs.topk_normalizer(logp_inf, logp_target, 1.0, 2)
    np.testing.assert_allclose(got, 0.4 + 0.3, rtol=1e-6)


@pytest.mark.parametrize("vocab", VOCABS)
def test_accepted_log_distribution_is_eq4(rng, vocab):
    logp_inf, logp_target = dist_pair(rng, vocab)
    p_inf, p_target = probs(logp_inf, logp_target)
    want = np.minimum(p_inf, p_target / 0.8) / reference.normalizer(p_inf, p_target, 0.8)[..., None]
    got = np.exp(np.asarray(obrs.accepted_log_distribution(logp_inf, logp_target, 0.8), np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)


def test_kappa_matches_reference_and_ignores_padding(rng):
    z = rng.uniform(0.2, 1.0, (4, 9))
    accepted = rng.uniform(size=(4, 9)) < 0.8
    valid = rng.uniform(size=(4, 9)) < 0.7
    z_garbage = np.where(valid, z, np.nan)  # padding holds anything
    got = obrs.kappa(f32(z_garbage), np.where(valid, accepted, True), valid)
    np.testing.assert_allclose(got, reference.kappa(f32(z), accepted, valid), rtol=1e-5)
    assert float(obrs.kappa(f32(z), accepted, np.zeros_like(valid))) == 1.0


@pytest.mark.parametrize("target_accept", [0.05, 0.5, 0.9, 0.99, 1.0])
def test_solve_lambda_on_sampled_tokens_hits_budget(rng, target_accept):
    logp_inf = f32(np.log(rng.uniform(1e-6, 1.0, (8, 64))))
    logp_target = f32(logp_inf + rng.normal(0.0, 2.0, (8, 64)))
    valid = rng.uniform(size=(8, 64)) < 0.9
    lam = obrs.solve_lambda(logp_inf, logp_target, target_accept, valid)
    a = reference.accept_prob(*probs(logp_target, logp_inf), float(lam))
    np.testing.assert_allclose(a[valid].mean(), target_accept, atol=1e-5)


@pytest.mark.parametrize("vocab", VOCABS[1:])
def test_solve_lambda_full_vocab_hits_budget(rng, vocab):
    logp_inf, logp_target = dist_pair(rng, vocab)
    valid = np.array([[True, True, False], [True, False, True]])
    lam = jax.jit(obrs.solve_lambda, static_argnames="full_vocab")(
        logp_inf, logp_target, 0.8, valid, full_vocab=True)
    z = reference.normalizer(*probs(logp_inf, logp_target), float(lam))
    np.testing.assert_allclose(z[valid].mean(), 0.8, atol=1e-5)


@pytest.mark.parametrize("target", ["old", "new"])
@pytest.mark.parametrize("c1,c2", [(2.0, 1.5), (np.inf, np.inf), (0.5, 0.9)])
def test_jackpot_weights_match_reference(rng, target, c1, c2):
    shape = (3, 50)
    logp_inf, logp_old = (f32(np.log(rng.uniform(1e-30, 1.0, shape))) for _ in range(2))
    logp_new = f32(logp_old + rng.normal(0, 0.3, shape))
    z = f32(rng.uniform(0.3, 1.0, shape))
    got = obrs.jackpot_weights(logp_new, logp_inf, logp_old, z, 0.9, c1, c2, target)
    p_new, p_inf, p_old = probs(logp_new, logp_inf, logp_old)
    want = reference.jackpot_weights(p_new, p_inf, p_old, np.float64(z), 0.9, c1, c2, target)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_jackpot_weights_are_stop_gradient(rng):
    logp = f32(np.log(rng.uniform(0.1, 1.0, 7)))
    grad = jax.grad(lambda x: obrs.jackpot_weights(x, logp, logp, 0.9, 0.5, 3.0, 3.0).sum())(logp)
    assert np.all(np.asarray(grad) == 0)


def test_sample_mask_is_bernoulli():
    p = jnp.array([0.0, 0.3, 0.75, 1.0])
    masks = jax.vmap(lambda k: obrs.sample_mask(k, p))(jax.random.split(jax.random.PRNGKey(0), 40000))
    freq = np.asarray(masks).mean(axis=0)
    assert freq[0] == 0.0 and freq[3] == 1.0
    se = np.sqrt(p[1:3] * (1 - p[1:3]) / 40000)
    np.testing.assert_array_less(np.abs(freq[1:3] - p[1:3]), 4 * se)


def test_functions_jit_with_traced_lam(rng):
    logp_inf, logp_target = dist_pair(rng, 17)

    @jax.jit
    def stats(logp_inf, logp_target):
        lam = obrs.solve_lambda(logp_inf, logp_target, 0.9, full_vocab=True)
        return (obrs.normalizer(logp_inf, logp_target, lam),
                obrs.topk_normalizer(logp_inf, logp_target, lam, 4), lam)

    z, z_topk, lam = stats(logp_inf, logp_target)
    np.testing.assert_allclose(z, obrs.normalizer(logp_inf, logp_target, float(lam)), rtol=1e-6)
    np.testing.assert_allclose(z_topk, obrs.topk_normalizer(logp_inf, logp_target, float(lam), 4), rtol=1e-6)


def test_obrs_filter_composes_the_pieces(rng):
    shape = (4, 30)
    logp_inf, logp_old = (f32(np.log(rng.uniform(0.01, 1.0, shape))) for _ in range(2))
    logp_new = f32(logp_old + rng.normal(0, 0.5, shape))
    z_approx = f32(rng.uniform(0.3, 0.9, shape))
    valid = np.arange(30)[None, :] < np.array([[30], [20], [5], [0]])
    uniforms = jax.random.uniform(jax.random.PRNGKey(3), shape, dtype=jnp.float32)
    out = obrs.obrs_filter(uniforms, logp_inf, logp_old, logp_new, z_approx, valid, lam=0.8, c1=5.0,
                           c2=2.0, target="new")
    accepted, k, z = reference.obrs_filter(logp_new, logp_old, logp_inf, valid, z_approx, uniforms,
                                           lam=0.8, target="new", calibrate=True)
    np.testing.assert_array_equal(out.accepted, accepted)
    np.testing.assert_allclose(out.kappa, k, rtol=1e-5)
    np.testing.assert_allclose(np.where(valid, out.z, 0), z, rtol=1e-5)
    p_new, p_inf, p_old = probs(logp_new, logp_inf, logp_old)
    rho = reference.jackpot_weights(p_new, p_inf, p_old, z, 0.8, 5.0, 2.0, "new")
    np.testing.assert_allclose(np.where(valid, out.rho, 0), np.where(valid, rho, 0), rtol=1e-5)


BAD_STATIC_ARGS = [
    ("lam", lambda li, lt: obrs.accept_prob(lt, li, 0.0)),
    ("lam", lambda li, lt: obrs.normalizer(li, lt, -1.0)),
    ("lam", lambda li, lt: obrs.topk_normalizer(li, lt, float("nan"), 2)),
    ("k", lambda li, lt: obrs.topk_normalizer(li, lt, 1.0, 0)),
    ("k", lambda li, lt: obrs.topk_normalizer(li, lt, 1.0, 6)),
    ("k", lambda li, lt: obrs.topk_normalizer(li, lt, 1.0, 2.5)),
    ("target_accept", lambda li, lt: obrs.solve_lambda(li, lt, 0.0)),
    ("target_accept", lambda li, lt: obrs.solve_lambda(li, lt, 1.01)),
    ("c1", lambda li, lt: obrs.jackpot_weights(lt, li, li, 1.0, 1.0, 0.0, 1.0)),
    ("c2", lambda li, lt: obrs.jackpot_weights(lt, li, li, 1.0, 1.0, 1.0, -2.0)),
    ("target", lambda li, lt: obrs.jackpot_weights(lt, li, li, 1.0, 1.0, 1.0, 1.0, "ref")),
]


@pytest.mark.parametrize("name,call", BAD_STATIC_ARGS)
def test_bad_static_arguments_raise_value_error_naming_them(rng, name, call):
    logp_inf, logp_target = dist_pair(rng, 5, lead=(2,))
    with pytest.raises(ValueError, match=rf"^{name}=.*{name} must be"):
        call(logp_inf, logp_target)
