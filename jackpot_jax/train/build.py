"""What a run is made of, built from its config: tokenizer, models, data, optimizers, rollout engine."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jackpot_jax.config import ConfigError
from jackpot_jax.models import hf, registry
from jackpot_jax.models.config import preset
from jackpot_jax.parallel import meshes_from_config
from jackpot_jax.rollout.decode import DecodeCore

logger = logging.getLogger(__name__)


def _check_directory(key: str, path: str, what: str = "a Hugging Face checkpoint directory holds config.json and "
                                                        "*.safetensors") -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is not allowed: the directory does not exist ({what}).")


def _model_sections(config) -> tuple[str, ...]:
    """The model sections a run of ``config`` builds: the policy, and the actor but in ``on_policy``."""
    return ("policy",) if config.algorithm.mode == "on_policy" else ("policy", "actor")


def tokenizer_source(config) -> tuple[str, str, str]:
    """``(kind, path, key)`` of the run's tokenizer: kind "char" or "hf", the directory ("" for
    "char") and the config key that names it (a model's path when it is that checkpoint's directory,
    for messages). ``tokenizer.kind="auto"`` resolves to ``tokenizer.path`` when set, else to the
    first checkpoint of ``policy.path``, ``actor.path`` holding tokenizer files
    (:func:`~jackpot_jax.models.hf.has_tokenizer`), else, with no checkpoint, to "char"; a
    checkpoint without tokenizer files is a ConfigError."""
    kind, path = config.tokenizer.kind, config.tokenizer.path
    if kind == "char":
        return "char", "", "config.tokenizer.kind"
    checkpoints = [(f"config.{name}.path", config[name].path) for name in _model_sections(config)
                   if config[name].path]
    if path:
        same = (key for key, directory in checkpoints if os.path.realpath(directory) == os.path.realpath(path))
        return "hf", path, next(same, "config.tokenizer.path")
    for key, directory in checkpoints:
        _check_directory(key, directory)
        if hf.has_tokenizer(directory):
            return "hf", directory, key
    if checkpoints:
        named = " or ".join(f"{key}={directory!r}" for key, directory in checkpoints)
        raise ConfigError(f"config.tokenizer.kind='auto' found no tokenizer files ({', '.join(hf.TOKENIZER_FILES)}) "
                          f"in {named}: give the tokenizer's directory with --config.tokenizer.path=...")
    return "char", "", "config.tokenizer.kind"


def resolve_tokenizer(config):
    """A copy of ``config`` with ``tokenizer.kind="auto"`` replaced by what it resolves to
    (:func:`tokenizer_source`): the kind and path a run records in its checkpoints and warm-start
    caches (the demo's, "char", as before "auto" existed)."""
    kind, path, _ = tokenizer_source(config)
    config = copy.deepcopy(config)
    config.tokenizer.kind, config.tokenizer.path = kind, path
    return config


def load_tokenizer(config):
    """The run's tokenizer (:func:`tokenizer_source`): the built-in character-level one, or a
    Hugging Face directory (a ConfigError naming the key when it does not load)."""
    kind, path, key = tokenizer_source(config)
    if kind == "char":
        from jackpot_jax.data.char_tokenizer import make_char_tokenizer  # noqa: PLC0415 (transformers is heavy)

        return make_char_tokenizer()
    _check_directory(key, path, "it must hold the tokenizer's files")
    try:
        return hf.load_tokenizer(path)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}={path!r}: {error}") from None


def _checkpoint_config(config, name: str):
    """The :class:`ModelConfig` of the checkpoint in ``config.<name>.path`` (its weight files
    checked, none read)."""
    path = config[name].path
    _check_directory(f"config.{name}.path", path)
    try:
        return hf.checkpoint_config(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"config.{name}.path={path!r} is not a checkpoint this trainer loads: {error}") from None


def _describe(config, name: str) -> str:
    section = config[name]
    return f"config.{name}.path={section.path!r}" if section.path else f"config.{name}.preset={section.preset!r}"


