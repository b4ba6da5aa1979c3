"""The trainer end to end: a run killed with SIGKILL and resumed repeats the uninterrupted run's
metrics exactly; a resume into other shapes is refused with the differences named; a run of
non-finite updates stops with its checkpoints intact; jackpot-export writes a loadable model; an
actor copied from the policy (``actor.init="policy"``) starts as the policy and syncs with it."""
import importlib.util
import itertools
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jackpot_jax.config import ConfigError
from jackpot_jax.train import build
from jackpot_jax.train.checkpoint import Checkpointer, ResumeError
from jackpot_jax.train.loop import Trainer, TrainingStopped
from jackpot_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small run: 4 steps of 4 prompts x 2 samples, two updates per step (staleness 2), saved every step.
OVERRIDES = {
    "train.steps": 4, "train.save_every": 1, "train.keep": 5, "train.eval_every": 0, "train.progress": False,
    "warm_start.policy_steps": 5, "warm_start.actor_steps": 5, "warm_start.batch_size": 8,
    "rollout.prompts_per_step": 4, "rollout.n": 2, "rollout.max_new_tokens": 32, "rollout.max_concurrent_decodes": 8,
    "algorithm.train_batch_size": 4, "algorithm.micro_batch_size": 2, "algorithm.k": 4,
    "data.train_limit": 64, "data.eval_limit": 0, "data.max_prompt_tokens": 40, "warm_start.problems": 32,
}
TIMING = ("time/", "throughput/")


def demo_config(data_dir, **extra):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in {**OVERRIDES, "data.data_dir": str(data_dir), **extra}.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return config


