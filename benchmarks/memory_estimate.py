"""Memory estimates for the paper presets (``configs/qwen*.py``): what a run holds, and on how many
devices it fits. Arithmetic from the model shapes (``jackpot_jax.models.config.preset``) and the
presets' settings; nothing is allocated. Estimates, not measurements.

    PYTHONPATH=. python benchmarks/memory_estimate.py

What it assumes (GB = 10^9 bytes; T = data.max_prompt_tokens + rollout.max_new_tokens):

- Parameters stay in the checkpoint's dtype (bfloat16 for these models: ``hf.from_pretrained``
  keeps ``torch_dtype``) and optax's AdamW keeps its moments in the parameters' dtype. The script
  checks the second point on the trainer's own optimizer (``train.build.make_optimizer``) and prints
  the moment dtypes. So a trained model holds 2 (parameter) + 2 (gradient) + 2 + 2 (mu, nu) = 8 bytes
  per parameter, plus 2 for the gradient-accumulation sum the update's scan carries beside each
  micro-batch's gradient: 10 bytes. The "fp32" columns are the same with float32 parameters and
  moments (20 bytes), for comparison (see the bf16 rounding check the script prints).
- Copies: the rollout engine keeps its own copy of the actor's parameters, and evaluation builds a
  decoding core with its own copy of the policy's.
- KV caches (bfloat16) exist only while generating: rollouts (the actor, ``max_concurrent_decodes``
  slots of T positions) and evaluation (the policy, the same slots). Per position:
  2 (K and V) x layers x kv_heads x head_dim x 2 bytes.
- Update activations, per sequence of T tokens, with remat (``ModelConfig.remat``): both models run
  forward and backward in one loss, so each keeps its layers' bf16 inputs (layers x hidden x 2 bytes
  per token); one layer at a time is recomputed (about 4 x (q + o + k + v + 3 x hidden + 3 x
  intermediate) bytes per token, its activations and their gradients); the vocabulary-streaming
  kernels hold one 8,192-wide block of fp32 logits and two more such arrays per model per token.
  Attention materializes its scores (``grouped_attention``: no flash attention), so the layer being
  recomputed also holds about 12 bytes (fp32 scores, bf16 probabilities, their gradients) x heads x
  T^2 per sequence: at T = 9,216 that term dominates.
- Peak = persistent (trained states + copies) + the largest phase (rollout KV, eval KV, or one
  micro-batch's activations). Per device: persistent and KV sharded evenly over N devices, and
  ceil(micro_batch_size / N) sequences' activations on each. XLA's temporaries, fragmentation and
  the allocator's reserve are not counted: compare with about 90% of a device's memory (on GPUs set
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; the default 0.75 leaves less).
"""
from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpot_jax.models.config import preset
from jackpot_jax.train.build import make_optimizer

PRESETS = ("qwen25_1p5b_to_3b_math", "qwen3_1p7b_to_4b_deepscaler", "qwen3_1p7b_to_8b_deepscaler")
MODELS = ("qwen2.5-1.5b", "qwen2.5-3b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")
BLOCK_V = 8192  # the vocabulary block of the streaming kernels on GPU and TPU (pallas_kernels._BLOCK_V)
GB = 1e9
# (name for n devices, memory per device in GB); a TPU v5p-2n slice has n chips
DEVICES = ((lambda n: f"{n} x H100 80GB", 80), (lambda n: f"TPU v5p-{2 * n} ({n} chips, 95 GB each)", 95),
           (lambda n: f"{n} x H200 141GB", 141))
USABLE = 0.9


