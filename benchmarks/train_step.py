"""Train-step benchmarks: the jitted update of each mode on the same batch, and a demo step split
into rollout and update.

``update`` times one :meth:`jackpot_jax.train.step.Updater.update` (one optimizer update of a
mini-batch, forward and backward of both models, ``kernel_impl="chunked"``) for each case on the
same random :class:`~jackpot_jax.train.batch.TrainBatch` (random prompt / completion splits and
tokens; log p_inf and, as a rollout stores them, p_inf's top ``--rollout-top-k`` ids and log-probs
(default the demo's ``algorithm.k``; 0: none) from the actor at the rollout temperature, computed
before the timing) and the same :class:`~jackpot_jax.train.step.OldStats` from ``prepare``:

- ``off_policy``, actor frozen: the paper's baseline policy update (PPO on the actor's rollouts);
- ``jackpot``, actor frozen: the same policy update with OBRS (the actor's forward for p_inf's Z,
  Z_approx from the first pass: p_inf's top-k from the batch when it has ``k`` or more, else
  ranked in the pass; rho);
- ``jackpot``, actor trained: the full joint update of eq. 8 (policy OBRS-PPO + actor PPO + distill);
- ``tis_distill``, actor trained: the same joint update with TIS weights instead of OBRS;
- ``jackpot``, actor trained, with ``rollout_actor``: (c) as every update of a rollout batch after
  its first runs it, with p_inf from the actor that sampled the batch (one more forward of it).

The cases take turns, one update each per round, so that a change in the machine's load hits all
of them alike; each reports the median over ``--repeats`` rounds after ``--warmup`` rounds
(compilation included there); ``--batch`` and ``--length`` default to the demo's mini-batch
(``algorithm.train_batch_size``) and sequence length. Updates but (e) run without ``rollout_actor`` (the
trained actor as p_inf, as in a rollout's first update, where the loop passes none). Models:
``preset(--policy, vocab_size=V)`` and ``preset(--actor, vocab_size=V)`` for each ``--vocab`` V.

On a GPU the table is followed by tokens/s and the model FLOPs utilization of each case: the
forward and backward of each trained model (3 x :func:`models.forward_flops`: 2 P per token and the
full T x T attention, backward twice the forward) plus the forward of a frozen actor that the update
runs (case b); the extra passes over the vocabulary are overhead, not counted. ``--peak-tflops`` is
the device's dense bfloat16 peak (H100 SXM: 989).

``e2e`` runs :class:`jackpot_jax.train.loop.Trainer` on ``configs/demo.py`` in a temporary work dir
(short warm start, no evaluation) and reports the median ``time/rollout_s`` and ``time/update_s``
over the steps after the first (which compiles).

    python benchmarks/train_step.py update [--vocab 4096 103] [--batch B] [--length L] [--repeats 10]
    python benchmarks/train_step.py update --policy qwen3-1.7b --actor qwen3-0.6b --vocab 151936 \
        --batch 4 --length 1024 --cases a b c [--kernel-impl chunked]          # on a GPU
    python benchmarks/train_step.py update --vocab 4096 --algorithm-overrides z=exact,k=20
    python benchmarks/train_step.py update --cases a b --rollout-top-k 0    # the update's own top-k of p_inf
    python benchmarks/train_step.py e2e [--steps 6] [--warm-steps 20] [--modes jackpot off_policy]
    python benchmarks/train_step.py all

Results are printed as Markdown for BENCHMARKS.md, with the device, versions, load, date and command.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import os
import platform
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from jackpot_jax.models import Transformer, preset
from jackpot_jax.train import build
from jackpot_jax.train.batch import make_batch
from jackpot_jax.train.step import StepConfig, Updater

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, mode, train_actor)
CASES = {
    "a": ("off_policy, actor frozen", "off_policy", False),
    "b": ("jackpot, actor frozen", "jackpot", False),
    "c": ("jackpot, actor trained", "jackpot", True),
    "d": ("tis_distill, actor trained", "tis_distill", True),
    "e": ("jackpot, actor trained, p_inf the rollout actor's", "jackpot", True),
}


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def header():
    dev = jax.devices()[0]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    return (f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}, "
            f"JAX {jax.__version__}, {datetime.date.today().isoformat()}, load average {load}; "
            f"`{shlex.join(['python', *sys.argv])}`")


# ----------------------------------------------------------------------------- update step


def _overrides(text):
    """``"hidden_size=512,num_hidden_layers=8"`` -> ``{"hidden_size": 512, "num_hidden_layers": 8}``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 or not pair[1].isdigit() for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INT pairs separated by commas")
    return {key: int(value) for key, value in pairs}


