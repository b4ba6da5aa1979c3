"""The trainer's config validation (``jackpot_jax.train.config.validate``): every key of the rule
table refuses a bad value with a message naming the key, the value and what is allowed; unknown,
missing and placeholder keys fail; the cross-key constraints hold; and ``jackpot-train`` refuses a
bad command-line override before it builds anything.

The per-key checks iterate ``RULES`` itself, so a key added to the table is covered automatically:
:func:`refused_values` derives values the rule must refuse from its description ("an integer >= 1",
"one of (...)", ...), and falls back to trying generic candidates against the rule's predicate.
"""
from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
import time

import ml_collections
import pytest
from ml_collections import config_dict

from configs.demo import get_config
from jackpot_jax.config import ConfigError
from jackpot_jax.train import config as train_config
from jackpot_jax.train.config import RULES, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Values of every kind, for rules whose description says nothing this file can read.
GENERIC_CANDIDATES = (True, False, -1, 0, 1, 2.5, -0.5, "", "not-a-valid-value", [1], {"a": 1})


# --- the rule table ------------------------------------------------------------------------------

def flat_rules(rules=None, prefix=("config",)):
    """``(path, (is_allowed, allowed))`` for every leaf rule, ``path`` a tuple like
    ``("config", "optim", "policy", "lr")``; ``seed`` (checked by ``validate`` beside ``RULES``)
    included."""
    if rules is None:
        yield ("config", "seed"), train_config._int(0, train_config.SEED_MAX)
        rules = RULES
    for key, rule in rules.items():
        if isinstance(rule, dict):
            yield from flat_rules(rule, (*prefix, key))
        else:
            yield (*prefix, key), rule


def section_paths(rules=RULES, prefix=("config",)):
    """Every section (a dict of rules) of the table, as a path tuple."""
    for key, rule in rules.items():
        if isinstance(rule, dict):
            yield (*prefix, key)
            yield from section_paths(rule, (*prefix, key))


LEAVES = list(flat_rules())
SECTIONS = list(section_paths())


def dotted(path) -> str:
    return ".".join(path)


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _bounds(allowed: str):
    """``{op: bound}`` of the comparisons in a description: ``{">=": 0, "<=": 1}``; an interval
    ``in [a, b)`` too."""
    bounds = {op: _number(num) for op, num in re.findall(r"(>=|<=|>|<) (-?\d+(?:\.\d+)?)", allowed)}
    interval = re.search(r"in ([\[(])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([\])])", allowed)
    if interval:
        left, low, high, right = interval.groups()
        bounds[">=" if left == "[" else ">"] = _number(low)
        bounds["<=" if right == "]" else "<"] = _number(high)
    return bounds


def _choices(allowed: str):
    """The allowed values of a ``one of (...)`` / ``one of [...]`` description, else None."""
    match = re.search(r"one of (\(.*\)|\[.*\])", allowed)
    return None if match is None else tuple(ast.literal_eval(match.group(1)))


def refused_values(rule):
    """Values ``rule`` must refuse, derived from its description; each is checked against the
    predicate (a value the description forbids but the predicate accepts is a bug in the rule).
    An unrecognized description falls back to the generic candidates the predicate refuses."""
    is_allowed, allowed = rule
    derived = []
    choices = _choices(allowed)
    if allowed.startswith(("an integer", "a number", "a finite number")):
        integer = allowed.startswith("an integer")
        bounds = _bounds(allowed)
        for op, bound in bounds.items():
            step = 1 if integer else 0.5
            derived.append({">=": bound - step, ">": bound, "<=": bound + step, "<": bound}[op])
        # a bool is an int in Python: it must be refused as a number anyway
        derived += [True, "1"] + ([float(bounds.get(">=", bounds.get(">", 0)) + 1)] if integer else [float("inf")])
    elif choices is not None:
        derived += ["not-a-choice", 0]
    elif allowed == "true or false":
        derived += [1, 0, "true"]
    elif allowed.startswith("a string") or allowed.startswith("a path"):
        derived += [1, True, ["a"]]
    elif allowed.startswith("a registered model name"):
        derived += ["", 1]
    else:  # a description this file does not know: try everything against the predicate
        derived = [v for v in GENERIC_CANDIDATES if not _safe(is_allowed, v)]
    return derived


