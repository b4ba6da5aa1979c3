"""Runnable studies: each module is a command (`python -m jackpot_jax.experiments.NAME --out DIR`)."""
