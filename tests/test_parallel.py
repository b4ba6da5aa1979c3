"""The update step on a device mesh (8 fake CPU devices, tests/conftest.py) against the same step on
one device: FSDP x tensor parallelism, and the disaggregated placement (policy and actor on meshes of
their own), change where the numbers live, not what they are; and each device holds less as FSDP
grows (XLA's memory analysis of the compiled update)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.demo import get_config
from jackpot_jax import losses
from jackpot_jax.config import ConfigError
from jackpot_jax.models import Transformer, preset
from jackpot_jax.models.sharding import make_mesh
from jackpot_jax.parallel import allgather, global_rows, initialize, mesh_from_config, meshes_from_config, mesh_shape
from jackpot_jax.train.batch import make_batch
from jackpot_jax.train.config import validate
from jackpot_jax.train.disaggregated import DisaggregatedUpdater
from jackpot_jax.train.step import StepConfig, Updater

V, B, LENGTH = 64, 8, 16  # V, the heads and the MLP width divide tensor=2; B divides data x fsdp = 4


def _models():
    policy = Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=2), rngs=nnx.Rngs(0))
    actor = Transformer(preset("tiny-qwen3", vocab_size=V, num_hidden_layers=1, hidden_size=32,
                               intermediate_size=64, head_dim=8), rngs=nnx.Rngs(1))
    return policy, actor


def _batch(actor, temperature):
    """Random prompts and completions; log p_inf is the actor's own, as a rollout stores it."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, V, rng.integers(2, 6))) for _ in range(B)]
    completions = [list(rng.integers(3, V, rng.integers(1, LENGTH - len(p)))) for p in prompts]
    advantages = np.asarray(losses.grpo_advantages(rng.integers(0, 2, B).astype(np.float32), 2))
    dummy = make_batch(prompts, completions, [np.zeros(len(c), np.float32) for c in completions], advantages, LENGTH)
    logits = actor(dummy.inputs, attention_mask=dummy.input_mask) / temperature
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, axis=-1)), dummy.targets[..., None], -1)[..., 0]
    return make_batch(prompts, completions, [logp[i][dummy.valid[i]] for i in range(B)], advantages, LENGTH)


CFG = StepConfig(mode="jackpot", k=5, lam=1.5, temperature=0.7, micro_batch_size=4, kernel_impl="chunked")


def _updater(mesh, tx=None):
    policy, actor = _models()
    tx = tx or optax.sgd(1.0)  # SGD at lr 1: the parameter change is minus the gradient
    updater = Updater(CFG, policy, actor, tx, tx, mesh=mesh)
    state = updater.init_state(nnx.state(policy, nnx.Param), nnx.state(actor, nnx.Param))
    return updater, state, _batch(actor, CFG.temperature)


def _step(mesh):
    updater, state, batch = _updater(mesh)
    old = updater.prepare(state.policy, state.actor, batch, CFG.lam)
    return updater.update(state, batch, old, jax.random.key(3), CFG.lam)


def test_fsdp_and_tensor_parallel_update_equals_the_one_device_update():
    mesh = make_mesh(fsdp=4, tensor=2)
    (want, want_metrics), (got, got_metrics) = _step(make_mesh(devices=jax.devices()[:1])), _step(mesh)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(got.policy) + jax.tree.leaves(got.actor)}
    assert any("fsdp" in str(spec) for spec in specs) and any("tensor" in str(spec) for spec in specs), specs
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(got))  # optimizer states included
    assert set(got_metrics) == set(want_metrics)
    for name in want_metrics:
        np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    assert 0.0 < float(want_metrics["obrs/accept_rate"]) < 1.0  # OBRS rejected some tokens: a real filter
    for model in ("policy", "actor"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(got, model)),
                                jax.tree.leaves(getattr(want, model))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6, err_msg=f"{model}{path}")


def _two_updates(make, cfg):
    """``(old stats, state, [metrics, metrics])`` of two updates on one rollout batch, the second
    with the rollout actor as p_inf's when the filter needs it (the trained actor has moved)."""
    policy, actor = _models()
    tx = optax.sgd(1.0)
    updater = make(cfg, policy, actor, tx, tx if cfg.train_actor else None)
    state = updater.init_state(nnx.state(policy, nnx.Param), nnx.state(actor, nnx.Param))
    batch = _batch(actor, cfg.temperature)
    old = updater.prepare(state.policy, state.actor, batch, cfg.lam, normalizers=cfg.p_target == "old")
    rollout_actor = jax.tree.map(jnp.copy, state.actor) if cfg.filter_needs_rollout_actor else None
    state, first = updater.update(state, batch, old, jax.random.key(3), cfg.lam)
    state, second = updater.update(state, batch, old, jax.random.key(4), cfg.lam, rollout_actor=rollout_actor)
    return old, state, jax.device_get([first, second])


