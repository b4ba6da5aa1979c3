"""A short supervised warm start before RL, cached in the work dir.

Tiny models trained from scratch (the CPU demo) sample no correct answer at first, so every GRPO
advantage would be 0. Each model is first fine-tuned on the train split's worked solutions
(:func:`jackpot_jax.train.sft.sft`: next-token loss on the completion only). The
result is saved under ``directory`` (the trainer's ``WORKDIR/warm_start/<name>``, or
``warm_start.dir/<name>``: an Orbax checkpoint of the parameters) with a
``spec.json`` of everything that determined it; a later run, or a resumed one, with the same spec
loads it instead of training again. :func:`unbox` drops the final boxed answer from some of the
solutions first (``warm_start.boxed < 1``), which gives RL a habit of the data to correct.
"""
from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jackpot_jax.files import atomic_write_text
from jackpot_jax.train.sft import sft

logger = logging.getLogger(__name__)


_FINAL_BOX_RE = re.compile(r"\s*\\boxed\{[^{}]*\}\s*$")


def unbox(records: list[dict], boxed: float, seed: int) -> list[dict]:
    """``records`` with the final ``\\boxed{...}`` removed from the solution of a fraction
    ``1 - boxed`` of them (drawn with ``seed``; the others unchanged). The worked lines stay, so a
    model fine-tuned on the result still computes the answer but boxes it only a fraction ``boxed``
    of the time, and the ``math`` reward, which reads only boxed answers, scores the rest 0: a
    habit of the supervised data that RL, and only RL, is told to change. A solution that does not
    end with a boxed answer is refused."""
    if boxed == 1.0:
        return records
    keep = np.random.default_rng(seed).random(len(records)) < boxed
    out = []
    for record, kept in zip(records, keep):
        if not _FINAL_BOX_RE.search(record["solution"]):
            raise ValueError(f"warm_start.boxed={boxed} needs solutions that end with \\boxed{{...}}; this one "
                             f"does not: {record['solution']!r}")
        out.append(record if kept else {**record, "solution": _FINAL_BOX_RE.sub("", record["solution"])})
    return out


def _checkpointer():
    """Orbax for this process alone: in a multi-process run each process trains (or loads) the warm
    start on its own devices, without waiting for the others; it saves and restores host arrays
    (Orbax refuses device arrays local to one process of several)."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def warm_start(model, tokenizer, records, *, name: str, directory: str, steps: int, batch_size: int, lr: float,
               seed: int, max_len: int, prompt_fn, spec: dict) -> dict:
    """Fine-tune ``model`` in place for ``steps`` on the ``records`` whose prompt, solution and eos
    fit in ``max_len`` tokens (or load the cached result); returns a summary
    (``{"cached": bool, "final_loss": float | None}``). ``spec`` holds the settings that must match
    for the cache to be used (data, template, model); the training settings are added here."""
    directory = os.path.abspath(directory)
    spec = {**spec, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "max_len": max_len}
    spec_path = os.path.join(directory, "spec.json")
    params_path = os.path.join(directory, "params")
    if os.path.exists(spec_path) and os.path.exists(params_path):
        with open(spec_path, encoding="utf-8") as f:
            saved = json.load(f)
        if {k: v for k, v in saved.items() if k != "final_loss"} == json.loads(json.dumps(spec)):
            abstract = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), nnx.state(model, nnx.Param))
            with _checkpointer() as checkpointer:
                nnx.update(model, jax.tree.map(jnp.asarray, checkpointer.restore(params_path, abstract)))
            logger.info("warm start of %s loaded from %s", name, directory)
            return {"cached": True, "final_loss": saved.get("final_loss")}
        logger.info("warm start of %s in %s was made with other settings; training it again", name, directory)
    records = [r for r in records
               if len(prompt_fn(r)) + len(tokenizer.encode(" " + r["solution"])) + 1 <= max_len]
    if not records:
        raise ValueError(f"warm start of the {name}: no worked solution fits in {max_len} tokens (prompt + "
                         f"solution + eos); raise rollout.max_new_tokens or data.max_prompt_tokens.")
    losses = sft(model, tokenizer, records, steps=steps, batch_size=batch_size, lr=lr, seed=seed, max_len=max_len,
                 warmup=min(100, steps // 5), prompt_fn=prompt_fn)
    final_loss = float(sum(losses[-20:]) / len(losses[-20:]))
    if jax.process_index() == 0:  # every process trained the same copy; one writes it
        os.makedirs(directory, exist_ok=True)
        with _checkpointer() as checkpointer:
            checkpointer.save(params_path, jax.device_get(nnx.state(model, nnx.Param)), force=True)
        atomic_write_text(spec_path, json.dumps({**spec, "final_loss": final_loss}, indent=2))
    return {"cached": False, "final_loss": final_loss}
