"""Data, rewards and evaluation for RL on math problems.

:mod:`jackpot_jax.data.rewards` grades completions (``math_reward``, ``format_reward`` and a registry
of reward functions) and :mod:`jackpot_jax.data.metrics` computes Mean@k / Pass@k. Importing this
package stays cheap: nothing here imports TensorFlow / TFDS or math-verify at import time; the
modules that need them import them lazily.
"""
