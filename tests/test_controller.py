"""The KL controller of the actor's distillation weight and learning rate (jackpot_jax/controller.py):
its laws against float64 transcriptions of the docstring's formulas, its bounds; an update's
learning-rate factor against the optimizer at that learning rate (both placements); and in the
trainer: the beta it sets each step from the measured KL is the beta the update's loss used, and its
state survives a checkpoint."""
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from jackpot_jax.config import ConfigError
from jackpot_jax.controller import KLController
from jackpot_jax.models.sharding import make_mesh
from jackpot_jax.train.config import validate
from jackpot_jax.train.disaggregated import DisaggregatedUpdater
from jackpot_jax.train.step import StepConfig, Updater
from tests.test_train_resume import demo_config
from tests.test_train_step import make_models, params_of, rollout_batch


def _law(beta, kl, target, rate, low, high):
    """log beta' = clip(log beta + rate * clip(log(kl / target), -1, 1), log low, log high)."""
    step = np.clip(np.log(np.float64(kl) / target), -1.0, 1.0)
    return float(np.exp(np.clip(np.log(beta) + rate * step, np.log(low), np.log(high))))


def _lr_law(scale, kl, target, lr_rate, low):
    """log s' = clip(log s - lr_rate * clip(log(kl / target), -1, 1), log low, 0)."""
    step = np.clip(np.log(np.float64(kl) / target), -1.0, 1.0)
    return float(np.exp(np.clip(np.log(scale) - lr_rate * step, np.log(low), 0.0)))


def test_the_controller_follows_its_law_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    controller = KLController(target_kl=0.05, rate=0.3, beta_min=0.02, beta_max=4.0, beta=0.1)
    beta = 0.1
    for kl in np.exp(rng.uniform(-8, 2, 200)):
        beta = _law(beta, kl, 0.05, 0.3, 0.02, 4.0)
        assert controller.update(float(kl)) == pytest.approx(beta, rel=1e-12)
    # far above the target it rises by e^rate per step until beta_max; at the target it holds
    controller = KLController(target_kl=0.05, rate=0.5, beta_min=0.01, beta_max=1.0, beta=0.1)
    assert controller.update(5.0) == pytest.approx(0.1 * math.exp(0.5))
    assert [round(controller.update(5.0), 12) for _ in range(10)][-1] == 1.0
    assert controller.update(0.05) == 1.0
    assert controller.update(float("nan")) == 1.0  # a failed measurement moves nothing
    assert controller.update(0.0) == pytest.approx(math.exp(-0.5))  # a perfect match: as far below as counted
    # the initial beta is clipped into the bounds, and the state round-trips
    assert KLController(target_kl=1, rate=1, beta_min=0.5, beta_max=2, beta=10).beta == 2
    other = KLController(target_kl=1, rate=1, beta_min=0.5, beta_max=2, beta=1)
    other.load_state_dict(controller.state_dict())
    assert other.beta == controller.beta
    with pytest.raises(ValueError, match="beta_min=3 > beta_max=2"):
        KLController(target_kl=1, rate=1, beta_min=3, beta_max=2, beta=1)
    with pytest.raises(ValueError, match="rate=0 is not allowed"):
        KLController(target_kl=1, rate=0, beta_min=1, beta_max=2, beta=1)
    assert controller.lr_scale == 1.0  # lr_rate 0 (the default): the learning rate is not controlled