def check_run(config):
    """The run's tokenizer (:func:`load_tokenizer`), once what can be checked in seconds about a run
    of ``config`` is, before its data preparation and compilation: each checkpoint directory exists
    with a config.json this trainer reads and its weight files (none read); the tokenizer loads;
    each model's vocabulary covers it, actor and policy have one vocabulary size, and each
    checkpoint's own tokenizer files (when it has them) are the run's tokenizer, token for token
    (:func:`~jackpot_jax.models.hf.tokenizer_difference`: the OBRS ratios compare the two models'
    distributions id by id); an actor copied from the policy (``actor.init="policy"``) has its
    architecture; each model's ``max_position_embeddings`` covers a prompt and its completion
    (``data.max_prompt_tokens + rollout.max_new_tokens``); ``data.manual_dir`` exists. Raises a
    one-line ConfigError naming the keys."""
    names = _model_sections(config)
    checkpoints = {name: _checkpoint_config(config, name) for name in names if config[name].path}
    tokenizer = load_tokenizer(config)
    # the configs the models will have (but for dtype and remat): fresh ones get the tokenizer's vocabulary
    planned = {name: checkpoints.get(name) or preset(config[name].preset, vocab_size=len(tokenizer))
               for name in names}
    kind, source, source_key = tokenizer_source(config)
    run_tokenizer = f"{source_key}={source!r}" if kind == "hf" else "the character-level tokenizer"
    length = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    for name, model_config in planned.items():
        if length > model_config.max_position_embeddings:
            raise ConfigError(f"config.data.max_prompt_tokens={config.data.max_prompt_tokens} + config.rollout."
                              f"max_new_tokens={config.rollout.max_new_tokens} = {length} is not allowed with "
                              f"{_describe(config, name)}: the {name}'s max_position_embeddings="
                              f"{model_config.max_position_embeddings} is the longest sequence it was made for; lower "
                              "them to fit.")
        if model_config.vocab_size < len(tokenizer):
            raise ConfigError(f"{_describe(config, name)} is not allowed: the model's vocab_size="
                              f"{model_config.vocab_size} is smaller than the run's tokenizer's {len(tokenizer)} "
                              f"tokens ({run_tokenizer}).")
    if "actor" in planned and planned["actor"].vocab_size != planned["policy"].vocab_size:
        raise ConfigError(f"{_describe(config, 'actor')} and {_describe(config, 'policy')} are not allowed together: "
                          f"their vocab_size {planned['actor'].vocab_size} and {planned['policy'].vocab_size} differ, "
                          "and the OBRS ratios compare the two models' distributions token by token; give models of "
                          "one vocabulary.")
    for name in names:
        path = config[name].path
        is_source = kind == "hf" and os.path.realpath(path) == os.path.realpath(source)
        if not path or is_source or not hf.has_tokenizer(path):
            continue
        try:
            own = hf.load_tokenizer(path)
        except FileNotFoundError as error:
            raise ConfigError(f"config.{name}.path={path!r}: its tokenizer files do not load: {error}") from None
        difference = hf.tokenizer_difference(own, tokenizer, names=(f"the {name}'s", "the run's"))
        if difference is not None:
            raise ConfigError(f"config.{name}.path={path!r} is not allowed with {run_tokenizer}: the {name}'s own "
                              f"tokenizer differs from the run's ({difference}); actor and policy must share one "
                              "tokenizer, the one the run encodes with.")
    if "actor" in planned and config.actor.init == "policy":
        bare = lambda c: dataclasses.replace(c, dtype="float32", param_dtype="float32", remat=False)
        if bare(planned["actor"]) != bare(planned["policy"]):
            raise ConfigError(f"config.actor.init='policy' is not allowed here: the actor must have the policy's "
                              f"architecture, but the actor is {bare(planned['actor'])} and the policy "
                              f"{bare(planned['policy'])}; give config.actor the policy's preset (or set "
                              "actor.init='own').")
    manual = config.data.manual_dir
    if manual and "://" not in manual and not os.path.isdir(manual):
        raise ConfigError(f"config.data.manual_dir={manual!r} is not allowed: the directory does not exist.")
    return tokenizer


