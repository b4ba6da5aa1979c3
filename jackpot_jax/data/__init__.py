"""Data, rewards and evaluation for RL on math problems.

* :mod:`~jackpot_jax.data.datasets`: ``load_split(name, split)`` over TFDS builders
  (:mod:`~jackpot_jax.data.builders`): the generated ``jackpot_arithmetic``
  (:mod:`~jackpot_jax.data.arithmetic`), and ``gsm8k``, ``math``, ``deepscaler`` from local files
  (:mod:`~jackpot_jax.data.manual_files`: which files, and reading them).
* :mod:`~jackpot_jax.data.prompts` and :mod:`~jackpot_jax.data.batching`: prompt templates and the
  ``PromptBatcher`` (n samples per prompt, per-process shards, resumable).
* :mod:`~jackpot_jax.data.rewards` grades completions (``math_reward``, ``format_reward``, a
  registry); :mod:`~jackpot_jax.data.metrics` computes Mean@k / Pass@k;
  :mod:`~jackpot_jax.data.evaluate` is ``jackpot-eval``.

Importing this package stays cheap: nothing imports TensorFlow / TFDS or math-verify at import
time; the modules that need them import them lazily.
"""
