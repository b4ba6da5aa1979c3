"""The decoding core: fixed decode slots over a KV cache; jitted admission (batched, shared prefill),
decode steps that stop on the device, and JetStream-style ``prefill`` / ``insert`` for one request.

* ``admit(params, state, prompts, slots, keys, ...)`` prefills the distinct prompts of many requests
  in one call per length bucket (powers of two from 16 up to ``max_prefill_length``), a prompt once
  for all the requests that share it, copies each prompt's cache into its requests' slots and
  samples their first tokens.
* ``generate_steps(params, state, steps, stops)`` advances every slot by ``steps`` tokens in one
  call (a scan), checking EOS, stop sequences and each request's length on the device: a finished
  slot stops producing tokens (``valid`` false) until it is refilled, so the host never has to read
  a call's results before it dispatches the next.
* ``prefill`` / ``insert`` / ``generate`` are the one-request steps JetStream's ``Engine`` API needs.

KV cache: a pool of ``num_pages`` pages of ``page_size`` positions (:class:`PagePool` hands them to
slots as their sequences grow; a step reads the pages its table spans) for models with
``init_paged_cache``; a contiguous ``[slots, max_target_length]`` cache for other models, or with
``page_size=None``.

Over several ``devices`` each device runs the same jitted calls on its own slots and part of the
KV pool (``shard_map``), with a whole copy of the model.

Randomness: each request has a key; its ``t``-th generated token is drawn with ``fold_in(key, t)``,
whatever slot, batch or call it runs in, so batching gives the samples of one-by-one generation.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jackpot_jax.rollout.pages import PagePool
from jackpot_jax.rollout.sampling import Sampled, SamplingParams, sample
from pallas_kernels import paged

MIN_BUCKET = 16
SLOTS = "slots"  # the mesh axis a core spreads its slots (and its KV pool) over
NO_TOKEN = -2  # what ``recent`` holds before a slot has generated anything: matches no stop sequence
NO_LIMIT = np.iinfo(np.int32).max
RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3  # finish codes
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


class Prefix(NamedTuple):
    """A prefilled request: its cache ``[1, bucket, ...]``, prompt length, first sampled token."""

    cache: Any
    length: jax.Array  # int32 scalar: prompt tokens in the cache
    first: Sampled  # the first generated token, [1] each
    sampling: SamplingParams  # [1] each
    key: jax.Array  # the request's key


class Stops(NamedTuple):
    """When a completion ends, checked on the device after every token: ``eos [E]`` token ids, and
    ``sequences [N, W]`` stop sequences right-aligned, their unused leading entries -1."""

    eos: jax.Array
    sequences: jax.Array

    @classmethod
    def make(cls, eos_token_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = ()) -> "Stops":
        sequences = [list(map(int, s)) for s in stop_sequences if len(s)]
        width = max([1] + [len(s) for s in sequences])
        table = np.full((len(sequences), width), -1, np.int32)
        for i, s in enumerate(sequences):
            table[i, width - len(s):] = s
        return cls(np.asarray(sorted(set(map(int, eos_token_ids))), np.int32).reshape(-1), table)

    @property
    def width(self) -> int:
        return self.sequences.shape[1]


class DecodeState(NamedTuple):
    """Everything a decode step transforms, per slot ``[slots, ...]``."""

    cache: Any
    tokens: jax.Array  # the token each slot feeds next (the last one sampled)
    steps: jax.Array  # tokens generated so far (the fold-in index of the next draw)
    keys: jax.Array  # each slot's request key
    sampling: SamplingParams
    last: Sampled  # what the last step sampled, with log-probs
    limit: jax.Array  # int32: the request's max_new_tokens
    finish: jax.Array  # int32 finish code (RUNNING, EOS, STOP, LENGTH); an empty slot is LENGTH
    recent: jax.Array  # int32 [slots, W]: the last W generated tokens, for stop sequences


class Drawn(NamedTuple):
    """What a ``generate_steps`` call produced: ``sampled [steps, slots, ...]``, ``valid [steps,
    slots]`` (the token belongs to the slot's request: it had not finished before it), and each
    slot's finish code after the call ``[slots]``."""

    sampled: Sampled
    valid: jax.Array
    finish: jax.Array


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


def pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def core_of(engine) -> "DecodeCore":
    """The decoding core of an engine: a :class:`DecodeCore` itself, or the one an engine that
    wraps a core (``JackpotEngine``) holds as ``core``; ``TypeError`` for anything else."""
    core = engine if isinstance(engine, DecodeCore) else getattr(engine, "core", None)
    if not isinstance(core, DecodeCore):
        raise TypeError(f"{type(engine).__name__} is not a decoding engine: give a DecodeCore or an engine "
                        "wrapping one (its .core).")
    return core


def _mine(per_device):
    """A device's part of arguments laid out ``[devices, ...]`` (under ``shard_map`` it sees ``[1, ...]``)."""
    return jax.tree.map(lambda x: x[0], per_device)


def finish_code(token, steps, limit, recent, stops: Stops):
    """The finish code after a slot generated ``token`` as its ``steps``-th token, ``recent [B, W]``
    ending with it: EOS, else a stop sequence, else the length limit, else RUNNING (``[B]``)."""
    is_eos = jnp.any(token[:, None] == stops.eos[None, :], axis=1)
    seqs = stops.sequences[None]
    is_stop = jnp.any(jnp.all((seqs < 0) | (recent[:, None, -stops.width:] == seqs), axis=2), axis=1)
    return jnp.where(is_eos, EOS, jnp.where(is_stop, STOP, jnp.where(steps >= limit, LENGTH, RUNNING)))


class DecodeCore:
    """Jitted admission / prefill / insert / decode for ``model`` (its graph; parameters are passed in).

    ``devices``: several devices (of this process) to spread the slots over, data-parallel: each
    decodes ``slots / len(devices)`` of them with a whole copy of the parameters and holds their
    part of the KV pool; None (or one device): everything where the parameters are (sharded or not).
    """

    def __init__(self, model, *, max_concurrent_decodes: int, max_prefill_length: int, max_target_length: int,
                 logprobs_top_k: int = 0, default_sampling: SamplingParams | None = None, page_size: int | None = 16,
                 num_pages: int | None = None, devices: Sequence[jax.Device] | None = None):
        if max_prefill_length > max_target_length:
            raise ValueError(f"max_prefill_length={max_prefill_length} is not allowed: it must be <= "
                             f"max_target_length={max_target_length} (the cache length).")
        vocab = model.config.vocab_size
        if not 0 <= logprobs_top_k <= vocab:
            raise ValueError(f"logprobs_top_k={logprobs_top_k} is not allowed: it must be in [0, {vocab}].")
        self.graphdef, self._param_state, self._rest = nnx.split(model, nnx.Param, ...)
        self.model_config = model.config
        self.slots = max_concurrent_decodes
        self.mesh = None if devices is None or len(devices) == 1 else Mesh(np.asarray(devices), (SLOTS,))
        self.parts = 1 if self.mesh is None else len(devices)
        self.slots_per_device = self.slots // self.parts
        if self.slots % self.parts:
            raise ValueError(f"max_concurrent_decodes={self.slots} is not allowed over {self.parts} devices: it must "
                             "be a multiple of the number of devices.")
        if self.mesh is not None:  # every device decodes its slots with all the weights
            self._param_state = jax.device_put(self._param_state, NamedSharding(self.mesh, P()))
        self.prefill_buckets = buckets(max_prefill_length)
        self.max_target_length = max_target_length
        self.logprobs_top_k = logprobs_top_k
        self.default_sampling = default_sampling or SamplingParams.fill(1)
        self.paged = page_size is not None and hasattr(model, "init_paged_cache")
        if self.paged:
            if not isinstance(page_size, int) or page_size < 1:
                raise ValueError(f"page_size={page_size!r} is not allowed: it must be an integer >= 1 (or None).")
            self.page_size, self.max_pages_per_slot = page_size, -(-max_target_length // page_size)
            # default: as much memory as a contiguous cache, plus a scratch page per device
            self.num_pages = self.slots * self.max_pages_per_slot + self.parts if num_pages is None else num_pages
            if self.num_pages % self.parts or self.num_pages < 2 * self.parts:
                raise ValueError(f"num_pages={num_pages} is not allowed over {self.parts} devices: it must be a "
                                 "multiple of the number of devices, at least 2 per device (one is scratch).")
            self.pages_per_device = self.num_pages // self.parts
        self.pages: PagePool | None = None
        self._lengths: dict[int, int] = {}  # slot -> cache positions, for the one-request steps
        self._prefill = jax.jit(self._prefill_impl)
        # over the devices: the state and the per-slot arguments split by slot, the rest replicated
        self._state_spec, self._init = self._state_specs(model) if self.mesh else None, {}
        state, by_slot, rep = self._state_spec, P(SLOTS), P()
        drawn = Drawn(P(None, SLOTS), P(None, SLOTS), by_slot)
        self._insert = self._over_slots(self._insert_impl, (rep, state, by_slot, by_slot), state, donate=(1,))
        self._admit = self._over_slots(self._admit_impl, (rep, state) + (by_slot,) * 8 + (rep,),
                                       (state, by_slot, by_slot), donate=(1,))
        self._generate_steps = self._over_slots(self._generate_steps_impl, (rep, state, rep, by_slot), (state, drawn),
                                                donate=(1,), static=(2,))
        self._generate_one = self._over_slots(self._generate_one_impl, (rep, state, by_slot), (state, by_slot),
                                              donate=(1,))

    @property
    def params(self):
        return self._param_state

    def _model(self, params):
        return nnx.merge(self.graphdef, params, self._rest)

    def _logits(self, model, h):
        return jnp.dot(h, model.unembedding().astype(h.dtype), preferred_element_type=jnp.float32)

    def bucket(self, length: int) -> int:
        return bucket_for(length, self.prefill_buckets[-1])

    # ---------------------------------------------------------------- devices

    def _state_specs(self, model):
        """How a :class:`DecodeState` splits over the devices: by slot, a paged cache's pools along
        their pages (each device holds its slots' part of the pool)."""
        by_slot = cache = P(SLOTS)
        if self.paged:
            shape = jax.eval_shape(lambda: model.init_paged_cache(2, self.page_size, 1))
            pools = (P(None, SLOTS),) * len(shape.k)
            cache = shape._replace(k=pools, v=pools, page_table=by_slot, lengths=by_slot)
        return DecodeState(cache, *(by_slot,) * (len(DecodeState._fields) - 1))

    def _over_slots(self, fn, in_specs, out_specs, donate=(), static=()):
        """``fn`` jitted; over several devices, each device runs it on its own slots and part of the
        KV pool (``shard_map``; ``in_specs`` for the arguments that are not ``static``)."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=donate, static_argnums=static)

        def spmd(*args):
            fixed = {i: args[i] for i in static}

            def local(*dynamic):
                rest = iter(dynamic)
                return fn(*(fixed[i] if i in fixed else next(rest) for i in range(len(args))))

            return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
                *(a for i, a in enumerate(args) if i not in fixed))

        return jax.jit(spmd, donate_argnums=donate, static_argnums=static)

    def slot_device(self, slot: int) -> int:
        """The device (index along the core's devices) that decodes ``slot``."""
        return slot // self.slots_per_device

    # ---------------------------------------------------------------- prefill

    def _prefill_rows(self, params, tokens, lengths):
        """The caches ``[P, ...]`` of prompts ``tokens [P, bucket]`` (right-padded) and the logits
        after each prompt's last token ``[P, V]``."""
        model = self._model(params)
        p, size = tokens.shape
        mask = jnp.arange(size)[None] < lengths[:, None]
        h, cache = model.hidden_states(tokens, attention_mask=mask, cache=model.init_cache(p, size))
        return cache, self._logits(model, h[jnp.arange(p), lengths - 1])

    def _draw_first(self, logits, keys, sampling):
        return sample(jax.vmap(jax.random.fold_in)(keys, jnp.zeros(keys.shape, jnp.int32)), logits, sampling,
                      self.logprobs_top_k)

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
        cache, logits = self._prefill_rows(params, tokens[None], true_length[None])
        return Prefix(cache, true_length, self._draw_first(logits, key[None], sampling), sampling, key)

    # ---------------------------------------------------------------- decode state

    def init_decode_state(self, stop_width: int = 1) -> DecodeState:
        """Every slot empty, every page free (one decode state per core at a time: the pages are
        the core's); ``stop_width``: the longest stop sequence the state's steps will check. Over
        several devices, each device's part is made in place."""
        self._lengths = {}
        if self.paged:
            self.pages = PagePool(self.num_pages, self.page_size, self.slots, self.max_pages_per_slot, self.parts)
        if self.mesh is None:
            return self._empty_state(stop_width)
        if stop_width not in self._init:
            shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self._state_spec,
                                     is_leaf=lambda x: isinstance(x, P))
            self._init[stop_width] = jax.jit(functools.partial(self._empty_state, stop_width), out_shardings=shardings)
        return self._init[stop_width]()

    def _empty_state(self, stop_width):
        b, k = self.slots, self.logprobs_top_k
        empty = Sampled(jnp.zeros((b,), jnp.int32), jnp.zeros((b,)), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k)))
        model = self._model(self.params)
        if self.paged:
            cache = model.init_paged_cache(self.num_pages, self.page_size, b)
        else:
            cache = model.init_cache(b, self.max_target_length)
        return DecodeState(cache, jnp.zeros((b,), jnp.int32),
                           jnp.zeros((b,), jnp.int32), jax.random.split(jax.random.key(0), b),
                           SamplingParams.fill(b), empty, jnp.zeros((b,), jnp.int32), jnp.full((b,), LENGTH, jnp.int32),
                           jnp.full((b, stop_width), NO_TOKEN, jnp.int32))

    def _write(self, state, cache, rows, slots, pages, first, keys, sampling, limit, stops):
        """Requests into ``slots [R]`` (an index >= slots is dropped): the cache rows ``rows [R]`` of
        ``cache`` (any cache pytree, batch first; its other axes may be shorter, e.g. a bucket's
        length; into the pages ``pages [R, W]`` of a paged cache), their first tokens, keys,
        sampling settings and length limits."""
        def put(full, part):
            index = (slots,) + tuple(slice(0, n) for n in part.shape[1:])
            return full.at[index].set(part[rows].astype(full.dtype), mode="drop")

        def put_rows(full, new):
            return full.at[slots].set(new.astype(full.dtype), mode="drop")

        recent = jnp.full((slots.shape[0], state.recent.shape[1]), NO_TOKEN, jnp.int32).at[:, -1].set(first.tokens)
        finish = finish_code(first.tokens, jnp.ones_like(limit), limit, recent, stops)
        if self.paged:
            into = state.cache
            new_cache = into._replace(k=tuple(paged.write_prefix(pool, part[rows], pages)
                                              for pool, part in zip(into.k, cache.k)),
                                      v=tuple(paged.write_prefix(pool, part[rows], pages)
                                              for pool, part in zip(into.v, cache.v)),
                                      lengths=put_rows(into.lengths, cache.lengths[rows]))
        else:
            new_cache = jax.tree.map(put, state.cache, cache)
        new = DecodeState(cache=new_cache, tokens=put_rows(state.tokens, first.tokens),
                          steps=put_rows(state.steps, jnp.ones_like(limit)), keys=put_rows(state.keys, keys),
                          sampling=jax.tree.map(put_rows, state.sampling, sampling),
                          last=jax.tree.map(put_rows, state.last, first), limit=put_rows(state.limit, limit),
                          finish=put_rows(state.finish, finish), recent=put_rows(state.recent, recent))
        return new, finish

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        """``prefix`` into decode slot ``slot``, with no length limit and no stops (JetStream's
        orchestrator applies them); the state is donated: use the returned one."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot={slot} is not allowed: it must be in [0, {self.slots}).")
        length = int(prefix.length)
        device, local = self.slot_device(slot), self.slots_per_device
        to = np.full((self.parts, 1), local, np.int32)  # per device: its own index of the slot, or a dropped one
        to[device] = slot % local
        pages = None
        if self.paged:
            self.pages.release(slot)
            self._reserve(slot, length)
            table = self.pages.table([slot], self.pages.pages_for(prefix.cache.max_len))
            pages = np.full((self.parts,) + table.shape, paged.SCRATCH_PAGE, np.int32)  # the others write nowhere
            pages[device] = table
        self._lengths[slot] = length
        return self._insert(prefix, state, to, pages)

    def _reserve(self, slot, positions):
        if not self.pages.reserve(slot, positions):
            raise RuntimeError(f"the KV cache's {self.num_pages} pages of {self.page_size} positions are all in use: "
                               "give the core more num_pages, or fewer slots.")

    def _insert_impl(self, prefix, state, to, pages):
        to, pages = _mine(to), _mine(pages)
        state, _ = self._write(state, prefix.cache, jnp.zeros((1,), jnp.int32), to, pages, prefix.first,
                               prefix.key[None], prefix.sampling, jnp.full((1,), NO_LIMIT, jnp.int32), Stops.make())
        return state

    # ---------------------------------------------------------------- admission

    def admit(self, params, state: DecodeState, prompts: Sequence[Sequence[int]], slots: Sequence[int], key_data,
              sampling: SamplingParams, limits: Sequence[int], stops: Stops) -> tuple[DecodeState, list]:
        """Requests into the decode state: ``prompts[r]`` into ``slots[r]``, drawn with the key of
        ``key_data[r]`` (``jax.random.key_data``, on the host), ``sampling`` (host arrays ``[R]``),
        at most ``limits[r]`` new tokens; with a paged cache, the slots already hold the pages of
        their prompts (:attr:`pages`). Requests with the same prompt (on the same device) share one
        prefill. One call per prefill bucket, each device's prompts and requests padded to a power of
        two (few compiled shapes). Returns the state (the old one is donated) and, per call, ``(the
        request of each row, -1 for padding; Sampled first tokens; finish codes)``, device arrays
        the host reads when it needs them."""
        groups: dict[int, list[int]] = {}
        for r, prompt in enumerate(prompts):
            groups.setdefault(self.bucket(len(prompt)), []).append(r)
        key_data, limits = np.asarray(key_data), np.asarray(limits, np.int32)
        sampling = jax.tree.map(np.asarray, sampling)
        outputs = []
        for size, members in sorted(groups.items()):
            mine = [[r for r in members if self.slot_device(slots[r]) == d] for d in range(self.parts)]
            distinct = [dict.fromkeys(tuple(prompts[r]) for r in rs) for rs in mine]
            row_of = [{prompt: i for i, prompt in enumerate(d)} for d in distinct]
            tokens = np.zeros((self.parts, pow2_at_least(max(map(len, distinct))), size), np.int32)
            lengths = np.ones(tokens.shape[:2], np.int32)
            width = pow2_at_least(max(map(len, mine)))
            order = np.full((self.parts, width), -1)  # the request of each row, -1: padding
            rows = np.zeros((self.parts, width), np.int32)
            for d, rs in enumerate(mine):
                for prompt, i in row_of[d].items():
                    tokens[d, i, :len(prompt)], lengths[d, i] = prompt, len(prompt)
                order[d, :len(rs)] = rs
                rows[d, :len(rs)] = [row_of[d][tuple(prompts[r])] for r in rs]
            local = self.slots_per_device
            slot_of = np.where(order >= 0, np.asarray(slots)[np.maximum(order, 0)], -1)
            to = np.where(order >= 0, slot_of % local, local).astype(np.int32)
            index = np.where(order >= 0, order, members[0])
            pages = (self.pages.table(slot_of.reshape(-1), self.pages.pages_for(size)).reshape(self.parts, width, -1)
                     if self.paged else None)
            state, first, finish = self._admit(params, state, tokens, lengths, rows, to, pages, key_data[index],
                                               jax.tree.map(lambda x: x[index], sampling), limits[index], stops)
            outputs.append((order.reshape(-1).tolist(), first, finish))
        return state, outputs

    def _admit_impl(self, params, state, tokens, lengths, rows, slots, pages, key_data, sampling, limit, stops):
        tokens, lengths, rows, slots, pages, key_data, sampling, limit = _mine(
            (tokens, lengths, rows, slots, pages, key_data, sampling, limit))
        keys = jax.random.wrap_key_data(key_data)
        cache, logits = self._prefill_rows(params, tokens, lengths)
        first = self._draw_first(logits[rows], keys, sampling)
        state, finish = self._write(state, cache, rows, slots, pages, first, keys, sampling, limit, stops)
        return state, first, finish

    # ---------------------------------------------------------------- decode

    def _step(self, params, state, stops):
        model = self._model(params)
        h, cache = model.hidden_states(state.tokens[:, None], cache=state.cache)
        logits = self._logits(model, h[:, 0])
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
        drawn = sample(keys, logits, state.sampling, self.logprobs_top_k)
        valid = state.finish == RUNNING
        steps = state.steps + 1
        recent = jnp.concatenate([state.recent[:, 1:], drawn.tokens[:, None]], axis=1)
        finish = jnp.where(valid, finish_code(drawn.tokens, steps, state.limit, recent, stops), state.finish)
        state = state._replace(cache=cache, tokens=drawn.tokens, steps=steps, last=drawn, finish=finish,
                               recent=jnp.where(valid[:, None], recent, state.recent))
        return state, valid

    def generate(self, params, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One token for every slot, no stops checked (the state is donated: use the returned one),
        and per slot the token the step consumed (the one sampled before it) and its 1-based index
        in the completion, ``int32 [slots, 2]``; the slots :meth:`insert` filled get the page they
        write next."""
        return self._generate_one(params, state, self.grow_inserted())

    def _generate_one_impl(self, params, state, page_table):
        state = self.with_page_table(state, page_table)
        consumed = jnp.stack([state.tokens, state.steps], axis=1)
        return self._step(params, state, Stops.make())[0], consumed

    def grow_inserted(self):
        """One more position for every slot :meth:`insert` filled; the page table of the next step
        (None for a contiguous cache)."""
        for slot in self._lengths:  # JetStream steps a finished slot until it refills it: its writes past
            self._lengths[slot] = min(self._lengths[slot] + 1, self.max_target_length)  # the cache are dropped
            if self.paged:
                self._reserve(slot, self._lengths[slot])
        return self.pages.table() if self.paged else None

    def with_page_table(self, state, page_table):
        """``state`` whose cache reads ``page_table`` (unchanged for None: a contiguous cache)."""
        if page_table is None:
            return state
        return state._replace(cache=state.cache._replace(page_table=page_table))

    def generate_steps(self, params, state: DecodeState, steps: int, stops: Stops | None = None
                       ) -> tuple[DecodeState, Drawn]:
        """``steps`` tokens for every slot in one call: the new state (the old one is donated) and
        :class:`Drawn`. The draws are those of ``steps`` calls of :meth:`generate`; a slot whose
        request finishes keeps computing (cache writes past ``max_target_length`` are dropped), its
        tokens marked invalid. With a paged cache, each slot must hold the pages of every position
        the call writes (:attr:`pages`); writes past them go to the scratch page."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} is not allowed: it must be an integer >= 1.")
        stops = Stops.make() if stops is None else stops
        if stops.width != state.recent.shape[1]:
            raise ValueError(f"stop sequences of up to {stops.width} tokens need a state made with "
                             f"init_decode_state(stop_width={stops.width}), not {state.recent.shape[1]}.")
        return self._generate_steps(params, state, steps, stops, self.pages.table() if self.paged else None)

    def _generate_steps_impl(self, params, state, steps, stops, page_table):
        state = self.with_page_table(state, page_table)

        def step(state, _):
            state, valid = self._step(params, state, stops)
            return state, (state.last, valid)

        state, (sampled, valid) = jax.lax.scan(step, state, None, length=steps)
        return state, Drawn(sampled, valid, state.finish)

    def update_params(self, params):
        """New parameters (e.g. the actor after an update), moved device to device into this
        core's shardings when they differ; no host round trip."""
        shardings = jax.tree.map(lambda x: x.sharding, self._param_state)
        self._param_state = jax.device_put(params, shardings)
        return self._param_state
