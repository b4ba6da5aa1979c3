"""Model benchmarks: forward throughput of ``jackpot_jax.models.Transformer``.

``compare`` runs our model and Hugging Face ``transformers`` (PyTorch) on the same weights (ours,
written with ``save_pretrained`` and read back by ``Qwen3ForCausalLM``) and the same tokens, float32,
and reports tokens/s of the forward pass that returns the logits, after checking that the two
logits agree. The default config is a ~100M-parameter Qwen3 (tied embeddings).

``mfu`` (GPU only) measures the forward model FLOPs utilization of Qwen3-1.7B-shaped random weights
in bfloat16. FLOPs per forward = 2 * P * B * T + 4 * B * T^2 * L * H * d_head: the matmuls over the
P weights that multiply activations (every parameter counted once, the tied embedding as the
unembedding, minus an untied input embedding, which is a lookup), plus QK^T and AV over the full
T x T scores (XLA computes them whole; the causal mask is not discounted).

    python benchmarks/models.py compare [--batch 4] [--seq 256] [--repeats 5] [--layers 12] [--vocab 32768]
    python benchmarks/models.py mfu [--batch 4] [--seq 2048] [--repeats 5] [--peak-tflops 989]

Results are printed as Markdown for BENCHMARKS.md, with the device, versions, date and command.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax.models import ModelConfig, Transformer, preset
from jackpot_jax.models.hf import save_pretrained


def config_100m(layers, vocab):
    return ModelConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                       num_attention_heads=12, num_key_value_heads=4, head_dim=64, model_type="qwen3",
                       tie_word_embeddings=True)


def jax_forward(model):
    """A jitted ``(tokens) -> logits`` with the parameters as jit arguments, not constants."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return lambda tokens: forward(state, tokens)


def torch_forward(model, path):
    import torch  # noqa: PLC0415 (only ``compare`` needs it)
    from transformers import Qwen3ForCausalLM, logging  # noqa: PLC0415

    logging.disable_progress_bar()
    save_pretrained(model, path)
    hf = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def forward(tokens):
        with torch.no_grad():
            return hf(torch.from_numpy(tokens)).logits

    return forward


def best_time(fn, tokens, repeats):
    """Seconds of the fastest of ``repeats`` calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn(tokens))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(tokens))
        times.append(time.perf_counter() - start)
    return min(times)


def header(libraries):
    dev = jax.devices()[0]
    versions = ", ".join(f"{name} {version}" for name, version in libraries)
    return (f"{dev.platform} ({dev.device_kind}), {platform.processor() or platform.machine()}, {versions}, "
            f"{datetime.date.today().isoformat()}; `{shlex.join(['python', *sys.argv])}`")


def compare(args):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config = config_100m(args.layers, args.vocab)
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int64)
    with tempfile.TemporaryDirectory() as path:
        impls = {"jackpot_jax (JAX, jit)": jax_forward(model), "transformers (PyTorch)": torch_forward(model, path)}
    ours, theirs = (impl(tokens) for impl in impls.values())
    diff = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
    print(f"Forward to logits, {config.num_params() / 1e6:.1f}M parameters, B={args.batch}, T={args.seq}, float32, "
          f"best of {args.repeats}; torch threads {torch.get_num_threads()}; max |logits diff| {diff:.2e}")
    print(header([("JAX", jax.__version__), ("torch", torch.__version__),
                  ("transformers", transformers.__version__)]) + "\n")
    print("| implementation | tokens/s | seconds per forward | ratio |")
    print("|---|---|---|---|")
    seconds = {name: best_time(impl, tokens, args.repeats) for name, impl in impls.items()}
    reference = seconds["transformers (PyTorch)"]
    for name, sec in seconds.items():
        print(f"| {name} | {args.batch * args.seq / sec:,.0f} | {sec:.3f} | {reference / sec:.2f}x |")
    print("\nratio: throughput relative to transformers (higher is faster).")


def forward_flops(config, batch, seq):
    """2 * P * B * T + 4 * B * T^2 * L * H * d_head (see the module docstring)."""
    matmul_params = config.num_params() - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    attention = 4 * batch * seq**2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 2 * matmul_params * batch * seq + attention


def mfu(args):
    if jax.default_backend() != "gpu":
        sys.exit(f"mfu needs a GPU (jax.default_backend() is {jax.default_backend()!r}); "
                 "on CPU run `compare` instead.")
    config = preset("qwen3-1.7b")
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    sec = best_time(jax_forward(model), tokens, args.repeats)
    flops = forward_flops(config, args.batch, args.seq)
    print(f"Forward MFU, qwen3-1.7b ({config.num_params() / 1e9:.2f}B parameters), bfloat16, B={args.batch}, "
          f"T={args.seq}, best of {args.repeats}, peak {args.peak_tflops:g} TFLOP/s; "
          f"{header([('JAX', jax.__version__)])}\n")
    print("| tokens/s | seconds per forward | TFLOP per forward | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    print(f"| {args.batch * args.seq / sec:,.0f} | {sec:.4f} | {flops / 1e12:.2f} | {flops / sec / 1e12:.1f} "
          f"| {100 * flops / sec / (args.peak_tflops * 1e12):.1f}% |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "mfu"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12, help="compare: number of layers")
    parser.add_argument("--vocab", type=int, default=32768, help="compare: vocabulary size")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="mfu: peak dense TFLOP/s (H100 bf16: 989)")
    args = parser.parse_args()
    args.seq = args.seq or {"compare": 256, "mfu": 2048}[args.what]
    (compare if args.what == "compare" else mfu)(args)


if __name__ == "__main__":
    main()