def random_batch(rng, batch, length, vocab, max_new):
    """``batch`` sequences of ``length`` tokens: a prompt of 8..length/2 tokens, then a completion
    of 1..``max_new`` tokens (at most the rest), random tokens, log p_inf in [-6, 0) (replaced by
    :func:`with_actor_p_inf`), GRPO-like advantages."""
    prompts, completions, logprobs = [], [], []
    for _ in range(batch):
        prompt = int(rng.integers(8, length // 2 + 1))
        completion = int(rng.integers(1, min(length - prompt, max_new) + 1))
        prompts.append(rng.integers(1, vocab, prompt).tolist())
        completions.append(rng.integers(1, vocab, completion).tolist())
        logprobs.append(-rng.exponential(1.5, completion).clip(max=6.0).astype(np.float32))
    advantages = rng.normal(size=batch).astype(np.float32)
    return make_batch(prompts, completions, logprobs, advantages, length)


def with_actor_p_inf(batch, actor, temperature, top_k):
    """``batch`` as the actor's rollout would store it: log p_inf of each generated token and, with
    ``top_k``, p_inf's top-k ids and log-probs (zeros / -inf elsewhere), p_inf = softmax(actor
    logits / temperature) (:func:`pallas_kernels.fused_token_stats`, chunked)."""
    h, _ = actor.hidden_states(jnp.asarray(batch.inputs), attention_mask=jnp.asarray(batch.input_mask))
    targets = jnp.asarray(batch.targets).reshape(-1)
    logp, _, top_logp, top_ids = pk.fused_token_stats(h.reshape(targets.shape[0], -1), actor.unembedding(),
                                                      targets, max(top_k, 1), temperature=temperature,
                                                      impl="chunked")
    valid = np.asarray(batch.valid)
    batch = batch._replace(logp_inf=np.where(valid, np.asarray(logp).reshape(valid.shape), 0.0).astype(np.float32))
    if not top_k:
        return batch
    per_token = lambda x: np.asarray(x).reshape(valid.shape + (top_k,))
    return batch._replace(topk_ids=np.where(valid[..., None], per_token(top_ids), 0).astype(np.int32),
                          topk_logp_inf=np.where(valid[..., None], per_token(top_logp), -np.inf).astype(np.float32))


def params(model):
    """A copy of the parameters: ``update`` donates its state, which must not alias the model."""
    return jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))


def make_updaters(args, vocab, demo):
    """Policy, actor, and per case an :class:`Updater` and its fresh state: the demo's algorithm
    and optimizer settings with the case's mode and train_actor, the ``--kernel-impl`` kernels."""
    policy = Transformer(preset(args.policy, vocab_size=vocab, **args.policy_overrides), rngs=nnx.Rngs(0))
    actor = Transformer(preset(args.actor, vocab_size=vocab, **args.actor_overrides), rngs=nnx.Rngs(1))
    updaters, states = {}, {}
    for case in args.cases:
        _, mode, train_actor = CASES[case]
        cfg = StepConfig.from_config(demo)._replace(mode=mode, train_actor=train_actor,
                                                    micro_batch_size=args.micro_batch,
                                                    kernel_impl=args.kernel_impl, window=args.max_new_tokens)
        policy_tx = build.make_optimizer(demo.optim.policy, 1000)[0]
        actor_tx = build.make_optimizer(demo.optim.actor, 1000)[0] if train_actor else None
        updaters[case] = Updater(cfg, policy, actor, policy_tx, actor_tx)
        states[case] = updaters[case].init_state(params(policy), params(actor))
    return policy, actor, updaters, states


def time_updates(args, vocab, demo):
    """Seconds of each update of each case (round-robin over the cases, see the docstring)."""
    policy, actor, updaters, states = make_updaters(args, vocab, demo)
    batch = random_batch(np.random.default_rng(0), args.batch, args.length, vocab, args.max_new_tokens)
    batch = jax.device_put(with_actor_p_inf(batch, actor, demo.rollout.temperature, args.rollout_top_k))
    # every case reads the same OldStats (p_target = new: prepare is the same for all four)
    old = jax.block_until_ready(updaters[args.cases[0]].prepare(params(policy), params(actor), batch, 1.0))
    key, rollout_actor = jax.random.key(0), params(actor)
    times = {case: [] for case in updaters}
    for round_ in range(args.warmup + args.repeats):
        for case, updater in updaters.items():
            start = time.perf_counter()
            # update donates its state: keep only the returned one
            states[case], metrics = updater.update(states[case], batch, old, jax.random.fold_in(key, round_), 1.0,
                                                   rollout_actor=rollout_actor if case == "e" else None)
            jax.block_until_ready((states[case], metrics))
            if round_ >= args.warmup:
                times[case].append(time.perf_counter() - start)
            if float(metrics["nonfinite/skipped"]):
                raise RuntimeError(f"case {case}: the update was skipped (non-finite loss or gradient)")
    return {case: np.asarray(t) for case, t in times.items()}, (policy.config, actor.config)


