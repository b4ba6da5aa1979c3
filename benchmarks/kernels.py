"""Kernel benchmarks: memory (compile-time, deterministic) and time of the full Jackpot statistics.

The measured function is what one update step needs from the vocabulary, forward and backward:
both models' token stats (policy p_new; actor p_inf at temperature 0.8), the top-k and exact OBRS
normalizers, and the forward distillation KL, differentiated in both models' h and w.

    python benchmarks/kernels.py memory [--tokens 2048 8192 32768] [--dim 2048] [--vocab 151936]
    python benchmarks/kernels.py time [--tokens 1024] [--dim 256] [--vocab 32768] [--repeats 5]
        [--impls reference chunked pallas floor]

On a GPU/TPU, the acceptance shape is ``time --tokens 8192 --dim 2048 --vocab 151936 --impls
reference chunked pallas floor`` (with ``--dtype float32`` too); ``floor`` times the LM-head
matmuls alone (see :func:`lm_head_floor`).

Results are printed as Markdown rows for BENCHMARKS.md, with the device and date.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

K = 20
LAM = 1.0
TEMPERATURE_INF = 0.8


def jackpot_statistics(h_pol, w_pol, h_act, w_act, targets, impl, block_v=None):
    """``fused_jackpot_stats`` reduced to a scalar that depends on every output."""
    stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, K, LAM, temperature_actor=TEMPERATURE_INF,
                                   exact=True, impl=impl, block_v=block_v)
    return (jnp.sum(stats.logp_new) + jnp.sum(stats.lse_new) + jnp.sum(stats.logp_actor) + jnp.sum(stats.lse_actor)
            + jnp.sum(stats.distill_kl) + jnp.sum(stats.z_topk + stats.z_exact))


def separate_ops(h_pol, w_pol, h_act, w_act, targets, impl, block_v=None):
    """The same statistics from the four separate ops (for comparison)."""
    opts = dict(impl=impl, block_v=block_v)
    logp_new, lse_new, _, _ = pk.fused_token_stats(h_pol, w_pol, targets, K, **opts)
    logp_act, lse_act, _, _ = pk.fused_token_stats(h_act, w_act, targets, K, temperature=TEMPERATURE_INF, **opts)
    z_topk, z_exact = pk.fused_obrs_normalizer(h_act, w_act, lse_act, h_pol, w_pol, lse_new, LAM, K, True,
                                               temperature_inf=TEMPERATURE_INF, **opts)
    kl = pk.fused_distill_kl(h_pol, w_pol, h_act, w_act, "forward", **opts)
    return jnp.sum(logp_new) + jnp.sum(logp_act) + jnp.sum(kl) + jnp.sum(z_topk + z_exact)


def lm_head_floor(h_pol, w_pol, h_act, w_act, g_pol, g_act):
    """The matmuls any forward + backward over both heads must do: each model's logits ``h @ w``
    and, for a logits cotangent ``g [N, V]``, ``g @ w.T`` and ``h.T @ g`` (3 N x D x V products
    per model), reduced so that nothing else is timed. The streaming ops recompute the logits once
    more in the backward pass and run a second forward pass, so ~5/3 of this is their ideal."""
    total = 0.0
    for h, w, g in ((h_pol, w_pol, g_pol), (h_act, w_act, g_act)):
        f32 = jnp.float32
        total += (jnp.sum(jnp.dot(h, w, preferred_element_type=f32)) + jnp.sum(jnp.dot(g, w.T, preferred_element_type=f32))
                  + jnp.sum(jnp.dot(h.T, g, preferred_element_type=f32)))
    return total


def step_fn(impl, block_v=None, fn=None):
    grad = jax.grad(fn or jackpot_statistics, argnums=(0, 1, 2, 3))
    return jax.jit(lambda *args: grad(*args, impl, block_v))


def shapes(n, d, v, dtype):
    s = jax.ShapeDtypeStruct
    return (s((n, d), dtype), s((d, v), dtype), s((n, d), dtype), s((d, v), dtype), s((n,), jnp.int32))


def device_line():
    dev = jax.devices()[0]
    return (f"{dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), {platform.processor() or platform.machine()}, "
            f"JAX {jax.__version__}, {datetime.date.today().isoformat()}")


def memory(args):
    print(f"Memory: temp bytes from compile().memory_analysis(); D={args.dim}, V={args.vocab}, k={K}, "
          f"{args.dtype}; {device_line()}\n")
    print("| N | reference | chunked, fused | fused / reference | chunked, separate ops | separate / reference |")
    print("|---|---|---|---|---|---|")
    dtype = jnp.dtype(args.dtype)
    for n in args.tokens:
        temps = {}
        for name, impl, fn in (("reference", "reference", None), ("fused", "chunked", None),
                               ("separate", "chunked", separate_ops)):
            compiled = step_fn(impl, fn=fn).lower(*shapes(n, args.dim, args.vocab, dtype)).compile()
            temps[name] = compiled.memory_analysis().temp_size_in_bytes
        ref = temps["reference"]
        print(f"| {n} | {ref / 2**30:.2f} GiB | {temps['fused'] / 2**20:.0f} MiB | {100 * temps['fused'] / ref:.2f}% "
              f"| {temps['separate'] / 2**20:.0f} MiB | {100 * temps['separate'] / ref:.2f}% |", flush=True)


def timing(args):
    rng = np.random.default_rng(0)
    n, d, v = args.tokens[0], args.dim, args.vocab
    dtype = jnp.dtype(args.dtype)
    inputs = (jnp.asarray(rng.normal(size=(n, d)), dtype), jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype),
              jnp.asarray(rng.normal(size=(n, d)), dtype), jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype),
              jnp.asarray(rng.integers(0, v, n), jnp.int32))
    print(f"Time: forward + backward, N={n}, D={d}, V={v}, k={K}, {args.dtype}, best of {args.repeats}; {device_line()}\n")
    print("| impl | block_v | seconds | vs reference |")
    print("|---|---|---|---|")
    runs = []
    for impl in args.impls:
        if impl == "chunked":
            runs += [("chunked", b) for b in args.blocks]
        else:
            runs.append((impl, None))
    results = {}
    for impl, block_v in runs:
        if impl == "floor":
            cot = tuple(jnp.asarray(rng.normal(size=(n, v)), dtype) for _ in range(2))
            fn, run_inputs = jax.jit(lm_head_floor), inputs[:4] + cot
        else:
            fn, run_inputs = step_fn(impl, block_v), inputs
        jax.block_until_ready(fn(*run_inputs))
        best = min(_timed(fn, run_inputs) for _ in range(args.repeats))
        results[(impl, block_v)] = best
        ref = results.get(("reference", None))
        ratio = f"{best / ref:.2f}x" if ref else "-"
        print(f"| {impl} | {block_v or '-'} | {best:.3f} | {ratio} |", flush=True)


def _timed(fn, inputs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "time"])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--impls", nargs="+", default=["reference", "chunked"],
                        choices=["reference", "chunked", "pallas", "floor"])
    args = parser.parse_args()
    defaults = {"memory": ([2048, 8192, 32768], 2048, 151936), "time": ([1024], 256, 32768)}[args.what]
    args.tokens = args.tokens or defaults[0]
    args.dim = args.dim or defaults[1]
    args.vocab = args.vocab or defaults[2]
    (memory if args.what == "memory" else timing)(args)


if __name__ == "__main__":
    main()
