"""The checks a run makes before its data preparation and compilation: the tokenizer follows the
models (``tokenizer.kind="auto"``), each checkpoint's own tokenizer must be the run's token for
token, a mistyped checkpoint path fails in seconds, and ``--resume`` names every changed config key,
refusing those that make another experiment. Fast: no model is built, no data is read (checkpoints
are a config.json and an empty weights file: only their presence is checked here)."""
from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import pytest

from configs.demo import get_config
from jackpot_jax.config import ConfigError
from jackpot_jax.models import hf
from jackpot_jax.models.config import preset
from jackpot_jax.train import build
from jackpot_jax.train.checkpoint import Checkpointer, ResumeError
from jackpot_jax.train.config import ABSENT, resume_changes, validate
from jackpot_jax.train.loop import Trainer, check_resume

LETTERS = ["a", "b", "c", "d"]


def bpe(merges, *, vocab=None, eos="<eos>", pad="<pad>"):
    """A byte-pair tokenizer over a, b, c, d (``vocab``: ``{token: id}``; by default the specials,
    the letters and one token per merge, in order)."""
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    if vocab is None:
        vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *LETTERS, *("".join(m) for m in merges)])}
    core = Tokenizer(models.BPE(vocab, list(merges)))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad)


def checkpoint(path, tokenizer=None, vocab_size=None):
    """A checkpoint directory as far as the early checks read it: tiny-qwen3's config.json (with
    ``vocab_size``, by default the tokenizer's), an empty weights file and the tokenizer's files."""
    path.mkdir(parents=True)
    vocab_size = vocab_size or len(tokenizer)
    (path / "config.json").write_text(json.dumps(preset("tiny-qwen3", vocab_size=vocab_size).to_hf()))
    (path / hf.SINGLE_FILE).write_bytes(b"")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def config_with(**updates):
    """The demo config with ``section__key=value`` updates."""
    config = get_config()
    for name, value in updates.items():
        section, key = name.split("__")
        setattr(config[section], key, value)
    validate(config)
    return config


def refused(config) -> str:
    """The one-line ConfigError of the early checks (resolving the tokenizer, loading it, check_run)."""
    with pytest.raises(ConfigError) as info:
        build.check_run(build.resolve_tokenizer(config))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_the_tokenizer_follows_the_models(tmp_path):
    tokenizer = bpe([("a", "b"), ("c", "d")])
    policy = checkpoint(tmp_path / "policy", tokenizer)
    bare = checkpoint(tmp_path / "bare", vocab_size=len(tokenizer))  # no tokenizer files

    demo = build.resolve_tokenizer(get_config())  # no checkpoint: the character-level tokenizer, as before "auto"
    assert (demo.tokenizer.kind, demo.tokenizer.path) == ("char", "") and get_config().tokenizer.kind == "auto"
    for updates in (dict(policy__path=policy), dict(actor__path=policy),  # the policy's, else the actor's
                    dict(policy__path=bare, actor__path=policy),
                    dict(policy__path=bare, tokenizer__path=policy)):  # an explicit one wins
        config = build.resolve_tokenizer(config_with(**updates))
        assert (config.tokenizer.kind, config.tokenizer.path) == ("hf", policy), updates
        assert build.load_tokenizer(config).get_vocab() == tokenizer.get_vocab()
        assert build.check_run(config).get_vocab() == tokenizer.get_vocab()
    message = refused(config_with(policy__path=bare))
    for text in ("config.tokenizer.kind='auto' found no tokenizer files", f"config.policy.path={bare!r}",
                 "--config.tokenizer.path="):
        assert text in message, message


