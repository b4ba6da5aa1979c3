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


# safetensors dtypes of floating-point weights (integer / bool tensors are never weights)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_index(directory: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of the safetensors index in ``directory``;
    ``ValueError`` naming the index when it is not an object with a weight_map of names to files
    inside ``directory`` (no absolute paths, no ``..``: an index never reads beyond its folder)."""
    index = os.path.join(directory, INDEX_FILE)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {error!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must be an object of tensor names to file names.")
    for name, file in weight_map.items():
        parts = file.replace("\\", "/").split("/")
        if os.path.isabs(file) or ".." in parts or not file:
            raise ValueError(f"{index}: weight_map[{name!r}]={file!r} is not allowed: shard files must be named "
                             "relative to the checkpoint's folder, inside it (no absolute path, no '..').")
    return weight_map


class _Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint (one file or sharded)."""

    def __init__(self, path):
        from safetensors import safe_open  # noqa: PLC0415 (light, but only needed here)

        self.path = path
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            weight_map = read_index(path)
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

    def file(self, name) -> str:
        """The path of the file holding tensor ``name``."""
        return os.path.join(self.path, self.weight_map[name])

    def slice(self, name):
        return self.handles[self.weight_map[name]].get_slice(name)

    def shape(self, name):
        return tuple(self.slice(name).get_shape())


def _checked(array: np.ndarray, file: str, name: str) -> np.ndarray:
    """``array`` (a tensor read from ``file``, in the parameter's dtype), or ``ValueError`` naming
    the tensor when it holds NaN or inf (also a finite value beyond the dtype's range)."""
    if not np.isfinite(array).all():
        raise ValueError(f"{file}: tensor {name} holds NaN or inf values (as {array.dtype}): the checkpoint's weights "
                         "must be finite.")
    return array


def from_pretrained(path, dtype=None, *, param_dtype=None, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                    **config_overrides) -> Transformer:
    """A :class:`Transformer` from a Hugging Face checkpoint directory.

    ``dtype`` (computation) and ``param_dtype`` (storage) default to the checkpoint's dtype;
    ``param_dtype`` defaults to ``dtype`` when only that is given. With a ``mesh``, each parameter is
    created directly in its sharding (``rules``). Other keyword arguments replace
    :class:`ModelConfig` fields (e.g. ``remat=True``). Raises ``ValueError`` naming the file and
    the field or tensor for a bad ``config.json`` value (:func:`jackpot_jax.models.config.check_hf_fields`),
    an index naming files outside ``path``, a tensor that is not floating point, or NaN / inf
    weights (each tensor, or each device's shard, checked as it is read, in the parameter's dtype).
    """
    directory = os.fspath(path)
    config_file = os.path.join(directory, "config.json")
    if dtype is not None:
        config_overrides.update(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype or dtype).name)
    elif param_dtype is not None:
        config_overrides.update(param_dtype=jnp.dtype(param_dtype).name)
    config = ModelConfig.from_hf(config_file, **config_overrides)
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
        file = checkpoint.file(name)
        if tensor.get_dtype() not in FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {tensor.get_dtype()}, but weights are floating point "
                             f"(one of {', '.join(FLOAT_DTYPES)}).")
        target = variable.dtype

        def read(index):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            array = np.asarray(tensor[tuple(reversed(index))]).T if transposed else np.asarray(tensor[index])
            with np.errstate(over="ignore"):  # a value beyond target's range: inf, refused by _checked
                return _checked(array.astype(target), file, name)

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


