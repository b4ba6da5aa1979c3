"""The jitted update step against a float64 reference of the whole mini-batch's objective.

The reference materializes every log-softmax ``[B, T, V]`` in float64 from the models' final hidden
states and builds eq. 3-8 from the NumPy transcriptions of ``tests/reference.py``, differentiated by
plain autodiff. The step under test runs the streaming kernels, micro-batching and optax; with SGD at
learning rate 1 the parameter change is exactly minus the gradient, so both loss and gradients are
compared, and every split of the mini-batch into micro-batches must give the same update.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pallas_kernels as pk
from scipy import optimize

from jackpot_jax import losses
from jackpot_jax.models import Transformer, preset
from jackpot_jax.train import objective
from jackpot_jax.train.batch import make_batch
from jackpot_jax.train.step import StepConfig, Updater
from tests import reference as ref

V = 61
B, LENGTH = 8, 14


def make_models(same=False):
    policy = Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=2), rngs=nnx.Rngs(0))
    actor = policy if same else Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=1,
                                                   hidden_size=32, intermediate_size=64, head_dim=8),
                                            rngs=nnx.Rngs(1))
    return policy, actor


def params_of(model):
    return jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))


def _log_probs(model, params, batch, temperature=1.0):
    """Materialized log-softmax ``[B, T, V]`` of a model on a batch."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    logits = nnx.merge(graphdef, params, rest)(jnp.asarray(batch.inputs), attention_mask=jnp.asarray(batch.input_mask))
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _take(logp_all, targets):
    return jnp.take_along_axis(logp_all, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def rollout_batch(actor, temperature=1.0, seed=0, topk=0):
    """Random prompts and completions; log p_inf is the actor's own (as a rollout would store), and
    with ``topk`` so are p_inf's top-``topk`` ids and log-probs at each generated token."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, V, rng.integers(2, 6))) for _ in range(B)]
    completions = [list(rng.integers(3, V, rng.integers(1, LENGTH - len(p)))) for p in prompts]
    rewards = rng.integers(0, 2, B).astype(np.float32)
    advantages = np.asarray(losses.grpo_advantages(jnp.asarray(rewards), 2))
    dummy = make_batch(prompts, completions, [np.zeros(len(c), np.float32) for c in completions], advantages, LENGTH)
    logp_all = _log_probs(actor, nnx.state(actor, nnx.Param), dummy, temperature)
    logp = np.asarray(_take(logp_all, dummy.targets))
    logprobs = [logp[i][dummy.valid[i]] for i in range(B)]
    if not topk:
        return make_batch(prompts, completions, logprobs, advantages, LENGTH)
    top_logp, top_ids = (np.asarray(x) for x in jax.lax.top_k(logp_all, topk))
    return make_batch(prompts, completions, logprobs, advantages, LENGTH,
                      topk_ids=[top_ids[i][dummy.valid[i]] for i in range(B)],
                      topk_logprobs=[top_logp[i][dummy.valid[i]] for i in range(B)])


def _log_probs64(model, params, batch, temperature=1.0):
    """float64 log-softmax ``[B, T, V]`` of the logits from a model's final hidden states (call under x64)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    module = nnx.merge(graphdef, params, rest)
    h, _ = module.hidden_states(jnp.asarray(batch.inputs), attention_mask=jnp.asarray(batch.input_mask))
    logits = jnp.asarray(h, jnp.float64) @ jnp.asarray(module.unembedding(), jnp.float64)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _budget_lam(logp_inf, logp_target, valid, target_accept):
    """The lam whose mean acceptance over the valid tokens is ``target_accept`` (float64, brentq)."""
    ratio = np.exp(np.float64(logp_target) - np.float64(logp_inf))[valid]
    mean_accept = lambda log_lam: np.mean(np.minimum(1.0, ratio / np.exp(log_lam))) - target_accept
    return float(np.exp(optimize.brentq(mean_accept, -30.0, 30.0, xtol=1e-14)))


def _reference_loss(cfg, policy, actor, params, batch, key):
    """``loss(trainable)``: eq. 8 on the whole mini-batch in float64 (call under x64), the OBRS mask
    drawn from the step's per-token uniforms; ``params`` the models at the start of the step (p_old,
    the rollout actor), where the gradient is taken: p_new's stop-gradient values are p_old's."""
    sg = jax.lax.stop_gradient
    valid = np.asarray(batch.valid)
    adv, logp_inf = np.float64(batch.advantages), np.float64(batch.logp_inf)
    take = lambda logp_all: jnp.take_along_axis(logp_all, jnp.asarray(batch.targets)[..., None], axis=-1)[..., 0]
    opts = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip=cfg.clip)
    logp_old_all = np.asarray(_log_probs64(policy, params["policy"], batch))
    logp_old = np.asarray(take(logp_old_all))
    if cfg.has_actor:
        logp_actor_old_all = np.asarray(_log_probs64(actor, params["actor"], batch, cfg.temperature))
    if cfg.mode == "jackpot":  # the filter, from the models at the start of the step
        u = np.asarray(objective.uniforms(key, jnp.asarray(valid)), np.float64)
        lam = (_budget_lam(logp_inf, logp_old, valid, cfg.target_accept) if cfg.target_accept > 0 else cfg.lam)
        z = (ref.normalizer(np.exp(logp_actor_old_all), np.exp(logp_old_all), lam) if cfg.z == "exact"
             else ref.topk_normalizer(logp_actor_old_all, logp_old_all, lam, cfg.k))
        accepted, _, z_t = ref.obrs_filter(logp_old, logp_old, logp_inf, valid, z, u, lam=lam, target=cfg.p_target,
                                           calibrate=cfg.z == "topk")
    elif cfg.mode in ("tis", "tis_distill"):
        rho = np.minimum(np.exp(np.where(valid, logp_old - logp_inf, 0.0)), cfg.c1)

    def loss(trainable):
        logp_new_all = _log_probs64(policy, trainable["policy"], batch)
        logp_new = take(logp_new_all)
        if cfg.mode == "jackpot":
            total = ref.policy_loss(logp_new, logp_old, logp_inf, adv, valid, accepted, z_t, lam=lam, c1=cfg.c1,
                                    c2=cfg.c2, target=cfg.p_target, aggregation=cfg.aggregation, xp=jnp, sg=sg, **opts)
        else:
            p_new, p_old = jnp.exp(jnp.where(valid, logp_new, 0.0)), np.exp(np.where(valid, logp_old, 0.0))
            ppo = ref.ppo_token_loss(p_new, p_old, np.where(valid, adv[:, None], 0.0), xp=jnp, **opts)
            total = ref.masked_mean((rho if cfg.mode in ("tis", "tis_distill") else 1.0) * ppo, valid,
                                    cfg.aggregation, xp=jnp)
        if cfg.train_actor:
            logp_actor_all = _log_probs64(actor, trainable["actor"], batch, cfg.temperature)
            p_new_all, p_actor_all = jnp.exp(sg(logp_new_all)), jnp.exp(logp_actor_all)
            kl = (ref.kl(p_new_all, p_actor_all, xp=jnp) if cfg.distill_direction == "forward"
                  else ref.kl(p_actor_all, p_new_all, xp=jnp))
            total = total + ref.actor_loss(take(logp_actor_all), take(logp_actor_old_all), logp_inf, adv, valid, kl,
                                           beta=cfg.beta, tis_cap=cfg.actor_tis_cap, aggregation=cfg.aggregation,
                                           xp=jnp, sg=sg, **opts)
        return total

    return loss


