"""The jitted update step against a slow, obviously-correct reference written here.

The reference materializes every log-softmax ``[B, T, V]`` and builds the losses from
:mod:`jackpot_jax.obrs` and :mod:`jackpot_jax.losses` directly (eq. 3-8), differentiated by plain
autodiff. The step under test runs the streaming kernels, micro-batching and optax; with SGD at
learning rate 1 the parameter change is exactly minus the gradient, so both loss and gradients are
compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pallas_kernels as pk

from jackpot_jax import losses, obrs
from jackpot_jax.models import Transformer, preset
from jackpot_jax.train.batch import make_batch
from jackpot_jax.train.step import StepConfig, Updater

V = 61
B, LENGTH = 6, 14


def _models(same=False):
    policy = Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=2), rngs=nnx.Rngs(0))
    actor = policy if same else Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=1,
                                                   hidden_size=32, intermediate_size=64, head_dim=8),
                                            rngs=nnx.Rngs(1))
    return policy, actor


def _params(model):
    return jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))


def _log_probs(model, params, batch, temperature=1.0):
    """Materialized log-softmax ``[B, T, V]`` of a model on a batch."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    logits = nnx.merge(graphdef, params, rest)(jnp.asarray(batch.inputs), attention_mask=jnp.asarray(batch.input_mask))
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _take(logp_all, targets):
    return jnp.take_along_axis(logp_all, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def _batch(actor, temperature=1.0, seed=0, topk=0):
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


def _reference_loss(cfg, policy, actor, trainable, frozen_actor, old_params, batch, key):
    """Eq. 8 on the whole batch from materialized distributions (one micro-batch)."""
    sg = jax.lax.stop_gradient
    actor_params = trainable.get("actor", frozen_actor)
    logp_new_all = _log_probs(policy, trainable["policy"], batch)
    logp_old_all = sg(_log_probs(policy, old_params["policy"], batch))
    if cfg.mode == "jackpot" or cfg.train_actor:
        logp_act_all = _log_probs(actor, actor_params, batch, cfg.temperature)
        logp_act_old = sg(_take(_log_probs(actor, old_params["actor"], batch, cfg.temperature), batch.targets))
    valid = jnp.asarray(batch.valid)
    zero = lambda x: jnp.where(valid, x, 0.0)
    logp_new, logp_old = zero(_take(logp_new_all, batch.targets)), zero(_take(logp_old_all, batch.targets))
    logp_inf = jnp.asarray(batch.logp_inf)
    if cfg.mode == "jackpot":
        target_all = logp_new_all if cfg.p_target == "new" else logp_old_all
        if cfg.target_accept > 0:  # lam of the budget, over this mini-batch's sampled tokens
            cfg = cfg._replace(lam=obrs.solve_lambda(logp_inf, sg(_take(target_all, batch.targets)),
                                                     cfg.target_accept, valid))
        z = (obrs.normalizer(sg(logp_act_all), sg(target_all), cfg.lam) if cfg.z == "exact"
             else obrs.topk_normalizer(sg(logp_act_all), sg(target_all), cfg.lam, cfg.k))
        f = obrs.obrs_filter(key, logp_inf.reshape(-1), logp_old.reshape(-1), logp_new.reshape(-1), z.reshape(-1),
                             valid.reshape(-1), lam=cfg.lam, c1=cfg.c1, c2=cfg.c2, target=cfg.p_target,
                             calibrate=cfg.z == "topk")
        mask, rho = f.accepted.reshape(valid.shape), f.rho.reshape(valid.shape)
    elif cfg.mode in ("tis", "tis_distill"):
        mask, rho = valid, losses.truncated_is(logp_old - logp_inf, cfg.c1)
    else:
        mask, rho = valid, jnp.ones(valid.shape)
    ppo, _ = losses.ppo_token_loss(logp_new, logp_old, jnp.asarray(batch.advantages), eps_low=cfg.eps_low,
                                   eps_high=cfg.eps_high, clip=cfg.clip)
    total = losses.masked_mean(sg(rho) * ppo, mask)
    if cfg.train_actor:
        kl = losses.distill_kl(logp_new_all, logp_act_all, cfg.distill_direction)
        actor_loss, _ = losses.actor_loss(_take(logp_act_all, batch.targets), logp_act_old, logp_inf,
                                          jnp.asarray(batch.advantages), valid, kl, beta=cfg.beta,
                                          tis_cap=cfg.actor_tis_cap, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                          clip=cfg.clip, ppo_weight=cfg.actor_ppo)
        total = total + actor_loss
    return total


def _run_step(cfg, policy, actor, batch, key):
    sgd = optax.sgd(1.0)
    updater = Updater(cfg, policy, actor if cfg.has_actor else None, sgd, sgd if cfg.train_actor else None)
    state = updater.init_state(_params(policy), _params(actor) if cfg.has_actor else None)
    before = jax.tree.map(jnp.copy, state)
    normalizers = cfg.mode == "jackpot" and cfg.p_target == "old"
    old = updater.prepare(state.policy, state.actor, batch, cfg.lam, normalizers=normalizers)
    state, metrics = updater.update(state, batch, old, key, cfg.lam)
    return before, state, metrics, old


CASES = {
    "jackpot_new_topk": dict(mode="jackpot", p_target="new", z="topk", k=5, lam=0.8),
    "jackpot_new_target_accept": dict(mode="jackpot", p_target="new", z="topk", k=5, target_accept=0.9),
    "jackpot_old_exact": dict(mode="jackpot", p_target="old", z="exact", lam=1.3, c1=3.0),
    "jackpot_new_exact_reverse_t07": dict(mode="jackpot", p_target="new", z="exact", temperature=0.7,
                                          distill_direction="reverse", clip=False),
    "tis_distill": dict(mode="tis_distill", c1=1.5, beta=0.5, actor_ppo=0.0),
    "off_policy_frozen_actor": dict(mode="off_policy", train_actor=False),
    "on_policy": dict(mode="on_policy", train_actor=False),
}
SLOW_CASES = {"jackpot_new_target_accept", "off_policy_frozen_actor", "on_policy"}  # `make test-slow`


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_CASES else name
                                  for name in CASES])
