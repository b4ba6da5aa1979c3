"""Prompt batches for RL: prompts rendered (:mod:`jackpot_jax.data.prompts`) and tokenized, each
repeated ``n`` times for GRPO-style groups, each process serving its slice, with a resumable position.

Layout. Prompts longer than ``max_prompt_tokens`` are skipped first, identically on every process.
Batch ``b`` of epoch ``e`` is the ``prompts_per_batch`` records at positions ``b * prompts_per_batch``
onwards of the epoch's order (``numpy.random.default_rng([seed, e])``'s permutation of the ``N``
records left; their own order when ``shuffle=False``); ``N // prompts_per_batch`` batches per epoch,
the rest dropped for that epoch. Process ``p`` of ``P`` serves the ``p``-th of ``P`` equal,
contiguous slices of each batch (``prompts_per_batch`` must divide by ``P``). The global batches
therefore do not depend on the number of processes: the concatenation of the processes' slices, in
process order, is the batch one process would serve, so a run on ``P`` hosts sees the data a
one-host run sees, and a position saved by one resumes on the other. Each process renders and
tokenizes only the records of its slices (all of them once when ``max_prompt_tokens`` is set, to
skip the same ones everywhere).

Resuming. The order is deterministic, so the position ``(epoch, position)`` of
:meth:`PromptBatcher.state_dict` is all a checkpoint needs, and every process of a job holds the
same position (one saved copy restores them all).

Tokenization is :func:`~jackpot_jax.data.prompts.encode_prompts`'s (special tokens for plain prompts
only).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import numpy as np

from jackpot_jax.data.prompts import INSTRUCTION, TEMPLATES, build_prompt, encode_prompts

logger = logging.getLogger(__name__)

_ORDER_KEYS = ("seed", "shuffle", "prompts_per_batch", "num_records")


@dataclasses.dataclass
class PromptBatch:
    """This process's slice of one batch: its prompts, each repeated ``n`` times consecutively.

    Per row (``n`` per prompt): ``prompt_ids`` (token ids), ``group`` (the row's prompt index in the
    slice, ``0 0 0 1 1 1 ...`` for ``n=3``) and ``answers`` (the reference answer). Per prompt:
    ``records`` and ``prompts`` (the rendered text). ``epoch`` and ``index`` (the batch's index in the
    epoch) say where the batch comes from, ``first_prompt`` where the slice starts in it (0 with one
    process): the slice's prompt ``i`` is the batch's prompt ``first_prompt + i``.
    """

    prompt_ids: list[list[int]]
    group: list[int]
    answers: list[str]
    records: list[Mapping[str, str]]
    prompts: list[str]
    epoch: int
    index: int
    first_prompt: int = 0


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """The given process index / count, JAX's where not given."""
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415 (only when the caller leaves the process layout to JAX)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count} is not allowed: "
                         f"it needs process_count >= 1 and 0 <= process_index < process_count.")
    return process_index, process_count