def _describe(overrides):
    return f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""


def update(args):
    demo = demo_config()
    for key, value in args.algorithm_overrides.items():
        old = getattr(demo.algorithm, key)  # an unknown key fails here, naming it
        setattr(demo.algorithm, key, value in ("True", "true", "1") if isinstance(old, bool) else type(old)(value))
    tokens = args.batch * (args.length - 1)
    dtype = preset(args.policy, **args.policy_overrides).dtype
    changed = "".join(f", {key}={value}" for key, value in args.algorithm_overrides.items())
    changed += (f", p_inf's top-{args.rollout_top_k} in the batch" if args.rollout_top_k
                else ", no top-k in the batch")
    print(f"Update step (`Updater.update`, one optimizer update, kernel_impl={args.kernel_impl}, {dtype}{changed}): policy "
          f"{args.policy}{_describe(args.policy_overrides)}, actor {args.actor}{_describe(args.actor_overrides)}, "
          f"B={args.batch} sequences x T={args.length - 1} positions "
          f"({tokens} tokens; completions of at most {args.max_new_tokens}), micro-batch {args.micro_batch}, "
          f"the demo's other algorithm settings; median of "
          f"{args.repeats} rounds after {args.warmup} warm-up rounds, cases interleaved; {header()}\n")
    cols = [c for c in "abcde" if c in args.cases]
    print("| V | " + " | ".join(f"({c}) {CASES[c][0]}" for c in cols) + " | (b)/(a) | (c)/(d) | (c)/(a) | (e)/(c) |")
    print("|---" * (len(cols) + 5) + "|")
    gpu_rows = []
    for vocab in args.vocab:
        times, configs = time_updates(args, vocab, demo)
        gpu_rows.append((vocab, times, configs))
        med = {case: float(np.median(t)) for case, t in times.items()}
        spread = {case: (float(np.min(t)), float(np.max(t))) for case, t in times.items()}
        cells = [f"{1e3 * med[c]:.0f} ms ({1e3 * spread[c][0]:.0f}-{1e3 * spread[c][1]:.0f})" for c in cols]
        ratio = lambda x, y: f"{med[x] / med[y]:.2f}x" if x in med and y in med else "-"
        ratios = " | ".join(ratio(x, y) for x, y in ("ba", "cd", "ca", "ec"))
        print(f"| {vocab:,} | " + " | ".join(cells) + f" | {ratios} |",
              flush=True)
    print("\nCells: median (min-max) wall time per update.")
    if jax.default_backend() == "gpu":
        print(f"\n| V | case | tokens/s | model TFLOP per update | TFLOP/s | MFU (peak {args.peak_tflops:g}) |")
        print("|---|---|---|---|---|---|")
        for vocab, times, configs in gpu_rows:
            for case, t in times.items():
                flops = update_flops(case, *configs, args.batch, args.length - 1)
                sec = float(np.median(t))
                print(f"| {vocab:,} | ({case}) | {tokens / sec:,.0f} | {flops / 1e12:.1f} | {flops / sec / 1e12:.0f} "
                      f"| {100 * flops / sec / (args.peak_tflops * 1e12):.1f}% |")


def update_flops(case, policy_config, actor_config, batch, seq):
    """Model FLOPs of one update of ``case`` (see the module docstring)."""
    from models import forward_flops  # noqa: PLC0415 (benchmarks/models.py, beside this file)

    _, mode, train_actor = CASES[case]
    actor_passes = 3 if train_actor else (1 if mode != "off_policy" else 0)
    return (3 * forward_flops(policy_config, batch, seq)
            + actor_passes * forward_flops(actor_config, batch, seq))


# ----------------------------------------------------------------------------- end to end


