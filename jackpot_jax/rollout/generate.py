"""``generate``: batch rollouts with continuous batching, returning tokens and p_inf log-probs.

Every request (prompt i, sample j) gets its own key, ``fold_in(fold_in(key(seed), first_prompt + i), j)``
(or ``fold_in(key(seed[i]), j)`` with one seed per prompt), and the decode core draws its t-th token
with ``fold_in(key, t)``: results do not depend on slot assignment, batch size or order. The
driver keeps one decode call in flight: while a call advances every slot by up to ``steps_per_call``
tokens (:meth:`DecodeCore.generate_steps`, which stops each request on the device), the host reads
the previous call's tokens and admits queued requests into the slots it freed (one batched, shared
prefill per length bucket, :meth:`DecodeCore.admit`). A finished slot idles until then.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.rollout.decode import FINISH_REASONS, MIN_BUCKET, DecodeCore, Stops, core_of
from jackpot_jax.rollout.sampling import SamplingParams, check_sampling


@dataclasses.dataclass
class Rollout:
    """Samples in request order (prompt 0's n samples, then prompt 1's, ...). Per sample:
    ``completions`` (generated ids), ``logprobs [len]`` = log p_inf of each generated token (the
    distribution after temperature / top-k / top-p, see :mod:`jackpot_jax.rollout.sampling`),
    ``topk_ids`` / ``topk_logprobs [len, K]`` of p_inf at each step, and the finish reason:
    ``"eos"``, ``"stop"`` (a stop sequence, included in the completion) or ``"length"``."""

    prompt_index: list[int]
    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray]
    topk_logprobs: list[np.ndarray]
    finish_reasons: list[str]
    preempted: int = 0  # requests restarted because the KV pool ran out (their samples are unchanged)
    mean_concurrent: float = 0.0  # requests holding a slot per decode step, on average over the steps
    peak_concurrent: int = 0  # and at most


def _check_prompts(prompts, vocab_size):
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids).")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token.")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i} must hold integer token ids in [0, {vocab_size}).")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _key_grid(base, num_prompts: int, n: int, first_prompt):
    """``[num_prompts, n]`` keys: sample j of prompt i folds ``first_prompt + i``, then j, into ``base``."""
    fold = lambda i, j: jax.random.fold_in(jax.random.fold_in(base, first_prompt + i), j)  # noqa: E731
    return jax.vmap(lambda i: jax.vmap(lambda j: fold(i, j))(jnp.arange(n)))(jnp.arange(num_prompts))


def request_keys(seed, num_prompts: int, n: int, first_prompt: int = 0) -> list[list[jax.Array]]:
    """The PRNG key of each request of :func:`generate`, ``[prompt][sample]``.

    With an int ``seed``, sample j of prompt i folds ``first_prompt + i``, then j, into
    ``key(seed)``: a prompt draws the same samples whichever slice of a batch it is generated in
    (``first_prompt`` is the slice's place in the batch). With one seed per prompt, sample j of
    prompt i folds j into ``key(seed[i])``. The samples recorded in ``docs/`` depend on these keys.
    An int seed's keys are derived in one compiled call (the same keys as folding them one by one,
    which dispatched two small programs a request)."""
    if isinstance(seed, (int, np.integer)):
        return [list(row) for row in _key_grid(jax.random.key(seed), num_prompts, n, first_prompt)]
    if len(seed) != num_prompts:
        raise ValueError(f"seed has {len(seed)} entries for {num_prompts} prompts: give one int, or one per prompt.")
    return [[jax.random.fold_in(jax.random.key(s), j) for j in range(n)] for s in seed]


def generate(model_or_engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, logprobs_top_k: int = 0, n: int = 1, seed=0, *,
             first_prompt: int = 0, eos_token_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (),
             params=None,
             max_concurrent_decodes: int = 32, steps_per_call: int = 8, progress: bool = False) -> Rollout:
    """Sample ``n`` completions of each prompt (token-id lists) with a model of the registry or an
    engine (a :class:`DecodeCore`, or a :class:`~jackpot_jax.rollout.engine.JackpotEngine` over
    one; then ``logprobs_top_k`` is the engine's). ``params`` default to the engine's / model's.

    Up to ``steps_per_call`` decode steps run per jitted call and host transfer: the largest power
    of two no larger than it or than what the longest remaining request needs (few compiled
    shapes). The samples do not depend on it.

    ``first_prompt``: the place of ``prompts[0]`` in a larger batch that several processes generate in
    slices (with an int ``seed``): each prompt then draws the samples it would draw in the whole batch.
    """
    check_sampling(temperature, top_p, top_k)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed: it must be >= 1.")
    if n < 1:
        raise ValueError(f"n={n} is not allowed: it must be >= 1.")
    if not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call!r} is not allowed: it must be an integer >= 1.")
    core = None if isinstance(model_or_engine, nnx.Module) else core_of(model_or_engine)
    _check_prompts(prompts, (model_or_engine.config if core is None else core.model_config).vocab_size)
    prompts = [list(map(int, p)) for p in prompts]
    if core is None:
        longest = max(MIN_BUCKET, max(len(p) for p in prompts))
        prefill = 1 << (longest - 1).bit_length()
        core = DecodeCore(model_or_engine, max_concurrent_decodes=min(max_concurrent_decodes, len(prompts) * n),
                          max_prefill_length=prefill, max_target_length=prefill + max_new_tokens,
                          logprobs_top_k=logprobs_top_k)
    for i, prompt in enumerate(prompts):
        core.bucket(len(prompt))  # raises if longer than the longest prefill
        if len(prompt) + max_new_tokens - 1 > core.max_target_length:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it needs "
                             f"{len(prompt) + max_new_tokens - 1} cache positions, more than the engine's "
                             f"max_target_length={core.max_target_length}.")
        pages = -(-(len(prompt) + max_new_tokens - 1) // core.page_size) if core.paged else 0
        if core.paged and pages > core.pages_per_device - 1:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it needs "
                             f"{pages} pages of {core.page_size} positions, more than the engine's pool of "
                             f"{core.pages_per_device - 1} per device (num_pages={core.num_pages} over "
                             f"{core.parts} devices, one scratch page each).")
    params = core.params if params is None else params
    if isinstance(seed, (int, np.integer)):  # the keys of request_keys, in one transfer
        grid = _key_grid(jax.random.key(seed), len(prompts), n, first_prompt)
    else:
        grid = jnp.stack([jnp.stack(row) for row in request_keys(seed, len(prompts), n)])
    key_data = np.asarray(jax.device_get(jax.random.key_data(grid))).reshape(len(prompts) * n, -1)
    stops = Stops.make(eos_token_ids, stop_sequences)
    driver = _Driver(core, params, [p for p in prompts for _ in range(n)], key_data,
                     SamplingParams(*(np.full((len(prompts) * n,), v, dtype) for v, dtype in
                                      ((temperature, np.float32), (top_p, np.float32), (top_k, np.int32)))),
                     max_new_tokens, stops, int(steps_per_call), _progress(len(prompts) * n) if progress else None)
    return driver.run([i for i in range(len(prompts)) for _ in range(n)])


class _Driver:
    """Continuous batching over a core's slots with one decode call always in flight: the host reads
    a call's results (and admits requests into the slots it freed) while the next call runs. With a
    paged cache a request is admitted when the pool holds its prompt and one call's tokens; when
    the pool runs out, the latest admitted request is preempted (its pages freed, requeued): it
    later starts over and, its draws being keyed, gives the same tokens."""

    def __init__(self, core, params, prompts, key_data, sampling, max_new_tokens, stops, steps_per_call, bar):
        self.core, self.params, self.prompts, self.key_data = core, params, prompts, key_data
        self.sampling, self.max_new_tokens, self.stops = sampling, max_new_tokens, stops
        self.steps_per_call, self.bar = steps_per_call, bar
        self.chunks: list[list] = [[] for _ in prompts]  # per request: Sampled pieces on the host
        self.finish: list[str | None] = [None] * len(prompts)
        self.dispatched = np.zeros(len(prompts), np.int64)  # tokens each request may have drawn so far
        self.epoch = np.zeros(len(prompts), np.int64)  # bumped when a request is preempted
        self.owner: dict[int, int] = {}  # slot -> request, in admission order
        self.free = list(range(core.slots))[::-1]
        self.queue = collections.deque(range(len(prompts)))
        self.preempted = 0
        self.slot_steps, self.steps, self.peak = 0, 0, 0  # requests in slots x decode steps; steps; the most

    def run(self, prompt_index) -> Rollout:
        pending = collections.deque()
        state = self.core.init_decode_state(self.stops.width)
        while self.queue or self.owner or pending:
            state = self._admit(state, pending)
            needed = max((self.max_new_tokens - self.dispatched[r] for r in self.owner.values()), default=0)
            if needed > 0:
                steps = 1 << (min(self.steps_per_call, int(needed)).bit_length() - 1)
                self._reserve(steps)
                self.slot_steps, self.steps = self.slot_steps + steps * len(self.owner), self.steps + steps
                self.peak = max(self.peak, len(self.owner))
                state, drawn = self.core.generate_steps(self.params, state, steps, self.stops)
                pending.append(("steps", {s: (r, self.epoch[r]) for s, r in self.owner.items()}, drawn, None))
                self.dispatched[list(self.owner.values())] += steps
            while pending and (len(pending) > 1 or needed <= 0):  # one call left in flight
                self._read(*pending.popleft())
        self.bar and self.bar.close()
        return self._rollout(prompt_index)

    def _positions(self, request, tokens):
        """Cache positions a request holds once it has drawn ``tokens`` (the last one is not written)."""
        return len(self.prompts[request]) + min(tokens, self.max_new_tokens) - 1

    def _admit(self, state, pending):
        pages, taken, slots = self.core.pages, [], []
        while self.queue and self.free:
            request = self.queue[0]
            slot = self.free[-1]
            if pages is not None:  # the slot whose device has the most free pages, if it holds the request
                slot = pages.roomiest(self.free, self._positions(request, 1 + self.steps_per_call) + 1)
                if slot is None:
                    break
                pages.reserve(slot, len(self.prompts[request]))
            self.free.remove(slot)
            slots.append(slot)
            taken.append(self.queue.popleft())
        if not taken:
            return state
        state, outputs = self.core.admit(
            self.params, state, [self.prompts[r] for r in taken], slots, self.key_data[taken],
            jax.tree.map(lambda x: x[taken], self.sampling), [self.max_new_tokens] * len(taken), self.stops)
        self.owner.update(zip(slots, taken))
        self.dispatched[taken] = 1
        pending.extend(("first", [(taken[i], slots[i], self.epoch[taken[i]]) if i >= 0 else None for i in rows],
                        first, finish) for rows, first, finish in outputs)
        return state

    def _reserve(self, steps):
        """Pages for the positions the next call writes; preempts the latest admitted requests when
        the pool runs out."""
        pages = self.core.pages
        if pages is None:
            return
        for slot, request in list(self.owner.items()):
            positions = self._positions(request, self.dispatched[request] + steps)
            while slot in self.owner and not pages.reserve(slot, positions):  # the latest on the same device
                self._preempt(next(s for s in reversed(self.owner) if pages.part_of(s) == pages.part_of(slot)))

    def _preempt(self, slot):
        request = self.owner.pop(slot)
        self.core.pages.release(slot)
        self.free.append(slot)
        self.chunks[request], self.dispatched[request] = [], 0
        self.epoch[request] += 1
        self.preempted += 1
        self.queue.appendleft(request)

    def _end(self, request, slot, code):
        self.finish[request] = FINISH_REASONS[int(code)]
        if self.owner.get(slot) == request:
            del self.owner[slot]
            self.free.append(slot)
            if self.core.pages is not None:
                self.core.pages.release(slot)
        self.bar and self.bar.update()

    def _live(self, request, epoch):
        return self.finish[request] is None and self.epoch[request] == epoch

    def _read(self, kind, owners, sampled, finish):
        if kind == "first":  # owners: (request, slot, epoch) of each row of the padded call, None: padding
            sampled, finish = jax.device_get((sampled, finish))
            for i, owner in enumerate(owners):
                if owner is None or not self._live(*owner[::2]):
                    continue
                request, slot, _ = owner
                self.chunks[request].append(jax.tree.map(lambda x: x[i:i + 1], sampled))
                if finish[i]:
                    self._end(request, slot, finish[i])
            return
        drawn = jax.device_get(sampled)  # owners: slot -> (request, epoch) when the call was dispatched
        counts = drawn.valid.sum(axis=0)
        for slot, (request, epoch) in owners.items():
            if not self._live(request, epoch) or not counts[slot]:
                continue
            self.chunks[request].append(jax.tree.map(lambda x: x[:counts[slot], slot], drawn.sampled))
            if drawn.finish[slot]:
                self._end(request, slot, drawn.finish[slot])

    def _rollout(self, prompt_index) -> Rollout:
        pieces = [jax.tree.map(lambda *x: np.concatenate(x), *chunks) for chunks in self.chunks]
        return Rollout(prompt_index=prompt_index, prompts=self.prompts,
                       completions=[p.tokens.tolist() for p in pieces],
                       logprobs=[p.logprobs.astype(np.float32) for p in pieces],
                       topk_ids=[p.topk_ids.astype(np.int32) for p in pieces],
                       topk_logprobs=[p.topk_logprobs.astype(np.float32) for p in pieces],
                       finish_reasons=self.finish, preempted=self.preempted,
                       mean_concurrent=self.slot_steps / max(1, self.steps), peak_concurrent=self.peak)


def _progress(total):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="rollout", unit="sample")