def _safe(is_allowed, value) -> bool:
    try:
        return bool(is_allowed(value))
    except (TypeError, ValueError):
        return False


def accepted_values(rule):
    """Values the description allows (boundaries, each choice): the predicate must accept them."""
    _, allowed = rule
    choices = _choices(allowed)
    if choices is not None:
        return list(choices)
    if allowed.startswith(("an integer", "a number", "a finite number")):
        bounds = _bounds(allowed)
        values = [bounds[op] for op in (">=", "<=") if op in bounds]
        if ">" in bounds:
            values.append(bounds[">"] + (1 if allowed.startswith("an integer") else 1e-6))
        if "<" in bounds:
            values.append(bounds["<"] - 1e-6)
        return values
    if allowed == "true or false":
        return [True, False]
    if allowed.startswith("a string") or allowed.startswith("a path"):
        return ["", "x"]
    return []


# --- configs -------------------------------------------------------------------------------------

def demo_dict() -> dict:
    return get_config().to_dict()


def _parent(tree, path):
    """The dict holding ``path`` (a path tuple starting at "config") and the last key."""
    for key in path[1:-1]:
        tree = tree[key]
    return tree, path[-1]


def with_value(path, value):
    """The demo config with ``path`` set to ``value`` (any type: built from a plain dict, so
    ConfigDict's type safety does not refuse it before ``validate`` sees it)."""
    tree = demo_dict()
    parent, key = _parent(tree, path)
    parent[key] = copy.deepcopy(value)
    return ml_collections.ConfigDict(tree)


def without(path):
    tree = demo_dict()
    parent, key = _parent(tree, path)
    del parent[key]
    return ml_collections.ConfigDict(tree)


def with_values(**updates):
    """The demo config with ``section__key=value`` updates (typed as the demo's, so plain setattr)."""
    config = get_config()
    for name, value in updates.items():
        section, key = name.split("__")
        setattr(config[section], key, value)
    return config


def refused(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config)
    return str(info.value)


# --- the demo and the table ----------------------------------------------------------------------

def test_demo_config_validates():
    validate(get_config())
    validate(ml_collections.ConfigDict(demo_dict()))  # what the helpers below start from


def test_demo_config_has_every_key_of_the_table():
    """configs/demo.py documents every key: each leaf of the table is set there (and, since unknown
    keys are refused, nothing else is)."""
    tree = demo_dict()
    for path, _ in LEAVES:
        parent, key = _parent(tree, path)
        assert key in parent, dotted(path)


@pytest.mark.parametrize("path,rule", LEAVES, ids=[dotted(p) for p, _ in LEAVES])
def test_every_rule_has_refused_values_matching_its_description(path, rule):
    is_allowed, allowed = rule
    bad = refused_values(rule)
    assert bad, f"{dotted(path)}: found no value that the rule ({allowed!r}) refuses"
    for value in bad:
        assert not _safe(is_allowed, value), f"{dotted(path)}={value!r} is accepted, but the rule says {allowed!r}"
    for value in accepted_values(rule):
        assert _safe(is_allowed, value), f"{dotted(path)}={value!r} is refused, but the rule says {allowed!r}"


BAD_CASES = [(path, rule, value) for path, rule in LEAVES for value in refused_values(rule)]


@pytest.mark.parametrize("path,rule,value", BAD_CASES, ids=[f"{dotted(p)}={v!r}" for p, _, v in BAD_CASES])
def test_bad_value_is_refused_naming_key_value_and_allowed(path, rule, value):
    message = refused(with_value(path, value))
    assert f"{dotted(path)}={value!r}" in message, message
    assert rule[1] in message, message