def _run_step(cfg, policy, actor, batch, key):
    sgd = optax.sgd(1.0)
    updater = Updater(cfg, policy, actor if cfg.has_actor else None, sgd, sgd if cfg.train_actor else None)
    state = updater.init_state(params_of(policy), params_of(actor) if cfg.has_actor else None)
    before = jax.tree.map(jnp.copy, state)
    normalizers = cfg.mode == "jackpot" and cfg.p_target == "old"
    old = updater.prepare(state.policy, state.actor, batch, cfg.lam, normalizers=normalizers)
    state, metrics = updater.update(state, batch, old, key, cfg.lam)
    return before, state, metrics, old


MODES = {  # the five modes, and OBRS' variants: each statistics path of the mini-batch's scope
    "on_policy": dict(mode="on_policy", train_actor=False),
    "off_policy": dict(mode="off_policy", train_actor=False),
    "tis": dict(mode="tis", train_actor=False, c1=1.5),
    "tis_distill": dict(mode="tis_distill", c1=1.5, beta=0.5, aggregation="seq_mean_token_mean"),
    "jackpot": dict(mode="jackpot", k=5, lam=2.0, c1=3.0, window=LENGTH - 3),  # V_k from the one pass
    "jackpot_budget_exact_t07": dict(mode="jackpot", z="exact", target_accept=0.9, temperature=0.7,
                                     distill_direction="reverse", clip=False),  # lam first, then Z
    "jackpot_old_seq_mean": dict(mode="jackpot", p_target="old", k=5, lam=1.3, c1=3.0,
                                 aggregation="seq_mean_token_mean"),  # Z from prepare
}
SLOW_MODES = {"jackpot_old_seq_mean"}  # `make test-slow`


