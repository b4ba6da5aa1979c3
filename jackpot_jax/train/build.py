"""What a run is made of, built from its config: tokenizer, models, data, optimizers, rollout engine."""
from __future__ import annotations

import dataclasses
import logging

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


def load_tokenizer(config):
    """The run's tokenizer: the built-in character-level one, or a Hugging Face directory."""
    if config.tokenizer.kind == "char":
        from jackpot_jax.data.char_tokenizer import make_char_tokenizer  # noqa: PLC0415 (transformers is heavy)

        return make_char_tokenizer()
    return hf.load_tokenizer(config.tokenizer.path)


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
    vocabulary and share it (the OBRS ratios compare their distributions token by token).
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
    if actor is not None:
        hf.check_shared_vocab(tokenizer, tokenizer, actor.config, policy.config)
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
