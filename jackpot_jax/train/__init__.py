"""The Jackpot trainer: configs, the jitted update step, the loop, checkpoints and metrics.

Read in this order: :mod:`~jackpot_jax.train.batch` (rollouts to arrays), :mod:`~jackpot_jax.train.step`
(the update step, Algorithm 1 phase 2), :mod:`~jackpot_jax.train.loop` (the RL loop).
"""
