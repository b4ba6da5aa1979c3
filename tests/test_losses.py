"""jackpot_jax.losses against float64 references (tests/reference.py): values in float32 against
NumPy, and gradients in float64 against jax.grad of the reference written from the equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax import losses
from tests import reference
from tests.conftest import VOCABS, random_log_dists


def f32(x):
    return np.asarray(x, np.float32)


# ---------------------------------------------------------------- GRPO advantages


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_grpo_advantages_match_reference(rng, group_size, normalize_std):
    rewards = rng.integers(0, 2, size=6 * group_size).astype(np.float64)
    rewards[:group_size] = 1.0  # one group with no spread
    rewards[group_size:2 * group_size] += rng.normal(0, 0.1, group_size)
    got = losses.grpo_advantages(f32(rewards), group_size, normalize_std=normalize_std)
    want = reference.grpo_advantages(f32(rewards), group_size, normalize_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[:group_size] == 0.0)


@pytest.mark.parametrize("rewards,group_size,match", [
    (np.zeros(6), 4, "not a multiple of group_size=4"),
    (np.zeros(6), 1, "group_size=1"),
    (np.zeros((2, 3)), 3, "must be 1-D"),
])
def test_grpo_advantages_bad_input(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        losses.grpo_advantages(rewards, group_size)


# ---------------------------------------------------------------- PPO, TIS


@pytest.mark.parametrize("clip,eps_low,eps_high", [(True, 0.2, 0.2), (True, 0.1, 0.28), (False, 0.2, 0.2)])
def test_ppo_token_loss_matches_reference(rng, clip, eps_low, eps_high):
    logp_old = f32(np.log(rng.uniform(0.05, 1.0, (4, 40))))
    logp_new = f32(logp_old + rng.normal(0, 0.4, (4, 40)))
    adv = f32(rng.normal(size=(4, 1)))
    got, clipped = losses.ppo_token_loss(logp_new, logp_old, adv, eps_low=eps_low, eps_high=eps_high, clip=clip)
    p_new, p_old = np.exp(np.float64(logp_new)), np.exp(np.float64(logp_old))
    want = reference.ppo_token_loss(p_new, p_old, np.float64(adv), eps_low, eps_high, clip)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if clip:  # the clipped branch is active exactly where the ratio is outside the band, A-side
        r = p_new / p_old
        want_clipped = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))
        np.testing.assert_array_equal(clipped, want_clipped)
        assert want_clipped.any() and not want_clipped.all()
    else:
        assert not np.asarray(clipped).any()


def test_truncated_is(rng):
    log_x = f32(rng.normal(0, 2, 100))
    np.testing.assert_allclose(losses.truncated_is(log_x, 2.0), np.minimum(np.exp(np.float64(log_x)), 2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="cap=0"):
        losses.truncated_is(log_x, 0.0)


# ---------------------------------------------------------------- distillation KL


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distill_kl_matches_reference(rng, vocab, direction):
    padded = 1 if vocab > 2 else 0
    teacher = f32(random_log_dists(rng, (2, 3), vocab, padded=padded))
    student = f32(random_log_dists(rng, (2, 3), vocab, padded=padded, tiny=2 if vocab > 8 else 0))
    got = losses.distill_kl(teacher, student, direction)
    p_t, p_s = np.exp(np.float64(teacher)), np.exp(np.float64(student))
    want = reference.kl(p_t, p_s) if direction == "forward" else reference.kl(p_s, p_t)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distill_kl_gradient_flows_to_student_only(rng, direction):
    vocab = 40
    teacher_logits = rng.normal(0, 3, (3, vocab))
    student_logits = rng.normal(0, 3, (3, vocab))
    teacher_logits[:, -3:] = student_logits[:, -3:] = -np.inf  # padded vocabulary

    def ours(t, s):
        return losses.distill_kl(jax.nn.log_softmax(t), jax.nn.log_softmax(s), direction).sum()

    def ref(t, s):
        p_t, p_s = jax.nn.softmax(jax.lax.stop_gradient(t)), jax.nn.softmax(s)
        return (reference.kl(p_t, p_s, xp=jnp) if direction == "forward" else reference.kl(p_s, p_t, xp=jnp)).sum()

    with jax.enable_x64(True):
        t, s = jnp.asarray(teacher_logits), jnp.asarray(student_logits)
        g_teacher, g_student = jax.grad(ours, argnums=(0, 1))(t, s)
        want = jax.grad(ref, argnums=1)(t, s)
        assert np.all(np.isfinite(np.asarray(g_student)))
        np.testing.assert_allclose(g_student, want, rtol=1e-9, atol=1e-12)
        assert np.all(np.asarray(g_teacher) == 0)


def test_distill_kl_infinite_where_student_misses_teacher_mass():
    teacher = jnp.log(jnp.array([0.5, 0.5]))
    student = jnp.array([0.0, -jnp.inf])
    assert float(losses.distill_kl(teacher, student)) == np.inf
    assert float(losses.distill_kl(teacher, student, "reverse")) == pytest.approx(np.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="direction='sideways'"):
        losses.distill_kl(teacher, student, "sideways")


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_masked_mean_matches_reference(rng, mode):
    values = f32(rng.normal(size=(5, 12)))
    mask = rng.uniform(size=(5, 12)) < 0.5
    mask[2] = False  # a sequence with every token rejected
    got = losses.masked_mean(np.where(mask, values, np.nan), mask, mode)
    np.testing.assert_allclose(got, reference.masked_mean(np.float64(values), mask, mode), rtol=1e-5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_masked_mean_all_rejected_is_zero_with_finite_gradient(mode):
    values = jnp.ones((3, 4))
    mask = jnp.zeros((3, 4), bool)
    assert float(losses.masked_mean(values, mask, mode)) == 0.0
    grad = jax.grad(lambda v: losses.masked_mean(v, mask, mode))(values)
    assert np.all(np.asarray(grad) == 0)
    with pytest.raises(ValueError, match="mode='sum'"):
        losses.masked_mean(values, mask, "sum")
