"""jackpot_jax.losses against float64 references (tests/reference.py): values in float32 against
NumPy, and gradients in float64 against jax.grad of the reference written from the equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax import losses, obrs
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


# ---------------------------------------------------------------- the policy loss (eq. 5)


def policy_batch(rng, batch=4, length=16, vocab=23):
    """Policy (old, new), actor logits and sampled tokens for a small batch; valid has padding."""
    logits_old = rng.normal(0, 2, (batch, length, vocab))
    logits_new = logits_old + rng.normal(0, 0.3, (batch, length, vocab))
    logits_inf = logits_old + rng.normal(0, 1.5, (batch, length, vocab))
    tokens = rng.integers(0, vocab, (batch, length))
    valid = np.arange(length)[None, :] < rng.integers(3, length + 1, (batch, 1))
    valid[-1] = False  # an all-padding sequence
    adv = rng.normal(size=batch)
    return logits_old, logits_new, logits_inf, tokens, valid, adv


def token_logp(logits, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]


POLICY_CASES = [
    dict(target="new", calibrate=True, clip=True, aggregation="token_mean", lam=0.9, c1=3.0, c2=2.0),
    dict(target="old", calibrate=True, clip=True, aggregation="seq_mean_token_mean", lam=0.5, c1=2.0, c2=2.0),
    dict(target="new", calibrate=False, clip=False, aggregation="seq_mean_token_mean", lam=1.5, c1=np.inf, c2=1.2),
]


@pytest.mark.parametrize("case", POLICY_CASES)
def test_jackpot_policy_loss_value_and_gradient_match_reference(rng, case):
    logits_old, logits_new, logits_inf, tokens, valid, adv = policy_batch(rng)
    opts = dict(eps_low=0.2, eps_high=0.28, **case)
    lam, c1, c2 = opts.pop("lam"), opts.pop("c1"), opts.pop("c2")
    key = jax.random.PRNGKey(7)
    with jax.enable_x64(True):
        logp_old, logp_inf = token_logp(logits_old, tokens), token_logp(logits_inf, tokens)
        z_approx = obrs.topk_normalizer(jax.nn.log_softmax(logits_inf), jax.nn.log_softmax(logits_new), lam, 3)
        # Padding holds garbage: it must reach neither the loss nor the gradient.
        logp_inf = jnp.where(valid, logp_inf, -jnp.inf)
        z_approx = jnp.where(valid, z_approx, jnp.nan)

        def ours(logits_new):
            return losses.jackpot_policy_loss(
                token_logp(logits_new, tokens), logp_old, logp_inf, adv, valid, z_approx, key,
                lam=lam, c1=c1, c2=c2, **opts)

        (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits_new))

        uniforms = jax.random.uniform(key, valid.shape, dtype=jnp.float32)
        accepted, k, z = reference.obrs_filter(
            token_logp(logits_new, tokens), logp_old, logp_inf, valid, z_approx, uniforms,
            lam=lam, target=opts["target"], calibrate=opts["calibrate"])
        ref_opts = {n: opts[n] for n in ("target", "eps_low", "eps_high", "clip", "aggregation")}

        def ref(logits_new):
            return reference.policy_loss(token_logp(logits_new, tokens), logp_old, logp_inf, adv, valid,
                                         accepted, z, lam=lam, c1=c1, c2=c2, xp=jnp,
                                         sg=jax.lax.stop_gradient, **ref_opts)

        want_loss, want_grad = jax.value_and_grad(ref)(jnp.asarray(logits_new))
    assert 0 < accepted.sum() < valid.sum()  # the mask really rejects something
    np.testing.assert_allclose(loss, want_loss, rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
    np.testing.assert_allclose(grad, want_grad, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(metrics["policy/accept_rate"], accepted.sum() / valid.sum(), rtol=1e-12)
    np.testing.assert_allclose(metrics["policy/kappa"], k, rtol=1e-9)


def test_jackpot_policy_loss_float32_matches_float64_reference(rng):
    logits_old, logits_new, logits_inf, tokens, valid, adv = policy_batch(rng, vocab=101)
    logp_new, logp_old, logp_inf = (np.asarray(token_logp(f32(x), tokens)) for x in (logits_new, logits_old, logits_inf))
    z_approx = np.asarray(obrs.topk_normalizer(jax.nn.log_softmax(f32(logits_inf)), jax.nn.log_softmax(f32(logits_new)), 0.8, 5))
    key = jax.random.PRNGKey(11)
    loss, metrics = jax.jit(lambda *a: losses.jackpot_policy_loss(*a, lam=0.8, c1=4.0, c2=2.0))(
        logp_new, logp_old, logp_inf, f32(adv), valid, z_approx, key)
    uniforms = jax.random.uniform(key, valid.shape, dtype=jnp.float32)
    accepted, k, z = reference.obrs_filter(logp_new, logp_old, logp_inf, valid, z_approx, uniforms,
                                           lam=0.8, target="new", calibrate=True)
    want = reference.policy_loss(*(np.float64(x) for x in (logp_new, logp_old, logp_inf)), np.float64(adv),
                                 valid, accepted, z, lam=0.8, c1=4.0, c2=2.0, target="new",
                                 eps_low=0.2, eps_high=0.2, clip=True, aggregation="token_mean")
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    p_new, p_inf, p_old = (np.exp(np.float64(x)) for x in (logp_new, logp_inf, logp_old))
    rho = reference.jackpot_weights(p_new, p_inf, p_old, z, 0.8, 4.0, 2.0, "new")[accepted]
    np.testing.assert_allclose(metrics["policy/rho_mean"], rho.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["policy/rho_max"], rho.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["policy/kappa"], k, rtol=1e-5)


def test_jackpot_policy_loss_all_rejected_is_zero_not_nan(rng):
    logits_old, logits_new, logits_inf, tokens, valid, adv = policy_batch(rng)
    logp = token_logp(f32(logits_old), tokens)
    # lam huge: acceptance ~ 0, every token rejected.
    loss, metrics = losses.jackpot_policy_loss(logp, logp, logp, adv, valid, jnp.ones(valid.shape),
                                               jax.random.PRNGKey(0), lam=1e30, c1=2.0, c2=2.0)
    assert float(loss) == 0.0 and float(metrics["policy/accept_rate"]) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())


# ---------------------------------------------------------------- the actor loss (eq. 6 + beta eq. 7)


@pytest.mark.parametrize("aggregation,clip,direction", [
    ("token_mean", True, "forward"), ("seq_mean_token_mean", False, "reverse")])
def test_actor_loss_value_and_gradient_match_reference(rng, aggregation, clip, direction):
    logits_policy, _, logits_actor_old, tokens, valid, adv = policy_batch(rng)
    logits_actor = logits_actor_old + rng.normal(0, 0.2, logits_actor_old.shape)
    logits_inf = logits_actor_old / 0.9  # sampled at temperature 0.9: p_inf != p_actor_old
    opts = dict(beta=0.3, tis_cap=1.5, eps_low=0.2, eps_high=0.2, clip=clip, aggregation=aggregation)
    with jax.enable_x64(True):
        logp_actor_old, logp_inf = token_logp(logits_actor_old, tokens), token_logp(logits_inf, tokens)
        logp_policy = jax.nn.log_softmax(jnp.asarray(logits_policy))

        def ours(logits_actor):
            kl = losses.distill_kl(logp_policy, jax.nn.log_softmax(logits_actor), direction)
            return losses.actor_loss(token_logp(logits_actor, tokens), logp_actor_old, logp_inf, adv,
                                     valid, kl, **opts)

        def ref(logits_actor):
            p_t, p_s = jnp.exp(logp_policy), jax.nn.softmax(logits_actor)
            kl = reference.kl(p_t, p_s, xp=jnp) if direction == "forward" else reference.kl(p_s, p_t, xp=jnp)
            return reference.actor_loss(token_logp(logits_actor, tokens), logp_actor_old, logp_inf, adv,
                                        valid, kl, xp=jnp, sg=jax.lax.stop_gradient, **opts)

        (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits_actor))
        want_loss, want_grad = jax.value_and_grad(ref)(jnp.asarray(logits_actor))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-8, atol=1e-12)
    assert float(metrics["actor/distill_kl"]) > 0 and float(metrics["actor/tis_mean"]) <= 1.5


@pytest.mark.parametrize("name,kwargs", [
    ("beta", dict(beta=-1.0, tis_cap=2.0)),
    ("cap", dict(beta=0.1, tis_cap=0.0)),
    ("eps_low", dict(beta=0.1, tis_cap=2.0, eps_low=1.0)),
    ("mode", dict(beta=0.1, tis_cap=2.0, aggregation="mean")),
])
def test_actor_loss_bad_arguments(name, kwargs):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=rf"{name}="):
        losses.actor_loss(x, x, x, jnp.zeros(2), jnp.ones((2, 3), bool), x, **kwargs)
