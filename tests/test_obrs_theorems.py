"""The paper's theorems and facts about OBRS as property tests, in float64 (64-bit mode).

KL values are computed here in NumPy from the distributions our code returns; the truths are the
theorems: Thm. 3.3 (OBRS never moves p_inf away from p_target), Thm. 3.4 (every budget has its lam,
and OBRS is the best acceptance rule for that budget), Z = sum_x p_inf a, Z_approx <= Z.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jackpot_jax import obrs
from tests import reference
from tests.conftest import random_log_dists


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@st.composite
def dist_pairs(draw, max_vocab=64):
    """(logp_inf, logp_target) float64 pairs: random logits, a random mismatch, and sometimes a
    padded (-inf) vocabulary tail."""
    seed = draw(st.integers(0, 2**32 - 1))
    vocab = draw(st.integers(2, max_vocab))
    scale = draw(st.floats(0.1, 5.0))
    gap = draw(st.floats(0.05, 5.0))
    padded = draw(st.integers(0, max(0, min(3, vocab - 2))))
    rng = np.random.default_rng(seed)
    logits_inf = scale * rng.standard_normal(vocab)
    logits_target = logits_inf + gap * rng.standard_normal(vocab)
    logits_inf[vocab - padded:] = logits_target[vocab - padded:] = -np.inf
    return reference.log_softmax(logits_inf), reference.log_softmax(logits_target)


def kl(logp, logq):
    return float(reference.kl(np.exp(logp), np.exp(np.asarray(logq, np.float64))))


def max_log_ratio(logp_inf, logp_target):
    proposed = logp_inf > -np.inf
    return float(np.max(logp_target[proposed] - logp_inf[proposed]))


@given(dist_pairs(), st.floats(1e-3, 0.999))
def test_thm_3_3_obrs_never_increases_kl(pair, fraction):
    """KL(p || p'_inf) <= KL(p || p_inf) whenever lam < max_x p/q."""
    logp_inf, logp_target = pair
    lam = fraction * np.exp(max_log_ratio(logp_inf, logp_target))
    accepted = obrs.accepted_log_distribution(logp_inf, logp_target, lam)
    assert kl(logp_target, accepted) <= kl(logp_target, logp_inf) + 1e-12


@given(dist_pairs(), st.floats(1.0, 10.0))
def test_classic_rejection_sampling_is_exact(pair, factor):
    """lam >= max p/q is classic rejection sampling: the accepted tokens follow p exactly,
    with acceptance 1 / lam."""
    logp_inf, logp_target = pair
    lam = factor * np.exp(max_log_ratio(logp_inf, logp_target))
    accepted = obrs.accepted_log_distribution(logp_inf, logp_target, lam)
    np.testing.assert_allclose(np.exp(accepted), np.exp(logp_target), atol=1e-12)
    np.testing.assert_allclose(obrs.normalizer(logp_inf, logp_target, lam), 1 / lam, rtol=1e-10)


@given(dist_pairs(), st.floats(0.01, 10.0))
def test_z_is_the_expected_acceptance_rate(pair, lam):
    """Z = sum_x p_inf(x) a(x)."""
    logp_inf, logp_target = pair
    expected_accept = np.sum(np.exp(logp_inf) * np.asarray(obrs.accept_prob(logp_target, logp_inf, lam)))
    np.testing.assert_allclose(obrs.normalizer(logp_inf, logp_target, lam), expected_accept, rtol=1e-12)


@given(dist_pairs(), st.floats(0.01, 1.0))
def test_thm_3_4_every_budget_has_its_lam(pair, budget):
    """solve_lambda(budget) gives Z(lam) = budget (within the stated 1e-10 in float64), and Z is
    monotone in lam, strictly where Z < 1, so that lam is unique."""
    logp_inf, logp_target = pair
    lam = float(obrs.solve_lambda(logp_inf, logp_target, budget, full_vocab=True))
    np.testing.assert_allclose(float(obrs.normalizer(logp_inf, logp_target, lam)), budget, atol=1e-10)
    grid = lam * np.exp(np.linspace(-3, 3, 61))
    z = np.asarray(jax.vmap(lambda l: obrs.normalizer(logp_inf, logp_target, l))(jnp.asarray(grid)))
    assert np.all(np.diff(z) <= 1e-15)
    below_one = z[:-1] < 1 - 1e-12
    assert np.all(np.diff(z)[below_one] < 0)


def random_rule_with_budget(rng, p_inf, budget):
    """A random acceptance rule a'(x) in [0, 1] with sum_x p_inf a' = budget: a random profile
    rescaled to the budget, mixed with the constant rule (budget everywhere) until it is <= 1."""
    profile = rng.uniform(0, 1, p_inf.shape) ** rng.uniform(0.2, 5.0)
    rule = profile * budget / np.sum(p_inf * profile)
    if rule.max() > 1:
        t = (1 - budget) / (rule.max() - budget)
        rule = t * rule + (1 - t) * budget
    return rule


@given(dist_pairs(), st.floats(0.05, 0.99), st.integers(0, 2**32 - 1))
def test_thm_3_4_obrs_beats_every_rule_of_the_same_budget(pair, budget, seed):
    """Among acceptance rules with sum_x p_inf a = budget, OBRS minimizes KL(p || accepted)."""
    logp_inf, logp_target = pair
    lam = obrs.solve_lambda(logp_inf, logp_target, budget, full_vocab=True)
    kl_obrs = kl(logp_target, obrs.accepted_log_distribution(logp_inf, logp_target, lam))
    p_inf = np.exp(logp_inf)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        rule = random_rule_with_budget(rng, p_inf, budget)
        np.testing.assert_allclose(np.sum(p_inf * rule), budget, rtol=1e-9)
        with np.errstate(divide="ignore"):
            kl_rule = kl(logp_target, np.log(p_inf * rule / budget))
        assert kl_obrs <= kl_rule + 1e-9


@given(dist_pairs(), st.floats(0.05, 5.0), st.data())
def test_topk_normalizer_underestimates_and_is_exact_at_full_k(pair, lam, data):
    logp_inf, logp_target = pair
    vocab = logp_inf.shape[-1]
    k = data.draw(st.integers(1, vocab))
    z = float(obrs.normalizer(logp_inf, logp_target, lam))
    assert float(obrs.topk_normalizer(logp_inf, logp_target, lam, k)) <= z * (1 + 1e-12)
    np.testing.assert_allclose(obrs.topk_normalizer(logp_inf, logp_target, lam, vocab), z, rtol=1e-12)


def test_kappa_debiasing_is_unbiased_over_monte_carlo_batches():
    """Seed 0; 4000 batches of 64 sampled tokens (+16 padding positions holding garbage) over
    V=200 with k=3. Calibrated: the batch mean of kappa * Z_approx_t is within 4 standard errors of
    the true mean Z. Uncalibrated: Z_approx is biased low by more than 20 standard errors."""
    rng = np.random.default_rng(0)
    n, pad, vocab, k, lam, batches = 64, 16, 200, 3, 1.0, 4000
    logp_inf = random_log_dists(rng, (n,), vocab, scale=2.0)
    logp_target = reference.log_softmax(logp_inf + 1.0 * rng.standard_normal((n, vocab)))
    z_exact = np.asarray(obrs.normalizer(logp_inf, logp_target, lam))
    z_approx = np.asarray(obrs.topk_normalizer(logp_inf, logp_target, lam, k))
    z_approx_padded = np.concatenate([z_approx, np.full(pad, 5.0)])
    valid = np.arange(n + pad) < n

    def calibrated_mean(key):
        k_tok, k_mask = jax.random.split(key)
        tokens = jax.random.categorical(k_tok, logp_inf)
        take = lambda logp: jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
        a = obrs.accept_prob(take(logp_target), take(logp_inf), lam)
        accepted = jnp.concatenate([obrs.sample_mask(k_mask, a), jnp.ones(pad, bool)])
        kap = obrs.kappa(z_approx_padded, accepted, valid)
        return jnp.mean(kap * z_approx)

    estimates = np.asarray(jax.vmap(calibrated_mean)(jax.random.split(jax.random.PRNGKey(0), batches)))
    se = estimates.std(ddof=1) / np.sqrt(batches)
    assert abs(estimates.mean() - z_exact.mean()) < 4 * se
    assert z_exact.mean() - z_approx.mean() > 20 * se
