"""jackpot-jax: JAX-native RL for LLMs where a small actor generates the rollouts that train a larger
policy, kept stable by Optimal Budgeted Rejection Sampling (Jackpot, Chen et al. 2025).

Start with :mod:`jackpot_jax.obrs` (sections 3-4 of the paper) and :mod:`jackpot_jax.losses`
(eq. 5-8). Heavy optional engines (TensorFlow, JetStream) are imported lazily by the modules that
serve or load data, never here.
"""
__version__ = "0.1.0"
