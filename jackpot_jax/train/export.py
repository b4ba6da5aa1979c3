"""``jackpot-export``: a trained model of a run as a Hugging Face checkpoint that needs nothing else.

A run keeps what an export needs in ``WORKDIR/export`` (:func:`save_run_files`, written once by
process 0 when the run starts)::

    export/policy/config.json             the policy's architecture (ModelConfig as Hugging Face's)
    export/policy/generation_config.json  the source checkpoint's, when it had one
    export/actor/...                      the same for the actor (none in on_policy mode)
    export/tokenizer/                     the run's tokenizer (with its chat template)

so that :func:`export` builds the models' shapes, restores the weights and writes the tokenizer
from the run directory alone: the base checkpoints and the tokenizer directory the config names
may be gone, and the run directory may have moved. A run directory made before these files falls
back to the config's paths.
"""
from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil

import jax
import ml_collections
from flax import nnx

from jackpot_jax.config import ConfigError
from jackpot_jax.files import atomic_write_text
from jackpot_jax.models import hf, registry
from jackpot_jax.models.config import ModelConfig, preset
from jackpot_jax.models.sharding import make_mesh
from jackpot_jax.train import build
from jackpot_jax.train.checkpoint import Checkpointer

logger = logging.getLogger(__name__)

RUN_FILES = "export"  # under the run directory
MODELS = ("policy", "actor")


def run_files_dir(workdir) -> str:
    """``WORKDIR/export``: what a run keeps for :func:`export`."""
    return os.path.join(os.fspath(workdir), RUN_FILES)


def save_run_files(workdir, config, tokenizer, policy, actor=None) -> None:
    """Write ``WORKDIR/export`` (see the module's docstring) for the run of ``config`` whose
    tokenizer and models (their ``config`` only is read) these are; call it in process 0.

    The directory is built beside its final name and renamed into place, so it is complete or
    absent. An existing one is never replaced: it describes the run's checkpoints (a resume that
    changed the models' shapes is refused before this), so a difference is only logged."""
    final = run_files_dir(workdir)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover
    os.makedirs(tmp)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    for name, model in zip(MODELS, (policy, actor)):
        if model is None or not hasattr(model.config, "to_hf"):  # no actor, or a family without HF config
            continue
        os.makedirs(os.path.join(tmp, name))
        atomic_write_text(os.path.join(tmp, name, "config.json"), json.dumps(model.config.to_hf(), indent=2))
        source = config[name].path and hf.read_generation_config(config[name].path)
        if source:
            atomic_write_text(os.path.join(tmp, name, hf.GENERATION_CONFIG), json.dumps(source, indent=2))
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    differ = _differing_files(tmp, final)
    shutil.rmtree(tmp)
    if differ:
        logger.warning("%s is kept as the run's first start wrote it, though this start would write %s otherwise: "
                       "an export writes the model and tokenizer of the first start.", final, differ)


def _differing_files(a: str, b: str) -> list[str]:
    """Paths under ``a`` or ``b`` (relative) that are missing from the other or differ."""
    def files(root):
        return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}

    left, right = files(a), files(b)
    return sorted((left ^ right) | {f for f in left & right
                                     if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)})


def run_tokenizer(workdir, config):
    """The tokenizer of the run in ``workdir``: its copy in ``WORKDIR/export/tokenizer``, or for a
    run made before those files, the config's (``config.tokenizer``)."""
    directory = os.path.join(run_files_dir(workdir), "tokenizer")
    if os.path.isdir(run_files_dir(workdir)):
        return hf.load_tokenizer(directory)
    try:
        return build.load_tokenizer(config)
    except (FileNotFoundError, ConfigError) as error:  # ConfigError: the directory named in the config is gone
        raise FileNotFoundError(f"the run in {workdir} has no {directory} (it predates it), so its tokenizer comes "
                                f"from its config, which fails: {error}") from None