@pytest.mark.parametrize("cfg", [
    CFG,  # p_target = new with Z from the first pass, the trained actor moving between the two updates
    CFG._replace(p_target="old", z="exact", train_actor=False),  # Z towards p_old from prepare, a frozen actor
], ids=["new_trained_actor", "old_frozen_actor"])
def test_disaggregated_update_equals_the_one_device_update(cfg):
    """The policy on FSDP=2 x tensor=2 of devices 0-3, the actor on FSDP=2 x tensor=2 of devices 4-7."""
    policy_mesh, actor_mesh = make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4]), make_mesh(
        fsdp=2, tensor=2, devices=jax.devices()[4:])
    one = lambda *args: Updater(*args, mesh=make_mesh(devices=jax.devices()[:1]))
    split = lambda *args: DisaggregatedUpdater(*args, mesh=policy_mesh, actor_mesh=actor_mesh)
    (want_old, want, want_metrics), (got_old, got, got_metrics) = _two_updates(one, cfg), _two_updates(split, cfg)
    for part, mesh in (("policy", policy_mesh), ("policy_opt", policy_mesh), ("updates", policy_mesh),
                       ("actor", actor_mesh), ("actor_opt", actor_mesh)):
        assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(getattr(got, part))), part
    assert any("tensor" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(got.actor))
    for name, a, b in zip(want_old._fields, want_old, got_old):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6, err_msg=f"old.{name}")
    for update, (want_row, got_row) in enumerate(zip(want_metrics, got_metrics)):
        assert set(got_row) == set(want_row)
        for name in want_row:
            np.testing.assert_allclose(float(got_row[name]), float(want_row[name]), rtol=2e-5, atol=1e-6,
                                       err_msg=f"update {update}: {name}")
    assert 0.0 < float(want_metrics[1]["obrs/accept_rate"]) < 1.0
    assert int(got.updates) == 2
    for model in ("policy", "actor"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(got, model)),
                                jax.tree.leaves(getattr(want, model))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6, err_msg=f"{model}{path}")
    if cfg.train_actor:  # the actor did move: the second update's p_inf really is the rollout actor's
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got.actor,
                                             nnx.state(_models()[1], nnx.Param)))
        assert max(moved) > 1e-4


def test_disaggregated_placement_refuses_shared_devices_and_a_missing_actor():
    policy, actor = _models()
    mesh = make_mesh(fsdp=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"share devices \[1\]"):
        DisaggregatedUpdater(CFG, policy, actor, optax.sgd(1.0), optax.sgd(1.0), mesh=mesh,
                             actor_mesh=make_mesh(fsdp=2, devices=jax.devices()[1:3]))
    with pytest.raises(ValueError, match="needs an actor"):
        DisaggregatedUpdater(CFG._replace(mode="on_policy", train_actor=False), policy, None, optax.sgd(1.0),
                             mesh=mesh, actor_mesh=make_mesh(devices=jax.devices()[2:3]))


@pytest.mark.slow  # ~25 s: three compilations of the update
def test_per_device_memory_falls_as_fsdp_grows():
    """Arguments (both models' parameters, optimizer states, the batch) and the compiled update's
    temporaries, per device, from XLA's memory analysis."""
    sizes = {}
    for fsdp in (1, 2, 4):
        updater, state, batch = _updater(make_mesh(fsdp=fsdp, devices=jax.devices()[:fsdp]), optax.adamw(1e-3))
        old = updater.prepare(state.policy, state.actor, batch, CFG.lam)
        compiled = updater._update_jit[False].lower(state, batch, old, jax.random.key(3), CFG.lam, None,
                                                    np.float32(CFG.beta), None).compile()
        analysis = compiled.memory_analysis()
        sizes[fsdp] = (analysis.argument_size_in_bytes, analysis.temp_size_in_bytes)
    arguments = [sizes[f][0] for f in (1, 2, 4)]
    assert all(later < 0.6 * earlier for earlier, later in zip(arguments, arguments[1:])), sizes  # about halves
    assert sizes[4][1] < sizes[1][1], sizes