def _train_command(workdir, data_dir, *extra):
    flags = [f"--config.{key}={value}" for key, value in {**OVERRIDES, "data.data_dir": data_dir}.items()]
    return [sys.executable, "-c", "from jackpot_jax.train.cli import train_main; train_main()",
            f"--workdir={workdir}", *flags, *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _comparable(rows):
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The reference run, in this process: ``(workdir, metrics by step)``."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    history = Trainer(demo_config(data_dir), str(workdir)).run()
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    return workdir, _comparable(read_metrics(workdir))


def test_sigkill_mid_run_then_resume_repeats_the_uninterrupted_metrics(uninterrupted, data_dir, tmp_path):
    _, want = uninterrupted
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_train_command(workdir, data_dir), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "2").is_dir():  # step 2 saved (renamed from its temporary name): kill mid step 3
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 2 in 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = Checkpointer(checkpoints, save_every=1, keep=5).latest_step()
    assert killed_at is not None and killed_at < 4

    resumed = subprocess.run(_train_command(workdir, data_dir, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _comparable(read_metrics(workdir))
    assert sorted(got) == [1, 2, 3, 4]  # rows past the kill point were dropped and written again
    for step in range(killed_at + 1, 5):
        assert got[step].keys() == want[step].keys()
        for key, value in want[step].items():
            np.testing.assert_allclose(got[step][key], value, rtol=1e-6, atol=1e-7, err_msg=f"step {step} {key}")


def test_without_resume_a_workdir_with_checkpoints_is_refused(uninterrupted, data_dir):
    workdir, _ = uninterrupted
    result = subprocess.run(_train_command(workdir, data_dir), env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "--resume" in result.stderr and str(workdir) in result.stderr


def test_resume_into_other_shapes_names_what_differs(uninterrupted, data_dir, monkeypatch, caplog):
    """Another policy is another experiment: refused before the data and the models are loaded,
    naming the key; with ``train.allow_changes`` the changes are logged and the restore names the
    leaves whose shapes differ."""
    workdir, _ = uninterrupted
    config = demo_config(data_dir, **{"train.steps": 5})
    config.policy.preset = "tiny-qwen3"  # narrower and shallower than the saved tiny-qwen3-large
    with monkeypatch.context() as patch, pytest.raises(ResumeError) as error:
        patch.setattr(build, "load_records", lambda config: pytest.fail("data preparation started"))
        Trainer(config, str(workdir))
    message = str(error.value)
    assert "\n" not in message and "(config.policy.preset 'tiny-qwen3-large' -> 'tiny-qwen3')" in message, message
    assert "--config.train.allow_changes=True" in message and "train.steps" not in message, message

    config.train.allow_changes = True
    with caplog.at_level(logging.INFO, logger="jackpot_jax.train.loop"), pytest.raises(ResumeError) as error:
        Trainer(config, str(workdir))
    message = str(error.value)
    assert "policy" in message and "(128,)" in message and "(64,)" in message
    assert "policy.preset: saved 'tiny-qwen3-large', now 'tiny-qwen3'" in message
    logged = {record.getMessage(): record.levelno for record in caplog.records if "resume: " in record.getMessage()}
    assert logged == {"resume: config.policy.preset changed 'tiny-qwen3-large' -> 'tiny-qwen3'": logging.WARNING,
                      "resume: config.train.allow_changes changed False -> True": logging.INFO,
                      "resume: config.train.steps changed 4 -> 5": logging.INFO}, logged


_REWARD_CALLS = itertools.count()


def nan_after_first_step(completion, answer):
    """A broken reward: fine for the first step's 8 samples, NaN afterwards (NaN advantages)."""
    return 0.0 if next(_REWARD_CALLS) < 8 else float("nan")


@pytest.mark.slow  # ~30 s: `make test-slow` (tests/test_train_step.py checks the skip of one update in CI)
def test_non_finite_updates_stop_the_run_and_keep_checkpoints(data_dir, tmp_path):
    config = demo_config(data_dir, **{"train.max_nonfinite": 3, "data.reward": f"{__name__}:nan_after_first_step"})
    trainer = Trainer(config, str(tmp_path))
    with pytest.raises(TrainingStopped, match="updates in a row had a non-finite loss"):
        trainer.run()
    rows = read_metrics(tmp_path)
    assert rows[0]["nonfinite/skipped"] == 0 and rows[-1]["nonfinite/skipped"] >= 1
    steps = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=5).all_steps()
    assert steps == [row["step"] for row in rows]


def test_export_writes_a_model_that_loads(uninterrupted, tmp_path, monkeypatch):
    """The run dir moved elsewhere, with nothing rebuilt from its config (tokenizer, models): both
    models export from the run dir's own files, with the tokenizer's ids for generate, and load in
    transformers; without those files (a run dir made before them) the config's are used."""
    import filecmp
    import shutil

    import transformers

    from jackpot_jax.models.hf import from_pretrained
    from jackpot_jax.train import build
    from jackpot_jax.train.cli import export

    workdir, _ = uninterrupted
    assert sorted(os.listdir(workdir / "export")) == ["actor", "policy", "tokenizer"]
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)

    def unavailable(*args, **kwargs):
        raise AssertionError("export rebuilt the tokenizer or a model from the run's config")

    monkeypatch.setattr(build, "load_tokenizer", unavailable)
    monkeypatch.setattr(build, "build_model", unavailable)
    out = pathlib.Path(export(str(moved), str(tmp_path / "policy")))
    actor_out = pathlib.Path(export(str(moved), str(tmp_path / "actor"), model="actor", step=3))
    monkeypatch.undo()

    policy, actor = from_pretrained(out), from_pretrained(actor_out)
    assert (policy.config.num_hidden_layers, policy.config.hidden_size) == (4, 128)
    assert (actor.config.num_hidden_layers, actor.config.hidden_size) == (2, 64)
    for path in (out, actor_out):
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(path))
        config = json.loads((path / "config.json").read_text())
        assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (1, 0, None)  # char ids
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id == 1
        assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id == 0
        assert loaded.config.vocab_size == len(tokenizer) == config["vocab_size"]

    shutil.rmtree(moved / "export")  # a run dir from before the export files: the config's tokenizer and presets
    old = pathlib.Path(export(str(moved), str(tmp_path / "old")))
    assert filecmp.cmp(old / "model.safetensors", out / "model.safetensors", shallow=False)
    assert json.loads((old / "config.json").read_text()) == json.loads((out / "config.json").read_text())


