"""Evaluation: k sampled completions per problem, graded, reported as Mean@k and Pass@k.

    jackpot-eval --model PATH --dataset gsm8k,math --k 4 [--split test] [--manual-dir DIR] [--limit N]
                 [--template plain|chat] [--max-new-tokens 1024] [--temperature 0.6] [--top-p 0.95]
                 [--out DIR [--save-completions]] [--debug]

The trainer calls :func:`evaluate` directly with its actor or policy. Completions come from
:func:`jackpot_jax.rollout.generate` (continuous batching), are decoded without special tokens and
graded by a reward of the registry (``math``: :func:`jackpot_jax.data.rewards.math_reward`).
Mean@k and Pass@k are :func:`jackpot_jax.data.metrics.at_k_metrics` (Pass@k is the unbiased
estimator; with exactly k samples it is the fraction of problems solved at least once).

``--manual-dir`` means what ``config.data.manual_dir`` means in training: a dataset's own directory, or a
root holding one directory per dataset (``gsm8k/``, ``math/``, ``deepscaler/``). ``--save-completions``
writes every graded sample to ``OUT/completions_<dataset>.jsonl``. A user error (a bad path, dataset or
value) is one line ``jackpot-eval: message`` (exit status 1) unless ``--debug`` (or ``JACKPOT_DEBUG=1``),
which also keeps TensorFlow's and XLA's start-up logs (:mod:`jackpot_jax.console`).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from jackpot_jax.console import debug_requested, quiet_startup, user_errors
from jackpot_jax.data.metrics import at_k_metrics
from jackpot_jax.data.rewards import get_reward
from jackpot_jax.files import atomic_write_text


def evaluate(model_or_engine, tokenizer, records, *, k: int = 4, template: str = "plain", instruction: str | None = None,
             max_new_tokens: int = 1024, temperature: float = 0.6, top_p: float = 0.95, seed: int = 0,
             reward: str = "math", max_concurrent_decodes: int = 32, return_samples: bool = False):
    """Mean@k and Pass@k of a model on ``records`` (dicts with ``problem`` and ``answer``), prompted
    as :func:`~jackpot_jax.data.prompts.build_prompt` (``instruction`` None: the default one).

    With ``return_samples``: ``(results, samples)``, ``samples`` one dict per graded completion in
    problem order (``index`` of the problem in ``records``, ``problem``, ``answer`` (the reference),
    ``completion`` (the decoded text), ``reward``, ``finish_reason``)."""
    from jackpot_jax.data.prompts import INSTRUCTION, build_prompt, encode_prompts  # noqa: PLC0415 (keeps this module light)
    from jackpot_jax.models.hf import end_token_ids  # noqa: PLC0415
    from jackpot_jax.rollout import generate  # noqa: PLC0415

    if not records:
        raise ValueError("records is empty: there is nothing to evaluate.")
    grade = get_reward(reward)
    instruction = INSTRUCTION if instruction is None else instruction
    texts = [build_prompt(record, tokenizer, template=template, instruction=instruction) for record in records]
    prompt_ids = encode_prompts(tokenizer, texts, template)
    rollout = generate(model_or_engine, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, n=k,
                       seed=seed, eos_token_ids=end_token_ids(tokenizer), max_concurrent_decodes=max_concurrent_decodes)
    completions = tokenizer.batch_decode(rollout.completions, skip_special_tokens=True)
    rewards, samples = [[] for _ in records], []
    for i, completion, finish in zip(rollout.prompt_index, completions, rollout.finish_reasons):
        rewards[i].append(grade(completion, records[i]["answer"]))
        samples.append({"index": i, "problem": records[i]["problem"], "answer": records[i]["answer"],
                        "completion": completion, "reward": rewards[i][-1], "finish_reason": finish})
    results = {"num_problems": len(records), "k": k, **at_k_metrics(rewards, k),
               "finish_reasons": dict(collections.Counter(rollout.finish_reasons)),
               "mean_completion_tokens": sum(map(len, rollout.completions)) / len(rollout.completions)}
    return (results, sorted(samples, key=lambda sample: sample["index"])) if return_samples else results


def completions_jsonl(samples: list[dict]) -> str:
    """``samples`` of :func:`evaluate` as JSON lines (one per sample)."""
    return "".join(json.dumps(sample) + "\n" for sample in samples)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per dataset: problems, k, Mean@k, Pass@k."""
    lines = ["| dataset | problems | k | Mean@k | Pass@k |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['num_problems']} | {r['k']} | {r['mean@k']:.4f} | {r['pass@k']:.4f} |")
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(prog="jackpot-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--dataset", required=True, help="comma-separated names from jackpot_jax.data.datasets.DATASETS")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--limit", type=int, help="at most the first N problems of each dataset")
    p.add_argument("--manual-dir", help="for gsm8k / math / deepscaler: the dataset's directory (its official "
                   "files), or a root holding one directory per dataset (gsm8k/, math/, deepscaler/), as "
                   "config.data.manual_dir (default: DATA_DIR/manual/<dataset>)")
    p.add_argument("--data-dir", help="where TFDS prepares the datasets")
    p.add_argument("--template", default="plain", choices=["plain", "chat"])
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", type=int, default=32, help="concurrent decodes")
    p.add_argument("--out", help="directory for results.json and results.md")
    p.add_argument("--save-completions", action="store_true",
                   help="also write OUT/completions_<dataset>.jsonl: one line per graded sample (index, problem, "
                        "answer, completion, reward, finish_reason)")
    p.add_argument("--debug", action="store_true", help="full tracebacks of every error and TensorFlow's / "
                   "XLA's start-up logs (also JACKPOT_DEBUG=1)")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k} is not allowed: k must be >= 1 (samples per problem)")
    if args.save_completions and not args.out:
        parser.error("--save-completions needs --out DIR (where completions_<dataset>.jsonl go)")
    debug = args.debug or debug_requested()
    quiet_startup(debug)  # before anything imports JAX or TensorFlow
    with user_errors("jackpot-eval", debug=debug):
        return _run(args)


def _run(args) -> int:
    from jackpot_jax.data.datasets import load_split  # noqa: PLC0415
    from jackpot_jax.models import hf  # noqa: PLC0415

    # the data first: a bad dataset, split, config or path is reported before the model is loaded
    names = args.dataset.split(",")
    data = {name: load_split(name, args.split, data_dir=args.data_dir, manual_dir=args.manual_dir,
                             limit=args.limit) for name in names}
    model = hf.from_pretrained(args.model)
    tokenizer = hf.load_tokenizer(args.tokenizer or args.model)
    results, samples = {}, {}
    for name, records in data.items():
        results[name], samples[name] = evaluate(
            model, tokenizer, records, k=args.k, template=args.template, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_concurrent_decodes=args.slots,
            return_samples=True)
    table = markdown_table(results)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
        atomic_write_text(os.path.join(args.out, "results.md"), table + "\n")
        if args.save_completions:
            for name, rows in samples.items():
                atomic_write_text(os.path.join(args.out, f"completions_{name}.jsonl"), completions_jsonl(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
