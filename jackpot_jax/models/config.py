"""``ModelConfig``: one decoder-only transformer family covering Llama 3.x, Qwen2 / Qwen2.5 and Qwen3
dense, with presets for the paper's models and ``from_hf`` / ``to_hf`` for Hugging Face's
``config.json`` (both the published checkpoints' ``rope_theta`` / ``rope_scaling`` keys and the
``rope_parameters`` dict that ``transformers`` 5 writes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

import jax.numpy as jnp

from pallas_kernels.attention import IMPLS as ATTENTION_IMPLS
from pallas_kernels.paged_attention import IMPLS as PAGED_ATTENTION_IMPLS

# model_type -> (attention projections carry a bias, q/k RMSNorm per head)
FAMILIES = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer (names follow Hugging Face's).

    ``rope_scaling`` is None (plain RoPE) or a dict with ``rope_type`` in ``ROPE_TYPES`` and that
    type's keys: ``factor`` (linear, llama3), ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings`` (llama3). ``dtype`` is the computation dtype and
    ``param_dtype`` the storage dtype of the weights; ``remat`` recomputes each layer's activations
    in the backward pass; ``attention_impl`` is the ``impl`` of attention in training and prefill
    (:func:`pallas_kernels.attention.attention`: dense or blockwise) and ``paged_attention_impl`` that
    of decode attention over a paged KV cache (:func:`pallas_kernels.paged_attention.paged_attention`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    model_type: str = "qwen3"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # default: the family's (Qwen2: True)
    qk_norm: bool | None = None  # default: the family's (Qwen3: True)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "auto"
    paged_attention_impl: str = "auto"

    def __post_init__(self):
        def fail(key, allowed):
            raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r} is not allowed: {key} must be {allowed}.")

        if self.model_type not in FAMILIES:
            fail("model_type", f"one of {tuple(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                fail(key, "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                fail("head_dim", "given when hidden_size is not a multiple of num_attention_heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not _is_int(self.head_dim) or self.head_dim < 1 or self.head_dim % 2:
            fail("head_dim", "a positive even integer (RoPE rotates pairs)")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            fail("max_position_embeddings", "a positive integer")
        for key in ("rms_norm_eps", "rope_theta"):  # eps <= 0 or theta <= 0 give NaN logits
            if not _is_positive_number(getattr(self, key)):
                fail(key, "a finite number > 0")
        bias, qk_norm = FAMILIES[self.model_type]
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", bias)
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", qk_norm)
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                fail(key, f"one of {DTYPES}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"one of {ATTENTION_IMPLS}")
        if self.paged_attention_impl not in PAGED_ATTENTION_IMPLS:
            fail("paged_attention_impl", f"one of {PAGED_ATTENTION_IMPLS}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.attention_bias else 0)
        norms = 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        layer = attn + 3 * d * self.intermediate_size + norms
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * layer + self.vocab_size * d + head + d

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike, **overrides) -> "ModelConfig":
        """From a Hugging Face ``config.json`` (a dict, the file, or its directory). ``dtype`` and
        ``param_dtype`` default to the checkpoint's; ``overrides`` replace any field."""
        source = "config.json"
        if not isinstance(config, dict):
            source = os.path.join(config, "config.json") if os.path.isdir(config) else os.fspath(config)
            config = read_hf_config(source)
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"model_type={model_type!r} in {source} is not supported: supported model types "
                             f"are {tuple(FAMILIES)}.")
        check_hf_fields(config, source)
        rope_theta, rope_scaling = _rope_from_hf(config)
        kwargs: dict[str, Any] = dict(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim"), model_type=model_type,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings") or 32768,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
        if model_type == "qwen2":
            kwargs["attention_bias"] = True  # Qwen2's q/k/v projections always have a bias
        elif "attention_bias" in config:
            kwargs["attention_bias"] = bool(config["attention_bias"])
        if config.get("mlp_bias"):
            raise ValueError(f"mlp_bias=True in {source} is not supported: the MLP projections have no bias.")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} in {source} is not supported: the MLP is SwiGLU ('silu').")
        dtype = config.get("dtype") or config.get("torch_dtype")
        if dtype in DTYPES:  # the checkpoint's dtype, for storage and computation
            kwargs["dtype"] = kwargs["param_dtype"] = dtype
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that ``transformers`` loads (``rope_theta`` / ``rope_scaling``
        keys, which ``transformers`` 4 and 5 both read)."""
        architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        out = dict(
            architectures=[architectures[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            torch_dtype=self.param_dtype,
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        return out


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value) -> bool:
    """A real number (not a bool), finite and > 0."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# config.json fields of sizes (positive integers; None allowed for the optional ones) and of constants (finite > 0)
HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
HF_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
HF_CONSTANTS = ("rms_norm_eps", "rope_theta")


