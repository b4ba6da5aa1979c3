"""From rollouts to the arrays an update step reads (Algorithm 1, phase 1 -> phase 2).

Each sequence is its prompt followed by its completion, right-padded to a fixed length ``L`` (one
compiled shape for the whole run). The model reads ``inputs = tokens[:, :-1]`` and predicts
``targets = tokens[:, 1:]``; per-token arrays are ``[B, L - 1]``, aligned with the targets. Only
completion tokens count (``valid``): they carry log p_inf from the rollout, the probability of the
token under the distribution it was actually sampled from, and, when the rollout stored them, p_inf's
top-K ids and log-probs at that step (Algorithm 1, phase 1: for Z_approx over V_k, section 4.4).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np


class TrainBatch(NamedTuple):
    """One rollout batch on the host or the devices; ``B`` sequences, ``T = L - 1`` positions."""

    inputs: np.ndarray  # [B, T] int32: tokens[:, :-1]
    targets: np.ndarray  # [B, T] int32: tokens[:, 1:], the token sampled (or given) at each position
    input_mask: np.ndarray  # [B, T] int32: 1 on real input tokens, 0 on padding (HF's attention_mask)
    valid: np.ndarray  # [B, T] bool: the target is a generated token (it enters the losses)
    logp_inf: np.ndarray  # [B, T] float32: log p_inf(target) from the rollout, 0 where not valid
    advantages: np.ndarray  # [B] float32: GRPO advantage of each sequence
    # p_inf's top-K at each target's step, most likely first (0 / -inf where not valid), or None
    topk_ids: np.ndarray | None = None  # [B, T, K] int32
    topk_logp_inf: np.ndarray | None = None  # [B, T, K] float32

    @property
    def num_sequences(self) -> int:
        return self.inputs.shape[0]


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               logprobs: Sequence[np.ndarray], advantages, length: int, pad_id: int = 0, *,
               topk_ids: Sequence[np.ndarray] | None = None,
               topk_logprobs: Sequence[np.ndarray] | None = None) -> TrainBatch:
    """A :class:`TrainBatch` of ``prompt + completion`` sequences padded to ``length`` tokens.

    ``logprobs[i][j]`` is log p_inf of ``completions[i][j]``; ``topk_ids[i]`` / ``topk_logprobs[i]``
    ``[len, K]`` (a :class:`~jackpot_jax.rollout.Rollout`'s) p_inf's top-K at each of its steps,
    aligned like ``logprobs`` (none when omitted or K = 0). Raises ``ValueError`` naming the
    sequence when one is longer than ``length`` or when a completion and its log-probs differ in
    length; a sequence needs a prompt of at least one token (the first target is predicted from it).
    """
    if not len(prompts) == len(completions) == len(logprobs) == len(advantages):
        raise ValueError(f"prompts, completions, logprobs and advantages differ in length: {len(prompts)}, "
                         f"{len(completions)}, {len(logprobs)}, {len(advantages)}.")
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    real = np.zeros((batch, length), bool)
    valid = np.zeros((batch, length - 1), bool)
    logp_inf = np.zeros((batch, length - 1), np.float32)
    top = _topk_arrays(topk_ids, topk_logprobs, completions, length)
    for i, (prompt, completion, logp) in enumerate(zip(prompts, completions, logprobs)):
        if not len(prompt):
            raise ValueError(f"sequence {i} has an empty prompt: the first generated token needs a context.")
        if len(logp) != len(completion):
            raise ValueError(f"sequence {i}: {len(completion)} completion tokens but {len(logp)} log-probs.")
        total = len(prompt) + len(completion)
        if total > length:
            raise ValueError(f"sequence {i} has {total} tokens ({len(prompt)} prompt + {len(completion)} "
                             f"completion), more than the batch length {length}.")
        tokens[i, :total] = list(prompt) + list(completion)
        real[i, :total] = True
        # target position t predicts tokens[t + 1]; completion tokens sit at len(prompt)..total - 1
        valid[i, len(prompt) - 1:total - 1] = True
        logp_inf[i, len(prompt) - 1:total - 1] = logp
        if top:
            top[0][i, len(prompt) - 1:total - 1] = topk_ids[i]
            top[1][i, len(prompt) - 1:total - 1] = topk_logprobs[i]
    return TrainBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], input_mask=real[:, :-1].astype(np.int32),
                      valid=valid, logp_inf=logp_inf, advantages=np.asarray(advantages, np.float32),
                      topk_ids=top[0] if top else None, topk_logp_inf=top[1] if top else None)


def _topk_arrays(topk_ids, topk_logprobs, completions, length):
    """Empty ``(ids [B, T, K] zeros, logp [B, T, K] -inf)`` for the top-K lists, or () without."""
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("give both topk_ids and topk_logprobs, or neither.")
    if topk_ids is None:
        return ()
    if not len(topk_ids) == len(topk_logprobs) == len(completions):
        raise ValueError(f"topk_ids, topk_logprobs and completions differ in length: {len(topk_ids)}, "
                         f"{len(topk_logprobs)}, {len(completions)}.")
    k = np.shape(topk_ids[0])[-1] if np.ndim(topk_ids[0]) == 2 else -1
    for i, (ids, logp, completion) in enumerate(zip(topk_ids, topk_logprobs, completions)):
        if not np.shape(ids) == np.shape(logp) == (len(completion), k):
            raise ValueError(f"sequence {i}: {len(completion)} completion tokens and top-k arrays of shapes "
                             f"{np.shape(ids)} and {np.shape(logp)}: both must be [{len(completion)}, K] with one K "
                             f"for all (K={k} from sequence 0).")
    if k == 0:
        return ()
    shape = (len(completions), length - 1, k)
    return np.zeros(shape, np.int32), np.full(shape, -np.inf, np.float32)


@jax.jit
def _take(arrays, rows):
    return [x[rows] for x in arrays]


def select(batch: TrainBatch, rows) -> TrainBatch:
    """The sequences ``rows`` of a batch: host arrays indexed on the host, device arrays in one
    compiled gather (indexing each eagerly dispatched a few small programs an array)."""
    rows = np.asarray(rows)
    leaves, treedef = jax.tree.flatten(batch)
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    taken = dict(zip(on_device, _take([leaves[i] for i in on_device], rows))) if on_device else {}
    return jax.tree.unflatten(treedef, [taken[i] if i in taken else x[rows] for i, x in enumerate(leaves)])


def split_micro(batch, num_micro: int):
    """Reshape every array's leading axis ``[B, ...]`` into ``[num_micro, B // num_micro, ...]``."""
    return jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]), batch)
