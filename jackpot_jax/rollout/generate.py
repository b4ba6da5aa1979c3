"""``generate``: batch rollouts with continuous batching, returning tokens and p_inf log-probs.

Every request (prompt i, sample j) gets its own key, ``fold_in(fold_in(key(seed), first_prompt + i), j)``
(or ``fold_in(key(seed[i]), j)`` with one seed per prompt), and the decode core draws its t-th token
with ``fold_in(key, t)``: results do not depend on slot assignment, batch size or order. A slot
whose request finishes is refilled from the queue before the next decode call; each call
advances every slot by up to ``steps_per_call`` tokens (:meth:`DecodeCore.generate_steps`), so a
finished slot may idle for the rest of a call, and the tokens it drew past its end are dropped.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.rollout.decode import MIN_BUCKET, DecodeCore
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


@dataclasses.dataclass
class _Request:
    index: int
    prompt_index: int
    prompt: list[int]
    key: jax.Array
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    topk_ids: list = dataclasses.field(default_factory=list)
    topk_logprobs: list = dataclasses.field(default_factory=list)
    finish: str | None = None


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
    engine (a :class:`DecodeCore`, e.g. a :class:`~jackpot_jax.rollout.engine.JackpotEngine`;
    then ``logprobs_top_k`` is the engine's). ``params`` default to the engine's / model's.

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
    is_core = isinstance(model_or_engine, DecodeCore)
    _check_prompts(prompts, (model_or_engine.model_config if is_core else model_or_engine.config).vocab_size)
    prompts = [list(map(int, p)) for p in prompts]
    if is_core:
        core = model_or_engine
    else:
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
    params = core.params if params is None else params
    sampling = SamplingParams.fill(1, temperature, top_p, top_k)
    keys = request_keys(seed, len(prompts), n, first_prompt)
    requests = [_Request(i * n + j, i, prompt, keys[i][j]) for i, prompt in enumerate(prompts) for j in range(n)]
    stops = [list(s) for s in stop_sequences if len(s)]
    eos = set(int(t) for t in eos_token_ids)

    def record(request, token, logprob, top_ids, top_logprobs):
        request.tokens.append(int(token))
        request.logprobs.append(float(logprob))
        request.topk_ids.append(top_ids)
        request.topk_logprobs.append(top_logprobs)
        if token in eos:
            request.finish = "eos"
        elif any(request.tokens[-len(s):] == s for s in stops):
            request.finish = "stop"
        elif len(request.tokens) >= max_new_tokens:
            request.finish = "length"
        return request.finish is not None

    bar = _progress(len(requests)) if progress else None
    queue = collections.deque(requests)
    free = list(range(core.slots))
    active: dict[int, _Request] = {}
    state = core.init_decode_state()
    while queue or active:
        while free and queue:
            request = queue.popleft()
            prefix = core.prefill(params, request.prompt, len(request.prompt), sampling=sampling, key=request.key)
            first = jax.device_get(prefix.first)
            if record(request, first.tokens[0], first.logprobs[0], first.topk_ids[0], first.topk_logprobs[0]):
                bar and bar.update()
                continue
            slot = free.pop()
            state = core.insert(prefix, state, slot)
            active[slot] = request
        if not active:
            continue
        needed = max(max_new_tokens - len(request.tokens) for request in active.values())
        steps = 1 << (min(int(steps_per_call), needed).bit_length() - 1)
        state, drawn = DecodeCore.generate_steps(core, params, state, steps)  # an engine's own generate is JetStream's
        drawn = jax.device_get(drawn)
        for slot, request in list(active.items()):
            for t in range(steps):
                if record(request, drawn.tokens[t, slot], drawn.logprobs[t, slot], drawn.topk_ids[t, slot],
                          drawn.topk_logprobs[t, slot]):
                    del active[slot]
                    free.append(slot)
                    bar and bar.update()
                    break
    bar and bar.close()

    k = core.logprobs_top_k
    return Rollout(
        prompt_index=[r.prompt_index for r in requests], prompts=[r.prompt for r in requests],
        completions=[r.tokens for r in requests],
        logprobs=[np.asarray(r.logprobs, np.float32) for r in requests],
        topk_ids=[np.asarray(r.topk_ids, np.int32).reshape(len(r.tokens), k) for r in requests],
        topk_logprobs=[np.asarray(r.topk_logprobs, np.float32).reshape(len(r.tokens), k) for r in requests],
        finish_reasons=[r.finish for r in requests])


def _progress(total):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="rollout", unit="sample")
