"""Issue 31, the work dir and the config's limits: one run per work dir (an exclusive lock naming its
holder, released when its process dies), ``jackpot-export`` of a relative work dir, and a prompt plus
its completion within each model's positions. (metrics.jsonl appended and truncated once on resume:
tests/test_train_metrics.py; values beyond their dtype: tests/test_train_config.py.) Fast: no model is
built, no data is read."""
from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys

import jax
import pytest

from configs.demo import get_config
from jackpot_jax import files
from jackpot_jax.config import ConfigError
from jackpot_jax.train import build
from jackpot_jax.train import export as export_lib
from jackpot_jax.train.loop import LOCK_FILE, Trainer, lock_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = ("import os, sys, time\n"
          "from jackpot_jax.files import try_exclusive_lock\n"
          "lock = try_exclusive_lock(sys.argv[1], f'pid {os.getpid()} on host elsewhere')\n"
          "print('held', flush=True)\n"
          "time.sleep(120)\n")


class Stop(Exception):
    """Ends a test's run where it has shown what it checks."""


def test_the_lock_is_exclusive_names_its_holder_and_dies_with_its_process(tmp_path):
    path = tmp_path / "lock"
    held = files.try_exclusive_lock(path, "pid 1 on host a")
    with pytest.raises(files.LockHeld) as info:  # another open of the file, even in this process
        files.try_exclusive_lock(path, "me")
    assert info.value.owner == "pid 1 on host a" and str(path) in str(info.value)
    held.release()
    held.release()  # idempotent
    assert path.read_text() == ""  # a free lock names no holder
    files.try_exclusive_lock(path, "me").release()

    # another process holds it; SIGKILLed (no clean-up of its own), the kernel releases its lock
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.LockHeld) as info:
            files.try_exclusive_lock(path, "me")
        assert info.value.owner == f"pid {holder.pid} on host elsewhere"
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    files.try_exclusive_lock(path, "me").release()
    assert files.lock_holder(path) is None and files.lock_holder(tmp_path / "missing") is None


def test_jackpot_train_in_a_work_dir_in_use_exits_with_one_line_naming_the_holder(tmp_path):
    """With checkpoints there and without ``--resume`` too: "pass --resume" would be wrong advice."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    held = files.try_exclusive_lock(workdir / LOCK_FILE, "pid 4242 on host elsewhere (started then)")
    try:
        assert files.lock_holder(workdir / LOCK_FILE) == "pid 4242 on host elsewhere (started then)"
        for checkpoints in (False, True):
            if checkpoints:
                (workdir / "checkpoints" / "1").mkdir(parents=True)
            result = subprocess.run([sys.executable, "-c", "from jackpot_jax.train.cli import train_main; train_main()",
                                     f"--workdir={workdir}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
            lines = [line for line in result.stderr.splitlines() if line.startswith("jackpot-train:")]
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and "is in use by another run: pid 4242 on host elsewhere" in lines[0], lines
            assert not (workdir / "metrics.jsonl").exists()
    finally:
        held.release()


def test_a_second_run_in_a_work_dir_fails_at_once_naming_the_first(tmp_path, monkeypatch):
    """Never two runs in one work dir: the second fails before its data, in one line naming the
    first's process; a run holds the lock from its start (released when the start fails too)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.setattr(build, "load_records", lambda config: pytest.fail("data preparation started"))
    first = lock_workdir(str(workdir))
    with pytest.raises(ConfigError) as info:
        Trainer(get_config(), str(workdir))
    message = str(info.value)
    assert "\n" not in message and f"workdir {str(workdir)!r} is in use by another run: pid {os.getpid()} on host " \
                                   f"{socket.gethostname()} (started " in message, message
    assert "--workdir" in message
    first.release()

    def held_while_starting(config):
        with pytest.raises(files.LockHeld, match=f"pid {os.getpid()} on host"):
            files.try_exclusive_lock(workdir / LOCK_FILE)
        raise Stop

    monkeypatch.setattr(build, "load_records", held_while_starting)
    with pytest.raises(Stop):
        Trainer(get_config(), str(workdir))
    files.try_exclusive_lock(workdir / LOCK_FILE).release()  # released by the failed start


def test_only_process_0_locks_and_a_filesystem_without_locks_is_named(tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        patch.setattr(jax, "process_index", lambda: 1)
        assert lock_workdir(str(tmp_path)) is None and not (tmp_path / LOCK_FILE).exists()

    def unsupported(path, owner=""):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files, "try_exclusive_lock", unsupported)
    with caplog.at_level(logging.WARNING, logger="jackpot_jax.train.loop"):
        assert lock_workdir(str(tmp_path)) is None
    assert any("cannot be locked" in r.getMessage() and "No locks available" in r.getMessage() for r in caplog.records)


def test_export_takes_a_relative_work_dir(tmp_path, monkeypatch):
    """Orbax restores from absolute paths only ("Checkpoint path should be absolute"): export gives
    it the work dir's absolute path."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    seen = []

    class Checkpointer:
        def __init__(self, directory, **kwargs):
            seen.append(directory)
            raise Stop

    monkeypatch.setattr(export_lib, "Checkpointer", Checkpointer)
    with pytest.raises(Stop):
        export_lib.export("run", "out")
    assert len(seen) == 1 and os.path.isabs(seen[0]) and os.path.samefile(seen[0], tmp_path / "run" / "checkpoints")


def test_a_prompt_and_completion_beyond_a_models_positions_are_refused():
    """``data.max_prompt_tokens + rollout.max_new_tokens`` must fit each model's
    ``max_position_embeddings`` (512 for the demo's tiny presets): a one-line ConfigError naming the
    keys and the model; exactly 512 passes."""
    config = get_config()
    prompt = config.data.max_prompt_tokens
    config.rollout.max_new_tokens = 512 - prompt + 1
    with pytest.raises(ConfigError) as info:
        build.check_run(build.resolve_tokenizer(config))
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"config.data.max_prompt_tokens={prompt} + config.rollout.max_new_tokens={513 - prompt} = 513 is not allowed "
        "with config.policy.preset='tiny-qwen3-large': the policy's max_position_embeddings=512"), message
    config.policy.preset = "qwen3-0.6b"  # 40960 positions: the actor's 512 are the limit
    with pytest.raises(ConfigError, match=r"= 513 is not allowed with config.actor.preset='tiny-qwen3': the actor's "
                                          r"max_position_embeddings=512"):
        build.check_run(build.resolve_tokenizer(config))
    config.policy.preset = "tiny-qwen3-large"
    config.rollout.max_new_tokens -= 1
    build.check_run(build.resolve_tokenizer(config))
