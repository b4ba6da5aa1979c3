"""Is ``jackpot_arithmetic`` learnable by a tiny model? Supervised fine-tuning on CPU, then greedy accuracy.

A tiny Qwen3-style model with a character-level tokenizer (:mod:`jackpot_jax.data.char_tokenizer`)
is trained from scratch on the train split's worked solutions (:func:`jackpot_jax.train.sft.sft`:
``prompt + " " + solution + <eos>``, loss on the completion only) and graded on the held-out test
split with greedy decoding and :func:`jackpot_jax.data.rewards.math_reward`, before and after training.
The splits are those of the TFDS config ``d{difficulty}`` (same seeds, test problems excluded from
train), drawn directly with :func:`jackpot_jax.data.arithmetic.make_split` (no TensorFlow needed).
Results: ``docs/arithmetic.md``.

    python -m jackpot_jax.experiments.arithmetic_sft --difficulty 1 --steps 1500 --out runs/arithmetic_sft
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from jackpot_jax.data.arithmetic import make_split
from jackpot_jax.data.char_tokenizer import make_char_tokenizer
from jackpot_jax.data.prompts import plain_prompt
from jackpot_jax.data.rewards import math_reward
from jackpot_jax.files import atomic_write_text
from jackpot_jax.models import Transformer, preset
from jackpot_jax.models.hf import save_pretrained
from jackpot_jax.rollout.generate import generate
from jackpot_jax.train.sft import sft

INSTRUCTION = ""  # the plain template without its instruction line: shorter sequences for a CPU


def arithmetic_splits(difficulty: int, train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` drawn as the TFDS builder's config ``d{difficulty}`` draws them (seeds
    ``1000 * difficulty`` and ``+ 1``; train excludes the test problems)."""
    test = make_split(1000 * difficulty + 1, test_size, difficulty)
    train = make_split(1000 * difficulty, train_size, difficulty, exclude=[r["problem"] for r in test])
    return train, test


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """The token ids of the record's plain prompt (without the instruction line)."""
    return tokenizer.encode(plain_prompt(record["problem"], INSTRUCTION))


def accuracy(model, tokenizer, records, max_new_tokens: int) -> float:
    """The fraction of ``records`` whose greedy completion :func:`math_reward` grades correct."""
    rollout = generate(model, [prompt_ids(tokenizer, r) for r in records], max_new_tokens, temperature=0.0,
                       eos_token_ids=[tokenizer.eos_token_id], max_concurrent_decodes=64)
    texts = tokenizer.batch_decode(rollout.completions, skip_special_tokens=True)
    return float(np.mean([math_reward(text, r["answer"]) for text, r in zip(texts, records)]))


def tiny_model(tokenizer, model_preset: str, seed: int) -> Transformer:
    """A fresh model of ``model_preset`` (e.g. ``tiny-qwen3``) with the tokenizer's vocabulary."""
    return Transformer(preset(model_preset, vocab_size=len(tokenizer)), rngs=nnx.Rngs(seed))


def run(difficulty: int = 1, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3, model_preset: str = "tiny-qwen3",
        train_size: int = 2000, test_size: int = 200, max_len: int = 64, max_new_tokens: int = 32, seed: int = 0,
        out: str | None = None, log_every: int = 0) -> dict:
    """Untrained accuracy, SFT, trained accuracy on the test split; the results as a dict (also
    ``results.json``, the model and the tokenizer under ``out`` when given)."""
    tokenizer = make_char_tokenizer()
    train, test = arithmetic_splits(difficulty, train_size, test_size)
    model = tiny_model(tokenizer, model_preset, seed)
    before = accuracy(model, tokenizer, test, max_new_tokens)
    print(f"untrained accuracy: {before:.3f} on {len(test)} test problems", flush=True)
    start = time.perf_counter()
    losses = sft(model, tokenizer, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, max_len=max_len,
                 prompt_fn=functools.partial(prompt_ids, tokenizer), log_every=log_every)
    train_s = time.perf_counter() - start
    after = accuracy(model, tokenizer, test, max_new_tokens)
    print(f"trained accuracy: {after:.3f} on {len(test)} test problems after {steps} steps "
          f"({train_s:.0f} s of training on {jax.devices()[0].device_kind})", flush=True)
    results = {"difficulty": difficulty, "model_preset": model_preset, "num_params": model.config.num_params(),
               "steps": steps, "batch_size": batch_size, "lr": lr, "train_size": len(train), "test_size": len(test),
               "seed": seed, "untrained_accuracy": before, "trained_accuracy": after, "train_seconds": train_s,
               "final_loss": float(np.mean(losses[-50:])) if losses else None}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
        save_pretrained(model, os.path.join(out, "model"))
        tokenizer.save_pretrained(os.path.join(out, "model"))
    return results


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--model-preset", default="tiny-qwen3")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write results.json, the model and the tokenizer")
    args = parser.parse_args(argv)
    results = run(args.difficulty, args.steps, args.batch_size, args.lr, args.model_preset, args.train_size,
                  args.test_size, args.max_len, args.max_new_tokens, args.seed, args.out, log_every=100)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