def run_model_config(workdir, config, name: str, tokenizer) -> tuple[ModelConfig, dict | None]:
    """``(ModelConfig, source generation_config.json dict or None)`` of the run's ``name`` model
    ("policy" or "actor"), from ``WORKDIR/export/NAME``; for a run made before those files, from
    ``config.NAME``: its checkpoint's ``config.json`` (only that: no weights are read), or its
    preset over the tokenizer's vocabulary."""
    section = config[name]
    if os.path.isdir(run_files_dir(workdir)):
        directory = os.path.join(run_files_dir(workdir), name)
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise ValueError(f"the {name} of the run in {workdir} (config.{name}.model={section.model!r}) has no "
                             f"{directory}/config.json: its family has no Hugging Face config, so it cannot be "
                             "exported.")
        return ModelConfig.from_hf(directory), hf.read_generation_config(directory)
    overrides = {key: section[key] for key in ("dtype", "param_dtype") if section[key]}
    if not section.path:
        return preset(section.preset, vocab_size=len(tokenizer), **overrides), None
    if not os.path.exists(os.path.join(section.path, "config.json")):
        raise FileNotFoundError(f"the run in {workdir} has no {run_files_dir(workdir)} (it predates it), so the "
                                f"{name}'s architecture comes from config.{name}.path={section.path!r}, which has no "
                                "config.json (moved or deleted?).")
    if section.dtype:  # as hf.from_pretrained applies them
        overrides["param_dtype"] = section.param_dtype or section.dtype
    return ModelConfig.from_hf(section.path, **overrides), hf.read_generation_config(section.path)


def _abstract_model(config, name: str, model_config: ModelConfig):
    """The ``name`` model of the run with shapes and dtypes only (nothing allocated). ``config`` is
    the checkpoint's metadata: its family must be registered, never an import path to import."""
    family = "transformer" if config[name].path else config[name].model  # as build.build_model builds it
    return nnx.eval_shape(lambda: registry.build(family, model_config, rngs=nnx.Rngs(0), imports=False))


def export(workdir: str, out: str, *, model: str = "policy", step: int | None = None) -> str:
    """Write the ``model`` ("policy" or "actor") of the run in ``workdir`` at checkpoint ``step``
    (default: the latest) to ``out`` as a Hugging Face checkpoint that needs nothing else: weights,
    ``config.json`` and ``generation_config.json`` with the tokenizer's special token ids (and the
    source checkpoint's sampling defaults), and the tokenizer's files. Only the models' shapes are
    built, and only the checkpoint's state is read (see :func:`run_model_config`)."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not allowed: it must be 'policy' or 'actor'.")
    workdir = os.path.abspath(workdir)  # Orbax restores from absolute paths only; runs may be given relative ones
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise FileNotFoundError(f"{workdir} has no checkpoints directory: is it a jackpot-train run directory?")
    with Checkpointer(checkpoints, save_every=1, keep=1) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint to export.")
        config = ml_collections.ConfigDict(checkpointer.read_meta(step)["config"])
        if model == "actor" and config.algorithm.mode == "on_policy":
            raise ValueError(f"the run in {workdir} is on_policy: it has no actor.")
        tokenizer = run_tokenizer(workdir, config)
        names = ("policy",) if config.algorithm.mode == "on_policy" else MODELS
        configs = {name: run_model_config(workdir, config, name, tokenizer) for name in names}
        models = {name: _abstract_model(config, name, configs[name][0]) for name in names}
        policy, actor = models["policy"], models.get("actor")
        # only the state's shapes are used: they depend on neither the mesh nor the placement
        config.placement = "colocated"
        updater = build.make_updater(config, policy, actor, total_updates=1, mesh=make_mesh(devices=jax.devices()[:1]))
        abstract = updater.abstract_state(nnx.state(policy, nnx.Param),
                                          None if actor is None else nnx.state(actor, nnx.Param))
        state, _ = checkpointer.restore(abstract, step=step)
    target = models[model]
    nnx.update(target, state.policy if model == "policy" else state.actor)
    hf.save_pretrained(target, out, tokenizer=tokenizer, generation_config=configs[model][1])
    return out
