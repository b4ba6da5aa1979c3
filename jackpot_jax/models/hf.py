"""Hugging Face checkpoints: ``config.json`` + ``*.safetensors`` in and out, and tokenizers.

``from_pretrained`` reads one tensor at a time with ``safetensors``' lazy slices; given a mesh, each
device reads only its own shard of each tensor from disk (``jax.make_array_from_callback``), so
the model never exists whole in host memory, let alone twice. Tensor names are Hugging Face's
(``model.layers.{i}.self_attn.q_proj.weight``, ...); their ``[out, in]`` linear weights are our
``[in, out]`` kernels, transposed on the way.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.files import atomic_write, atomic_write_text
from jackpot_jax.models import sharding as sharding_lib
from jackpot_jax.models.config import ModelConfig
from jackpot_jax.models.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# checkpoint tensors that carry no parameter of ours
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path (``("layers", 0, "self_attn", "q_proj", "kernel")``) -> (Hugging Face
    tensor name, whether the tensor is stored transposed)."""
    *parents, leaf = (str(p) for p in path)
    if not parents:  # embed_tokens, lm_head
        return ("lm_head.weight", True) if leaf == "lm_head" else (f"model.{leaf}.weight", False)
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"model.{'.'.join(parents)}.{suffix}", leaf == "kernel"


class _Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint (one file or sharded)."""

    def __init__(self, path):
        from safetensors import safe_open  # noqa: PLC0415 (light, but only needed here)

        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE}, or {INDEX_FILE} with the shard "
                                    "files it lists.")
        self.handles = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file} is listed in {INDEX_FILE} but does not exist.")
            self.handles[name] = safe_open(file, framework="numpy")
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self.handles[SINGLE_FILE].keys()}
        self.weight_map = weight_map

    def slice(self, name):
        return self.handles[self.weight_map[name]].get_slice(name)

    def shape(self, name):
        return tuple(self.slice(name).get_shape())


def from_pretrained(path, dtype=None, *, param_dtype=None, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                    **config_overrides) -> Transformer:
    """A :class:`Transformer` from a Hugging Face checkpoint directory.

    ``dtype`` (computation) and ``param_dtype`` (storage) default to the checkpoint's dtype;
    ``param_dtype`` defaults to ``dtype`` when only that is given. With a ``mesh``, each parameter is
    created directly in its sharding (``rules``). Other keyword arguments replace
    :class:`ModelConfig` fields (e.g. ``remat=True``).
    """
    directory = os.fspath(path)
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: a Hugging Face checkpoint directory needs a "
                                "config.json.")
    with open(config_file) as f:
        config_json = json.load(f)
    if dtype is not None:
        config_overrides.update(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype or dtype).name)
    elif param_dtype is not None:
        config_overrides.update(param_dtype=jnp.dtype(param_dtype).name)
    config = ModelConfig.from_hf(config_json, **config_overrides)
    checkpoint = _Checkpoint(directory)

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = nnx.state(abstract, nnx.Param)
    shardings = None if mesh is None else sharding_lib.param_shardings(params, mesh, rules)
    used = set()

    def load(key, variable):
        name, transposed = hf_name(key)
        if name not in checkpoint.weight_map:
            raise ValueError(f"tensor {name} is missing from the checkpoint in {directory}, but the config "
                             f"(model_type={config.model_type}, tie_word_embeddings={config.tie_word_embeddings}, "
                             f"attention_bias={config.attention_bias}, qk_norm={config.qk_norm}) needs it.")
        used.add(name)
        shape = checkpoint.shape(name)
        expected = tuple(reversed(variable.shape)) if transposed else tuple(variable.shape)
        if shape != expected:
            raise ValueError(f"tensor {name} has shape {shape} in the checkpoint but the config needs {expected}.")
        tensor = checkpoint.slice(name)
        target = variable.dtype

        def read(index):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if transposed:
                return np.asarray(tensor[tuple(reversed(index))]).T.astype(target)
            return np.asarray(tensor[index]).astype(target)

        if mesh is None:
            return jnp.asarray(read(()))
        return jax.make_array_from_callback(variable.shape, _leaf_at(shardings, key), read)

    values = {}
    for key, variable in nnx.to_flat_state(params):
        values[key] = load(key, variable)
    unused = sorted(name for name in checkpoint.weight_map
                    if name not in used and not name.endswith(_IGNORED_SUFFIXES)
                    and not (name == "lm_head.weight" and config.tie_word_embeddings))
    if unused:
        raise ValueError(f"the checkpoint in {directory} has tensors the config does not use: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''}; is config.json the checkpoint's own?")
    model = nnx.merge(graphdef, state)
    nnx.update(model, nnx.from_flat_state([(key, value) for key, value in values.items()]))
    return model


def _leaf_at(tree: nnx.State, path):
    node = tree
    for key in path:
        node = node[key]
    return node


def save_pretrained(model: Transformer, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors (sharded with an index past ``max_shard_bytes``) that
    ``transformers`` loads. Each file is written under a temporary name and renamed into place, so
    a crash never leaves a truncated checkpoint behind a valid name."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    config: ModelConfig = model.config
    dtype = jnp.dtype(dtype or config.param_dtype)
    os.makedirs(path, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(key)
        array = np.asarray(jax.device_get(variable[...])).astype(dtype)
        array = np.ascontiguousarray(array.T if transposed else array)
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        atomic_write(os.path.join(path, name), lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
                 "weight_map": {t: n for n, s in zip(names, shards) for t in s}}
        atomic_write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2))
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = dtype.name
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2))


# ------------------------------------------------------------------------------- tokenizers


def load_tokenizer(path):
    """The Hugging Face tokenizer in a local directory (``tokenizer.json`` / ``tokenizer_config.json``,
    with its chat template when it has one). Never downloads."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist.")
    from transformers import AutoTokenizer  # noqa: PLC0415 (heavy; only the tokenizer needs it)

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no tokenizer could be loaded from {path} (expected tokenizer.json or the files "
                                f"of a slow tokenizer, with tokenizer_config.json): {error}") from None


def check_shared_vocab(actor_tokenizer, policy_tokenizer, actor_config: ModelConfig | None = None,
                       policy_config: ModelConfig | None = None) -> None:
    """Raise ``ValueError`` unless actor and policy share one vocabulary: the same token -> id map
    and, given the configs, the same number of embedding rows (the OBRS ratios compare the two
    distributions token by token)."""
    actor_vocab, policy_vocab = actor_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if actor_vocab != policy_vocab:
        differ = sorted(set(actor_vocab.items()) ^ set(policy_vocab.items()), key=lambda item: item[1])[:3]
        raise ValueError(f"actor and policy tokenizers differ ({len(actor_vocab)} vs {len(policy_vocab)} tokens; "
                         f"e.g. {differ}): Jackpot needs one shared vocabulary.")
    if actor_config is not None and policy_config is not None and actor_config.vocab_size != policy_config.vocab_size:
        raise ValueError(f"actor has vocab_size={actor_config.vocab_size} but policy has "
                         f"vocab_size={policy_config.vocab_size}: both models' logits must cover the same vocabulary.")