def test_values_beyond_their_dtype_are_refused_naming_the_key():
    """Every float key refuses a finite value float32 cannot hold (``lr=1e300`` was NaN on the device),
    every integer key one beyond its use (``seed=10**20`` raised OverflowError in jax.random; counts
    beyond int32): a one-line ConfigError naming the key."""
    floats = {dotted(path) for path, (_, allowed) in LEAVES if allowed.startswith("a finite number")}
    assert {"config.optim.policy.lr", "config.algorithm.lam", "config.optim.actor.weight_decay", "config.algorithm.c1",
            "config.algorithm.c2", "config.algorithm.beta", "config.rollout.temperature"} <= floats
    for path, (is_allowed, allowed) in LEAVES:
        if allowed.startswith(("a finite number", "a number")):
            assert not any(map(is_allowed, (1e39, -1e39, 1e300))), dotted(path)
        if allowed.startswith("an integer"):
            assert not is_allowed(2**64), dotted(path)
    cases = [(("config", "optim", "policy", "lr"), 1e300, "float32"), (("config", "algorithm", "lam"), 1e39, "float32"),
             (("config", "optim", "actor", "weight_decay"), 3.5e38, "float32"),
             (("config", "seed"), 10**20, "<= 4294967295"), (("config", "warm_start", "seed"), 2**32, "<= 4294967295"),
             (("config", "train", "steps"), 2**31, "<= 2147483647")]
    for path, value, allowed in cases:
        message = refused(with_value(path, value))
        assert message.startswith(f"{dotted(path)}={value!r} is not allowed: ") and allowed in message, message
        assert "\n" not in message
    for path, value in ((("config", "seed"), 2**32 - 1), (("config", "optim", "policy", "lr"), 3.4e38)):
        validate(with_value(path, value))  # the largest allowed

@pytest.mark.parametrize("path", SECTIONS, ids=[dotted(p) for p in SECTIONS])
def test_section_holding_a_value_is_refused(path):
    message = refused(with_value(path, 5))
    assert f"{dotted(path)}=5" in message and "section" in message, message


@pytest.mark.parametrize("path", [p for p, _ in LEAVES] + SECTIONS,
                         ids=[dotted(p) for p, _ in LEAVES] + [dotted(p) for p in SECTIONS])
def test_missing_key_or_section_is_refused(path):
    message = refused(without(path))
    assert f"{dotted(path)} is missing" in message, message


@pytest.mark.parametrize("path", [("config",)] + SECTIONS, ids=["config"] + [dotted(p) for p in SECTIONS])
def test_unknown_key_is_refused(path):
    tree = demo_dict()
    section = tree
    for key in path[1:]:
        section = section[key]
    section["lamb"] = 1
    message = refused(ml_collections.ConfigDict(tree))
    assert f"{dotted(path)}.lamb is not a known key" in message, message


def test_typo_in_algorithm_is_named():
    message = refused(with_value(("config", "algorithm", "lamb"), 0.5))
    assert "config.algorithm.lamb" in message and "'lam'" in message, message  # lists the known keys


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=[dotted(p) for p, _ in LEAVES])
def test_none_is_reported_as_required(path):
    message = refused(with_value(path, None))
    assert f"{dotted(path)} is required" in message and f"--{dotted(path)}=" in message, message


@pytest.mark.parametrize("model", ["policy", "actor"])
def test_placeholder_path_is_required_with_its_flag(model):
    """An ``ml_collections`` placeholder (how presets leave model paths to the command line)."""
    config = get_config()
    config[model].path = config_dict.placeholder(str)
    message = refused(config)
    assert f"config.{model}.path is required" in message, message
    assert f"--config.{model}.path=" in message, message
    assert train_config._PATH[1] in message, message