def test_run_files_keep_a_run_of_checkpoints_exportable_without_them(data_dir, tmp_path, caplog):
    """A run from a Hugging Face checkpoint and tokenizer directory: WORKDIR/export keeps the models'
    config.json, the checkpoint's generation_config.json and the tokenizer, so the sources may go; a
    later start that would write other files keeps the first ones; without WORKDIR/export, a missing
    source is named."""
    import logging
    import shutil
    import types

    from jackpot_jax.data.char_tokenizer import make_char_tokenizer
    from jackpot_jax.models import preset
    from jackpot_jax.train.export import run_model_config, run_tokenizer, save_run_files

    tokenizer = make_char_tokenizer(tmp_path / "tokenizer")
    policy = types.SimpleNamespace(config=preset("tiny-qwen3", vocab_size=len(tokenizer)))  # only its config is read
    actor = types.SimpleNamespace(config=preset("tiny-llama", vocab_size=len(tokenizer)))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(policy.config.to_hf()))
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": [1]}))
    config = demo_config(data_dir, **{"policy.path": str(base), "tokenizer.kind": "hf",
                                      "tokenizer.path": str(tmp_path / "tokenizer")})
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="jackpot_jax.train.export"):
        save_run_files(workdir, config, tokenizer, policy, actor)
        save_run_files(workdir, config, tokenizer, policy, actor)  # a resume with the same files: nothing to say
        assert not caplog.records
        save_run_files(workdir, config, make_char_tokenizer(extra_chars="\u00e9"), policy, actor)
    assert "is kept as the run's first start wrote it" in caplog.text and "tokenizer/tokenizer.json" in caplog.text
    shutil.rmtree(base)
    shutil.rmtree(tmp_path / "tokenizer")

    assert run_tokenizer(workdir, config).get_vocab() == tokenizer.get_vocab()  # the first start's
    assert run_model_config(workdir, config, "policy", tokenizer) == (policy.config, {"temperature": 0.6,
                                                                                      "eos_token_id": [1]})
    assert run_model_config(workdir, config, "actor", tokenizer) == (actor.config, None)
    shutil.rmtree(workdir / "export")
    with pytest.raises(FileNotFoundError, match=r"config.policy.path='.*base', which has no config.json"):
        run_model_config(workdir, config, "policy", tokenizer)
    with pytest.raises(FileNotFoundError, match=r"tokenizer comes from its config, which fails: config.tokenizer"):
        run_tokenizer(workdir, config)


def _host(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]  # host copies: the update donates the arrays


def _same(a, b) -> bool:
    return len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def parity_reward(completion, answer):
    """A reward that varies within a group without a trained model: the completion's length parity."""
    return float(len(completion) % 2)


def test_a_stale_copy_of_the_policy_generates_and_syncs_every_n_steps(data_dir, tmp_path):
    """``actor.init="policy"`` with ``algorithm.actor_sync_every=2``: the actor starts as the policy,
    stays frozen for two steps while the policy trains, then becomes the policy again."""
    config = demo_config(data_dir, **{"actor.init": "policy", "actor.preset": "tiny-qwen3-large",
                                      "algorithm.mode": "tis", "algorithm.train_actor": False,
                                      "algorithm.actor_sync_every": 2, "optim.policy.lr": 1e-3,
                                      "optim.policy.warmup_steps": 0, "data.reward": f"{__name__}:parity_reward"})
    trainer = Trainer(config, str(tmp_path))
    start = _host(trainer.state.policy)
    assert _same(_host(trainer.state.actor), start)
    assert os.listdir(tmp_path / "warm_start") == ["policy"]  # the actor has no warm start of its own

    first = trainer.run_step()
    assert abs(first["mismatch/kl_full"]) < 1e-6, first  # the rollouts came from a copy of the policy
    assert _same(_host(trainer.state.actor), start)  # not synced yet: the frozen copy of step 0
    assert not _same(_host(trainer.state.policy), start)

    second = trainer.run_step()
    assert second["mismatch/kl_full"] > 1e-6, second  # a policy one step newer than its rollouts' actor
    policy = _host(trainer.state.policy)
    assert _same(_host(trainer.state.actor), policy)  # synced after step 2
    assert _same(_host(trainer.engine.params), policy)  # and the engine generates with it


def test_an_actor_of_another_architecture_cannot_copy_the_policy(data_dir, tmp_path):
    config = demo_config(data_dir, **{"actor.init": "policy"})  # the demo's actor is smaller than its policy
    with pytest.raises(ConfigError, match=r"config.actor.init='policy' is not allowed here: the actor must have "
                                          r"the policy's architecture.*hidden_size=64.*hidden_size=128"):
        Trainer(config, str(tmp_path))