def build_model(section, tokenizer, seed: int, mesh=None):
    """A model from ``config.policy`` / ``config.actor``: a Hugging Face checkpoint when ``path``
    is set (with a ``mesh``, each tensor read straight into its shards: never the whole model on one
    device), else a fresh model of the registry with the preset's shape and the tokenizer's
    vocabulary. ``dtype`` / ``param_dtype`` ("" keeps the checkpoint's or preset's) and ``remat``
    apply to both."""
    overrides = {"remat": section.remat}
    overrides.update({key: section[key] for key in ("dtype", "param_dtype") if section[key]})
    if section.path:
        return hf.from_pretrained(section.path, mesh=mesh, **overrides)
    config = preset(section.preset, vocab_size=len(tokenizer), **overrides)
    return registry.build(section.model, config, rngs=nnx.Rngs(seed))


def model_seed(config) -> int:
    """The seed of the starting models: their initial weights and their warm start
    (``warm_start.seed``; ``config.seed`` when it is -1). RL's randomness follows ``config.seed``."""
    return config.seed if config.warm_start.seed == -1 else config.warm_start.seed


def build_models(config, tokenizer, mesh=None, actor_mesh=None):
    """``(policy, actor)``; the actor is None in ``on_policy`` mode. Both must cover the tokenizer's
    vocabulary and share it (the OBRS ratios compare their distributions token by token; their own
    tokenizers are compared with the run's by :func:`check_run`, before any data is read).
    Checkpoints load into their shardings: on ``mesh`` (the update's) when given, the actor's on
    ``actor_mesh`` when given (the disaggregated placement). Fresh models are drawn with
    :func:`model_seed` (the actor with the next seed)."""
    seed = model_seed(config)
    policy = build_model(config.policy, tokenizer, seed, mesh)
    actor = (None if config.algorithm.mode == "on_policy"
             else build_model(config.actor, tokenizer, seed + 1, mesh if actor_mesh is None else actor_mesh))
    for name, model in (("policy", policy), ("actor", actor)):
        if model is not None and model.config.vocab_size < len(tokenizer):
            raise ConfigError(f"config.{name}: the model's vocab_size={model.config.vocab_size} is smaller than the "
                              f"tokenizer's {len(tokenizer)} tokens.")
    if actor is not None and actor.config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"config.actor has vocab_size={actor.config.vocab_size} but config.policy has vocab_size="
                          f"{policy.config.vocab_size}: both models' logits must cover one vocabulary.")
    return policy, actor


def init_actor_from_policy(policy, actor) -> None:
    """``config.actor.init="policy"``: set the actor's parameters to a copy of the policy's, in the
    actor's shardings and parameter dtype. Then the two start as one model and differ only by
    training and staleness (``algorithm.actor_sync_every``): the paper's small actor-policy
    mismatch. The two must be one architecture (the same model config, but for dtype and remat, and
    the same parameter shapes); else a ConfigError."""
    def architecture(model):
        config = model.config
        if dataclasses.is_dataclass(config):
            config = dataclasses.replace(config, dtype="float32", param_dtype="float32", remat=False)
        return type(model), config

    if architecture(actor) != architecture(policy):
        raise ConfigError(f"config.actor.init='policy' is not allowed here: the actor must have the policy's "
                          f"architecture, but the actor is {architecture(actor)} and the policy "
                          f"{architecture(policy)}; give config.actor the policy's preset (or set actor.init='own').")
    p_params, a_params = nnx.state(policy, nnx.Param), nnx.state(actor, nnx.Param)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    if shapes(p_params) != shapes(a_params):  # an architecture whose config does not fix its shapes
        raise ConfigError("config.actor.init='policy' is not allowed here: the actor's parameter shapes differ from "
                          "the policy's; give config.actor the policy's preset (or set actor.init='own').")
    nnx.update(actor, copy_params(p_params, a_params))


def copy_params(source, like):
    """``source``'s values as new buffers in ``like``'s shardings and dtypes (``like``: a tree of
    arrays of the same structure and shapes): the policy's parameters made the actor's, at start-up
    (``actor.init="policy"``) and at each sync (``algorithm.actor_sync_every``). Never aliases of
    ``source``: the update step donates both models' parameters."""
    return jax.tree.map(lambda x, y: jax.device_put(jnp.array(x, dtype=y.dtype, copy=True), y.sharding), source, like)