def test_update_step_equals_materialized_reference(case):
    cfg = StepConfig(**{"micro_batch_size": B, "kernel_impl": "chunked", "eps_high": 0.28, **CASES[case]})
    policy, actor = _models()
    batch = _batch(actor if cfg.has_actor else policy, cfg.temperature)
    key = jax.random.key(7)
    before, after, metrics, old = _run_step(cfg, policy, actor if cfg.has_actor else None, batch, key)

    old_params = {"policy": before.policy, "actor": before.actor}
    trainable = {"policy": before.policy, **({"actor": before.actor} if cfg.train_actor else {})}
    reference = lambda t: _reference_loss(cfg, policy, actor if cfg.has_actor else policy, t,
                                          before.actor, old_params, batch, jax.random.fold_in(key, 0))
    loss, grads = jax.jit(jax.value_and_grad(reference))(trainable)  # one compile, not op-by-op dispatch
    np.testing.assert_allclose(float(metrics["loss/total"]), float(loss), rtol=1e-5, atol=1e-6)
    for name in trainable:
        step = jax.tree.map(lambda b, a: b - a, getattr(before, name), getattr(after, name))  # SGD(1): -grad
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(step), jax.tree.leaves(grads[name])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6,
                                       err_msg=f"{name} gradient at {jax.tree_util.keystr(path)}")
    if not cfg.train_actor and cfg.has_actor:
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.actor), jax.tree.leaves(after.actor)))
    assert float(metrics["nonfinite/skipped"]) == 0.0