def test_a_checkpoints_own_tokenizer_must_be_the_runs(tmp_path):
    """Actor and policy tokenizers of one vocabulary size that differ in a token, a special token
    or a merge are refused, naming both paths and an example; an equal copy passes."""
    run = bpe([("a", "b"), ("c", "d")])
    policy = checkpoint(tmp_path / "policy", run)
    same = checkpoint(tmp_path / "same", bpe([("a", "b"), ("c", "d")]))
    config_with(policy__path=policy, actor__path=same)  # validates
    assert len(build.check_run(build.resolve_tokenizer(config_with(policy__path=policy, actor__path=same)))) == 8

    other = bpe([("b", "a"), ("c", "d")])  # another byte-pair encoding of the same size
    assert len(other) == len(run)
    actor = checkpoint(tmp_path / "actor", other)
    message = refused(config_with(policy__path=policy, actor__path=actor))
    for text in (f"config.actor.path={actor!r}", f"config.policy.path={policy!r}",
                 "id 6 is 'ba' in the actor's and 'ab' in the run's"):
        assert text in message, message
    swapped = checkpoint(tmp_path / "swapped", bpe([("a", "b"), ("c", "d")], eos="<pad>", pad="<eos>"))
    message = refused(config_with(policy__path=policy, actor__path=swapped))
    assert "eos_token_id is 0 in the actor's and 1 in the run's" in message, message
    # an explicit tokenizer directory is compared with the policy's own tokenizer files too
    tokenizer_dir = str(tmp_path / "tokenizer")
    run.save_pretrained(tokenizer_dir)
    message = refused(config_with(policy__path=actor, tokenizer__kind="hf", tokenizer__path=tokenizer_dir))
    assert f"config.policy.path={actor!r} is not allowed with config.tokenizer.path={tokenizer_dir!r}" in message

    # the same tokens and ids, merged in another order: other ids for the same text
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *LETTERS, "ab", "bc"])}
    first, second = bpe([("a", "b"), ("b", "c")], vocab=vocab), bpe([("b", "c"), ("a", "b")], vocab=vocab)
    assert first.encode("abc") != second.encode("abc")
    assert "merge 0 is" in hf.tokenizer_difference(first, second)
    assert hf.tokenizer_difference(first, bpe([("a", "b"), ("b", "c")], vocab=vocab)) is None


def test_vocab_sizes_and_architectures_are_checked_before_the_data(tmp_path):
    tokenizer = bpe([("a", "b"), ("c", "d")])
    policy = checkpoint(tmp_path / "policy", tokenizer)
    wide = checkpoint(tmp_path / "wide", vocab_size=64)
    small = checkpoint(tmp_path / "small", vocab_size=4)
    message = refused(config_with(policy__path=policy, actor__path=wide))
    for text in (f"config.actor.path={wide!r} and config.policy.path={policy!r}", "vocab_size 64 and 8 differ"):
        assert text in message, message
    message = refused(config_with(policy__path=small, tokenizer__kind="hf", tokenizer__path=policy))
    assert f"config.policy.path={small!r} is not allowed: the model's vocab_size=4 is smaller" in message, message
    # a fresh model takes the tokenizer's vocabulary: a checkpoint actor beside it must have the same
    message = refused(config_with(actor__path=wide, tokenizer__kind="hf", tokenizer__path=policy))
    assert "config.actor.path=" in message and "config.policy.preset='tiny-qwen3-large'" in message, message
    message = refused(config_with(actor__init="policy"))  # the demo's actor is smaller than its policy
    assert "config.actor.init='policy' is not allowed here" in message and "hidden_size=64" in message, message
    (tmp_path / "policy" / "config.json").write_text("{not json")
    message = refused(config_with(policy__path=policy))
    assert f"config.policy.path={policy!r} is not a checkpoint" in message and "not valid JSON" in message, message
    (tmp_path / "wide" / hf.SINGLE_FILE).unlink()
    message = refused(config_with(policy__path=wide, tokenizer__kind="hf", tokenizer__path=str(tmp_path / "small")))
    assert f"config.policy.path={wide!r} is not a checkpoint this trainer loads: no weights in" in message, message
    message = refused(config_with(tokenizer__kind="hf", tokenizer__path=str(tmp_path / "small")))
    assert f"config.tokenizer.path={str(tmp_path / 'small')!r}: tokenizer directory" in message, message
    assert "has no tokenizer files" in message, message
    (tmp_path / "small" / "tokenizer_config.json").write_text("{not json")
    message = refused(config_with(tokenizer__kind="hf", tokenizer__path=str(tmp_path / "small")))
    assert f"config.tokenizer.path={str(tmp_path / 'small')!r}: no tokenizer could be loaded" in message, message
    message = refused(config_with(data__manual_dir=str(tmp_path / "nowhere")))
    assert "config.data.manual_dir=" in message and "does not exist" in message, message