def load_records(config):
    """``(train, eval)`` records of ``config.data`` (TFDS, prepared on first use). With several
    processes, process 0 loads (and prepares) first and the others after it: on a shared data
    directory they find it prepared, on their own disks each prepares its copy."""
    from jackpot_jax.data.datasets import load_split  # noqa: PLC0415 (imports TensorFlow Datasets)

    data = config.data
    kwargs = dict(data_dir=data.data_dir or None, manual_dir=data.manual_dir or None, config=data.config or None)

    def load():
        train = load_split(data.dataset, data.split, limit=data.train_limit or None, **kwargs)
        return train, load_split(data.dataset, data.eval_split, limit=data.eval_limit, **kwargs) if data.eval_limit else []

    if jax.process_count() == 1:
        return load()
    records = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jackpot_jax: data prepared by process 0")
    return records if records is not None else load()


def make_optimizer(section, total_updates: int):
    """``(optax transformation, learning-rate schedule)``: global-norm clipping, then AdamW with a
    linear warmup to ``lr`` followed by a constant rate or a cosine decay to 0 over the run."""
    warmup = min(section.warmup_steps, max(total_updates - 1, 0))
    if section.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, section.lr, warmup, max(total_updates, warmup + 1))
    else:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, section.lr, warmup),
                                         optax.constant_schedule(section.lr)], [warmup])
    tx = optax.chain(optax.clip_by_global_norm(section.clip_norm),
                     optax.adamw(schedule, b1=section.b1, b2=section.b2, weight_decay=section.weight_decay))
    return tx, schedule


def make_updater(config, policy, actor, total_updates: int, mesh=None, actor_mesh=None):
    """The run's :class:`~jackpot_jax.train.step.Updater` on ``mesh`` (default: ``config.mesh``'s),
    or with ``config.placement='disaggregated'`` its
    :class:`~jackpot_jax.train.disaggregated.DisaggregatedUpdater` with the actor on ``actor_mesh``
    (default: :func:`~jackpot_jax.parallel.meshes_from_config`'s): both optimizers (the actor's only
    when it is trained) over ``total_updates`` updates, the policy's schedule reported as ``lr``."""
    from jackpot_jax.train.disaggregated import DisaggregatedUpdater  # noqa: PLC0415 (step imports the kernels)
    from jackpot_jax.train.step import StepConfig, Updater  # noqa: PLC0415

    if mesh is None:
        mesh, actor_mesh = meshes_from_config(config)
    policy_tx, policy_lr = make_optimizer(config.optim.policy, total_updates)
    actor_tx = make_optimizer(config.optim.actor, total_updates)[0] if config.algorithm.train_actor else None
    args = (StepConfig.from_config(config), policy, actor, policy_tx, actor_tx, policy_lr)
    if config.placement == "disaggregated":
        return DisaggregatedUpdater(*args, mesh=mesh, actor_mesh=actor_mesh)
    return Updater(*args, mesh=mesh)


def engine_devices(config, model) -> list:
    """The devices an engine spreads its slots over: ``rollout.engine_devices`` (0: all) of those of
    this process that hold the model's parameters (all of its devices when one does)."""
    held = {d for x in jax.tree.leaves(nnx.state(model, nnx.Param)) for d in x.sharding.device_set
            if d.process_index == jax.process_index()}
    local = sorted(held, key=lambda d: d.id) if len(held) > 1 else jax.local_devices()
    wanted = config.rollout.engine_devices or len(local)
    if wanted > len(local):
        raise ConfigError(f"config.rollout.engine_devices={wanted} is not allowed: the engine has {len(local)} "
                          "devices in this process.")
    return local[:wanted]


def rollout_engine(model, config):
    """The engine that generates rollouts: JetStream's (:class:`~jackpot_jax.rollout.engine.JackpotEngine`)
    when google-jetstream is installed, else its decoding core (same code, same samples)."""
    try:
        from jackpot_jax.rollout.engine import JackpotEngine as Engine  # noqa: PLC0415 (imports TensorFlow)
    except ImportError as error:
        logger.warning("google-jetstream is not importable (%s): rollouts use the decoding core directly.", error)
        Engine = DecodeCore  # noqa: N806
    rollout = config.rollout
    return Engine(model, devices=engine_devices(config, model), max_concurrent_decodes=rollout.max_concurrent_decodes,
                  max_prefill_length=config.data.max_prompt_tokens,
                  max_target_length=config.data.max_prompt_tokens + rollout.max_new_tokens,
                  logprobs_top_k=rollout.logprobs_top_k)
