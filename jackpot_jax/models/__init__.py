"""Decoder-only transformers (Llama 3.x, Qwen2 / Qwen2.5, Qwen3) in Flax NNX, Hugging Face
checkpoint I/O, logical-axis sharding and a registry for plugging in other Flax models."""
from jackpot_jax.models.config import PRESETS, ModelConfig, preset
from jackpot_jax.models.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "KVCache"]
