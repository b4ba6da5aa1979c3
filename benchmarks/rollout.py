"""Rollout benchmark: generated tokens/s of ``jackpot_jax.rollout.generate`` against Hugging Face
``transformers`` ``generate`` (PyTorch, KV cache on) on the same weights.

Both generate exactly ``--new`` tokens for each of ``--batch`` prompts of ``--prompt`` tokens
(greedy; no EOS), float32; the time includes prefill. The two must produce the same tokens (checked).
Configs: ``30m`` and ``150m`` Qwen3-like models (vocabulary 32,768, tied embeddings).

    python benchmarks/rollout.py [--sizes 30m 150m] [--batch 32] [--prompt 64] [--new 128] [--repeats 2] \
        [--steps-per-call 8]

``decode`` (meant for a GPU) times a decode step (every slot's next token, sampling included,
``--steps-per-call`` steps per :meth:`DecodeCore.generate_steps` call, the tokens fetched to the host
after each call) of a Qwen3-1.7B-shaped model (``--preset``) with random bfloat16 weights and a
random bfloat16 KV cache, at each ``--batches`` size, against the memory-bandwidth floor: the bytes one step must read
(every weight once; the tied embedding once, as the unembedding) plus the keys and values of each
slot's context, over the copy bandwidth measured in the same process (an elementwise pass over
2 GiB, bytes read plus written). The cache holds ``--cache`` positions; the slots start at
``--context`` filled positions and the timed ``--steps`` steps go on from there. Our attention reads
the pages its page table spans (``--page-size 0``: the whole contiguous cache, dense, masked), so a
second floor counts all ``--cache`` positions.

    python benchmarks/rollout.py decode [--preset qwen3-1.7b] [--batches 1 64] [--cache 1024] [--context 512] \
        [--steps 128] [--steps-per-call 1] [--page-size 16]

``sampling`` times ``sample`` (jitted, random normal ``[B, V]`` logits times ``--scale``, ``logprobs_top_k`` 20) at
top_p = 1, top_p = 0.95 and top_k = 50 with the sort-free ``processed_log_probs`` and the sorting
``processed_log_probs_reference``, then a decode step (``DecodeCore.generate_steps``, one step per call) of a small
Qwen3 (hidden 256, 4 layers, tied embeddings, vocabulary 151,936, random weights) at top_p = 1 and 0.95.

    python benchmarks/rollout.py sampling [--batches 32 64] [--vocabs 32000 151936] [--repeats 5] [--steps 20]

Prints Markdown rows for BENCHMARKS.md with the device, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.models import ModelConfig, Transformer, preset
from jackpot_jax.models.hf import save_pretrained
from jackpot_jax.rollout import DecodeCore, SamplingParams, generate, sample, sampling as sampling_module

SIZES = {
    "30m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, head_dim=64),
    "150m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64),
}


def config(size):
    return ModelConfig(vocab_size=32768, model_type="qwen3", tie_word_embeddings=True, max_position_embeddings=4096,
                       **SIZES[size])


def ours(model, prompts, new, steps_per_call):
    core = DecodeCore(model, max_concurrent_decodes=len(prompts), max_prefill_length=len(prompts[0]),
                      max_target_length=len(prompts[0]) + new)
    return lambda: generate(core, prompts, new, temperature=0.0, steps_per_call=steps_per_call).completions


def theirs(model, prompts, new, path):
    import torch  # noqa: PLC0415
    from transformers import Qwen3ForCausalLM, logging  # noqa: PLC0415

    logging.disable_progress_bar()
    save_pretrained(model, path)
    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].tolist()

    return run


def best(fn, repeats):
    result = fn()  # warm-up: compiles every bucket and step
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def copy_bandwidth(gib=2, repeats=10):
    """Bytes read plus written per second of an elementwise pass over ``gib`` GiB of bfloat16."""
    x = jax.random.normal(jax.random.key(0), (gib * 2**29,), jnp.bfloat16)
    step = jax.jit(lambda x: x * jnp.bfloat16(1.5))
    jax.block_until_ready(step(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / float(np.median(times))


def decode(args):
    cfg = preset(args.preset)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    bandwidth = copy_bandwidth()
    weight_bytes = cfg.num_params() * cfg.jnp_param_dtype.itemsize
    kv_per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * cfg.jnp_dtype.itemsize
    dev = jax.devices()[0]
    print(f"Decode step, {args.preset} shape ({cfg.num_params() / 1e9:.2f}B parameters, {weight_bytes / 2**30:.2f} GiB), "
          f"{cfg.dtype}, cache {args.cache} positions, context {args.context} -> {args.context + args.steps}, "
          f"{args.steps_per_call} steps per call, median over {args.steps} steps; copy bandwidth measured {bandwidth / 1e12:.2f} TB/s; "
          f"{dev.platform} ({dev.device_kind}), JAX {jax.__version__}, {datetime.date.today().isoformat()}\n")
    print("| batch | ms per step | tokens/s | floor, context KV (ms) | vs floor | floor, whole cache (ms) | vs floor |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        core = DecodeCore(model, max_concurrent_decodes=batch, max_prefill_length=16, max_target_length=args.cache,
                          page_size=args.page_size or None)
        state = core.init_decode_state()
        for slot in range(batch if core.paged else 0):  # the pages of every position the timed steps write
            core.pages.reserve(slot, args.context + 2 * args.steps_per_call + args.steps + 1)
        keys = iter(jax.random.split(jax.random.key(1), 2 * cfg.num_hidden_layers))
        fill = lambda c: jax.random.normal(next(keys), c.shape, c.dtype)
        cache = state.cache._replace(k=tuple(map(fill, state.cache.k)), v=tuple(map(fill, state.cache.v)),
                                     lengths=jnp.full((batch,), args.context, jnp.int32))
        state = state._replace(cache=cache, tokens=jnp.asarray(np.arange(batch) % cfg.vocab_size, jnp.int32))
        per_call = args.steps_per_call
        for _ in range(2):  # compile, warm up
            state, drawn = core.generate_steps(core.params, state, per_call)
        jax.device_get(drawn.sampled.tokens)
        times = []
        for _ in range(max(1, args.steps // per_call)):
            start = time.perf_counter()
            state, drawn = core.generate_steps(core.params, state, per_call)
            jax.device_get(drawn.sampled.tokens)  # the host needs the tokens, as generate does
            times.append((time.perf_counter() - start) / per_call)
        step = float(np.median(times))
        context = args.context + 2 * per_call + args.steps / 2
        floor = (weight_bytes + batch * context * kv_per_position) / bandwidth
        floor_cache = (weight_bytes + batch * args.cache * kv_per_position) / bandwidth
        print(f"| {batch} | {1e3 * step:.3f} | {batch / step:,.0f} | {1e3 * floor:.3f} | {step / floor:.2f}x "
              f"| {1e3 * floor_cache:.3f} | {step / floor_cache:.2f}x |", flush=True)
        del state, core


def interleaved_ms(fns, repeats):
    """Median ms per call of each of ``fns`` (each returns what to wait for), timed in turns so that all see the
    same load."""
    for fn in fns:
        jax.block_until_ready(fn())  # compile, warm up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            spent.append(time.perf_counter() - start)
    return [1e3 * float(np.median(spent)) for spent in times]


def sampling(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sampling"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--scale", type=float, default=1.0, help="the logits' standard deviation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    args = parser.parse_args(argv)
    implementations = {"sort-free": sampling_module.processed_log_probs,
                       "reference (sort)": sampling_module.processed_log_probs_reference}
    settings = {"top_p = 1": (1.0, 0), "top_p = 0.95": (0.95, 0), "top_k = 50": (1.0, 50)}
    dev = jax.devices()[0]
    print(f"sample, ms per call (median of {args.repeats}, all cells of a row timed in turns), logits "
          f"N(0, {args.scale}^2), logprobs_top_k 20; {dev.platform} ({dev.device_kind}), JAX {jax.__version__}, "
          f"{datetime.date.today().isoformat()}\n")
    print("| batch | vocabulary | " + " | ".join(f"{s}, {i}" for s in settings for i in implementations) + " |")
    print("|---|---|" + "---|" * len(settings) * len(implementations))
    for batch in args.batches:
        keys = jax.random.split(jax.random.key(1), batch)
        for vocab in args.vocabs:
            logits = args.scale * jax.random.normal(jax.random.key(0), (batch, vocab))
            fns = []
            for top_p, top_k in settings.values():
                for impl in implementations.values():
                    sampling_module.processed_log_probs = impl  # what sample calls, looked up when traced
                    step = jax.jit(lambda k, x, p: sample(k, x, p, 20))
                    jax.block_until_ready(step(keys, logits, SamplingParams.fill(batch)))  # traced with impl
                    fns.append(lambda step=step, p=SamplingParams.fill(batch, 1.0, top_p, top_k): step(keys, logits, p))
            cells = interleaved_ms(fns, args.repeats)
            print(f"| {batch} | {vocab:,} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |", flush=True)
    cfg = ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, model_type="qwen3",
                      tie_word_embeddings=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    print(f"\nDecode step, Qwen3 hidden 256, 4 layers, tied embeddings, vocabulary 151,936, random weights, float32, "
          f"batch 32, 64 filled positions, one step per call (the tokens fetched after each), ms per step (median of "
          f"{args.steps}, the four timed in turns)\n")
    print("| processed_log_probs | top_p = 1 | top_p = 0.95 | ratio |")
    print("|---|---|---|---|")
    fns = []
    for impl in implementations.values():
        sampling_module.processed_log_probs = impl
        core = DecodeCore(model, max_concurrent_decodes=32, max_prefill_length=16, max_target_length=256,
                          logprobs_top_k=20)
        for top_p in (1.0, 0.95):
            state = core.init_decode_state()
            state = state._replace(cache=state.cache._replace(lengths=jnp.full((32,), 64, jnp.int32)),
                                   tokens=jnp.arange(32, dtype=jnp.int32), sampling=SamplingParams.fill(32, 1.0, top_p))
            jax.block_until_ready(core.generate_steps(core.params, core.init_decode_state(), 1))  # traced with impl
            box = [state]

            def decode_step(core=core, box=box):
                box[0], drawn = core.generate_steps(core.params, box[0], 1)
                return jax.device_get(drawn.sampled.tokens)  # the host needs the tokens, as generate does

            fns.append(decode_step)
    sampling_module.processed_log_probs = implementations["sort-free"]
    cells = interleaved_ms(fns, args.steps)
    for i, name in enumerate(implementations):
        print(f"| {name} | {cells[2 * i]:.1f} | {cells[2 * i + 1]:.1f} | {cells[2 * i + 1] / cells[2 * i]:.2f}x |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "sampling":
        return sampling(sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] == "decode":
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("what", choices=["decode"])
        parser.add_argument("--preset", default="qwen3-1.7b", help="the model's shape (random bfloat16 weights)")
        parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
        parser.add_argument("--cache", type=int, default=1024)
        parser.add_argument("--context", type=int, default=512)
        parser.add_argument("--steps", type=int, default=128)
        parser.add_argument("--steps-per-call", type=int, default=1,
                            help="decode steps per jitted call (DecodeCore.generate_steps); 1: one token per call")
        parser.add_argument("--page-size", type=int, default=16, help="KV cache page size; 0: a contiguous cache")
        return decode(parser.parse_args())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["30m", "150m"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps-per-call", type=int, default=8, help="decode steps per jitted call (generate's)")
    args = parser.parse_args()
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    dev = jax.devices()[0]
    print(f"Generated tokens/s, batch {args.batch}, {args.prompt}-token prompts, {args.new} new tokens, greedy, "
          f"float32, {args.steps_per_call} decode steps per call, best of {args.repeats}; {dev.platform} ({dev.device_kind}), {platform.machine()}, "
          f"JAX {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {datetime.date.today().isoformat()}\n")
    print("| model | parameters | jackpot_jax tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        cfg = config(size)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()
        with tempfile.TemporaryDirectory() as path:
            hf_run = theirs(model, prompts, args.new, path)
        t_ours, out_ours = best(ours(model, prompts, args.new, args.steps_per_call), args.repeats)
        t_theirs, out_theirs = best(hf_run, args.repeats)
        same = np.mean([a == b for a, b in zip(out_ours, out_theirs)])
        tokens = args.batch * args.new
        print(f"| {size} | {cfg.num_params() / 1e6:.0f}M | {tokens / t_ours:,.0f} | {tokens / t_theirs:,.0f} "
              f"| {t_theirs / t_ours:.2f}x | (identical completions: {same:.0%})", flush=True)


if __name__ == "__main__":
    main()