def e2e(args):
    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415 (imports TensorFlow Datasets)

    print(f"Demo steps (`Trainer.run`, configs/demo.py, {args.steps} steps, warm start {args.warm_steps} steps, "
          f"no evaluation, kernel_impl=chunked); median over steps 2..{args.steps}; {header()}\n")
    print("| mode | train_actor | rollout s | update s | update share | tokens / s | mean completion length "
          "| first step: rollout s, update s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        config = demo_config()
        config.train.steps, config.train.eval_every, config.train.progress = args.steps, 0, False
        config.train.save_every, config.train.kernel_impl = 10**6, "chunked"
        config.warm_start.policy_steps = config.warm_start.actor_steps = args.warm_steps
        config.algorithm.mode = mode
        config.algorithm.train_actor = mode in ("jackpot", "tis_distill")
        with tempfile.TemporaryDirectory() as workdir:
            history = Trainer(config, workdir, resume=False).run()
        rest = history[1:]
        med = lambda key: float(np.median([row[key] for row in rest]))
        rollout_s, update_s = med("time/rollout_s"), med("time/update_s")
        print(f"| {mode} | {config.algorithm.train_actor} | {rollout_s:.2f} | {update_s:.2f} "
              f"| {100 * update_s / (rollout_s + update_s):.0f}% | {med('throughput/tokens_per_s'):,.0f} "
              f"| {med('rollout/mean_length'):.1f} "
              f"| {history[0]['time/rollout_s']:.1f}, {history[0]['time/update_s']:.1f} |", flush=True)
    print("\nupdate s: from the batch's assembly to the new actor weights in the engine (prepare, the "
          "updates, the weight push); the first step compiles and is not in the medians.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["update", "e2e", "all"])
    parser.add_argument("--policy", default="tiny-qwen3-large", help="update: the policy's preset")
    parser.add_argument("--actor", default="tiny-qwen3", help="update: the actor's preset")
    for model in ("policy", "actor"):
        parser.add_argument(f"--{model}-overrides", type=_overrides, default={}, metavar="KEY=INT,...",
                            help=f"update: integer fields of the {model}'s preset to replace, e.g. "
                                 "hidden_size=512,num_hidden_layers=8")
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 103],
                        help="update: vocabulary sizes (103: the demo's character tokenizer)")
    parser.add_argument("--batch", type=int, default=0,
                        help="update: sequences per update (0: the demo's algorithm.train_batch_size)")
    parser.add_argument("--length", type=int, default=0, help="update: tokens per sequence (0: the demo's "
                        "data.max_prompt_tokens + rollout.max_new_tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="update: longest completion, the step's statistics window (0: the demo's "
                             "rollout.max_new_tokens)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="update: sequences per micro-batch (0: the demo's, or the batch if it does not divide it)")
    parser.add_argument("--cases", nargs="+", default=list("abcd"), choices=list("abcde"))
    parser.add_argument("--algorithm-overrides", type=lambda text: dict(item.split("=", 1) for item in text.split(",")),
                        default={}, metavar="KEY=VALUE,...",
                        help="update: keys of the demo's algorithm section to replace, e.g. z=exact")
    parser.add_argument("--rollout-top-k", type=int, default=-1,
                        help="update: p_inf's top-k stored in the batch, as a rollout with "
                             "logprobs_top_k stores it (-1: the demo's algorithm.k; 0: none)")
    parser.add_argument("--kernel-impl", default="chunked", choices=["chunked", "pallas", "reference"],
                        help="update: the vocabulary statistics' implementation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="update, on a GPU: dense bfloat16 peak")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="e2e: RL steps (the first is not counted)")
    parser.add_argument("--warm-steps", type=int, default=20, help="e2e: supervised warm-start steps of each model")
    parser.add_argument("--modes", nargs="+", default=["jackpot", "off_policy"], help="e2e: algorithm modes",
                        choices=["on_policy", "off_policy", "tis", "tis_distill", "jackpot"])
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step compiles and is not counted.")
    demo = demo_config()
    args.batch = args.batch or demo.algorithm.train_batch_size
    args.length = args.length or demo.data.max_prompt_tokens + demo.rollout.max_new_tokens
    args.max_new_tokens = args.max_new_tokens or demo.rollout.max_new_tokens
    args.rollout_top_k = demo.algorithm.k if args.rollout_top_k < 0 else args.rollout_top_k
    micro = demo.algorithm.micro_batch_size
    args.micro_batch = args.micro_batch or (micro if args.batch % micro == 0 else args.batch)
    logging.basicConfig(level=logging.WARNING)
    if args.what in ("update", "all"):
        update(args)
    if args.what == "all":
        print()
    if args.what in ("e2e", "all"):
        e2e(args)


if __name__ == "__main__":
    main()
