"""The KL controller of the actor's distillation weight (jackpot_jax/controller.py): its law against a
float64 transcription of the docstring's formula, its bounds, and in the trainer: the beta it sets
each step from the measured KL is the beta the update's loss used, and it survives a checkpoint."""
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from jackpot_jax.config import ConfigError
from jackpot_jax.controller import KLController
from jackpot_jax.train.config import validate
from jackpot_jax.train.step import StepConfig, Updater
from tests.test_train_resume import demo_config
from tests.test_train_step import _batch, _models, _params


def _law(beta, kl, target, rate, low, high):
    """log beta' = clip(log beta + rate * clip(log(kl / target), -1, 1), log low, log high)."""
    step = np.clip(np.log(np.float64(kl) / target), -1.0, 1.0)
    return float(np.exp(np.clip(np.log(beta) + rate * step, np.log(low), np.log(high))))


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
    config.algorithm.controller.beta_min, config.algorithm.train_actor = 0.01, False
    with pytest.raises(ConfigError, match="controller.kind='kl' is not allowed with algorithm.train_actor=False"):
        validate(config)


def test_beta_given_to_an_update_equals_beta_compiled_in():
    """The update's ``beta`` argument is the eq. 8 weight: the same update as a StepConfig with it."""
    policy, actor = _models()
    batch = _batch(actor)
    results = []
    for cfg, beta in ((StepConfig(mode="jackpot", k=5, beta=0.1, micro_batch_size=6), 2.5),
                      (StepConfig(mode="jackpot", k=5, beta=2.5, micro_batch_size=6), None)):
        updater = Updater(cfg, policy, actor, optax.sgd(1.0), optax.sgd(1.0))
        state = updater.init_state(_params(policy), _params(actor))
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
                                                                 beta_max=10.0))
    trainer = Trainer(config, str(tmp_path / "run"))
    history = trainer.run()
    beta = config.algorithm.beta
    for row in history:
        beta = _law(beta, row["mismatch/kl_full"], 0.01, 0.7, 0.01, 10.0)
        assert row["controller/beta"] == pytest.approx(beta, rel=1e-9)
        # one micro-batch per update: loss/total = L_policy + actor_ppo * L_ppo_actor + beta * L_distill
        actor_part = row["loss/total"] - row["loss/policy"] - config.algorithm.actor_ppo * row["loss/actor_ppo"]
        assert actor_part == pytest.approx(beta * row["loss/distill"], rel=1e-3, abs=1e-6)
    assert history[-1]["controller/beta"] != pytest.approx(history[0]["controller/beta"])  # it moved
    assert trainer._meta()["controller"] == {"beta": history[-1]["controller/beta"]}
    resumed = Trainer(config, str(tmp_path / "run"))  # from the last checkpoint
    assert resumed.controller.beta == history[-1]["controller/beta"]
