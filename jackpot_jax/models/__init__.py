"""Decoder-only transformers (Llama 3.x, Qwen2 / Qwen2.5, Qwen3) in Flax NNX, Hugging Face
checkpoint I/O (:mod:`jackpot_jax.models.hf`), logical-axis sharding
(:mod:`jackpot_jax.models.sharding`) and a registry for plugging in other Flax models
(:mod:`jackpot_jax.models.registry`)."""
from jackpot_jax.models.config import PRESETS, ModelConfig, preset
from jackpot_jax.models.registry import CausalLM, build, check_protocol, register
from jackpot_jax.models.transformer import KVCache, PagedKVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "KVCache", "PagedKVCache", "CausalLM", "build", "register",
           "check_protocol"]