def test_placeholder_section_is_required():
    tree = demo_dict()
    tree["warm_start"] = None
    message = refused(ml_collections.ConfigDict(tree))
    assert "config.warm_start is required" in message and "section" in message, message


# --- cross-key constraints -----------------------------------------------------------------------

def test_train_batch_size_must_divide_the_rollout_batch():
    # 16 prompts * 8 samples = 128 rows; 48 does not divide them (micro 16 divides 48: only this fails)
    message = refused(with_values(algorithm__train_batch_size=48, algorithm__micro_batch_size=16))
    for text in ("config.algorithm.train_batch_size=48", "rollout.prompts_per_step", "rollout.n", "128"):
        assert text in message, message
    validate(with_values(algorithm__train_batch_size=128, algorithm__micro_batch_size=16))
    validate(with_values(rollout__n=3, rollout__prompts_per_step=16, algorithm__train_batch_size=48,
                         algorithm__micro_batch_size=16))


def test_micro_batch_size_must_divide_train_batch_size():
    message = refused(with_values(algorithm__micro_batch_size=48))
    for text in ("config.algorithm.micro_batch_size=48", "algorithm.train_batch_size=64"):
        assert text in message, message
    validate(with_values(algorithm__micro_batch_size=16))


def test_on_policy_refuses_train_actor():
    message = refused(with_values(algorithm__mode="on_policy", algorithm__train_actor=True))
    for text in ("config.algorithm.train_actor=True", "mode='on_policy'"):
        assert text in message, message
    validate(with_values(algorithm__mode="on_policy", algorithm__train_actor=False))


def test_jackpot_needs_untruncated_rollouts():
    for key, value in (("top_p", 0.9), ("top_k", 50)):
        message = refused(with_values(**{f"rollout__{key}": value}))  # the demo's mode is jackpot
        for text in (f"config.rollout.{key}={value}", "mode='jackpot'", "rollout.top_p=1.0 and rollout.top_k=0"):
            assert text in message, message
        validate(with_values(**{f"rollout__{key}": value, "algorithm__mode": "tis"}))  # TIS reads log p_inf only
    validate(with_values(rollout__temperature=0.7))


def test_an_actor_copied_from_the_policy_takes_no_path():
    message = refused(with_values(actor__init="policy", actor__path="/ckpt/actor"))
    for text in ("config.actor.path='/ckpt/actor'", "actor.init='policy'", "actor.init='own'"):
        assert text in message, message
    validate(with_values(actor__init="policy"))


@pytest.mark.parametrize("updates", [dict(algorithm__train_actor=True), dict(actor__init="own"),
                                     dict(algorithm__mode="on_policy")], ids=["trained", "own-init", "on-policy"])
def test_syncing_the_actor_needs_a_frozen_copy_of_the_policy(updates):
    sync = dict(algorithm__actor_sync_every=4, algorithm__train_actor=False, actor__init="policy")
    message = refused(with_values(**{**sync, **updates}))
    for text in ("config.algorithm.actor_sync_every=4", "train_actor=False and actor.init='policy'"):
        assert text in message, message
    validate(with_values(**sync))


def test_logprobs_top_k_must_not_exceed_top_k():
    message = refused(with_values(algorithm__mode="tis", rollout__top_k=5, rollout__logprobs_top_k=6))
    for text in ("config.rollout.logprobs_top_k=6", "rollout.top_k=5"):
        assert text in message, message
    validate(with_values(algorithm__mode="tis", rollout__top_k=5, rollout__logprobs_top_k=5))
    validate(with_values(rollout__top_k=0, rollout__logprobs_top_k=6))  # top_k=0: no top-k sampling


def test_hf_tokenizer_needs_a_path():
    message = refused(with_values(tokenizer__kind="hf", tokenizer__path=""))
    for text in ("config.tokenizer.path=''", "tokenizer.kind='hf'"):
        assert text in message, message
    validate(with_values(tokenizer__kind="hf", tokenizer__path="/some/tokenizer"))