def save_pretrained(model: Transformer, path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, tokenizer=None,
                    generation_config: dict | None = None) -> None:
    """Write ``config.json`` and safetensors (sharded with an index past ``max_shard_bytes``) that
    ``transformers`` loads. Each file is written under a temporary name and renamed into place, so
    a crash never leaves a truncated checkpoint behind a valid name; ``config.json`` comes last.

    With a ``tokenizer``, a checkpoint that needs nothing else: the tokenizer's files (its chat
    template included) beside the weights, and its special token ids (:func:`special_token_ids`)
    in ``config.json`` and ``generation_config.json``, so that ``generate`` stops at the end tokens;
    ``generation_config`` (the source checkpoint's, see :func:`read_generation_config`) gives the
    sampling defaults kept there."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    if generation_config is not None and tokenizer is None:
        raise ValueError("save_pretrained(generation_config=...) needs the tokenizer: its special token ids go into "
                         "generation_config.json.")
    config: ModelConfig = model.config
    ids = None if tokenizer is None else special_token_ids(tokenizer, generation_config)
    if ids is not None:
        _check_ids_in_vocab(ids, config.vocab_size)
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
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(path))
        atomic_write_text(os.path.join(path, GENERATION_CONFIG),
                          json.dumps(make_generation_config(tokenizer, generation_config), indent=2))
        hf_config.update(ids)
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2))


# ------------------------------------------------------------------ special tokens, generation_config.json

GENERATION_CONFIG = "generation_config.json"
# tokens that end a turn or a text in the chat models' vocabularies (Qwen, Llama 3, Gemma): a tokenizer
# that has one stops generation there too, as the published generation_config.json files list them
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>")
# keys of a generation_config.json that transformers writes about itself, not sampling defaults
_GENERATION_BOOKKEEPING = ("transformers_version", "_from_model_config")


def read_generation_config(path) -> dict | None:
    """The ``generation_config.json`` of a checkpoint directory as a dict, or None without one."""
    file = os.path.join(os.fspath(path), GENERATION_CONFIG)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_token_ids(tokenizer, extra=()) -> list[int]:
    """The ids generation stops at, without duplicates: the tokenizer's ``eos_token_id`` first, then
    ``extra`` (e.g. a source ``generation_config.json``'s), then those of :data:`END_TOKENS` the
    tokenizer has (Qwen chat: ``<|im_end|>`` and ``<|endoftext|>``)."""
    vocab = tokenizer.get_vocab()
    known = [vocab[token] for token in END_TOKENS if token in vocab]
    return list(dict.fromkeys([*_id_list(tokenizer.eos_token_id), *map(int, extra), *known]))


def special_token_ids(tokenizer, source: dict | None = None) -> dict:
    """``{"eos_token_id", "bos_token_id", "pad_token_id"}`` of a checkpoint written with
    ``tokenizer``: eos from :func:`end_token_ids` (a list when there are several, an int when one),
    bos and pad the tokenizer's (None when it has none: then ``source``'s, a source
    ``generation_config.json`` dict). Raises ``ValueError`` when there is no end token at all."""
    source = source or {}
    eos = end_token_ids(tokenizer, _id_list(source.get("eos_token_id")))
    if not eos:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) has no eos_token and "
                         f"none of the end tokens {END_TOKENS}: generation from the checkpoint could never stop.")
    pick = lambda own, key: own if own is not None else source.get(key)
    return {"eos_token_id": eos[0] if len(eos) == 1 else eos,
            "bos_token_id": pick(tokenizer.bos_token_id, "bos_token_id"),
            "pad_token_id": pick(tokenizer.pad_token_id, "pad_token_id")}


def make_generation_config(tokenizer, source: dict | None = None) -> dict:
    """A ``generation_config.json`` dict: ``source``'s sampling defaults (temperature, top_p, ...;
    none without a source) with :func:`special_token_ids` (bos and pad left out when None)."""
    kept = {k: v for k, v in (source or {}).items() if k not in _GENERATION_BOOKKEEPING}
    ids = {k: v for k, v in special_token_ids(tokenizer, source).items() if v is not None}
    return {**kept, **ids}


def _check_ids_in_vocab(ids: dict, vocab_size: int) -> None:
    for key, value in ids.items():
        bad = [i for i in _id_list(value) if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{key}={value} is not allowed: the model has vocab_size={vocab_size}, so token ids must "
                             f"be in [0, {vocab_size}); is the tokenizer the model's?")


# ------------------------------------------------------------------------------- tokenizers


def load_tokenizer(path):
    """The Hugging Face tokenizer in a local directory (``tokenizer.json`` / ``tokenizer_config.json``,
    with its chat template when it has one). Never downloads."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist.")
    if not has_tokenizer(path):  # transformers would make an empty tokenizer of config.json's model type
        raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer files (one of "
                                f"{', '.join(TOKENIZER_FILES)}).")
    from transformers import AutoTokenizer  # noqa: PLC0415 (heavy; only the tokenizer needs it)

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"no tokenizer could be loaded from {path} (expected tokenizer.json or the files "
                                f"of a slow tokenizer, with tokenizer_config.json): {error}") from None