def load_preset(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"jackpot_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def optimizer_dtypes(section):
    """The trainer's optimizer (``make_optimizer``) on bf16 parameters: the dtypes of its AdamW
    moments, and the fraction of bf16 weights (magnitude ~0.02) that one update at ``section.lr``
    changes at all (the rest round back to the same bf16 value)."""
    params = {"w": (0.02 * jax.random.normal(jax.random.key(0), (512, 512))).astype(jnp.bfloat16)}
    grads = {"w": jax.random.normal(jax.random.key(1), (512, 512)).astype(jnp.bfloat16)}
    tx, _ = make_optimizer(section, total_updates=100)
    state = tx.init(params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    updates, state = tx.update(grads, state, params)
    for _ in range(20):  # past the warmup, at the full learning rate
        updates, state = tx.update(grads, state, params)
    changed = float(jnp.mean(optax.apply_updates(params, updates)["w"] != params["w"]))
    return adam.mu["w"].dtype, adam.nu["w"].dtype, changed


def kv_bytes_per_position(cfg):
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2


def activation_bytes(models, tokens):
    """``(per-token bytes, attention bytes)`` of one sequence in the update (see the docstring)."""
    saved = sum(c.num_hidden_layers * c.hidden_size * 2 for c in models)
    layer = max(4 * (2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
                     + 3 * c.hidden_size + 3 * c.intermediate_size) for c in models)
    kernels = len(models) * 3 * BLOCK_V * 4
    attention = max(12 * c.num_attention_heads * tokens ** 2 for c in models)
    return saved + layer + kernels, attention


def estimate(config):
    policy, actor = preset(config.policy.preset), preset(config.actor.preset)
    tokens = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    slots, micro = config.rollout.max_concurrent_decodes, config.algorithm.micro_batch_size
    n_pol, n_act = policy.num_params(), actor.num_params()
    trained = n_pol + (n_act if config.algorithm.train_actor else 0)
    per_token, attention = activation_bytes((policy, actor), tokens)
    phases = {"rollout_kv": slots * tokens * kv_bytes_per_position(actor),
              "eval_kv": slots * tokens * kv_bytes_per_position(policy) if config.train.eval_every else 0,
              "act_seq": per_token * tokens + attention}
    out = dict(tokens=tokens, slots=slots, micro=micro, n_pol=n_pol, n_act=n_act, per_token=per_token,
               attention=attention, **phases)
    for name, state_bytes, param_bytes in (("bf16", 10, 2), ("fp32", 20, 4)):
        persistent = trained * state_bytes + (n_act + n_pol) * param_bytes
        out[f"{name}_persistent"] = persistent
        out[f"{name}_checkpoint"] = trained * 3 * param_bytes  # parameters, mu, nu
        out[f"{name}_peak"] = persistent + max(phases["rollout_kv"], phases["eval_kv"], micro * phases["act_seq"])
        out[f"{name}_dev1"] = persistent + max(phases.values())  # one device, micro_batch_size=1
        for n in (8, 16):
            out[f"{name}_dev{n}"] = persistent / n + max(phases["rollout_kv"] / n, phases["eval_kv"] / n,
                                                         math.ceil(micro / n) * phases["act_seq"])
    return out


def recommend(row, name):
    """The device counts of each kind (8 or 16) on which the estimate fits, smallest first."""
    fits = [next((device(n) for n in (8, 16) if row[f"{name}_dev{n}"] <= USABLE * memory * GB), None)
            for device, memory in DEVICES]
    return ", ".join(fit for fit in fits if fit) or "more than 16 devices"


def main():
    print(f"jax {jax.__version__}, optax {optax.__version__}\n")
    print("| model | parameters | KV cache per position |")
    print("|---|---:|---:|")
    for name in MODELS:
        cfg = preset(name)
        print(f"| {name} | {cfg.num_params() / 1e9:.3f} B | {kv_bytes_per_position(cfg) / 1024:.0f} KiB |")

    configs = {name: load_preset(name) for name in PRESETS}
    lr = configs[PRESETS[-1]].optim.policy.lr
    mu, nu, changed = optimizer_dtypes(configs[PRESETS[-1]].optim.policy)
    print(f"\nThe trainer's AdamW on bfloat16 parameters keeps mu as {np.dtype(mu).name} and nu as "
          f"{np.dtype(nu).name}. One update at lr={lr:g} changes {100 * changed:.1f}% of bfloat16 weights of "
          f"magnitude ~0.02 (the rest round back to the same value).\n")

    rows = {name: estimate(config) for name, config in configs.items()}
    print("| preset (actor -> policy) | T | slots | micro | rollout KV | eval KV | act/token | attention/seq "
          "| act/micro-batch | bf16: persistent | peak | per device (8 / 16) | 1 device, micro 1 | checkpoint "
          "| fp32: peak | per device (8 / 16) | 1 device, micro 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        c = configs[name]
        print(f"| {name} ({c.actor.preset} -> {c.policy.preset}) | {r['tokens']} | {r['slots']} | {r['micro']} "
              f"| {r['rollout_kv'] / GB:.0f} GB | {r['eval_kv'] / GB:.0f} GB | {r['per_token'] / 1e3:.0f} KB "
              f"| {r['attention'] / GB:.1f} GB | {r['micro'] * r['act_seq'] / GB:.0f} GB "
              f"| {r['bf16_persistent'] / GB:.0f} GB | {r['bf16_peak'] / GB:.0f} GB "
              f"| {r['bf16_dev8'] / GB:.0f} / {r['bf16_dev16'] / GB:.0f} GB | {r['bf16_dev1'] / GB:.0f} GB "
              f"| {r['bf16_checkpoint'] / GB:.0f} GB | {r['fp32_peak'] / GB:.0f} GB "
              f"| {r['fp32_dev8'] / GB:.0f} / {r['fp32_dev16'] / GB:.0f} GB | {r['fp32_dev1'] / GB:.0f} GB |")
    print(f"\nWhere the estimate fits in {USABLE:.0%} of each device's memory, sharded (8 or 16 devices):\n")
    print("| preset | bf16 parameters (as built today) | fp32 parameters |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {recommend(r, 'bf16')} | {recommend(r, 'fp32')} |")


if __name__ == "__main__":
    main()