@pytest.mark.parametrize("case,sizes", [
    pytest.param(name, sizes, marks=pytest.mark.slow if name in SLOW_MODES or sizes != (1,) else ())
    for name in MODES for sizes in ((1,), (2, 4))])
def test_the_update_is_the_mini_batch_objective_whatever_the_micro_batches(case, sizes):
    """Micro-batches of 1 (2 and 4 in `make test-slow`) sequences of one mini-batch of 8, with one key,
    give the update of one micro-batch of 8 (parameters, kappa, lam, acceptance and every metric), and
    its gradient is the float64 reference's of the whole mini-batch."""
    policy, actor = make_models()
    cfg = StepConfig(kernel_impl="chunked", eps_high=0.28, **MODES[case])
    batch = rollout_batch(actor if cfg.has_actor else policy, cfg.temperature)
    key = jax.random.key(7)
    runs = {micro: _run_step(cfg._replace(micro_batch_size=micro), policy, actor if cfg.has_actor else None,
                             batch, key)
            for micro in sizes + (B,)}
    before, want, want_m, _ = runs[B]
    for micro in sizes:
        _, got, got_m, _ = runs[micro]
        assert set(got_m) == set(want_m)
        for name in want_m:
            np.testing.assert_allclose(float(got_m[name]), float(want_m[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}, micro-batches of {micro}")
        for (path, a), b, b0 in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                                    jax.tree.leaves(before)):
            scale = float(np.abs(np.asarray(b0, np.float64) - np.asarray(b)).max())  # float32 sums: scaled by the step
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=max(1e-7, 2e-6 * scale),
                                       err_msg=f"{jax.tree_util.keystr(path)}, micro-batches of {micro}")
    if cfg.mode == "jackpot":  # a real filter: some tokens rejected, kappa away from 1
        assert 0.0 < float(want_m["obrs/accept_rate"]) < 1.0 and float(want_m["obrs/kappa"]) != 1.0
    if sizes != (1,):
        return  # the reference once per mode
    trainable = {"policy": before.policy, **({"actor": before.actor} if cfg.train_actor else {})}
    with jax.enable_x64(True):
        loss_fn = _reference_loss(cfg, policy, actor, {"policy": before.policy, "actor": before.actor}, batch, key)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)  # one compile, not op-by-op dispatch
    np.testing.assert_allclose(float(want_m["loss/total"]), float(loss), rtol=1e-5, atol=1e-6)
    for name in trainable:
        step = jax.tree.map(lambda b, a: b - a, getattr(before, name), getattr(want, name))  # SGD(1): -grad
        for (path, got), wanted in zip(jax.tree_util.tree_leaves_with_path(step), jax.tree.leaves(grads[name])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(wanted), rtol=2e-4, atol=2e-6,
                                       err_msg=f"{name} gradient at {jax.tree_util.keystr(path)}")
    if not cfg.train_actor and cfg.has_actor:
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.actor), jax.tree.leaves(want.actor)))
    assert float(want_m["nonfinite/skipped"]) == 0.0