# ------------------------------------------------------------------------------- early checks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# the parts of a fast tokenizer's tokenizer.json that decide the ids of a text and the text of ids
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder")


def has_tokenizer(path) -> bool:
    """Whether the directory ``path`` holds a tokenizer's files (any of :data:`TOKENIZER_FILES`)."""
    return any(os.path.isfile(os.path.join(os.fspath(path), name)) for name in TOKENIZER_FILES)


def checkpoint_config(path, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of the Hugging Face checkpoint in ``path``, without reading a tensor:
    ``config.json`` parsed (``overrides`` replace fields) and the weight files present (a single
    file, or an index and every shard it lists). Raises ``FileNotFoundError`` / ``ValueError`` naming
    the file: what :func:`from_pretrained` would raise later, after the run's data preparation."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory: a Hugging Face checkpoint is a directory with "
                                "config.json and *.safetensors.")
    config = ModelConfig.from_hf(directory, **overrides)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        files = sorted(set(read_index(directory).values()))
        missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
        if missing:
            raise FileNotFoundError(f"{os.path.join(directory, missing[0])} is listed in {INDEX_FILE} but does not "
                                    "exist.")
    elif not os.path.exists(os.path.join(directory, SINGLE_FILE)):
        raise FileNotFoundError(f"no weights in {directory}: expected {SINGLE_FILE}, or {INDEX_FILE} with the shard "
                                "files it lists.")
    return config


def _tokens(tokenizer) -> dict[int, str]:
    """``{id: token}``, added tokens included."""
    return {i: token for token, i in tokenizer.get_vocab().items()}


def _parts(tokenizer) -> dict | None:
    """The parts of a fast tokenizer's ``tokenizer.json`` (:data:`_TOKENIZER_PARTS`), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    tree = json.loads(backend.to_str())
    return {part: tree.get(part) for part in _TOKENIZER_PARTS}


def tokenizer_difference(a, b, names=("the first", "the second")) -> str | None:
    """How tokenizer ``a`` differs from ``b`` (called ``names``), as a short phrase naming an
    example ("id 7 is 'ab' in the first and 'ba' in the second"); None when they agree on every id's
    token (added tokens included), the special tokens (eos / bos / pad / unk ids, which added tokens
    are special) and, for fast tokenizers, the normalizer, pre-tokenizer, merges, post-processor and
    decoder. Two models trained with different tokenizers of one vocabulary size fail here, not in
    their logits."""
    one, two = names
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        first, second = getattr(a, name, None), getattr(b, name, None)
        if first != second:
            return f"{name} is {first!r} in {one} and {second!r} in {two}"
    first, second = _tokens(a), _tokens(b)
    if len(first) != len(second):
        extra = sorted(set(first) ^ set(second))[0]
        return (f"{one} has {len(first)} tokens and {two} {len(second)} (e.g. id {extra} is "
                f"{first.get(extra, '(none)')!r} in {one} and {second.get(extra, '(none)')!r} in {two})")
    for i in sorted(set(first) | set(second)):
        if first.get(i) != second.get(i):
            return f"id {i} is {first.get(i, '(none)')!r} in {one} and {second.get(i, '(none)')!r} in {two}"
    special = lambda tok: {i: (t.content, t.special) for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    first, second = special(a), special(b)
    for i in sorted(set(first) | set(second)):
        if first.get(i) != second.get(i):
            return (f"added token {i} (content, special) is {first.get(i, '(none)')} in {one} and "
                    f"{second.get(i, '(none)')} in {two}")
    first, second = _parts(a), _parts(b)
    if first is None or second is None:
        return None
    merges = lambda parts: (parts["model"] or {}).get("merges") or []
    for i, (x, y) in enumerate(zip(merges(first), merges(second))):
        if x != y:
            return f"merge {i} is {x!r} in {one} and {y!r} in {two}"
    for part in _TOKENIZER_PARTS:
        if first[part] != second[part]:
            return (f"their {part.replace('_', '-')}s differ: {str(first[part])[:80]} in {one}, "
                    f"{str(second[part])[:80]} in {two}")
    return None
