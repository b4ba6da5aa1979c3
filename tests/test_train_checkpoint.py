"""Checkpointer: exact round trips, resharding on restore, retention, save interval, clear errors
on a mismatched state, no half-written checkpoint after a process is killed mid-save, and a
damaged newest step (each kind of damage) set aside with one warning line for the previous one."""
import asyncio
import glob
import json
import os
import re
import shutil
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

from jackpot_jax.train.checkpoint import Checkpointer, CorruptCheckpointError, ResumeError, config_diff

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


def _damage(step_dir, kind):
    """Damages the saved step in ``step_dir`` as ``kind`` does (a key of DAMAGE)."""
    state_dir = os.path.join(step_dir, "state")
    data = max(glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True), key=os.path.getsize)
    if kind == "truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif kind.startswith("bit_flipped"):  # in the zstd frame header, or inside the compressed values
        raw = bytearray(open(data, "rb").read())
        raw[0 if kind == "bit_flipped_header" else len(raw) // 2] ^= 0x10
        open(data, "wb").write(raw)
    elif kind == "no_metadata":
        os.remove(os.path.join(state_dir, "_METADATA"))
    elif kind == "no_state":
        shutil.rmtree(state_dir)
    elif kind in ("garbage_meta", "meta_not_a_dict", "meta_of_another_step"):
        text = {"garbage_meta": "{garbage", "meta_not_a_dict": "[1, 2]", "meta_of_another_step": '{"step": 7}'}[kind]
        open(os.path.join(step_dir, "meta", "metadata"), "w").write(text)


DAMAGE = {  # kind: what the warning says
    "truncated": r"array data unreadable \(ValueError: OUT_OF_RANGE: .*Requested byte range",
    "bit_flipped_header": r"array data unreadable \(ValueError: .*ZSTD",
    "bit_flipped_values": r"leaf w differs from what was saved \(checksum \d+, saved \d+\)",
    "no_metadata": r"state/_METADATA is missing",
    "no_state": r"no state/ directory",
    "garbage_meta": r"meta unreadable \(JSONDecodeError: Expecting property name",
    "meta_not_a_dict": r"meta is a list, not a JSON object",
    "meta_of_another_step": r"meta names step 7, not 2",
    "nan": r"leaf w holds NaN or infinite values",
}


def wide_state(scale=1.0):
    """Enough values for a compressed data file of a few KB."""
    return {"w": jnp.arange(2048, dtype=jnp.float32) * scale, "count": jnp.int32(7)}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no flood of abandoned reads
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_step_is_set_aside_with_one_warning_and_the_previous_restored(tmp_path, kind, caplog):
    with Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.save(1, wide_state(1.0), {"step": 1})
        ckpt.save(2, wide_state(jnp.nan) if kind == "nan" else wide_state(2.0), {"step": 2})
    _damage(str(tmp_path / "2"), kind)
    with caplog.at_level("WARNING", logger="jackpot_jax.train.checkpoint"):
        with Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
            restored, meta = ckpt.restore(wide_state())
            assert meta == {"step": 1}
            assert_trees_equal(restored, wide_state(1.0))
            assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]
            assert ckpt.save(2, wide_state(5.0), {"step": 2})  # no collision with the step set aside
    warnings = [r.getMessage() for r in caplog.records if r.name == "jackpot_jax.train.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert re.search(rf"^checkpoint step 2 in {re.escape(str(tmp_path))} is damaged: {DAMAGE[kind]}.*; set aside as "
                     r"2\.corrupt, trying the previous step$", warnings[0]), warnings[0]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt"]
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        restored, meta = ckpt.restore(wide_state())
    assert meta == {"step": 2} and float(restored["w"][1]) == 5.0


def test_no_good_step_is_one_line_and_explicit_or_meta_reads_are_checked(tmp_path, capsys):
    with Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, wide_state(step), {"step": step})
    _damage(str(tmp_path / "3"), "garbage_meta")
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        with pytest.raises(CorruptCheckpointError, match=r"^checkpoint step 3 .* is damaged: meta unreadable"):
            ckpt.read_meta(3)
        with pytest.raises(CorruptCheckpointError, match=r"^checkpoint step 3 .* is damaged: meta unreadable"):
            ckpt.restore(wide_state(), step=3)  # a step asked for is never replaced by another
        assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
        assert ckpt.read_meta(2) == {"step": 2}  # the checksums stay inside the Checkpointer
        assert ckpt.latest_meta() == (2, {"step": 2})  # what check_resume reads: step 3 set aside
        assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt"]
    # a checkpoint written before the checksums existed still restores
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"step": 2}))
    _damage(str(tmp_path / "1"), "no_state")
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.restore(wide_state())[1] == {"step": 2}
        _damage(str(tmp_path / "2"), "truncated")
        with pytest.raises(CorruptCheckpointError) as err:
            ckpt.restore(wide_state())
        assert ckpt.all_steps() == [] and ckpt.latest_meta() is None
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ResumeError)
    assert re.match(rf"no good checkpoint in {re.escape(str(tmp_path))} \(the damaged steps are set aside as "
                    r"<step>\.corrupt\): step 2: array data unreadable .*; step 1: no state/ directory$", message)
    assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt", "3.corrupt"]
    # after a failed read, TensorStore's late callbacks into Orbax's closed event loop print nothing; other errors do
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as late:
        loop.call_soon_threadsafe(print)
    capsys.readouterr()
    sys.excepthook(RuntimeError, late.value, late.value.__traceback__)
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # not from a callback: shown
    assert capsys.readouterr().err.count("Event loop is closed") == 1
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(ValueError, match="may not hold the key '_checksums'"):
            ckpt.save(4, wide_state(), {"_checksums": {}})


def test_check_resume_reads_the_config_of_the_newest_step_with_good_meta(tmp_path, caplog):
    from configs.demo import get_config  # noqa: PLC0415
    from jackpot_jax.train import build  # noqa: PLC0415
    from jackpot_jax.train.loop import check_resume  # noqa: PLC0415
    config = build.resolve_tokenizer(get_config())
    with Checkpointer(tmp_path, save_every=1, keep=2, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.zeros(2)}, {"step": step, "config": config.to_dict()})
    _damage(str(tmp_path / "2"), "meta_not_a_dict")
    with caplog.at_level("WARNING"), Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        check_resume(config, ckpt)  # the same config as step 1's: nothing refused
        assert ckpt.latest_step() == 1
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "meta is a list, not a JSON object; set aside as 2.corrupt, trying the previous step"]