def test_same_actor_and_policy_with_lam_one_is_plain_grpo():
    """actor == policy (same weights), lam = 1, exact Z: every token accepted, rho = 1, and the
    policy update equals the uncorrected (plain GRPO / PPO) one."""
    policy, actor = make_models(same=True)
    batch = rollout_batch(actor)
    key = jax.random.key(11)
    common = dict(micro_batch_size=B, kernel_impl="chunked", lam=1.0, z="exact")
    _, jackpot, metrics, _ = _run_step(StepConfig(mode="jackpot", **common), policy, actor, batch, key)
    _, plain, _, _ = _run_step(StepConfig(mode="off_policy", train_actor=False, **common), policy, actor, batch, key)
    assert float(metrics["obrs/accept_rate"]) == 1.0
    np.testing.assert_allclose(float(metrics["obrs/rho_mean"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(metrics["obrs/rho_max"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(metrics["obrs/z_exact_mean"]), 1.0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jackpot.policy), jax.tree.leaves(plain.policy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z,micro", [pytest.param("exact", B, marks=pytest.mark.slow), ("topk", B), ("topk", B // 2)])
def test_the_filter_uses_the_rollout_actor_once_the_trained_actor_has_moved(z, micro):
    """update(state with actor A, rollout_actor=R) gives the policy the update (and the OBRS
    statistics) of update(state with actor R): the filter's p_inf is the actor that sampled the
    batch The negative
    control, actor A as p_inf, moves the policy differently."""
    policy, actor = make_models()
    rollout = params_of(actor)
    moved = jax.tree.map(lambda x: x + 0.2 * jnp.sign(x), rollout)  # the trained actor, far from R
    batch = rollout_batch(actor)
    cfg = StepConfig(mode="jackpot", p_target="new", z=z, k=5, lam=0.7, micro_batch_size=micro, kernel_impl="chunked")
    sgd = optax.sgd(1.0)
    updater = Updater(cfg, policy, actor, sgd, sgd)
    key = jax.random.key(5)

    def run(actor_params, rollout_actor):
        state = updater.init_state(params_of(policy), jax.tree.map(jnp.copy, actor_params))  # donated by update
        old = updater.prepare(state.policy, rollout, batch, cfg.lam)  # p_omega_old: the rollout actor
        return updater.update(state, batch, old, key, cfg.lam, rollout_actor=rollout_actor)

    (want, want_m), (got, got_m), (wrong, wrong_m) = (run(rollout, None), run(moved, rollout), run(moved, None))
    z_mean = f"obrs/z_{z}_mean"
    for name in (z_mean, "obrs/accept_rate", "obrs/rho_mean"):
        np.testing.assert_allclose(float(got_m[name]), float(want_m[name]), rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(got.policy), jax.tree.leaves(want.policy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert abs(float(wrong_m[z_mean]) - float(want_m[z_mean])) > 1e-3
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(wrong.policy),
                                                              jax.tree.leaves(want.policy))) > 1e-4


def _assert_same_filtered_update(got, got_metrics, want, want_metrics):
    """The same metrics and new state within float32 tolerance, from a batch where OBRS really
    filtered (some tokens rejected, kappa away from 1)."""
    assert set(got_metrics) == set(want_metrics)
    for name in want_metrics:
        np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert 0.0 < float(want_metrics["obrs/accept_rate"]) < 1.0 and float(want_metrics["obrs/kappa"]) != 1.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


ONE_PASS_CASES = {
    "frozen_actor": dict(mode="jackpot", train_actor=False, k=5, lam=2.5, c1=3.0),
    "trained_actor_t07": dict(mode="jackpot", k=4, lam=1.3, temperature=0.7, distill_direction="reverse"),
    "target_accept": dict(mode="jackpot", k=5, target_accept=0.9),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) for case in ONE_PASS_CASES])
def test_top_k_z_from_the_first_pass_equals_the_normalizer_pass(case, monkeypatch):
    """p_target = new, z = topk (chunked): Z from fused_jackpot_stats' one pass (V_k) and no
    fused_obrs_normalizer gives the update of Z from the normalizer's own pass over the vocabulary
    (forced): the same loss, metrics and parameters, with the same key."""
    policy, actor = make_models()
    cfg = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **ONE_PASS_CASES[case])
    batch = rollout_batch(actor, cfg.temperature)
    calls = []
    fused_obrs_normalizer = pk.fused_obrs_normalizer
    monkeypatch.setattr(pk, "fused_obrs_normalizer",
                        lambda *args, **kw: calls.append(1) or fused_obrs_normalizer(*args, **kw))
    _, got, got_m, _ = _run_step(cfg, policy, actor, batch, jax.random.key(4))
    assert cfg.z_in_first_pass and not calls
    monkeypatch.setattr(StepConfig, "z_in_first_pass", property(lambda self: False))
    _, want, want_m, _ = _run_step(cfg, policy, actor, batch, jax.random.key(4))
    assert calls
    _assert_same_filtered_update(got, got_m, want, want_m)


@pytest.mark.parametrize("case,window", [pytest.param(case, False, marks=pytest.mark.slow) for case in ONE_PASS_CASES]
                         + [("frozen_actor", True)])
def test_top_k_z_with_the_rollout_top_k_equals_the_one_pass(case, window, monkeypatch):
    """A batch that carries p_inf's top-K (K > k, exact: the actor's materialized log-softmax, as a
    rollout stores it) gives the first pass p_inf's part of V_k (Algorithm 1, phase 1), and the
    update equals the one pass that ranks the actor's logits itself: the same loss, metrics and
    parameters, with the same key; also on the completion window. K < k: the batch's top-k is not
    used."""
    policy, actor = make_models()
    cfg = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **ONE_PASS_CASES[case])
    plain, stored = rollout_batch(actor, cfg.temperature), rollout_batch(actor, cfg.temperature, topk=cfg.k + 2)
    if window:
        cfg = cfg._replace(window=int(plain.valid.sum(axis=1).max()))
    given = []
    fused_jackpot_stats = pk.fused_jackpot_stats
    spy = lambda *args, **kw: given.append(kw.get("inf_topk") is not None) or fused_jackpot_stats(*args, **kw)
    monkeypatch.setattr(pk, "fused_jackpot_stats", spy)
    _, got, got_m, _ = _run_step(cfg, policy, actor, stored, jax.random.key(4))
    assert any(given)
    given.clear()
    _, want, want_m, _ = _run_step(cfg, policy, actor, plain, jax.random.key(4))
    assert given and not any(given)
    _assert_same_filtered_update(got, got_m, want, want_m)
    given.clear()
    _run_step(cfg, policy, actor, rollout_batch(actor, cfg.temperature, topk=cfg.k - 1), jax.random.key(4))
    assert given and not any(given)


def test_nonfinite_update_is_skipped():
    """One compiled update, three ways to a non-finite step, each skipped (params and optimizer state
    unchanged bit for bit, counted) and named by skip_cause: a NaN advantage (the loss); a NaN learning
    rate (finite loss and gradients, NaN parameters: the rejected update's first leaf); NaN parameters
    before the update (corrupt, and refused by init_state). The control with lr 1 is applied."""
    policy, actor = make_models()
    batch = rollout_batch(actor)
    cfg = StepConfig(mode="jackpot", micro_batch_size=B, kernel_impl="chunked")
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # the rate lives in the state: no recompile
    updater = Updater(cfg, policy, actor, sgd, sgd)
    key = jax.random.key(0)
    template = updater.init_state(params_of(policy), params_of(actor))  # once: init_state compiles anew
    old = updater.prepare(template.policy, template.actor, batch, cfg.lam)
    with_lr = lambda opt, lr: opt._replace(hyperparams={"learning_rate": jnp.float32(lr)})

    def run(batch, lr=1.0):
        state = jax.tree.map(jnp.copy, template)  # update donates its state
        state = state._replace(policy_opt=with_lr(state.policy_opt, lr))
        before = jax.tree.map(jnp.copy, state)
        after, metrics = updater.update(state, batch, old, key, cfg.lam)
        return before, after, metrics

    nan_advantage = batch._replace(advantages=np.where(np.arange(B) == 0, np.nan, batch.advantages).astype(np.float32))
    for case, (got, lr, cause) in {"loss": (nan_advantage, 1.0, "the loss"),
                                   "lr": (batch, np.nan, "the updated parameters / optimizer state, first at policy[")
                                   }.items():
        before, after, metrics = run(got, lr)
        assert float(metrics["nonfinite/skipped"]) == 1.0 and int(after.updates) == 0, case
        if case == "lr":  # the loss and gradients were finite: only the update's result is not
            assert np.isfinite(float(metrics["loss/total"])) and np.isfinite(float(metrics["grad_norm/policy"]))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=case)
        assert updater.skip_cause(after)[1] is False and updater.skip_cause(after)[0].startswith(cause), case
    before, after, metrics = run(batch)  # the control: applied, and nothing to name
    assert float(metrics["nonfinite/skipped"]) == 0.0 and int(after.updates) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.policy), jax.tree.leaves(after.policy)))
    assert updater.skip_cause(after) == ("nothing (the last update was applied)", False)
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0, 0].set(jnp.inf) if "embed_tokens" in jax.tree_util.keystr(path) else x, after.policy)
    cause, corrupt = updater.skip_cause(after._replace(policy=poisoned))
    assert corrupt and cause.startswith("the parameters before the update, first at policy['embed_tokens']"), cause
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) before any update, first at "
                                         r"policy\['embed_tokens'\] \(1 leaves\): the model or checkpoint"):
        updater.init_state(poisoned, params_of(actor))


