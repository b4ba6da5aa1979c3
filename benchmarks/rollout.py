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
``--context`` filled positions (``--mixed``: spread evenly over a quarter to 7/4 of it, the same mean)
and the timed ``--steps`` steps go on from there. Each ``--paged-impls`` entry is the model's
``paged_attention_impl`` (``xla`` reads every page the table spans, ``pallas`` a slot's live pages;
``--page-size 0``: the whole contiguous cache, dense, masked), so a second floor counts all ``--cache``
positions.

    python benchmarks/rollout.py decode [--preset qwen3-1.7b] [--batches 1 64] [--cache 1024] [--context 512] \
        [--mixed] [--steps 128] [--steps-per-call 1] [--page-size 16] [--paged-impls auto]

``sampling`` times ``sample`` (jitted, random normal ``[B, V]`` logits times ``--scale``, ``logprobs_top_k`` 20) at
top_p = 1, top_p = 0.95 and top_k = 50 with the sort-free ``processed_logits`` and the sorting
``processed_logits_reference``, then a decode step (``DecodeCore.generate_steps``, one step per call) of a small
Qwen3 (hidden 256, 4 layers, tied embeddings, vocabulary 151,936, random weights) at top_p = 1 and 0.95.

    python benchmarks/rollout.py sampling [--batches 32 64] [--vocabs 32000 151936] [--repeats 5] [--steps 20]

``kv-budget`` runs the same requests (16 prompts x n = 8, up to 1,024 new tokens, a random model's EOS)
through a contiguous cache of 16 slots and through paged engines of 64 and 128 slots whose pools hold
the same number of KV positions: the concurrent sequences each fits (mean and peak), preemptions,
tokens/s, and the share of completions equal to the contiguous engine's.

    python benchmarks/rollout.py kv-budget [--budget-slots 16] [--paged-slots 64 128] [--new 1024]

``grpo`` times the batch our RL driver generates: 8 prompts of 64-128 tokens x n=8 samples, exactly
``--new`` tokens each (no EOS), temperature 1, top-k off, at each ``--top-p``, float32, a ~11M-parameter
Qwen3 with random weights (V=32,000) saved once and run by ``generate`` (64 slots, ``logprobs_top_k=20``),
CTranslate2 ``generate_batch`` and ``transformers`` ``generate`` (2 threads); then, with every slot
running, ``generate`` against ``DecodeCore.generate_steps`` alone (the same calls back to back, no host
work). ``-P``: the script's folder off ``sys.path`` (its ``kernels.py`` shadows the ``kernels`` package
that ``transformers`` imports when it is installed). Needs the ``bench`` extra (ctranslate2).

    python -P benchmarks/rollout.py grpo [--top-p 1 0.95] [--repeats 3] [--steps-per-call 8]

Prints Markdown rows for BENCHMARKS.md with the device, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
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
from pallas_kernels.paged_attention import IMPLS as PAGED_ATTENTION_IMPLS

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
    per_call = args.steps_per_call
    batches = {batch: slot_contexts(batch, args.context, args.mixed) for batch in args.batches}
    for batch, contexts in batches.items():
        if contexts.max() + args.steps + 2 * per_call + 1 > args.cache:
            raise SystemExit(f"--cache {args.cache} is too small: batch {batch} needs {contexts.max()} context "
                             f"positions + {args.steps + 2 * per_call + 1} steps")
    cfg = preset(args.preset)
    bandwidth = copy_bandwidth()
    weight_bytes = cfg.num_params() * cfg.jnp_param_dtype.itemsize
    kv_per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * cfg.jnp_dtype.itemsize
    dev = jax.devices()[0]
    spread = "spread over [1/4, 7/4] of it" if args.mixed else "every slot"
    print(f"Decode step, {args.preset} shape ({cfg.num_params() / 1e9:.2f}B parameters, "
          f"{weight_bytes / 2**30:.2f} GiB), {cfg.dtype}, cache {args.cache} positions "
          f"(page size {args.page_size or 'contiguous'}), context {args.context} ({spread}) + {args.steps} steps, "
          f"{per_call} steps per call, median over {args.steps} steps; copy bandwidth measured "
          f"{bandwidth / 1e12:.2f} TB/s; "
          f"{dev.platform} ({dev.device_kind}), JAX {jax.__version__}, {datetime.date.today().isoformat()}\n")
    print("| impl | batch | ms per step | tokens/s | floor, live KV (ms) | vs floor | floor, whole cache (ms) "
          "| vs floor |")
    print("|---|---|---|---|---|---|---|---|")
    for impl in args.paged_impls:
        model = Transformer(cfg.replace(paged_attention_impl=impl), rngs=nnx.Rngs(0))
        for batch, contexts in batches.items():
            step = decode_step_seconds(model, batch, contexts, args)
            live = float(np.sum(contexts + 2 * per_call + args.steps / 2))
            floor = (weight_bytes + live * kv_per_position) / bandwidth
            floor_cache = (weight_bytes + batch * args.cache * kv_per_position) / bandwidth
            print(f"| {impl} | {batch} | {1e3 * step:.3f} | {batch / step:,.0f} | {1e3 * floor:.3f} | "
                  f"{step / floor:.2f}x | {1e3 * floor_cache:.3f} | {step / floor_cache:.2f}x |", flush=True)
        del model


