"""Rollout benchmark: generated tokens/s of ``jackpot_jax.rollout.generate`` against Hugging Face
``transformers`` ``generate`` (PyTorch, KV cache on) on the same weights.

Both generate exactly ``--new`` tokens for each of ``--batch`` prompts of ``--prompt`` tokens
(greedy; no EOS), float32; the time includes prefill. The two must produce the same tokens (checked).
Configs: ``30m`` and ``150m`` Qwen3-like models (vocabulary 32,768, tied embeddings).

    python benchmarks/rollout.py [--sizes 30m 150m] [--batch 32] [--prompt 64] [--new 128] [--repeats 2]

Prints Markdown rows for BENCHMARKS.md with the device, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jackpot_jax.models import ModelConfig, Transformer
from jackpot_jax.models.hf import save_pretrained
from jackpot_jax.rollout import DecodeCore, generate

SIZES = {
    "30m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, head_dim=64),
    "150m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64),
}


def config(size):
    return ModelConfig(vocab_size=32768, model_type="qwen3", tie_word_embeddings=True, max_position_embeddings=4096,
                       **SIZES[size])


def ours(model, prompts, new):
    core = DecodeCore(model, max_concurrent_decodes=len(prompts), max_prefill_length=len(prompts[0]),
                      max_target_length=len(prompts[0]) + new)
    return lambda: generate(core, prompts, new, temperature=0.0).completions


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["30m", "150m"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    dev = jax.devices()[0]
    print(f"Generated tokens/s, batch {args.batch}, {args.prompt}-token prompts, {args.new} new tokens, greedy, "
          f"float32, best of {args.repeats}; {dev.platform} ({dev.device_kind}), {platform.machine()}, "
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
        t_ours, out_ours = best(ours(model, prompts, args.new), args.repeats)
        t_theirs, out_theirs = best(hf_run, args.repeats)
        same = np.mean([a == b for a, b in zip(out_ours, out_theirs)])
        tokens = args.batch * args.new
        print(f"| {size} | {cfg.num_params() / 1e6:.0f}M | {tokens / t_ours:,.0f} | {tokens / t_theirs:,.0f} "
              f"| {t_theirs / t_ours:.2f}x | (identical completions: {same:.0%})", flush=True)


if __name__ == "__main__":
    main()
