"""The paper presets (``configs/qwen*.py``): model and data paths are required flags, a preset with
them set is a valid config (as ``jackpot-train`` would receive it from its command line), and the
values a user relies on hold. Fast: no model is built, no data is read."""
import importlib.util
import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from jackpot_jax.config import ConfigError
from jackpot_jax.train.config import validate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PATHS = ("policy.path", "actor.path", "tokenizer.path", "data.manual_dir")

# preset -> (actor preset, policy preset, dataset, the names its docstring gives the models)
PRESETS = {
    "qwen25_1p5b_to_3b_math": ("qwen2.5-1.5b", "qwen2.5-3b", "math", ("Qwen2.5-1.5B", "Qwen2.5-3B")),
    "qwen3_1p7b_to_4b_deepscaler": ("qwen3-1.7b", "qwen3-4b", "deepscaler", ("Qwen3-1.7B-Base", "Qwen3-4B-Base")),
    "qwen3_1p7b_to_8b_deepscaler": ("qwen3-1.7b", "qwen3-8b", "deepscaler", ("Qwen3-1.7B-Base", "Qwen3-8B-Base")),
}


def _module(name):
    spec = importlib.util.spec_from_file_location(f"jackpot_configs_{name}", os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(tree, prefix=""):
    """The dotted names of every leaf of a nested dict."""
    return sorted(key for k, v in tree.items()
                  for key in (_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]))


def _set(config, dotted, value):
    section, key = dotted.split(".")
    config[section][key] = value


@pytest.fixture(params=sorted(PRESETS))
def name(request):
    return request.param


def test_paths_are_required_flags(name):
    config = _module(name).get_config()
    with pytest.raises(ConfigError, match=r"config\.policy\.path is required.*--config\.policy\.path="):
        validate(config)
    for i, dotted in enumerate(PATHS[:-1]):  # each path in turn is the one reported
        _set(config, dotted, f"/set/{dotted}")
        with pytest.raises(ConfigError, match=re.escape(f"config.{PATHS[i + 1]} is required")):
            validate(config)


def test_valid_with_paths_set(name):
    config = _module(name).get_config()
    for dotted in PATHS:
        _set(config, dotted, f"/set/{dotted}")
    validate(config)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading the file
def test_docstring_command_line_parses_and_validates(name):
    """The command line of the module docstring, through the flags ``jackpot-train`` defines."""
    doc = _module(name).__doc__
    command = re.search(r"jackpot-train (.*?)\n\n", doc, re.S).group(1).replace("\\\n", " ").split()
    assert command[:2] == ["--config", f"configs/{name}.py"]
    overrides = [arg for arg in command if arg.startswith("--config.")]
    assert sorted(arg.split("=")[0][len("--config."):] for arg in overrides) == sorted(PATHS)
    argv = ["jackpot-train", f"--config={os.path.join(CONFIGS, name)}.py", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    validate(config)
    assert config.policy.path == dict(arg[len("--config."):].split("=") for arg in overrides)["policy.path"]


def test_values_users_rely_on(name):
    actor, policy, dataset, names = PRESETS[name]
    module = _module(name)
    config = module.get_config()
    demo = _module("demo").get_config()
    assert config.algorithm.mode == "jackpot"
    assert config.algorithm.k == 20
    assert config.algorithm.train_actor  # eq. 8: the actor learns too
    assert config.algorithm.eps_low == config.algorithm.eps_high == 0.2  # the symmetric clip of eq. 1 / eq. 5
    assert config.rollout.max_new_tokens == 8192
    assert (config.actor.preset, config.policy.preset) == (actor, policy)
    assert config.data.dataset == dataset
    assert config.tokenizer.kind == "hf"
    assert config.data.template == "plain"  # base models
    assert config.data.instruction  # the \boxed{} instruction the math reward reads
    assert config.warm_start.policy_steps == config.warm_start.actor_steps == config.warm_start.problems == 0
    assert config.train.eval_k == 4 and config.train.eval_every > 0
    assert config.train.kernel_impl == "auto"
    for model in names:
        assert model in module.__doc__.splitlines()[0] and f"/ckpt/{model}" in module.__doc__
    assert _keys(config.to_dict()) == _keys(demo.to_dict())  # the schema's keys (configs/demo.py), no other