def test_the_learning_rate_factor_follows_its_law_and_stays_in_bounds():
    rng = np.random.default_rng(1)
    controller = KLController(target_kl=0.1, rate=0.2, beta_min=0.01, beta_max=10.0, beta=0.1, lr_rate=0.7,
                              lr_scale_min=0.05)
    beta, scale = 0.1, 1.0
    for kl in np.exp(rng.uniform(-6, 1, 200)):
        beta, scale = _law(beta, kl, 0.1, 0.2, 0.01, 10.0), _lr_law(scale, kl, 0.1, 0.7, 0.05)
        assert controller.update(float(kl)) == pytest.approx(beta, rel=1e-12)
        assert controller.lr_scale == pytest.approx(scale, rel=1e-12)
    # far above the target it falls by e^-lr_rate per step to lr_scale_min; far below, back to 1, no further
    controller = KLController(target_kl=0.1, rate=0.2, beta_min=0.01, beta_max=10.0, beta=0.1, lr_rate=1.0,
                              lr_scale_min=0.01)
    controller.update(10.0)
    assert controller.lr_scale == pytest.approx(math.exp(-1.0))
    for _ in range(10):
        controller.update(10.0)
    assert controller.lr_scale == pytest.approx(0.01)
    controller.update(float("nan"))
    assert controller.lr_scale == pytest.approx(0.01)
    for _ in range(10):
        controller.update(1e-3)
    assert controller.lr_scale == 1.0
    other = KLController(target_kl=1, rate=1, beta_min=0.5, beta_max=2, beta=1, lr_rate=1.0)
    controller.update(10.0)
    other.load_state_dict(controller.state_dict())
    assert other.lr_scale == controller.lr_scale == pytest.approx(math.exp(-1.0))
    other.load_state_dict({"beta": 1.0})  # a checkpoint from before the learning-rate factor
    assert other.lr_scale == 1.0
    with pytest.raises(ValueError, match="lr_scale_min=2 is not allowed: it must be <= 1"):
        KLController(target_kl=1, rate=1, beta_min=1, beta_max=2, beta=1, lr_rate=1, lr_scale_min=2)
    with pytest.raises(ValueError, match="lr_rate=-1 is not allowed"):
        KLController(target_kl=1, rate=1, beta_min=1, beta_max=2, beta=1, lr_rate=-1)


