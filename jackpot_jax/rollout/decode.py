"""The decoding core: fixed decode slots over a KV cache, jitted prefill / insert / generate steps.

``DecodeCore`` is what :class:`jackpot_jax.rollout.engine.JackpotEngine` (the JetStream ``Engine``)
and :func:`jackpot_jax.rollout.generate` drive; it imports nothing from JetStream, so rollouts run
where JetStream is not installed. Any model of the registry works (the ``CausalLM`` protocol).

* ``prefill(params, tokens, true_length)`` runs a prompt padded to a bucket length (powers of two
  from 16 up to ``max_prefill_length``, so at most log2 compiled shapes) and samples the first
  token: a :class:`Prefix`.
* ``insert(prefix, state, slot)`` writes the prefix's cache into a decode slot.
* ``generate(params, state)`` advances every slot by one token; ``generate_steps(params, state,
  steps)`` by ``steps`` tokens in one jitted call (a scan over the same step), returning what each
  step sampled: one dispatch and one host transfer per ``steps`` tokens instead of per token.

Randomness: each request has a key; its ``t``-th generated token is drawn with
``fold_in(key, t)``, whatever slot or batch it runs in, so continuous batching gives the same
samples as one-by-one generation.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.rollout.sampling import Sampled, SamplingParams, sample

MIN_BUCKET = 16


class Prefix(NamedTuple):
    """A prefilled request: its cache ``[1, bucket, ...]``, prompt length, first sampled token."""

    cache: Any
    length: jax.Array  # int32 scalar: prompt tokens in the cache
    first: Sampled  # the first generated token, [1] each
    sampling: SamplingParams  # [1] each
    key: jax.Array  # the request's key


class DecodeState(NamedTuple):
    """Everything a generate step transforms, per slot ``[slots, ...]``."""

    cache: Any
    tokens: jax.Array  # the token each slot feeds next (the last one sampled)
    steps: jax.Array  # tokens generated so far (the fold-in index of the next draw)
    keys: jax.Array  # each slot's request key
    sampling: SamplingParams
    last: Sampled  # what the last step sampled, with log-probs


def buckets(max_prefill_length: int) -> tuple[int, ...]:
    """Prefill lengths: powers of two from 16, and ``max_prefill_length`` itself."""
    sizes, size = [], MIN_BUCKET
    while size < max_prefill_length:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_prefill_length,)


def bucket_for(length: int, max_prefill_length: int) -> int:
    """The smallest prefill bucket that holds ``length`` tokens."""
    for size in buckets(max_prefill_length):
        if length <= size:
            return size
    raise ValueError(f"a prompt of {length} tokens is longer than max_prefill_length={max_prefill_length}.")


class DecodeCore:
    """Jitted prefill / insert / generate for ``model`` (its graph; parameters are passed in)."""

    def __init__(self, model, *, max_concurrent_decodes: int, max_prefill_length: int, max_target_length: int,
                 logprobs_top_k: int = 0, default_sampling: SamplingParams | None = None):
        if max_prefill_length > max_target_length:
            raise ValueError(f"max_prefill_length={max_prefill_length} is not allowed: it must be <= "
                             f"max_target_length={max_target_length} (the cache length).")
        vocab = model.config.vocab_size
        if not 0 <= logprobs_top_k <= vocab:
            raise ValueError(f"logprobs_top_k={logprobs_top_k} is not allowed: it must be in [0, {vocab}].")
        self.graphdef, self._param_state, self._rest = nnx.split(model, nnx.Param, ...)
        self.model_config = model.config
        self.slots = max_concurrent_decodes
        self.prefill_buckets = buckets(max_prefill_length)
        self.max_target_length = max_target_length
        self.logprobs_top_k = logprobs_top_k
        self.default_sampling = default_sampling or SamplingParams.fill(1)
        self._prefill = jax.jit(self._prefill_impl)
        self._insert = jax.jit(self._insert_impl, donate_argnums=(1,))
        self._generate = jax.jit(self._generate_impl, donate_argnums=(1,))
        self._generate_steps = jax.jit(self._generate_steps_impl, donate_argnums=(1,), static_argnums=(2,))

    @property
    def params(self):
        return self._param_state

    def _model(self, params):
        return nnx.merge(self.graphdef, params, self._rest)

    def _logits(self, model, h):
        return jnp.dot(h, model.unembedding().astype(h.dtype), preferred_element_type=jnp.float32)

    # ---------------------------------------------------------------- prefill

    def bucket(self, length: int) -> int:
        return bucket_for(length, self.prefill_buckets[-1])

    def prefill(self, params, tokens, true_length: int, *, sampling: SamplingParams | None = None,
                key=None) -> Prefix:
        """Run a prompt (``tokens [bucket]`` padded, or a list of ids) and sample its first token."""
        if true_length < 1:
            raise ValueError("a prompt must have at least one token.")
        tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32)
        size = self.bucket(max(true_length, tokens.shape[0]))
        pad = np if isinstance(tokens, np.ndarray) else jnp  # a host prompt padded on the host: no dispatch
        tokens = pad.pad(tokens.astype(np.int32), (0, size - tokens.shape[0]))
        key = jax.random.key(0) if key is None else key
        return self._prefill(params, tokens, np.int32(true_length), sampling or self.default_sampling, key)

    def _prefill_impl(self, params, tokens, true_length, sampling, key):
        model = self._model(params)
        size = tokens.shape[0]
        mask = (jnp.arange(size) < true_length)[None]
        cache = model.init_cache(1, size)
        h, cache = model.hidden_states(tokens[None], attention_mask=mask, cache=cache)
        logits = self._logits(model, h[:, true_length - 1])
        first = sample(jax.random.fold_in(key, 0)[None], logits, sampling, self.logprobs_top_k)
        return Prefix(cache, true_length, first, sampling, key)

    # ---------------------------------------------------------------- decode state

    def init_decode_state(self) -> DecodeState:
        b = self.slots
        empty = Sampled(jnp.zeros((b,), jnp.int32), jnp.zeros((b,)), jnp.zeros((b, self.logprobs_top_k), jnp.int32),
                        jnp.zeros((b, self.logprobs_top_k)))
        model = self._model(self.params)
        return DecodeState(model.init_cache(b, self.max_target_length), jnp.zeros((b,), jnp.int32),
                           jnp.zeros((b,), jnp.int32), jax.random.split(jax.random.key(0), b),
                           SamplingParams.fill(b), empty)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        """``prefix`` into decode slot ``slot`` (the state is donated: use the returned one)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot={slot} is not allowed: it must be in [0, {self.slots}).")
        return self._insert(prefix, state, np.int32(slot))

    def _insert_impl(self, prefix, state, slot):
        def put(full, part):  # part [1, ...] (its other axes may be shorter, e.g. a bucket's length)
            index = (slot,) + (0,) * (full.ndim - 1)
            return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), index)

        def put_row(full, row):  # row: [1, ...] of one request
            return full.at[slot].set(row[0])

        return DecodeState(
            cache=jax.tree.map(put, state.cache, prefix.cache),  # any cache pytree, batch first
            tokens=state.tokens.at[slot].set(prefix.first.tokens[0]),
            steps=state.steps.at[slot].set(1),
            keys=state.keys.at[slot].set(prefix.key),
            sampling=jax.tree.map(put_row, state.sampling, prefix.sampling),
            last=jax.tree.map(put_row, state.last, prefix.first),
        )

    # ---------------------------------------------------------------- generate

    def generate(self, params, state: DecodeState) -> DecodeState:
        """One token for every slot (the state is donated: use the returned one)."""
        return self._generate(params, state)

    def _generate_impl(self, params, state):
        model = self._model(params)
        h, cache = model.hidden_states(state.tokens[:, None], cache=state.cache)
        logits = self._logits(model, h[:, 0])
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
        drawn = sample(keys, logits, state.sampling, self.logprobs_top_k)
        return state._replace(cache=cache, tokens=drawn.tokens, steps=state.steps + 1, last=drawn)

    def generate_steps(self, params, state: DecodeState, steps: int) -> tuple[DecodeState, Sampled]:
        """``steps`` tokens for every slot in one call: the new state (the old one is donated) and
        what each step sampled, ``[steps, slots, ...]`` (``last`` of each step's state). The
        draws are those of ``steps`` calls of :meth:`generate`. A slot keeps decoding past its
        request's end within the call (cache writes past ``max_target_length`` are dropped); the
        caller discards those tokens."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} is not allowed: it must be an integer >= 1.")
        return self._generate_steps(params, state, steps)

    def _generate_steps_impl(self, params, state, steps):
        def step(state, _):
            state = self._generate_impl(params, state)
            return state, state.last

        return jax.lax.scan(step, state, None, length=steps)

    def update_params(self, params):
        """New parameters (e.g. the actor after an update), moved device to device into this
        core's shardings when they differ; no host round trip."""
        shardings = jax.tree.map(lambda x: x.sharding, self._param_state)
        self._param_state = jax.device_put(params, shardings)
        return self._param_state