def test_a_mistyped_checkpoint_path_fails_before_the_data(tmp_path, monkeypatch):
    def load_records(config):
        raise AssertionError("data preparation started")

    monkeypatch.setattr(build, "load_records", load_records)
    missing = str(tmp_path / "Qwen3-4B-Bsae")
    for updates in (dict(policy__path=missing), dict(tokenizer__kind="hf", tokenizer__path=str(tmp_path),
                                                     actor__path=missing)):
        with pytest.raises(ConfigError) as info:
            Trainer(config_with(**updates), str(tmp_path / "run"))
        message = str(info.value)
        name = "policy" if "policy__path" in updates else "actor"
        assert message == (f"config.{name}.path={missing!r} is not allowed: the directory does not exist (a Hugging "
                           "Face checkpoint directory holds config.json and *.safetensors)."), message
    assert not (tmp_path / "run").exists()


def test_resume_changes_sort_keys_into_refused_changed_and_free():
    saved = get_config().to_dict()
    del saved["train"]["allow_changes"], saved["data"]["template"]  # keys the checkpoint's schema lacked
    saved["data"]["eval_limit"] = [1, 2]  # JSON lists equal tuples
    current = get_config()
    current.seed, current.policy.preset, current.data.dataset, current.algorithm.mode = 3, "tiny-qwen3", "gsm8k", "tis"
    current.optim.policy.lr, current.algorithm.lam = 5e-4, 0.5
    current.train.steps, current.data.data_dir, current.mesh.data, current.policy.remat = 7, "/data", 2, True
    current = current.to_dict()
    current["data"]["eval_limit"] = (1, 2)
    changes = {change.key: change for change in resume_changes(saved, current)}
    assert {key: change.kind for key, change in changes.items()} == {
        "seed": "refused", "policy.preset": "refused", "data.dataset": "refused", "algorithm.mode": "refused",
        "optim.policy.lr": "changed", "algorithm.lam": "changed", "data.template": "changed",
        "train.steps": "free", "data.data_dir": "free", "mesh.data": "free", "policy.remat": "free",
        "train.allow_changes": "free"}
    assert str(changes["optim.policy.lr"]) == "config.optim.policy.lr 2e-05 -> 0.0005"
    assert changes["data.template"].saved is ABSENT and str(changes["data.template"]).endswith("(absent) -> 'plain'")
    assert resume_changes(current, current) == []


def test_resume_refuses_another_experiment_unless_allowed_and_logs_every_change(tmp_path, caplog):
    saved = build.resolve_tokenizer(get_config())
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as checkpointer:
        checkpointer.save(1, {"w": jnp.zeros(2)}, {"config": saved.to_dict()}, force=True)
    current = config_with(policy__preset="tiny-qwen3", train__steps=200)
    current.seed = 4
    current.optim.policy.lr = 5e-4
    current = build.resolve_tokenizer(current)
    with Checkpointer(tmp_path, save_every=1, keep=1) as checkpointer:
        check_resume(build.resolve_tokenizer(get_config()), checkpointer)  # the same config: nothing to say
        with pytest.raises(ResumeError) as info, caplog.at_level(logging.INFO, logger="jackpot_jax.train.loop"):
            check_resume(current, checkpointer)
        message = str(info.value)
        assert "\n" not in message and "--config.train.allow_changes=True" in message, message
        assert "config.policy.preset 'tiny-qwen3-large' -> 'tiny-qwen3'; config.seed 0 -> 4)" in message, message
        assert "lr" not in message and "train.steps" not in message, message
        levels = {record.getMessage(): record.levelno for record in caplog.records}
        assert levels == {"resume: config.optim.policy.lr changed 2e-05 -> 0.0005": logging.WARNING,
                          "resume: config.policy.preset changed 'tiny-qwen3-large' -> 'tiny-qwen3'": logging.WARNING,
                          "resume: config.seed changed 0 -> 4": logging.WARNING,
                          "resume: config.train.steps changed 100 -> 200": logging.INFO}, levels
        current.train.allow_changes = True
        check_resume(current, checkpointer)
