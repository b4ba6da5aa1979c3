"""Checkpointer: exact round trips, resharding on restore, retention, save interval, clear errors
on a mismatched state, and no half-written checkpoint after a process is killed mid-save."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jackpot_jax.train.checkpoint import Checkpointer, ResumeError, config_diff

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(scale=1.0):
    return {"w": jnp.full((4, 8), scale, jnp.float32), "count": jnp.int32(7)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_namedtuples(tmp_path, rng):
    params = {
        "layers": {0: {"w": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)},
                   1: {"w": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)}},
        "embed": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
    }
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    state = {"params": params, "opt": opt_state, "step": jnp.int32(3),
             "key": jax.random.key_data(jax.random.PRNGKey(5)),
             "typed_key": jax.random.key(6),
             "ids": jnp.asarray(rng.integers(0, 2**32, 5, dtype=np.uint32))}
    meta = {"step": 3, "data": {"epoch": 1, "position": 40}, "config": {"sizes": (1, 2)}}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.save(3, state, meta)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        restored, restored_meta = ckpt.restore(state)
    assert_trees_equal(restored, state)
    assert type(restored["opt"][0]) is type(opt_state[0])
    assert restored_meta == {"step": 3, "data": {"epoch": 1, "position": 40},
                             "config": {"sizes": [1, 2]}}


def test_restore_onto_a_mesh_uses_the_requested_shardings(tmp_path):
    devices = np.array(jax.devices())
    save_mesh = Mesh(devices[:2], ("x",))
    state = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(save_mesh, P("x"))),
             "b": jnp.arange(8, dtype=jnp.int32)}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state, {"step": 1})
        mesh = Mesh(devices[:4], ("x",))
        shardings = {"w": NamedSharding(mesh, P(None, "x")), "b": NamedSharding(mesh, P("x"))}
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
        restored, _ = ckpt.restore(abstract)
    for name in state:
        assert restored[name].sharding == shardings[name]
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))


def test_keep_retains_only_the_latest_steps(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=2, async_save=False) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, small_state(step), {"step": step})
        assert ckpt.all_steps() == [4, 5]
        with pytest.raises(FileNotFoundError, match=r"no checkpoint step 3 in .*: \[4, 5\]"):
            ckpt.restore(small_state(), step=3)
        restored, meta = ckpt.restore(small_state())
    assert meta["step"] == 5 and float(restored["w"][0, 0]) == 5.0


def test_save_every_skips_other_steps_unless_forced(tmp_path):
    with Checkpointer(tmp_path, save_every=3, keep=10, async_save=False) as ckpt:
        saved = {step: ckpt.save(step, small_state(), {"step": step}, force=step == 4)
                 for step in range(1, 8)}
        assert [s for s, did in saved.items() if did] == [3, 4, 6]
        assert ckpt.all_steps() == [3, 4, 6]
        assert not ckpt.save(6, small_state(), {"step": 6})


def test_empty_directory_has_no_steps(tmp_path):
    with Checkpointer(tmp_path / "new", save_every=1, keep=1) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no checkpoint in .*new; saved steps: \\[\\]"):
            ckpt.restore(small_state())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(TypeError, match="meta for step 1 is not JSON-serializable"):
            ckpt.save(1, small_state(), {"step": 1, "when": object()})
        assert ckpt.all_steps() == []


def test_mismatched_state_raises_resume_error_naming_leaves_and_config(tmp_path):
    state = {"params": {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}, "count": jnp.int32(0)}
    saved_config = {"model": {"hidden": 8, "layers": 2}, "lr": 1e-3}
    expected = {"params": {"w": jax.ShapeDtypeStruct((4, 16), jnp.float32),
                           "gate": jax.ShapeDtypeStruct((2,), jnp.float32)},
                "count": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(2, state, {"step": 2, "config": saved_config})
        with pytest.raises(ResumeError) as err:
            ckpt.restore(expected, config={"model": {"hidden": 16, "layers": 2}, "lr": 1e-3})
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "params.w: saved (4, 8) float32, expected (4, 16) float32" in message
    assert "missing from the checkpoint:\n  params.gate" in message
    assert "in the checkpoint but not in the state:\n  params.b" in message
    assert "model.hidden: saved 8, now 16" in message
    assert "count" not in message and "layers" not in message


def test_resume_error_lists_at_most_ten_leaves(tmp_path):
    state = {f"p{i:02d}": jnp.zeros(2) for i in range(13)}
    expected = {k: jax.ShapeDtypeStruct((3,), jnp.bfloat16) for k in state}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state, {"step": 1})
        with pytest.raises(ResumeError, match=r"p09: saved \(2,\) float32, expected \(3,\) bfloat16"
                                              r"\n  \.\.\. and 3 more"):
            ckpt.restore(expected)


def test_config_diff_on_nested_dicts():
    saved = {"model": {"hidden": 8, "heads": (2, 4), "act": "gelu"}, "lr": 1e-3, "old": True}
    current = {"model": {"hidden": 16, "heads": [2, 4], "act": "relu", "rope": {"theta": 1e4}},
               "lr": 1e-3}
    assert config_diff(saved, current) == [
        "model.act: saved 'gelu', now 'relu'",
        "model.hidden: saved 8, now 16",
        "model.rope: saved (absent), now {'theta': 10000.0}",
        "old: saved True, now (absent)",
    ]
    assert config_diff(current, current) == []


def test_async_save_then_restore_in_a_new_instance(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    assert ckpt.save(1, small_state(2.0), {"step": 1, "data": {"epoch": 0, "position": 8}})
    ckpt.wait()
    ckpt.close()
    with Checkpointer(tmp_path, save_every=1, keep=1) as fresh:
        assert fresh.latest_step() == 1
        restored, meta = fresh.restore(small_state())
    assert_trees_equal(restored, small_state(2.0))
    assert meta["data"] == {"epoch": 0, "position": 8}


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax, numpy as np
    from jackpot_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=1)
    ckpt.save(1, {"small": np.arange(4, dtype=np.float32)}, {"step": 1})
    ckpt.wait()
    big = {f"a{i}": jax.device_put(np.random.default_rng(i).integers(0, 2**32, 12_500_000,
                                                                     dtype=np.uint32))
           for i in range(4)}
    ckpt.save(2, big, {"step": 2})
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_during_async_save_leaves_only_restorable_steps(tmp_path):
    """200 MB written asynchronously, the process SIGKILLed 0.1 s into the write: the next run
    sees step 1 (and restores it) or a complete step 2, never a broken one."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        if ckpt.latest_step() == 2:
            big = {f"a{i}": np.random.default_rng(i).integers(0, 2**32, 12_500_000,
                                                              dtype=np.uint32) for i in range(4)}
            restored, _ = ckpt.restore(jax.tree.map(jnp.asarray, big))
            assert_trees_equal(jax.tree.map(np.asarray, restored), big)
        else:
            assert ckpt.all_steps() == [1]
            restored, meta = ckpt.restore({"small": jnp.zeros(4, jnp.float32)})
            np.testing.assert_array_equal(np.asarray(restored["small"]), np.arange(4))
            assert meta == {"step": 1}
        # Orbax deletes the partial directory in a background thread started by the constructor.
        deadline = time.monotonic() + 30
        while sorted(os.listdir(tmp_path)) != [str(ckpt.latest_step())] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(os.listdir(tmp_path)) == [str(ckpt.latest_step())]