def test_gradient_accumulation_averages_micro_batches():
    """Two micro-batches: the update's gradient is the mean of the reference gradients of each half,
    each with its own mask key (fold_in(key, i))."""
    base = dict(mode="jackpot", p_target="new", z="topk", k=5, kernel_impl="chunked")
    policy, actor = _models()
    batch = _batch(actor)
    key = jax.random.key(3)
    before, after, _, _ = _run_step(StepConfig(**base, micro_batch_size=B // 2), policy, actor, batch, key)
    cfg = StepConfig(**base, micro_batch_size=B)
    old_params = {"policy": before.policy, "actor": before.actor}
    trainable = {"policy": before.policy, "actor": before.actor}
    halves = [jax.tree.map(lambda x: x[i * B // 2:(i + 1) * B // 2], batch) for i in range(2)]
    grads = [jax.jit(jax.grad(lambda t: _reference_loss(cfg, policy, actor, t, None, old_params, half,  # noqa: B023
                                                        jax.random.fold_in(key, i))))(trainable)
             for i, half in enumerate(halves)]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    got = jax.tree.map(lambda b, a: b - a, {"policy": before.policy, "actor": before.actor},
                       {"policy": after.policy, "actor": after.actor})
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-6)


def test_same_actor_and_policy_with_lam_one_is_plain_grpo():
    """actor == policy (same weights), lam = 1, exact Z: every token accepted, rho = 1, and the
    policy update equals the uncorrected (plain GRPO / PPO) one."""
    policy, actor = _models(same=True)
    batch = _batch(actor)
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


@pytest.mark.parametrize("z", [pytest.param("exact", marks=pytest.mark.slow), "topk"])
def test_the_filter_uses_the_rollout_actor_once_the_trained_actor_has_moved(z):
    """update(state with actor A, rollout_actor=R) gives the policy the update (and the OBRS
    statistics) of update(state with actor R): the filter's p_inf is the actor that sampled the
    batch (with the top-k Z: the filter's own pass, against Z from the first pass). The negative
    control, actor A as p_inf, moves the policy differently."""
    policy, actor = _models()
    rollout = _params(actor)
    moved = jax.tree.map(lambda x: x + 0.2 * jnp.sign(x), rollout)  # the trained actor, far from R
    batch = _batch(actor)
    cfg = StepConfig(mode="jackpot", p_target="new", z=z, k=5, lam=0.7, micro_batch_size=B, kernel_impl="chunked")
    sgd = optax.sgd(1.0)
    updater = Updater(cfg, policy, actor, sgd, sgd)
    key = jax.random.key(5)

    def run(actor_params, rollout_actor):
        state = updater.init_state(_params(policy), jax.tree.map(jnp.copy, actor_params))  # donated by update
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
def test_top_k_z_from_the_first_pass_equals_the_filter_pass(case, monkeypatch):
    """p_target = new, z = topk (chunked): Z from fused_jackpot_stats' one pass and no
    fused_obrs_filter gives the update of the two-pass path (the filter's own pass over the
    vocabulary, forced): the same loss, metrics and parameters, with the same key."""
    policy, actor = _models()
    cfg = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **ONE_PASS_CASES[case])
    batch = _batch(actor, cfg.temperature)
    filter_calls = []
    fused_obrs_filter = pk.fused_obrs_filter
    monkeypatch.setattr(pk, "fused_obrs_filter",
                        lambda *args, **kw: filter_calls.append(1) or fused_obrs_filter(*args, **kw))
    _, got, got_m, _ = _run_step(cfg, policy, actor, batch, jax.random.key(4))
    assert cfg.z_in_first_pass and not filter_calls
    monkeypatch.setattr(StepConfig, "z_in_first_pass", property(lambda self: False))
    _, want, want_m, _ = _run_step(cfg, policy, actor, batch, jax.random.key(4))
    assert filter_calls
    _assert_same_filtered_update(got, got_m, want, want_m)


@pytest.mark.parametrize("case,window", [pytest.param(case, False, marks=pytest.mark.slow) for case in ONE_PASS_CASES]
                         + [("frozen_actor", True)])
def test_top_k_z_with_the_rollout_top_k_equals_the_one_pass(case, window, monkeypatch):
    """A batch that carries p_inf's top-K (K > k, exact: the actor's materialized log-softmax, as a
    rollout stores it) gives the first pass p_inf's part of V_k (Algorithm 1, phase 1), and the
    update equals the one pass that ranks the actor's logits itself: the same loss, metrics and
    parameters, with the same key; also on the completion window. K < k: the batch's top-k is not
    used."""
    policy, actor = _models()
    cfg = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **ONE_PASS_CASES[case])
    plain, stored = _batch(actor, cfg.temperature), _batch(actor, cfg.temperature, topk=cfg.k + 2)
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
    _run_step(cfg, policy, actor, _batch(actor, cfg.temperature, topk=cfg.k - 1), jax.random.key(4))
    assert given and not any(given)


def test_nonfinite_update_is_skipped():
    """A NaN advantage poisons the loss: the update is skipped (state unchanged) and counted."""
    policy, actor = _models()
    batch = _batch(actor)
    batch = batch._replace(advantages=np.where(np.arange(B) == 0, np.nan, batch.advantages).astype(np.float32))
    before, after, metrics, _ = _run_step(StepConfig(mode="jackpot", micro_batch_size=B, kernel_impl="chunked"),
                                          policy, actor, batch, jax.random.key(0))
    assert float(metrics["nonfinite/skipped"]) == 1.0
    assert int(after.updates) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # remat itself is checked in tests/test_models.py; this is the whole update with it
def test_remat_models_give_the_same_update():
    """Rematerialized blocks (inside prepare's lax.map and the update's scan) change nothing but memory."""
    cfg = StepConfig(mode="jackpot", micro_batch_size=B // 2, kernel_impl="chunked", k=5)
    results = []
    for remat in (False, True):
        policy = Transformer(preset("tiny-qwen3", vocab_size=V, remat=remat), rngs=nnx.Rngs(0))
        actor = Transformer(preset("tiny-qwen3", vocab_size=V, remat=remat, num_hidden_layers=1), rngs=nnx.Rngs(1))
        results.append(_run_step(cfg, policy, actor, _batch(actor), jax.random.key(5))[1])
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


WINDOW_CASES = {  # masks that do not depend on the uniforms (every token accepted): both paths agree exactly
    "jackpot_new_topk_accept_all": dict(mode="jackpot", p_target="new", z="topk", k=5, lam=1e-4),
    "jackpot_old_exact_accept_all": dict(mode="jackpot", p_target="old", z="exact", lam=1e-4, c1=3.0),
    "tis_distill_seq_mean": dict(mode="tis_distill", c1=1.5, beta=0.5, aggregation="seq_mean_token_mean"),
    "on_policy": dict(mode="on_policy", train_actor=False),  # no actor in the update
}
PAST_THE_END = ("tis_distill_seq_mean",)  # a window running past T as well


@pytest.mark.parametrize("case", [pytest.param(case, marks=() if case == "jackpot_new_topk_accept_all" else pytest.mark.slow)
                                  for case in WINDOW_CASES])
def test_statistics_on_the_completion_window_equal_all_positions(case):
    """window = the longest completion (or, for some cases, a window running past the sequence end)
    gives the update of the statistics at every position: the same parameters and metrics."""
    policy, actor = _models()
    base = StepConfig(micro_batch_size=B // 2, kernel_impl="chunked", **WINDOW_CASES[case])
    batch = _batch(actor if base.has_actor else policy, base.temperature)
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
        assert float(want_m["obrs/accept_rate"]) == 1.0  # the premise: no token left to the uniforms


def test_a_completion_longer_than_the_window_is_refused():
    policy, actor = _models()
    batch = _batch(actor)
    longest = int(batch.valid.sum(axis=1).max())
    with pytest.raises(ValueError, match=f"{longest} generated tokens, more than the step's window={longest - 1}"):
        _run_step(StepConfig(mode="jackpot", micro_batch_size=B, kernel_impl="chunked", window=longest - 1),
                  policy, actor, batch, jax.random.key(0))