class PromptBatcher:
    """This process's slices of the batches of ``records`` (dicts with ``problem`` and ``answer``),
    see the module docstring; ``prompts_per_batch`` counts the whole batch's prompts. ``template`` / ``instruction`` / ``system`` are
    :func:`~jackpot_jax.data.prompts.build_prompt`'s; prompts of more than ``max_prompt_tokens``
    tokens are skipped (counted in ``num_skipped``, with a warning); ``process_index`` /
    ``process_count`` default to JAX's."""

    def __init__(self, records: Sequence[Mapping[str, str]], tokenizer, *, prompts_per_batch: int, n: int = 1,
                 seed: int = 0, shuffle: bool = True, template: str = "plain", instruction: str = INSTRUCTION,
                 system: str | None = None, max_prompt_tokens: int | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        records = list(records)
        if not records:
            raise ValueError("records is empty: give at least one record (a dict with 'problem' and 'answer').")
        if n < 1:
            raise ValueError(f"n={n} is not allowed: it must be >= 1 (samples per prompt).")
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch={prompts_per_batch} is not allowed: it must be >= 1.")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is not allowed: it must be >= 1 (or None).")
        if seed < 0:
            raise ValueError(f"seed={seed} is not allowed: it must be >= 0.")
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r} is not one of {TEMPLATES}.")
        for i, record in enumerate(records):
            if "problem" not in record or "answer" not in record:
                raise KeyError(f"record {i} needs 'problem' and 'answer' fields (it has {sorted(record)}).")
        self.process_index, self.process_count = _processes(process_index, process_count)
        self.tokenizer, self.template, self.instruction, self.system = tokenizer, template, instruction, system
        self.prompts_per_batch, self.n, self.seed, self.shuffle = prompts_per_batch, n, seed, shuffle

        kept = self._fitting(records, max_prompt_tokens)
        self.num_skipped = len(records) - len(kept)
        if not kept:
            raise ValueError(f"all {len(records)} prompts are longer than max_prompt_tokens={max_prompt_tokens}.")
        if self.num_skipped:
            logger.warning("skipped %d of %d prompts longer than max_prompt_tokens=%d.", self.num_skipped,
                           len(records), max_prompt_tokens)
        self.num_records = len(kept)
        if prompts_per_batch > self.num_records:
            raise ValueError(f"prompts_per_batch={prompts_per_batch} is larger than the {self.num_records} records: "
                             f"use a smaller prompts_per_batch or more records.")
        if prompts_per_batch % self.process_count:
            raise ValueError(f"prompts_per_batch={prompts_per_batch} does not divide by the {self.process_count} "
                             f"processes: each serves an equal slice of every batch; use a multiple of "
                             f"{self.process_count}.")
        self.batches_per_epoch = self.num_records // prompts_per_batch
        self.prompts_per_process = prompts_per_batch // self.process_count
        self.records = [records[i] for i in kept]
        self._prompts: dict[int, tuple[str, list[int]]] = {}  # record index -> (text, ids), rendered on first use
        self.epoch, self.position = 0, 0

    def encode_record(self, record: Mapping[str, str]) -> list[int]:
        """The token ids of ``record``'s prompt, rendered and encoded as this batcher's prompts are
        (for any record, in the shard or not: the trainer's warm start uses it)."""
        return self._encode([self._render(record)])[0]

    def _render(self, record: Mapping[str, str]) -> str:
        return build_prompt(record, self.tokenizer, self.template, self.instruction, self.system)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, texts, self.template)

    def _fitting(self, records: list[Mapping[str, str]], max_prompt_tokens: int | None) -> list[int]:
        """Indices of the records whose prompt has at most ``max_prompt_tokens`` tokens (all if None)."""
        if max_prompt_tokens is None:
            return list(range(len(records)))
        ids = self._encode([self._render(record) for record in records])
        return [i for i, prompt in enumerate(ids) if len(prompt) <= max_prompt_tokens]

    def _prompt(self, i: int) -> tuple[str, list[int]]:
        """``(rendered text, token ids)`` of record ``i``."""
        if i not in self._prompts:
            text = self._render(self.records[i])
            self._prompts[i] = (text, self._encode([text])[0])
        return self._prompts[i]

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.records))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def next_batch(self) -> PromptBatch:
        """This process's slice of the next batch; after the last batch of an epoch the next epoch
        starts (reshuffled)."""
        first = self.process_index * self.prompts_per_process
        start = self.position * self.prompts_per_batch + first
        chosen = self._order(self.epoch)[start:start + self.prompts_per_process].tolist()
        prompts = [self._prompt(i) for i in chosen]
        batch = PromptBatch(
            prompt_ids=[list(ids) for _, ids in prompts for _ in range(self.n)],
            group=[g for g in range(len(chosen)) for _ in range(self.n)],
            answers=[self.records[i]["answer"] for i in chosen for _ in range(self.n)],
            records=[self.records[i] for i in chosen],
            prompts=[text for text, _ in prompts],
            epoch=self.epoch, index=self.position, first_prompt=first)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        """The position (``epoch``, ``position`` = batches served in that epoch) and what fixes the
        order (checked by :meth:`load_state_dict`): plain ints and bools, for any checkpoint format."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "prompts_per_batch": self.prompts_per_batch, "num_records": self.num_records}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position: the next batch is the one the saved batcher would have
        served next. Raises ``ValueError`` if the saved batcher's order differs from this one's (another
        seed, shuffle, prompts_per_batch or number of records); the process count may differ."""
        differ = [f"{key} saved {state.get(key)!r} vs {getattr(self, key)!r} now" for key in _ORDER_KEYS
                  if state.get(key) != getattr(self, key)]
        if differ:
            detail = ", ".join(differ)
            raise ValueError(f"the saved batcher position is for another data order ({detail}): resume with the "
                             f"same data and batching options.")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"saved position epoch={epoch}, position={position} is out of range: it needs "
                             f"epoch >= 0 and 0 <= position < {self.batches_per_epoch} (batches per epoch).")
        self.epoch, self.position = epoch, position