def test_the_character_tokenizer_takes_no_checkpoint_and_no_path():
    """A checkpoint reads its own tokenizer's ids: "char" beside a model path would train it on
    character ids silently (build.tokenizer_source: "auto", the default, takes the checkpoint's)."""
    for model in ("policy", "actor"):
        message = refused(with_values(tokenizer__kind="char", **{f"{model}__path": "/ckpt/Qwen3-4B"}))
        for text in ("config.tokenizer.kind='char'", f"config.{model}.path='/ckpt/Qwen3-4B'", "tokenizer.kind='auto'"):
            assert text in message, message
        validate(with_values(tokenizer__kind="auto", **{f"{model}__path": "/ckpt/Qwen3-4B"}))
    message = refused(with_values(tokenizer__kind="char", tokenizer__path="/some/tokenizer"))
    assert "config.tokenizer.path='/some/tokenizer' is not allowed with tokenizer.kind='char'" in message, message
    assert get_config().tokenizer.kind == "auto"
    validate(with_values(tokenizer__kind="char"))


def test_evaluation_needs_eval_problems():
    message = refused(with_values(data__eval_limit=0))  # the demo evaluates every 20 steps
    for text in ("config.data.eval_limit=0", "train.eval_every"):
        assert text in message, message
    validate(with_values(data__eval_limit=0, train__eval_every=0))


def test_warm_start_problems_split_the_train_records():
    from jackpot_jax.train.loop import split_warm_start  # noqa: PLC0415 (the split lives in the loop)

    records = [{"problem": f"p{i}", "answer": str(i)} for i in range(40)]
    assert split_warm_start(records, with_values(warm_start__problems=0)) == (records, records)
    warm, rl = split_warm_start(records, with_values(warm_start__problems=10))
    assert warm == records[:10] and rl == records[10:]
    config = with_values(warm_start__problems=30)  # 40 - 30 < 16 prompts per RL step
    with pytest.raises(ConfigError) as error:
        split_warm_start(records, config)
    for text in ("config.warm_start.problems=30", "40 problems", "rollout.prompts_per_step=16", "at most 24"):
        assert text in str(error.value), error.value