def read_hf_config(path: str) -> dict:
    """The JSON object in the ``config.json`` at ``path``; ``FileNotFoundError`` / ``ValueError``
    naming the file when it is missing, not JSON, or not an object."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: a Hugging Face checkpoint directory needs a config.json.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: a config.json is an object "
                         "of the model's fields.")
    return config


def check_hf_fields(config: dict, source: str = "config.json") -> None:
    """Raise ``ValueError`` naming ``source`` and the field when a size of ``config`` (a
    ``config.json`` dict) is missing or not a positive integer, or a constant (``rms_norm_eps``,
    ``rope_theta``, the ``rope_scaling`` numbers) is not a finite number > 0."""
    def fail(key, value, allowed):
        raise ValueError(f"{key}={value!r} in {source} is not allowed: {key} must be {allowed}.")

    for key in HF_SIZES:
        if key not in config:
            raise ValueError(f"{source} has no {key}: a config.json needs {', '.join(HF_SIZES)}.")
    for key in HF_SIZES + HF_OPTIONAL_SIZES:
        value = config.get(key)
        if (value is not None or key in HF_SIZES) and (not _is_int(value) or value < 1):
            fail(key, value, "a positive integer")
    constants = [(key, config[key]) for key in HF_CONSTANTS if key in config]
    for name in ("rope_parameters", "rope_scaling"):  # transformers 5's form, the published checkpoints' form
        section = config.get(name) or {}
        if not isinstance(section, dict):
            fail(name, section, "an object (or null)")
        constants += [(f"{name}.{key}", value) for key, value in section.items()
                      if key in ROPE_NUMBERS or key == "rope_theta"]
    for key, value in constants:
        if not _is_positive_number(value):
            fail(key, value, "a finite number > 0")
    if not isinstance(config.get("tie_word_embeddings", False), bool):
        fail("tie_word_embeddings", config["tie_word_embeddings"], "true or false")


# the numbers of a rope_scaling dict (each finite and > 0)
ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling: dict) -> None:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported: it must be one of {ROPE_TYPES}.")
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [key for key in needed[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs the keys {missing}.")
    bad = {key: scaling[key] for key in ROPE_NUMBERS if key in scaling and not _is_positive_number(scaling[key])}
    if bad:
        raise ValueError(f"rope_scaling {bad} is not allowed: {', '.join(bad)} must be finite numbers > 0.")


def _rope_from_hf(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config.json form."""
    params = config.get("rope_parameters")
    if params:  # transformers 5: theta and scaling in one dict
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    _check_rope_scaling(scaling)
    return float(theta), scaling


# ---------------------------------------------------------------------------------- presets

_LLAMA3_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

PRESETS = {
    # the paper's pairs (base models) and Qwen3-0.6B (the GPU benchmarks' actor), from their config.json
    "qwen2.5-1.5b": ModelConfig(151936, 1536, 8960, 28, 12, 2, model_type="qwen2", rope_theta=1e6,
                                max_position_embeddings=131072, tie_word_embeddings=True, param_dtype="bfloat16",
                                dtype="bfloat16"),
    "qwen2.5-3b": ModelConfig(151936, 2048, 11008, 36, 16, 2, model_type="qwen2", rope_theta=1e6,
                              max_position_embeddings=32768, tie_word_embeddings=True, param_dtype="bfloat16",
                              dtype="bfloat16"),
    "qwen3-0.6b": ModelConfig(151936, 1024, 3072, 28, 16, 8, head_dim=128, rope_theta=1e6,
                              max_position_embeddings=40960, tie_word_embeddings=True, param_dtype="bfloat16",
                              dtype="bfloat16"),
    "qwen3-1.7b": ModelConfig(151936, 2048, 6144, 28, 16, 8, head_dim=128, rope_theta=1e6,
                              max_position_embeddings=40960, tie_word_embeddings=True, param_dtype="bfloat16",
                              dtype="bfloat16"),
    "qwen3-4b": ModelConfig(151936, 2560, 9728, 36, 32, 8, head_dim=128, rope_theta=1e6,
                            max_position_embeddings=40960, tie_word_embeddings=True, param_dtype="bfloat16",
                            dtype="bfloat16"),
    "qwen3-8b": ModelConfig(151936, 4096, 12288, 36, 32, 8, head_dim=128, rope_theta=1e6,
                            max_position_embeddings=40960, tie_word_embeddings=False, param_dtype="bfloat16",
                            dtype="bfloat16"),
    "llama-3.2-1b": ModelConfig(128256, 2048, 8192, 16, 32, 8, head_dim=64, model_type="llama", rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                                tie_word_embeddings=True, param_dtype="bfloat16", dtype="bfloat16"),
    "llama-3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, model_type="llama", rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
                                max_position_embeddings=131072, param_dtype="bfloat16", dtype="bfloat16"),
    # tiny ones for tests and the CPU demo (float32)
    "tiny-qwen3": ModelConfig(512, 64, 128, 2, 4, 2, head_dim=16, max_position_embeddings=512,
                              tie_word_embeddings=True),
    "tiny-qwen3-large": ModelConfig(512, 128, 256, 4, 4, 2, head_dim=32, max_position_embeddings=512,
                                    tie_word_embeddings=True),
    "tiny-qwen2": ModelConfig(512, 64, 128, 2, 4, 2, model_type="qwen2", max_position_embeddings=512,
                              tie_word_embeddings=True),
    "tiny-llama": ModelConfig(512, 64, 128, 2, 4, 2, model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling={**_LLAMA3_SCALING, "original_max_position_embeddings": 64},
                              max_position_embeddings=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named config (``PRESETS``), optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown: presets are {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