def test_mesh_from_config():
    assert dict(mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    mesh = mesh_from_config({"data": 1, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2} and mesh.devices.size == 8
    assert list(mesh_from_config({"data": 2, "fsdp": 1, "tensor": 1}).devices.flat) == jax.devices()[:2]
    for sizes, message in [
        ({"data": 1, "fsdp": -1, "tensor": -1}, "at most one is -1"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, "each axis is a positive size"),
        ({"data": 3, "fsdp": -1, "tensor": 1}, "the 8 devices do not divide by the other axes' product 3"),
        ({"data": 4, "fsdp": 4, "tensor": 1}, "needs 16 devices and there are 8"),
    ]:
        with pytest.raises(ConfigError, match=message):
            mesh_shape(sizes, 8)
    config = get_config()
    config.mesh.fsdp = -1  # the devices left over: what a multi-device run sets
    validate(config)
    config.mesh.tensor = -2
    with pytest.raises(ConfigError, match=r"config.mesh.tensor=-2 is not allowed: .* or -1"):
        validate(config)


def test_meshes_of_the_two_placements():
    config = get_config()
    policy_mesh, actor_mesh = meshes_from_config(config)
    assert policy_mesh is actor_mesh and policy_mesh.devices.size == 1
    config.placement, config.mesh.fsdp = "disaggregated", -1
    config.actor_mesh.update(dict(fsdp=1, tensor=2))
    validate(config)
    policy_mesh, actor_mesh = meshes_from_config(config)
    assert list(actor_mesh.devices.flat) == jax.devices()[6:] and dict(actor_mesh.shape)["tensor"] == 2
    assert list(policy_mesh.devices.flat) == jax.devices()[:6] and dict(policy_mesh.shape)["fsdp"] == 6
    config.actor_mesh.fsdp = 4
    with pytest.raises(ConfigError, match=r"takes 8 of the 8 devices"):
        meshes_from_config(config)
    config.actor_mesh.fsdp = -1
    with pytest.raises(ConfigError, match=r"config.actor_mesh.fsdp=-1 is not allowed: it must be an integer >= 1"):
        validate(config)
    config.actor_mesh.fsdp, config.algorithm.mode, config.algorithm.train_actor = 1, "on_policy", False
    with pytest.raises(ConfigError, match="placement='disaggregated' is not allowed with algorithm.mode='on_policy'"):
        validate(config)


def test_initialize_refuses_a_partial_start_and_does_nothing_alone():
    """Checked before JAX's runtime starts (the real two-process start: tests/test_multiprocess.py)."""
    assert initialize() is False  # one process: nothing to start
    with pytest.raises(ConfigError, match="missing: num_processes, process_id"):
        initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match="num_processes=2, process_id=2 is not allowed"):
        initialize("127.0.0.1:1234", 2, 2)
    # one process: the host-local and global views coincide
    rows = {"x": np.arange(6.0).reshape(3, 2)}
    assert global_rows(rows, None) is rows
    np.testing.assert_array_equal(allgather(np.arange(3)), np.arange(3))


@pytest.mark.slow  # ~2 min: `make test-slow`, or python -m pytest -m slow tests/test_parallel.py
def test_the_trainer_on_a_mesh_repeats_the_one_device_metrics(tmp_path):
    """Two steps of the demo in small form (rollouts, updates with staleness 2, the weight push, an
    evaluation) on FSDP=4 x tensor=2, and disaggregated (the policy on FSDP=2 x tensor=2 of devices
    0-3, the actor and its engine on FSDP=2 x tensor=2 of devices 4-7), give the one-device run's metrics."""
    from tests.test_train_resume import TIMING, demo_config  # noqa: PLC0415 (the small demo of the resume tests)

    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415

    extra = {"train.steps": 2, "data.eval_limit": 8, "train.eval_every": 2}
    runs = {}
    split = {"placement": "disaggregated", "actor_mesh.fsdp": 2, "actor_mesh.tensor": 2}
    for name, mesh, placement in (("one", (1, 1), {}), ("fsdp4_tensor2", (4, 2), {}), ("disaggregated", (2, 2), split)):
        config = demo_config(tmp_path / "data", **extra, **{"mesh.fsdp": mesh[0], "mesh.tensor": mesh[1]}, **placement)
        trainer = Trainer(config, str(tmp_path / name))
        assert dict(trainer.updater.mesh.shape) == {"data": 1, "fsdp": mesh[0], "tensor": mesh[1]}
        if placement:  # the engine generates on the actor's devices, none of the policy's
            engine_devices = {d for leaf in jax.tree.leaves(trainer.engine.params) for d in leaf.devices()}
            assert engine_devices == set(jax.devices()[4:]) == set(trainer.updater.actor_mesh.devices.flat)
        runs[name] = trainer.run()
    assert [row["step"] for row in runs["one"]] == [1, 2] and "eval/policy/mean@4" in runs["one"][-1]
    for run in ("fsdp4_tensor2", "disaggregated"):
        for want, got in zip(runs["one"], runs[run]):
            assert set(want) == set(got)
            for name, value in want.items():
                if not name.startswith(TIMING):
                    np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6,
                                               err_msg=f"{run}, step {want['step']}: {name}")