def test_warm_start_seed_draws_the_starting_models_whatever_the_runs_seed():
    """``warm_start.seed`` seeds the models' initial weights (and their warm start): runs of other
    seeds with one warm_start.seed start from equal models; -1 follows ``config.seed``."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from jackpot_jax.train import build  # noqa: PLC0415

    tokenizer = build.load_tokenizer(get_config())

    def weights(seed, warm_start_seed):
        config = with_values(warm_start__seed=warm_start_seed)
        config.seed = seed
        validate(config)
        return [jax.tree.leaves(nnx.state(model, nnx.Param)) for model in build.build_models(config, tokenizer)]

    def equal(a, b):
        return all(np.array_equal(x, y) for leaves_a, leaves_b in zip(a, b) for x, y in zip(leaves_a, leaves_b))

    assert build.model_seed(with_values(warm_start__seed=-1)) == 0 and build.model_seed(with_values(warm_start__seed=3)) == 3
    assert equal(weights(1, 0), weights(0, -1))
    assert not equal(weights(1, -1), weights(0, -1))
    refused(with_values(warm_start__seed=-2))


def test_unbox_removes_the_final_box_from_a_seeded_fraction_of_the_solutions():
    from jackpot_jax.data.arithmetic import make_split  # noqa: PLC0415
    from jackpot_jax.data.rewards import math_reward  # noqa: PLC0415
    from jackpot_jax.train.warm_start import unbox  # noqa: PLC0415

    records = make_split(7, 2000, 2, form="expression")
    assert unbox(records, 1.0, seed=0) is records
    out = unbox(records, 0.3, seed=0)
    assert out == unbox(records, 0.3, seed=0) and out != unbox(records, 0.3, seed=1)  # seeded
    kept = [new == old for new, old in zip(out, records)]
    assert abs(sum(kept) / len(kept) - 0.3) < 0.035, sum(kept)  # 3.5 standard deviations of a binomial mean
    for new, old, same in zip(out, records, kept):
        assert math_reward(old["solution"], old["answer"]) == 1.0
        if not same:  # the worked lines stay, only the box goes, and the reward then reads no answer
            assert old["solution"] == new["solution"] + " \\boxed{" + old["answer"] + "}", (old, new)
            assert "\\boxed" not in new["solution"] and math_reward(new["solution"], new["answer"]) == 0.0
    with pytest.raises(ValueError, match=r"warm_start.boxed=0.5 needs solutions that end with .*'x = 1\.'"):
        unbox([{"problem": "p", "answer": "1", "solution": "x = 1."}], 0.5, seed=0)
    refused(with_values(warm_start__boxed=1.5))

# --- the command line ----------------------------------------------------------------------------

def _train_cli(*args, workdir):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "from jackpot_jax.train.cli import train_main; train_main()",
         f"--workdir={workdir}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - start


@pytest.mark.parametrize("explicit_config", [False, True], ids=["default-config", "explicit-config"])
def test_cli_refuses_an_unknown_override_key(tmp_path, explicit_config):
    """ml_collections refuses an override of a key the config lacks (with a did-you-mean)."""
    workdir = tmp_path / "run"
    config = ["--config", os.path.join(REPO, "configs", "demo.py")] if explicit_config else []
    result, _ = _train_cli(*config, "--config.algorithm.lamb=1", workdir=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "lamb" in output and 'Did you mean "lam"' in output, output
    assert "Traceback" not in output and "jackpot-train: unknown config key" in output, output
    assert not workdir.exists()


def test_cli_refuses_a_bad_value_before_building_anything(tmp_path):
    workdir = tmp_path / "run"
    result, seconds = _train_cli("--config.algorithm.lam=-1", workdir=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "jackpot-train: config.algorithm.lam=-1.0 is not allowed: it must be a finite number > 0 " in output, output
    assert "Traceback" not in output, output
    assert seconds < 60
    # the Trainer creates its work dir right after validating: nothing was built
    assert not workdir.exists()


def test_cli_reports_a_placeholder_as_required(tmp_path):
    config_file = tmp_path / "placeholder.py"
    config_file.write_text(
        "from ml_collections import config_dict\n"
        "from configs.demo import get_config as demo\n\n\n"
        "def get_config():\n"
        "    config = demo()\n"
        "    config.policy.path = config_dict.placeholder(str)\n"
        "    return config\n")
    workdir = tmp_path / "run"
    result, _ = _train_cli("--config", str(config_file), workdir=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "config.policy.path is required" in output and "--config.policy.path=" in output, output
    assert not workdir.exists()


def test_a_url_work_dir_is_refused_before_anything_loads():
    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"workdir 'gs://bucket/run' is not allowed: URLs are not supported yet"):
        Trainer(get_config(), "gs://bucket/run")


def test_the_gsm8k_config_needs_its_three_paths_and_validates_with_them(tmp_path):
    """configs/gsm8k.py (docs/training.md, "Your own checkpoints"; run end to end by
    tests/test_walkthrough.py): its paths are required flags, and with them it is a valid config."""
    from configs.gsm8k import get_config as gsm8k_config  # noqa: PLC0415

    config = gsm8k_config()
    assert config.tokenizer.kind == "auto" and config.data.dataset == "gsm8k" and config.data.config == ""
    for key in ("policy.path", "actor.path", "data.manual_dir"):
        assert f"config.{key} is required by this config" in refused(config)
        section, name = key.split(".")
        config[section][name] = str(tmp_path)
    validate(config)
