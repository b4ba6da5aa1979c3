"""The objective at mini-batch scope (jackpot_jax/train/objective.py) against the float64 NumPy
transcriptions of tests/reference.py: the aggregation weights, the per-token draws, the policy's
scope and loss (eq. 3-5) and the actor's loss (eq. 6 + beta eq. 7), values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax import losses, obrs
from jackpot_jax.train import objective
from jackpot_jax.train.step import StepConfig
from tests import reference


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


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_aggregation_weights_give_the_masked_mean(rng, mode):
    mask = rng.random((5, 7)) < 0.4
    mask[1] = False  # a sequence with no counted token
    values = rng.normal(size=(5, 7))
    weights = objective.aggregation_weights(mask, mode)
    np.testing.assert_allclose(float(jnp.sum(weights * values)), reference.masked_mean(values, mask, mode), rtol=1e-6,
                               atol=1e-7)
    assert float(jnp.sum(objective.aggregation_weights(np.zeros((2, 3), bool), mode))) == 0.0


def test_uniforms_are_keyed_by_row_and_completion_position():
    """A completion's draws do not depend on where it starts (the prompt's length) nor on the other rows."""
    valid = np.zeros((3, 10), bool)
    valid[0, 2:7], valid[1, 5:9], valid[2, 0:10] = True, True, True
    shifted = np.zeros_like(valid)
    shifted[0, 4:9], shifted[1, 1:5], shifted[2] = True, True, True
    key = jax.random.key(0)
    u, v = objective.uniforms(key, valid), objective.uniforms(key, shifted)
    for row in range(3):
        np.testing.assert_array_equal(np.asarray(u)[row][valid[row]], np.asarray(v)[row][shifted[row]])
    assert len(np.unique(np.asarray(u)[valid])) == valid.sum()  # one draw per token


POLICY_CASES = [
    dict(p_target="new", z="topk", clip=True, aggregation="token_mean", lam=0.9, c1=3.0, c2=2.0),
    dict(p_target="old", z="topk", clip=True, aggregation="seq_mean_token_mean", lam=0.5, c1=2.0, c2=2.0),
    dict(p_target="new", z="exact", clip=False, aggregation="seq_mean_token_mean", lam=1.5, c1=np.inf, c2=1.2),
]


@pytest.mark.parametrize("case", POLICY_CASES)
def test_policy_scope_and_loss_match_reference(rng, case):
    """Eq. 5 over a batch: the scope's mask, kappa and rho and the loss's value and gradient against the
    float64 reference, with padding holding garbage that reaches neither the loss nor the gradient."""
    logits_old, logits_new, logits_inf, tokens, valid, adv = policy_batch(rng)
    cfg = StepConfig(mode="jackpot", eps_high=0.28, **case)
    uniforms = jax.random.uniform(jax.random.PRNGKey(7), valid.shape, dtype=jnp.float32)
    with jax.enable_x64(True):
        logp_old, logp_inf, logp_new = (token_logp(x, tokens) for x in (logits_old, logits_inf, logits_new))
        target = logits_new if cfg.p_target == "new" else logits_old
        z_topk = obrs.topk_normalizer(jax.nn.log_softmax(logits_inf), jax.nn.log_softmax(target), cfg.lam, 3)
        z_exact = obrs.normalizer(jax.nn.log_softmax(logits_inf), jax.nn.log_softmax(target), cfg.lam)
        tokens_ = objective.Tokens(*(jnp.where(valid, x, 0.0) for x in (logp_inf, logp_old, logp_new)), valid, uniforms)
        scope = objective.policy_scope(cfg, tokens_, jnp.where(valid, z_topk, jnp.nan), z_exact, cfg.lam)
        exact = cfg.z == "exact"
        accepted, k, z = reference.obrs_filter(logp_new, logp_old, logp_inf, valid, z_exact if exact else z_topk,
                                               uniforms, lam=cfg.lam, target=cfg.p_target, calibrate=not exact)
        valid_weight = objective.aggregation_weights(valid, cfg.aggregation)
        opts = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip=cfg.clip)

        def ours(logits_new):
            logp = jnp.where(valid, token_logp(logits_new, tokens), 0.0)
            return objective.policy_loss(logp, tokens_.logp_old, tokens_.logp_inf, adv, scope.rho, scope.weight,
                                         valid_weight, **opts)

        def ref(logits_new):
            return reference.policy_loss(token_logp(logits_new, tokens), logp_old, logp_inf, adv, valid, accepted, z,
                                         lam=cfg.lam, c1=cfg.c1, c2=cfg.c2, target=cfg.p_target,
                                         aggregation=cfg.aggregation, xp=jnp, sg=jax.lax.stop_gradient, **opts)

        (loss, _), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits_new))
        want_loss, want_grad = jax.value_and_grad(ref)(jnp.asarray(logits_new))
    assert 0 < accepted.sum() < valid.sum()  # the mask really rejects something
    np.testing.assert_array_equal(np.asarray(scope.mask), accepted)
    np.testing.assert_allclose(scope.metrics["obrs/kappa"], k, rtol=1e-9)
    np.testing.assert_allclose(scope.metrics["obrs/accept_rate"], accepted.sum() / valid.sum(), rtol=1e-12)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
    np.testing.assert_allclose(grad, want_grad, rtol=1e-8, atol=1e-12)


def test_policy_scope_with_every_token_rejected_is_zero_not_nan(rng):
    _, _, _, tokens, valid, _ = policy_batch(rng)
    logp = jnp.zeros(valid.shape) - 1.0
    scope = objective.policy_scope(StepConfig(mode="jackpot", lam=1e30),  # acceptance ~ 0
                                   objective.Tokens(logp, logp, logp, valid, jnp.full(valid.shape, 0.5)),
                                   jnp.ones(valid.shape), None, 1e30)
    assert not np.any(scope.mask) and float(jnp.sum(scope.weight)) == 0.0
    assert all(np.isfinite(float(v)) for v in scope.metrics.values())


@pytest.mark.parametrize("aggregation,clip,direction", [
    ("token_mean", True, "forward"), ("seq_mean_token_mean", False, "reverse")])
def test_actor_loss_value_and_gradient_match_reference(rng, aggregation, clip, direction):
    logits_policy, _, logits_actor_old, tokens, valid, adv = policy_batch(rng)
    logits_actor = logits_actor_old + rng.normal(0, 0.2, logits_actor_old.shape)
    logits_inf = logits_actor_old / 0.9  # sampled at temperature 0.9: p_inf != p_actor_old
    opts = dict(beta=0.3, tis_cap=1.5, eps_low=0.2, eps_high=0.2, clip=clip)
    with jax.enable_x64(True):
        logp_actor_old, logp_inf = token_logp(logits_actor_old, tokens), token_logp(logits_inf, tokens)
        logp_policy = jax.nn.log_softmax(jnp.asarray(logits_policy))
        zero = lambda x: jnp.where(valid, x, 0.0)
        weight = objective.aggregation_weights(valid, aggregation)

        def ours(logits_actor):
            kl = losses.distill_kl(logp_policy, jax.nn.log_softmax(logits_actor), direction)
            return objective.actor_loss(zero(token_logp(logits_actor, tokens)), zero(logp_actor_old), zero(logp_inf),
                                        adv, zero(kl), weight, **opts)

        def ref(logits_actor):
            p_t, p_s = jnp.exp(logp_policy), jax.nn.softmax(logits_actor)
            kl = reference.kl(p_t, p_s, xp=jnp) if direction == "forward" else reference.kl(p_s, p_t, xp=jnp)
            return reference.actor_loss(token_logp(logits_actor, tokens), logp_actor_old, logp_inf, adv,
                                        valid, kl, xp=jnp, sg=jax.lax.stop_gradient, aggregation=aggregation, **opts)

        (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits_actor))
        want_loss, want_grad = jax.value_and_grad(ref)(jnp.asarray(logits_actor))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-8, atol=1e-12)
    assert float(metrics["loss/distill"]) > 0


@pytest.mark.parametrize("name,kwargs", [
    ("beta", dict(beta=-1.0, tis_cap=2.0)),
    ("cap", dict(beta=0.1, tis_cap=0.0)),
    ("eps_low", dict(beta=0.1, tis_cap=2.0, eps_low=1.0)),
    ("ppo_weight", dict(beta=0.1, tis_cap=2.0, ppo_weight=-1.0)),
])
def test_actor_loss_bad_arguments(name, kwargs):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=rf"{name}="):
        objective.actor_loss(x, x, x, jnp.zeros(2), x, x, **kwargs)


def test_policy_scope_bad_mode():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="mode='sft' is not allowed"):
        objective.policy_scope(StepConfig(mode="sft"), objective.Tokens(x, x, x, x > 0, x))
