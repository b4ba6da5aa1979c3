"""Vocabulary-streaming kernels for the OBRS statistics (log-probs, top-k, Z, distillation KL).

Not implemented yet: this package is reserved by the project layout and is built in the issue
"Pallas kernels: OBRS statistics over the vocabulary without materializing logits". Until then the
materialized definitions in :mod:`jackpot_jax.obrs` and :mod:`jackpot_jax.losses` are the only path.
"""
