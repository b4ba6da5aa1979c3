"""Attention for training and prefill (``pallas_kernels.attention``): memory and time, dense against blockwise.

``memory``: XLA's ``compile().memory_analysis()`` (nothing runs) of one decoder block of ``--preset``'s shape
(``--dtype``, one sequence of T tokens, causal), forward + backward (gradients of every parameter
and of the input), at each ``--lengths`` T, for each ``--impls`` entry (the model's ``attention_impl``).

    python benchmarks/attention.py memory [--preset qwen3-8b] [--lengths 2048 4096 9216 16384] \\
        [--impls reference blockwise] [--dtype bfloat16]

``time``: forward + backward of the attention op alone (``[--batch, T, H, d]`` queries, GQA, causal), best of
``--repeats``, at each ``--lengths`` T, for each ``--impls`` entry (blockwise at each ``--blocks`` tile size;
``pallas`` on a TPU or GPU), on this backend.

    python benchmarks/attention.py time [--lengths 256 512 1024 2048] [--batch 1] [--heads 4] [--kv-heads 2] \
        [--head-dim 64] [--blocks 256 512] [--impls reference blockwise]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.models import preset
from jackpot_jax.models.transformer import Block
from pallas_kernels import attention as at
from pallas_kernels.attention import Mask


def device_line():
    dev = jax.devices()[0]
    return (f"{dev.platform} ({dev.device_kind}), {platform.processor() or platform.machine()}, JAX {jax.__version__}, "
            f"{datetime.date.today().isoformat()}")


def block_scratch(config, t):
    """Temp bytes of one block's forward + backward at T = ``t`` (abstract weights: nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))
    mask = Mask.causal(jnp.ones((1, t), jnp.int32))

    def loss(state, x):
        out, _ = nnx.merge(graphdef, state)(x, mask.q_positions, mask)
        return jnp.sum(out.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((1, t, config.hidden_size), config.jnp_dtype)
    compiled = jax.jit(jax.grad(loss, (0, 1))).trace(state, x).lower().compile()
    return compiled.memory_analysis().temp_size_in_bytes


def op_scratch(config, t):
    """Temp bytes of the attention op's forward + backward (``[1, T, H, d]`` queries, causal)."""
    mask = Mask.causal(jnp.ones((1, t), jnp.int32))
    loss = lambda q, k, v: jnp.sum(at.attention(q, k, v, mask, impl=config.attention_impl).astype(jnp.float32))
    s, c = jax.ShapeDtypeStruct, config
    shapes = (s((1, t, c.num_attention_heads, c.head_dim), c.jnp_dtype),
              *[s((1, c.num_key_value_heads, t, c.head_dim), c.jnp_dtype)] * 2)
    return jax.jit(jax.grad(loss, (0, 1, 2))).trace(*shapes).lower().compile().memory_analysis().temp_size_in_bytes


def memory(args):
    base = preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, num_hidden_layers=1)
    what = "decoder block" if args.op == "block" else "attention op"
    print(f"Scratch (temp bytes, compile().memory_analysis()) of one {args.preset}-shape {what}, forward + "
          f"backward, one sequence, {args.dtype}, tiles of {at.BLOCK}; {device_line()}\n")
    scratch = block_scratch if args.op == "block" else op_scratch
    ratios = [f"{i} / {args.impls[0]}" for i in args.impls[1:]]
    print("| T | " + " | ".join(args.impls) + " | " + " | ".join(ratios) + " |")
    print("|---" * (2 * len(args.impls)) + "|")
    for t in args.lengths:
        temps = [scratch(base.replace(attention_impl=impl), t) for impl in args.impls]
        print(f"| {t:,} | " + " | ".join(f"{b / 2**30:.2f} GiB" for b in temps) + " | "
              + " | ".join(f"{100 * b / temps[0]:.2f}%" for b in temps[1:]) + " |", flush=True)


def best(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def timing(args):
    runs = [(impl, b) for impl in args.impls for b in (args.blocks if impl == "blockwise" else [None])]
    print(f"Attention forward + backward, [{args.batch}, T, {args.heads}, {args.head_dim}] queries over "
          f"{args.kv_heads} key-value heads, causal, {args.dtype}, best of {args.repeats}; {device_line()}\n")
    print("| T | " + " | ".join(f"{impl}{f' {b}' if b else ''} (ms)" for impl, b in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    for t in args.lengths:
        q = jnp.asarray(rng.standard_normal((args.batch, t, args.heads, args.head_dim)), dtype)
        kv_shape = (args.batch, args.kv_heads, t, args.head_dim)
        k, v = (jnp.asarray(rng.standard_normal(kv_shape), dtype) for _ in range(2))
        mask = Mask.causal(jnp.ones((args.batch, t), jnp.int32))

        def step(impl, block):
            loss = lambda q, k, v: jnp.sum(at.attention(q, k, v, mask, impl=impl, block_q=block, block_k=block)
                                           .astype(jnp.float32))
            return jax.jit(jax.grad(loss, (0, 1, 2)))

        row = [best(step(impl, b), (q, k, v), args.repeats) for impl, b in runs]
        print(f"| {t:,} | " + " | ".join(f"{1e3 * s:.1f}" for s in row) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "time"])
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--op", choices=["block", "attention"], default="block", help="memory: what is compiled")
    parser.add_argument("--impls", nargs="+", default=["reference", "blockwise"], choices=at.IMPLS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dtype", help="default: bfloat16 (memory), float32 (time)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.what == "memory":
        args.lengths, args.dtype = args.lengths or [2048, 4096, 9216, 16384], args.dtype or "bfloat16"
        return memory(args)
    args.lengths, args.dtype = args.lengths or [256, 512, 1024, 2048], args.dtype or "float32"
    return timing(args)


if __name__ == "__main__":
    main()