def test_controller_config():
    config = demo_config("/tmp/unused")
    assert KLController.from_config(config.algorithm) is None
    config.algorithm.controller.kind = "kl"
    validate(config)
    controller = KLController.from_config(config.algorithm)
    assert controller.beta == config.algorithm.beta and controller.target_kl == config.algorithm.controller.target_kl
    config.algorithm.controller.beta_min = 20.0
    with pytest.raises(ConfigError, match="controller.beta_min=20.0 is not allowed: it must be <= controller.beta_max"):
        validate(config)
    config.algorithm.controller.beta_min = 0.01
    config.algorithm.controller.lr_scale_min = 1.5
    with pytest.raises(ConfigError, match=r"lr_scale_min=1.5 is not allowed: it must be a finite number > 0 and <= 1"):
        validate(config)
    config.algorithm.controller.lr_scale_min, config.algorithm.controller.lr_rate = 0.05, 0.5
    validate(config)
    controller = KLController.from_config(config.algorithm)
    assert (controller.lr_rate, controller.lr_scale_min, controller.lr_scale) == (0.5, 0.05, 1.0)
    config.algorithm.train_actor = False
    with pytest.raises(ConfigError, match="controller.kind='kl' is not allowed with algorithm.train_actor=False"):
        validate(config)


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_an_actor_lr_scale_is_the_actors_learning_rate_times_it(placement):
    """AdamW at lr with ``actor_lr_scale`` s equals AdamW at lr * s (two updates, so Adam's moments
    matter); the policy's update does not change."""
    policy, actor = make_models()
    batch = rollout_batch(actor)
    cfg = StepConfig(mode="jackpot", k=5, beta=0.5, micro_batch_size=8)
    if placement == "colocated":
        make = lambda *args: Updater(*args)
    else:
        devices = jax.devices()
        make = lambda *args: DisaggregatedUpdater(*args, mesh=make_mesh(devices=devices[:1]),
                                                  actor_mesh=make_mesh(devices=devices[1:2]))
    results = []
    for actor_lr, scale in ((1e-2, 0.25), (2.5e-3, None)):
        tx = lambda lr: optax.adamw(lr, weight_decay=0.1)
        updater = make(cfg, policy, actor, tx(1e-2), tx(actor_lr))
        state = updater.init_state(params_of(policy), params_of(actor))
        old = updater.prepare(state.policy, state.actor, batch, cfg.lam)
        for key in (0, 1):
            state, _ = updater.update(state, batch, old, jax.random.key(key), cfg.lam, actor_lr_scale=scale)
        results.append(jax.device_get(state))
    got, want = results
    start = params_of(actor)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(want.actor), jax.tree.leaves(start)))
    assert moved > 1e-3  # the actor really moved
    for a, b in zip(jax.tree.leaves(got.actor), jax.tree.leaves(want.actor)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(got.policy), jax.tree.leaves(want.policy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_beta_given_to_an_update_equals_beta_compiled_in():
    """The update's ``beta`` argument is the eq. 8 weight: the same update as a StepConfig with it."""
    policy, actor = make_models()
    batch = rollout_batch(actor)
    results = []
    for cfg, beta in ((StepConfig(mode="jackpot", k=5, beta=0.1, micro_batch_size=8), 2.5),
                      (StepConfig(mode="jackpot", k=5, beta=2.5, micro_batch_size=8), None)):
        updater = Updater(cfg, policy, actor, optax.sgd(1.0), optax.sgd(1.0))
        state = updater.init_state(params_of(policy), params_of(actor))
        old = updater.prepare(state.policy, state.actor, batch, cfg.lam)
        results.append(updater.update(state, batch, old, jax.random.key(0), cfg.lam, beta=beta))
    (got, got_metrics), (want, want_metrics) = results
    for name in want_metrics:
        np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(got.actor), jax.tree.leaves(want.actor)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert float(want_metrics["loss/distill"]) > 0


def test_the_trainer_uses_the_controllers_beta_each_step(tmp_path):
    """Three steps with the controller: ``controller/beta`` follows the law from the measured
    ``mismatch/kl_full``, and the actor's loss in ``loss/total`` weighs ``loss/distill`` by it."""
    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415

    config = demo_config(tmp_path / "data", **{"train.steps": 3, "algorithm.micro_batch_size": 4})
    config.algorithm.controller = ml_collections.ConfigDict(dict(kind="kl", target_kl=0.01, rate=0.7, beta_min=0.01,
                                                                 beta_max=10.0, lr_rate=0.5, lr_scale_min=0.1))
    trainer = Trainer(config, str(tmp_path / "run"))
    history = trainer.run()
    beta, scale = config.algorithm.beta, 1.0
    for row in history:
        beta = _law(beta, row["mismatch/kl_full"], 0.01, 0.7, 0.01, 10.0)
        scale = _lr_law(scale, row["mismatch/kl_full"], 0.01, 0.5, 0.1)
        assert row["controller/beta"] == pytest.approx(beta, rel=1e-9)
        assert row["controller/actor_lr_scale"] == pytest.approx(scale, rel=1e-9)
        # one micro-batch per update: loss/total = L_policy + actor_ppo * L_ppo_actor + beta * L_distill
        actor_part = row["loss/total"] - row["loss/policy"] - config.algorithm.actor_ppo * row["loss/actor_ppo"]
        assert actor_part == pytest.approx(beta * row["loss/distill"], rel=1e-3, abs=1e-6)
    assert history[-1]["controller/beta"] != pytest.approx(history[0]["controller/beta"])  # it moved
    assert history[-1]["controller/actor_lr_scale"] < 1.0
    assert trainer._meta()["controller"] == {"beta": history[-1]["controller/beta"],
                                             "lr_scale": history[-1]["controller/actor_lr_scale"]}
    resumed = Trainer(config, str(tmp_path / "run"))  # from the last checkpoint
    assert resumed.controller.beta == history[-1]["controller/beta"]
    assert resumed.controller.lr_scale == history[-1]["controller/actor_lr_scale"]