def slot_contexts(batch, context, mixed):
    """Each slot's filled positions: ``context``, or spread evenly over [context / 4, 7 context / 4]."""
    if not mixed:
        return np.full(batch, context)
    return np.round(np.linspace(context / 4, 7 * context / 4, batch)).astype(int)


def decode_step_seconds(model, batch, contexts, args):
    """The median seconds per step of ``generate_steps`` over random caches of ``contexts`` positions."""
    cfg, per_call = model.config, args.steps_per_call
    core = DecodeCore(model, max_concurrent_decodes=batch, max_prefill_length=16, max_target_length=args.cache,
                      page_size=args.page_size or None)
    state = core.init_decode_state()
    for slot in range(batch if core.paged else 0):  # the pages of every position the timed steps write
        core.pages.reserve(slot, int(contexts[slot]) + 2 * per_call + args.steps + 1)
    keys = iter(jax.random.split(jax.random.key(1), 2 * cfg.num_hidden_layers))
    fill = lambda c: jax.random.normal(next(keys), c.shape, c.dtype)
    cache = state.cache._replace(k=tuple(map(fill, state.cache.k)), v=tuple(map(fill, state.cache.v)),
                                 lengths=jnp.asarray(contexts, jnp.int32))
    state = state._replace(cache=cache, tokens=jnp.asarray(np.arange(batch) % cfg.vocab_size, jnp.int32))
    for _ in range(2):  # compile, warm up
        state, drawn = core.generate_steps(core.params, state, per_call)
    jax.device_get(drawn.sampled.tokens)
    times = []
    for _ in range(max(1, args.steps // per_call)):
        start = time.perf_counter()
        state, drawn = core.generate_steps(core.params, state, per_call)
        jax.device_get(drawn.sampled.tokens)  # the host needs the tokens, as generate does
        times.append((time.perf_counter() - start) / per_call)
    return float(np.median(times))


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
    implementations = {"sort-free": sampling_module.processed_logits,
                       "reference (sort)": sampling_module.processed_logits_reference}
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
                    sampling_module.processed_logits = impl  # what sample calls, looked up when traced
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
    print("| processed_logits | top_p = 1 | top_p = 0.95 | ratio |")
    print("|---|---|---|---|")
    fns = []
    for impl in implementations.values():
        sampling_module.processed_logits = impl
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
    sampling_module.processed_logits = implementations["sort-free"]
    cells = interleaved_ms(fns, args.steps)
    for i, name in enumerate(implementations):
        print(f"| {name} | {cells[2 * i]:.1f} | {cells[2 * i + 1]:.1f} | {cells[2 * i + 1] / cells[2 * i]:.2f}x |")


GRPO_MODEL = dict(model_type="qwen3", vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)


class _Vocabulary:
    """The tokenizer CTranslate2's converter asks for: token i is ``<i>``; EOS is the last token."""

    bos_token, unk_token, pad_token = None, None, "<0>"

    def __init__(self, size):
        self.size, self.eos_token = size, f"<{size - 1}>"

    def get_vocab(self):
        return {f"<{i}>": i for i in range(self.size)}


def ct2_convert(path, out, vocab_size):
    """The checkpoint at ``path`` as a float32 CTranslate2 model in ``out``."""
    from ctranslate2.converters import TransformersConverter  # noqa: PLC0415

    class Converter(TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):
            return _Vocabulary(vocab_size)

    return Converter(path).convert(out, quantization="float32", force=True)


def grpo_ours(core, prompts, new, n, top_p, steps_per_call):
    def run():
        out = generate(core, prompts, new, temperature=1.0, top_p=top_p, n=n, seed=0, steps_per_call=steps_per_call)
        assert all(t.shape == (new, core.logprobs_top_k) for t in out.topk_logprobs)
        return out.completions

    return run


def grpo_ct2(path, prompts, new, n, top_p, intra, inter):
    """``generate_batch`` with ``num_hypotheses=n``, the prompts split into ``inter`` batches (one per
    parallel generation); ``return_scores``: each sample's log-prob (the peer's nearest to ours)."""
    import ctranslate2  # noqa: PLC0415

    generator = ctranslate2.Generator(path, device="cpu", compute_type="float32", intra_threads=intra,
                                      inter_threads=inter)
    tokens = [[f"<{t}>" for t in p] for p in prompts]

    def run():
        results = generator.generate_batch(tokens, max_batch_size=-(-len(prompts) // inter), num_hypotheses=n,
                                           max_length=new, min_length=new, include_prompt_in_result=False,
                                           sampling_topk=0, sampling_topp=top_p, sampling_temperature=1.0,
                                           return_scores=True)
        return [[int(t[1:-1]) for t in s] for r in results for s in r.sequences]

    return run


def grpo_hf(path, prompts, new, n, top_p):
    """``generate`` on a left-padded batch, ``num_return_sequences=n``; no scores asked for."""
    import torch  # noqa: PLC0415
    from transformers import Qwen3ForCausalLM  # noqa: PLC0415

    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=top_p, top_k=0,
                              num_return_sequences=n, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                              output_scores=False, pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()

    return run


def same_weights(path, ct2_path, prompt):
    """Largest difference of the per-token log-probs of ``prompt`` between transformers and CTranslate2."""
    import ctranslate2  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import Qwen3ForCausalLM  # noqa: PLC0415

    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    ref = logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy()
    scored = ctranslate2.Generator(ct2_path, device="cpu").score_batch([[f"<{t}>" for t in prompt]])[0].log_probs
    return float(np.abs(np.asarray(scored) - ref).max())


def steps_alone(core, prompts, n, new, top_p, steps_per_call, repeats):
    """Tokens/s of ``generate_steps`` alone with every slot running (its prompt's length filled, the
    pages of all its tokens held): ``new`` steps in calls of ``steps_per_call``, dispatched back to
    back, waited for at the end; best of ``repeats``."""
    slots = core.slots
    lengths = np.asarray([len(p) for p in prompts for _ in range(n)][:slots], np.int32)

    def full():
        state = core.init_decode_state()
        for slot, length in enumerate(lengths):  # each slot's pages, as generate's would hold them
            core.pages is None or core.pages.reserve(slot, int(length) + new)
        return state._replace(cache=state.cache._replace(lengths=jnp.asarray(lengths)),
                              tokens=jnp.arange(slots, dtype=jnp.int32),
                              sampling=SamplingParams.fill(slots, 1.0, top_p),
                              limit=jnp.full((slots,), new + 1, jnp.int32), finish=jnp.zeros((slots,), jnp.int32))

    times = []
    for _ in range(repeats + 1):  # the first compiles
        state = jax.block_until_ready(full())
        start = time.perf_counter()
        for _ in range(new // steps_per_call):
            state, drawn = core.generate_steps(core.params, state, steps_per_call)
        jax.block_until_ready(drawn)
        times.append(time.perf_counter() - start)
    return slots * (new // steps_per_call) * steps_per_call / min(times[1:])


def grpo_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["grpo"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sample (no EOS)")
    parser.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.95])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-call", type=int, default=8, help="decode steps per jitted call (generate's)")
    return parser.parse_args()


def grpo(args):
    import ctranslate2  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(2)
    transformers.logging.disable_progress_bar()
    cfg = ModelConfig(**GRPO_MODEL)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, length).tolist() for length in rng.integers(64, 129, args.prompts)]
    core = DecodeCore(model, max_concurrent_decodes=args.prompts * args.n, max_prefill_length=128,
                      max_target_length=128 + args.new, logprobs_top_k=20)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    tokens = args.prompts * args.n * args.new
    print(f"GRPO-shaped rollout: {args.prompts} prompts ({', '.join(str(len(p)) for p in prompts)} tokens) x "
          f"n={args.n}, {args.new} new tokens each (no EOS), temperature 1, top-k off, float32, Qwen3 "
          f"{cfg.num_params() / 1e6:.1f}M parameters (V={cfg.vocab_size:,}, random weights, one checkpoint); "
          f"ours: {core.slots} slots, logprobs_top_k={core.logprobs_top_k}, {args.steps_per_call} steps per call; "
          f"best of {args.repeats} after a warm-up. {cpu}, {os.cpu_count()} cores; JAX {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, ctranslate2 {ctranslate2.__version__}; "
          f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n")
    rows, sustained = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path, ct2_path = os.path.join(tmp, "hf"), os.path.join(tmp, "ct2")
        save_pretrained(model, path)
        ct2_convert(path, ct2_path, cfg.vocab_size)
        diff = same_weights(path, ct2_path, prompts[0])
        for top_p in args.top_p:
            engines = [("jackpot_jax generate", grpo_ours(core, prompts, args.new, args.n, top_p, args.steps_per_call)),
                       ("CTranslate2, 1 batch of 64 (intra 2, inter 1)",
                        grpo_ct2(ct2_path, prompts, args.new, args.n, top_p, 2, 1)),
                       ("CTranslate2, 2 batches of 32 (intra 1, inter 2)",
                        grpo_ct2(ct2_path, prompts, args.new, args.n, top_p, 1, 2)),
                       ("transformers generate", grpo_hf(path, prompts, args.new, args.n, top_p))]
            times = {}
            for name, run in engines:
                times[name], out = best(run, args.repeats)
                lengths = [len(c) for c in out]
                assert lengths == [args.new] * (args.prompts * args.n), f"{name}: {len(out)} samples, {set(lengths)}"
            ours = times["jackpot_jax generate"]
            rows += [f"| {name} | {top_p} | {tokens / t:,.0f} | {t / ours:.2f}x |" for name, t in times.items()]
            alone = steps_alone(core, prompts, args.n, args.new, top_p, args.steps_per_call, args.repeats)
            sustained.append(f"| {top_p} | {tokens / ours:,.0f} | {alone:,.0f} | {tokens / ours / alone:.2f}x |")
    print(f"Every engine produced {args.prompts * args.n} x {args.new} tokens (checked); transformers and "
          f"CTranslate2 score prompt 0 alike (log-probs within {diff:.1e}).\n")
    print("| engine | top_p | tokens/s | ours / peer |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nSustained, {core.slots} slots full: generate (the rows above) vs generate_steps alone ("
          f"{args.new // args.steps_per_call} calls of {args.steps_per_call} steps back to back, waited for at the "
          "end)\n")
    print("| top_p | generate tokens/s | generate_steps alone tokens/s | generate / alone |\n|---|---|---|---|")
    print("\n".join(sustained))


def kv_budget(argv):
    """Concurrent sequences at one KV budget: a contiguous cache (every slot holds max_target_length
    positions) against the paged one (pages for the tokens a sequence holds), the same requests."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kv-budget"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new", type=int, default=1024, help="max_new_tokens")
    parser.add_argument("--budget-slots", type=int, default=16, help="the budget: this many max_target_length slots")
    parser.add_argument("--paged-slots", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--eos", type=int, default=2, help="EOS ids (0..eos-1) of the 512-token vocabulary")
    args = parser.parse_args(argv)
    cfg = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 129, args.prompts)
    prompts = [rng.integers(args.eos, cfg.vocab_size, length).tolist() for length in lengths]
    target, page = 128 + args.new, 16
    budget = args.budget_slots * target  # KV positions
    engines = [("contiguous", args.budget_slots, DecodeCore(model, max_concurrent_decodes=args.budget_slots,
                                                            max_prefill_length=128, max_target_length=target,
                                                            page_size=None))]
    engines += [(f"paged, {page}-position pages", slots,
                 DecodeCore(model, max_concurrent_decodes=slots, max_prefill_length=128, max_target_length=target,
                            page_size=page, num_pages=budget // page + 1)) for slots in args.paged_slots]
    print(f"KV budget: {budget:,} positions ({args.budget_slots} slots of max_target_length {target}); "
          f"{args.prompts} prompts of 64-128 tokens x n={args.n}, temperature 1, up to {args.new} new tokens, "
          f"EOS ids 0..{args.eos - 1} of a 512-token random-weights Qwen3 (0.1M parameters, float32); "
          f"{jax.devices()[0].platform}, JAX {jax.__version__}, {datetime.date.today().isoformat()}\n")
    print("| KV cache | slots | concurrent sequences, mean | peak | preempted | generated tokens | tokens/s | "
          "completions equal to the contiguous engine's |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for name, slots, core in engines:
        run = lambda core=core: generate(core, prompts, args.new, n=args.n, seed=0, eos_token_ids=range(args.eos))
        run()  # compiles
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        tokens = sum(map(len, out.completions))
        first = first or out.completions
        same = np.mean([a == b for a, b in zip(out.completions, first)])
        print(f"| {name} | {slots} | {out.mean_concurrent:.1f} | {out.peak_concurrent} | {out.preempted} | "
              f"{tokens:,} | {tokens / seconds:,.0f} | {same:.1%} |", flush=True)
    lengths = np.asarray([len(c) for c in first])
    print(f"\nCompletion lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}. "
          "The engines sum attention in other orders (float32 rounding), which can flip a draw whose uniform falls "
          "within rounding of a CDF boundary.")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "kv-budget":
        return kv_budget(sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] == "sampling":
        return sampling(sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] == "grpo":
        return grpo(grpo_args())
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
        parser.add_argument("--mixed", action="store_true", help="slot contexts spread over [1/4, 7/4] of --context")
        parser.add_argument("--paged-impls", nargs="+", default=["auto"], choices=PAGED_ATTENTION_IMPLS,
                            help="the model's paged_attention_impl, each in turn")
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
          f"float32, {args.steps_per_call} decode steps per call, best of {args.repeats}; {dev.platform} "
          f"({dev.device_kind}), {platform.machine()}, "
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
