"""Rollouts: sampling with p_inf log-probs, a decoding core with continuous batching, the batch
driver ``generate``, and (imported on demand, it needs JetStream) the JetStream engine
``jackpot_jax.rollout.engine.JackpotEngine`` and the gRPC server ``jackpot_jax.rollout.serve``."""
from jackpot_jax.rollout.decode import DecodeCore, DecodeState, Prefix
from jackpot_jax.rollout.generate import Rollout, generate
from jackpot_jax.rollout.sampling import SamplingParams, processed_log_probs, processed_log_probs_reference, sample

__all__ = ["DecodeCore", "DecodeState", "Prefix", "Rollout", "generate", "SamplingParams", "processed_log_probs",
           "processed_log_probs_reference", "sample"]
