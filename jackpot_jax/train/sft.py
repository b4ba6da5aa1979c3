"""Supervised fine-tuning on worked solutions: next-token loss on the completion only.

The trainer's warm start (:mod:`jackpot_jax.train.warm_start`) and the learnability experiment
(:mod:`jackpot_jax.experiments.arithmetic_sft`) train with it. An example is ``prompt + " " +
solution + <eos>``; the prompt's token ids come from the caller's ``prompt_fn(record)`` (the
template is the caller's), and only the tokens after the prompt are trained on.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def encode_examples(tokenizer, records, max_len: int, prompt_fn) -> tuple[np.ndarray, np.ndarray]:
    """``tokens [N, max_len]`` of ``prompt + " " + solution + <eos>`` (right-padded with ``<pad>``)
    and ``completion [N, max_len]``: 1 on the tokens after the prompt (the solution and ``<eos>``).
    ``prompt_fn(record)`` gives a record's prompt ids."""
    tokens = np.full((len(records), max_len), tokenizer.pad_token_id, np.int32)
    completion = np.zeros((len(records), max_len), np.int32)
    for i, record in enumerate(records):
        prompt = prompt_fn(record)
        answer = tokenizer.encode(" " + record["solution"]) + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) > max_len:
            raise ValueError(f"example {i} has {len(prompt) + len(answer)} tokens, more than max_len={max_len}.")
        tokens[i, :len(prompt) + len(answer)] = prompt + answer
        completion[i, len(prompt):len(prompt) + len(answer)] = 1
    return tokens, completion


def completion_loss(model, tokens, completion):
    """Mean next-token cross-entropy over the completion tokens (prompt and padding masked). The
    padding is on the right, so causal attention keeps it out of the real tokens' logits."""
    logits = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    weights = completion[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@nnx.jit
def _train_step(model, optimizer, tokens, completion):
    loss, grads = nnx.value_and_grad(completion_loss)(model, tokens, completion)
    optimizer.update(model, grads)
    return loss


def sft(model, tokenizer, records, *, steps: int, batch_size: int, lr: float, seed: int, max_len: int, prompt_fn,
        warmup: int = 100, weight_decay: float = 0.01, log_every: int = 0) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps (linear warmup, then cosine decay to 0)
    on batches drawn uniformly from ``records`` (prompts from ``prompt_fn``, see
    :func:`encode_examples`); returns the loss of each step."""
    tokens, completion = encode_examples(tokenizer, records, max_len, prompt_fn)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), max(steps, 1))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=weight_decay), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        rows = rng.integers(0, len(records), batch_size)
        losses.append(float(_train_step(model, optimizer, jnp.asarray(tokens[rows]), jnp.asarray(completion[rows]))))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    return losses