@pytest.mark.slow  # remat itself is checked in tests/test_models.py; this is the whole update with it
def test_remat_models_give_the_same_update():
    """Rematerialized blocks (inside prepare's lax.map and the update's scan) change nothing but memory."""
    cfg = StepConfig(mode="jackpot", micro_batch_size=B // 2, kernel_impl="chunked", k=5)
    results = []
    for remat in (False, True):
        policy = Transformer(preset("tiny-qwen3", vocab_size=V, remat=remat), rngs=nnx.Rngs(0))
        actor = Transformer(preset("tiny-qwen3", vocab_size=V, remat=remat, num_hidden_layers=1), rngs=nnx.Rngs(1))
        results.append(_run_step(cfg, policy, actor, rollout_batch(actor), jax.random.key(5))[1])
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


WINDOW_CASES = {
    "jackpot_new_topk": dict(mode="jackpot", p_target="new", z="topk", k=5, lam=0.8),
    "jackpot_old_exact": dict(mode="jackpot", p_target="old", z="exact", lam=1.3, c1=3.0),
    "tis_distill_seq_mean": dict(mode="tis_distill", c1=1.5, beta=0.5, aggregation="seq_mean_token_mean"),
    "on_policy": dict(mode="on_policy", train_actor=False),  # no actor in the update
}
PAST_THE_END = ("tis_distill_seq_mean",)  # a window running past T as well


@pytest.mark.parametrize("case", [pytest.param(case, marks=() if case == "jackpot_new_topk" else pytest.mark.slow)
                                  for case in WINDOW_CASES])
def test_statistics_on_the_completion_window_equal_all_positions(case):
    """window = the longest completion (or, for some cases, a window running past the sequence end)
    gives the update of the statistics at every position: the same parameters and metrics, the OBRS
    mask too (a token's draw is keyed by its completion position)."""
    policy, actor = make_models()
    base = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **WINDOW_CASES[case])
    batch = rollout_batch(actor if base.has_actor else policy, base.temperature)
    longest = int(batch.valid.sum(axis=1).max())
    key = jax.random.key(2)
    _, want, want_m, _ = _run_step(base, policy, actor if base.has_actor else None, batch, key)
    for window in (longest, LENGTH + 3) if case in PAST_THE_END else (longest,):
        _, got, got_m, _ = _run_step(base._replace(window=window), policy, actor if base.has_actor else None,
                                     batch, key)
        assert set(got_m) == set(want_m)
        for name in want_m:
            np.testing.assert_allclose(float(got_m[name]), float(want_m[name]), rtol=1e-5, atol=1e-6, err_msg=name)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if base.mode == "jackpot":
        assert 0.0 < float(want_m["obrs/accept_rate"]) < 1.0  # a real filter


def test_a_completion_longer_than_the_window_is_refused():
    policy, actor = make_models()
    batch = rollout_batch(actor)
    longest = int(batch.valid.sum(axis=1).max())
    with pytest.raises(ValueError, match=f"{longest} generated tokens, more than the step's window={longest - 1}"):
        _run_step(StepConfig(mode="jackpot", micro_batch_size=B, kernel_impl="chunked", window=longest - 1),
                  policy, actor, batch, jax.random.key(0))
