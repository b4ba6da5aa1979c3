"""Memory estimates for the paper presets (``configs/qwen*.py``): what a run holds, and on how many
devices it fits. Arithmetic from the model shapes (``jackpot_jax.models.config.preset``) and the
presets' settings; nothing is allocated. Estimates, not measurements.

    PYTHONPATH=. python benchmarks/memory_estimate.py            # the whole-run totals (below)
    PYTHONPATH=. python benchmarks/memory_estimate.py mesh --preset qwen3_1p7b_to_8b_deepscaler --device v5p --chips 16
    PYTHONPATH=. python benchmarks/memory_estimate.py table      # the per-device tables of docs/scaling.md

The whole-run totals (no argument) assume (GB = 10^9 bytes; T = data.max_prompt_tokens +
rollout.max_new_tokens):

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
  Attention (``pallas_kernels.attention``, ``attention_impl="auto"``) is blockwise beyond 256
  tokens: the layer being recomputed holds one query block's tiles, about 16 bytes (fp32 scores,
  probabilities and their gradients) x heads x 512^2, whatever T; the dense path (T <= 256, or
  ``attention_impl="reference"``) holds 12 bytes x heads x T^2 instead.
- Peak = persistent (trained states + copies) + the largest phase (rollout KV, eval KV, or one
  micro-batch's activations). Per device: persistent and KV sharded evenly over N devices, and
  ceil(micro_batch_size / N) sequences' activations on each. XLA's temporaries, fragmentation and
  the allocator's reserve are not counted: compare with about 90% of a device's memory (on GPUs set
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; the default 0.75 leaves less).

Per device on a mesh (``mesh`` and ``table``). The update's mesh is ``config.mesh`` = (data, fsdp,
tensor) over N = data x fsdp x tensor devices (``jackpot_jax.parallel``). Each term below is in bytes
on one device; "sharded" means the exact per-device size of each parameter under the trainer's own
rule table (``sharding.logical_to_spec`` on the model's abstract parameters, ``nnx.eval_shape``: the
embed axis over fsdp, heads / MLP width / vocabulary over tensor, a dimension its mesh axes do not
divide replicated), so a parameter is divided by fsdp x tensor or less, and replicated over data.
Parameters are in the config's ``param_dtype`` (the presets: float32), p bytes each.

- trained states = 5 x sharded(trained model) (parameter, gradient, the accumulation sum, AdamW mu
  and nu, all in the parameters' dtype), for the policy and, with ``train_actor``, the actor; a
  frozen actor counts 1 x sharded.
- engine copy = the whole actor, unsharded (p bytes x its parameter count): each process's rollout
  engine keeps its own full copy of the actor on one of its devices (colocated placement).
- eval copy = sharded(policy): the evaluation decoding core built from the trained policy's sharded
  parameters and kept between evaluations (what one process does). ``--eval-copy whole`` counts the
  whole policy instead (a process that keeps its own unsharded copy).
- update = micro-batch activations + sharded(actor) when the OBRS filter reads the rollout-time
  actor (``mode="jackpot"``, ``p_target="new"``, ``train_actor``: the update takes the engine's
  copy, placed in the actor's shardings). Sequences per device: micro_batch_size / (data x fsdp)
  when that divides (the batch axis rule), else the whole micro-batch (the rule replicates it).
  Per sequence of T tokens, as above, with the tensor-sharded parts divided by tensor: both models'
  saved layer inputs (layers x hidden x 2 bytes per token, replicated over tensor: the residual
  stream's embed axis would map to fsdp, which the batch already uses); the recomputed layer's
  4 x (q + o + k + v) / tensor + 4 x 3 x hidden + 4 x 3 x intermediate / tensor bytes per token
  (a width not divided by tensor is counted whole); the streaming kernels' 3 x 8,192 x 4 bytes
  per token per model (counted whole); the attention tiles (16 x heads x 512^2, or the dense
  12 x heads x T^2), divided by tensor only when the key-value heads divide by it (attention
  computes per key-value head; otherwise counted whole).
- rollout KV = ceil(slots / L) x T x the actor's KV bytes per position, eval KV the same with the
  policy's: each process generates for its own prompts with ``rollout.max_concurrent_decodes``
  slots. The engine decodes where its parameters are, one device per process, so all of a
  process's slots sit on that device: L = 1, the default. ``--engine-devices L`` shows what an
  engine that spreads its slots over L devices of a process needs (``rollout.engine_devices``:
  data-parallel decoding, the whole actor on each of them). The eval KV gets the same placement (an assumption: its decode state's sharding is
  left to XLA).
- peak = trained states + engine copy + eval copy + max(rollout KV, eval KV, update), on the device
  that holds the engine (the other devices hold less); it fits when it is at most 90% of the
  device's memory. "max slots" = the most decode slots per process (a multiple of L, at most the
  configured number) with which every phase fits. Not counted: transient copies (the weight push
  and the evaluation copy's refresh copy parameters before the old ones are freed), XLA's
  temporaries and fragmentation; the 10% margin is meant for them.

Device kinds (memory in GB = 10^9 bytes, the vendors' nominal figures): H100 80GB, H200 141GB, 8
per node; TPU v5p 95 GB per chip, a v5p-N slice has N TensorCores = N/2 chips, 4 chips per host;
TPU v6e (Trillium) 32 GB per chip, one TensorCore per chip, a v6e-N slice has N chips, up to 8 on
one host (v6e-8). Assumed, not checked against a slice: 4 chips per host in multi-host v6e slices
(it sets only the devices a process has, used by ``table``'s spread-engine column).

Recommended mesh (``table``; ``mesh`` lists it first): among the meshes of N devices with tensor at
most 8 (a GPU node), those that fit with some decode slots; of these, those that fit with the
configured slots; then on GPUs fsdp x tensor within one node (data across nodes: FSDP gathers the
parameters every micro-batch, over NVLink within a node); then the most slots; a micro-batch that
data x fsdp splits and that divides train_batch_size; the smallest tensor; the smallest data (the
most FSDP: the least state per device). micro_batch_size = data x fsdp (one
sequence per data x fsdp group) unless ``--micro`` says otherwise. The flags to give
``jackpot-train`` are printed, with the slots lowered to the most that fit when needed.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jackpot_jax.models import registry
from jackpot_jax.models.config import preset
from jackpot_jax.models.sharding import logical_to_spec
from jackpot_jax.train.build import make_optimizer
from pallas_kernels.attention import BLOCK as ATTENTION_BLOCK, DENSE_MAX_LENGTH

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


def activation_bytes(models, tokens, tensor=1):
    """``(per-token bytes, attention bytes)`` of one sequence in the update on one device, with the
    tensor-sharded widths divided by ``tensor`` where it divides them (see the docstring)."""
    def split(width):
        return width // tensor if width % tensor == 0 else width

    saved = sum(c.num_hidden_layers * c.hidden_size * 2 for c in models)
    layer = max(4 * (2 * split(c.num_attention_heads * c.head_dim) + 2 * split(c.num_key_value_heads * c.head_dim)
                     + 3 * c.hidden_size + 3 * split(c.intermediate_size)) for c in models)
    kernels = len(models) * 3 * BLOCK_V * 4
    scores = 12 * tokens ** 2 if tokens <= DENSE_MAX_LENGTH else 16 * ATTENTION_BLOCK ** 2
    attention = max(scores * c.num_attention_heads // (tensor if c.num_key_value_heads % tensor == 0 else 1)
                    for c in models)
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


# ---------------------------------------------------------------------------- per device on a mesh


class DeviceKind(NamedTuple):
    """A device of the ``mesh`` / ``table`` modes (see the module docstring for the figures)."""

    label: str
    memory_gb: float
    per_host: int  # devices one process drives in a multi-host slice or a multi-node GPU job
    single_host: int  # the most devices of one host (a slice this small is one process)
    slice_prefix: str = ""  # "v5p" / "v6e": TPU slices are named <prefix>-<TensorCores>
    cores_per_chip: int = 1

    def name(self, chips: int) -> str:
        if self.slice_prefix:
            return f"{self.slice_prefix}-{chips * self.cores_per_chip} ({chips} chips)"
        return f"{chips} x {self.label}"

    def local_devices(self, chips: int) -> int:
        """Devices per process: the whole slice / node when it fits one host, else ``per_host``."""
        return chips if chips <= self.single_host else self.per_host


DEVICE_KINDS = {
    "h100": DeviceKind("H100 80GB", 80, 8, 8),
    "h200": DeviceKind("H200 141GB", 141, 8, 8),
    "v5p": DeviceKind("TPU v5p", 95, 4, 4, "v5p", 2),
    "v6e": DeviceKind("TPU v6e", 32, 4, 8, "v6e", 1),
}
# the hardware docs/scaling.md covers: (device kind, devices)
TARGETS = (("h100", 8), ("h100", 16), ("h200", 8), ("v5p", 8), ("v5p", 16), ("v5p", 32),
           ("v6e", 8), ("v6e", 16), ("v6e", 32))


@functools.lru_cache(maxsize=None)
def param_layout(preset_name: str, param_dtype: str):
    """``((shape, logical axes, itemsize), ...)`` of every parameter of the preset's model, from the
    model itself (``nnx.eval_shape``: nothing is allocated)."""
    config = preset(preset_name, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: registry.build("transformer", config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    itemsize = np.dtype(param_dtype).itemsize
    return tuple((tuple(v.shape), tuple(v.get_metadata()["logical_axes"]), itemsize) for v in leaves)


def sharded_param_bytes(layout, shape=None) -> int:
    """Bytes of one copy of the parameters on one device of a mesh ``shape`` (``{"data": d, "fsdp":
    f, "tensor": t}``; None: unsharded), by the trainer's logical-axis rules."""
    total = 0
    for dims, axes, itemsize in layout:
        split = 1
        if shape is not None:
            spec = logical_to_spec(axes, dims, types.SimpleNamespace(shape=dict(shape)))
            for entry in spec:
                for axis in () if entry is None else (entry,) if isinstance(entry, str) else entry:
                    split *= shape[axis]
        total += math.prod(dims) * itemsize // split
    return total


def _param_dtype(section, override=None) -> str:
    return override or section.param_dtype or preset(section.preset).param_dtype


def per_device(config, shape, kind: DeviceKind, chips: int, *, micro=None, slots=None, param_dtype=None,
               local=1, eval_whole=False) -> dict:
    """The per-device estimate (bytes) of ``config`` on the mesh ``shape`` of ``chips`` devices of
    ``kind``: the terms of the module docstring, the peak, whether it fits, the most slots that fit."""
    algo = config.algorithm
    data, fsdp, tensor = shape["data"], shape["fsdp"], shape["tensor"]
    policy, actor = preset(config.policy.preset), preset(config.actor.preset)
    tokens = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    has_actor = algo.mode != "on_policy"
    train_actor = has_actor and algo.train_actor
    evaluates = bool(config.train.eval_every)
    policy_layout = param_layout(config.policy.preset, _param_dtype(config.policy, param_dtype))
    actor_layout = param_layout(config.actor.preset, _param_dtype(config.actor, param_dtype))
    policy_shard, actor_shard = sharded_param_bytes(policy_layout, shape), sharded_param_bytes(actor_layout, shape)

    states = 5 * policy_shard + (5 * actor_shard if train_actor else actor_shard if has_actor else 0)
    engine = sharded_param_bytes(actor_layout if has_actor else policy_layout)  # whole, unsharded
    eval_copy = 0 if not (has_actor and evaluates) else (  # on_policy evaluates with the engine
        sharded_param_bytes(policy_layout) if eval_whole else policy_shard)
    rollout_actor = actor_shard if train_actor and algo.mode == "jackpot" and algo.p_target == "new" else 0

    groups = data * fsdp
    micro = micro or groups
    seqs = micro // groups if micro % groups == 0 else micro
    per_token, attention = activation_bytes((policy, actor), tokens, tensor)
    activations = seqs * (per_token * tokens + attention)
    update = activations + rollout_actor

    slots = slots or config.rollout.max_concurrent_decodes
    gen_kv = kv_bytes_per_position(actor if has_actor else policy) * tokens  # per slot
    eval_kv_slot = kv_bytes_per_position(policy) * tokens if has_actor and evaluates else 0
    slots_per_device = math.ceil(slots / local)
    rollout_kv, eval_kv = slots_per_device * gen_kv, slots_per_device * eval_kv_slot
    persistent = states + engine + eval_copy
    peak = persistent + max(rollout_kv, eval_kv, update)
    budget = USABLE * kind.memory_gb * GB
    free = budget - persistent
    max_slots = 0 if free < update else min(slots, int(free // max(gen_kv, eval_kv_slot)) * local)
    return dict(shape=dict(shape), micro=micro, seqs=seqs, replicated_batch=micro % groups != 0,
                batch_ok=algo.train_batch_size % micro == 0, states=states, engine=engine, eval_copy=eval_copy,
                activations=activations, rollout_actor=rollout_actor, update=update, slots=slots, local=local,
                slots_per_device=slots_per_device, rollout_kv=rollout_kv, eval_kv=eval_kv, persistent=persistent,
                peak=peak, memory=kind.memory_gb * GB, fits=peak <= budget, max_slots=max_slots)


def candidate_shapes(chips: int):
    """Every (data, fsdp, tensor) with data x fsdp x tensor = chips and tensor at most 8 (a GPU node)."""
    for tensor in (t for t in range(1, min(chips, 8) + 1) if chips % t == 0):
        for data in (d for d in range(1, chips // tensor + 1) if (chips // tensor) % d == 0):
            yield {"data": data, "fsdp": chips // tensor // data, "tensor": tensor}


def preference(row, kind: DeviceKind):
    """Sort key of the recommended mesh (module docstring): fits with some slots; fits with the
    configured slots; on GPUs fsdp x tensor within a node; the most slots (when none fits: the least
    memory); a micro-batch split over data x fsdp that divides train_batch_size; the smallest
    tensor; the smallest data."""
    s = row["shape"]
    across_nodes = not kind.slice_prefix and s["fsdp"] * s["tensor"] > kind.per_host
    floor = 0 if row["max_slots"] else row["persistent"] + row["update"]
    return (not row["max_slots"], not row["fits"], across_nodes, -row["max_slots"], floor, row["replicated_batch"],
            not row["batch_ok"], s["tensor"], s["data"])


def mesh_rows(config, kind, chips, **kwargs):
    """Every candidate mesh's estimate, the recommended first."""
    rows = [per_device(config, shape, kind, chips, **kwargs) for shape in candidate_shapes(chips)]
    return sorted(rows, key=lambda r: preference(r, kind))


def lowered(config, row, kind, chips, **kwargs):
    """``row`` again with the decode slots lowered to the most that fit when the configured number
    does not (to one per device when nothing fits: the least the mesh needs)."""
    if row["max_slots"] >= row["slots"]:
        return row
    kwargs = dict(kwargs, micro=row["micro"], slots=row["max_slots"] or row["local"])
    return dict(per_device(config, row["shape"], kind, chips, **kwargs), configured_slots=row["slots"])


def recommended(config, kind, chips, **kwargs):
    """The recommended mesh's estimate (:func:`preference`), its decode slots :func:`lowered`."""
    return lowered(config, mesh_rows(config, kind, chips, **kwargs)[0], kind, chips, **kwargs)


def _gb(x) -> str:
    return f"{x / GB:.1f}"


def _mesh(s) -> str:
    return f"({s['data']}, {s['fsdp']}, {s['tensor']})"


def flags(row, config) -> str:
    """The ``jackpot-train`` flags of an estimate's mesh, micro-batch and decode slots."""
    s = row["shape"]
    out = (f"--config.mesh.data={s['data']} --config.mesh.fsdp={s['fsdp']} --config.mesh.tensor={s['tensor']} "
           f"--config.algorithm.micro_batch_size={row['micro']}")
    if row["slots"] != config.rollout.max_concurrent_decodes:
        out += f" --config.rollout.max_concurrent_decodes={row['slots']}"
    return out


def _verdict(row) -> str:
    if row["fits"]:
        return "yes"
    return f"with <= {row['max_slots']} slots" if row["max_slots"] else "no"


HEADER = ("| mesh (data, fsdp, tensor) | micro (sequences per device) | trained states | engine actor | eval policy "
          "| update (act + actor) | rollout KV | eval KV | peak | of memory | fits | max slots |")


def _row(row) -> str:
    pct = 100 * row["peak"] / row["memory"]
    note = "" if row["batch_ok"] else " (does not divide train_batch_size)"
    seqs = f"{row['seqs']}" + (", replicated" if row["replicated_batch"] else "")
    return (f"| {_mesh(row['shape'])} | {row['micro']} ({seqs}){note} | {_gb(row['states'])} | {_gb(row['engine'])} "
            f"| {_gb(row['eval_copy'])} | {_gb(row['activations'])} + {_gb(row['rollout_actor'])} "
            f"| {_gb(row['rollout_kv'])} | {_gb(row['eval_kv'])} | {_gb(row['peak'])} | {pct:.0f}% "
            f"| {_verdict(row)} | {row['max_slots']} |")


def _describe(name, config, param_dtype=None) -> str:
    dtypes = {_param_dtype(config.policy, param_dtype), _param_dtype(config.actor, param_dtype)}
    return (f"{name} ({config.actor.preset} -> {config.policy.preset}), parameters in {'/'.join(sorted(dtypes))}, "
            f"T = {config.data.max_prompt_tokens + config.rollout.max_new_tokens}, "
            f"rollout.max_concurrent_decodes = {config.rollout.max_concurrent_decodes} per process")


def mesh_main(args):
    config = load_preset(args.preset)
    kind = DEVICE_KINDS[args.device]
    kwargs = dict(micro=args.micro, slots=args.slots, param_dtype=args.param_dtype, local=args.engine_devices,
                  eval_whole=args.eval_copy == "whole")
    if args.mesh:
        sizes = dict(zip(("data", "fsdp", "tensor"), (int(x) for x in args.mesh.split(","))))
        if math.prod(sizes.values()) != args.chips:
            raise SystemExit(f"--mesh {args.mesh} has {math.prod(sizes.values())} devices, --chips is {args.chips}.")
        rows = [per_device(config, sizes, kind, args.chips, **kwargs)]
    else:
        rows = mesh_rows(config, kind, args.chips, **kwargs)
    usable = USABLE * kind.memory_gb
    print(f"Estimate (arithmetic, not a measurement): {_describe(args.preset, config, args.param_dtype)}.")
    print(f"Device: {kind.name(args.chips)}, {kind.memory_gb:g} GB each; the engine's slots on {args.engine_devices} "
          f"device(s) per process; eval copy {args.eval_copy}; fits = peak <= {USABLE:.0%} = {usable:.1f} GB. "
          "GB = 10^9 bytes, per device.\n")
    print(HEADER)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        print(_row(row))
    if not rows[0]["max_slots"]:
        print("\nNo mesh of these devices fits, even with one decode slot per process: use more devices.")
        return
    best = lowered(config, rows[0], kind, args.chips, **kwargs)
    if best["slots"] < config.rollout.max_concurrent_decodes:
        print(f"\nWith {best['slots']} decode slots per process: peak {_gb(best['peak'])} GB "
              f"({100 * best['peak'] / best['memory']:.0f}%).")
    print(f"\n{'Flags' if args.mesh else 'Recommended'}: {flags(best, config)}")


def startup_bytes(config, param_dtype=None) -> int:
    """One device at start-up today: ``train/build.py`` loads each checkpoint whole onto one device
    and ``train/loop.py`` copies both models there (``_copy``) before placing the copies on the mesh."""
    return 2 * sum(sharded_param_bytes(param_layout(section.preset, _param_dtype(section, param_dtype)))
                   for section in (config.policy, config.actor))


def table_main(args):
    print("Estimates (arithmetic, not measurements) of `python benchmarks/memory_estimate.py table`: per device, "
          f"GB = 10^9 bytes; fits = peak <= {USABLE:.0%} of the device's memory.\n")
    for name in args.presets:
        config = load_preset(name)
        print(f"**{_describe(name, config, args.param_dtype)}**\n")
        print("| hardware | recommended mesh (data, fsdp, tensor) | micro | trained states | engine actor "
              "| eval policy | update | rollout KV | eval KV | peak | of memory | decode slots per process "
              "| slots spread over a process's devices (rollout.engine_devices=0) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for device, chips in TARGETS:
            kind = DEVICE_KINDS[device]
            row = recommended(config, kind, chips, param_dtype=args.param_dtype)
            spread = kind.local_devices(chips)
            spread_slots = per_device(config, row["shape"], kind, chips, micro=row["micro"],
                                      param_dtype=args.param_dtype, local=spread)["max_slots"]
            if not row["max_slots"]:
                slot_text = "does not fit, even with 1"
            elif "configured_slots" in row:
                slot_text = f"**{row['slots']}** (fits; {row['configured_slots']} does not)"
            else:
                slot_text = f"{row['slots']} (as configured)"
            print(f"| {kind.name(chips)} | {_mesh(row['shape'])} | {row['micro']} "
                  f"| {_gb(row['states'])} | {_gb(row['engine'])} | {_gb(row['eval_copy'])} | {_gb(row['update'])} "
                  f"| {_gb(row['rollout_kv'])} | {_gb(row['eval_kv'])} | {_gb(row['peak'])} "
                  f"| {100 * row['peak'] / row['memory']:.0f}% | {slot_text} | {spread_slots} over {spread} |")
        print()
    print("Start-up today (`train/build.py` loads each checkpoint whole onto one device, `train/loop.py` copies "
          "both models there before placing them on the mesh):\n")
    print("| preset | one device at start-up | fits (90%) on |")
    print("|---|---:|---|")
    for name in args.presets:
        need = startup_bytes(load_preset(name), args.param_dtype)
        fits = [k.label for k in DEVICE_KINDS.values() if need <= USABLE * k.memory_gb * GB]
        print(f"| {name} | {_gb(need)} GB | {', '.join(fits) or 'none'} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    mesh = sub.add_parser("mesh", help="per-device estimate of candidate meshes (or one, --mesh) on a device kind")
    mesh.add_argument("--preset", choices=PRESETS, required=True)
    mesh.add_argument("--device", choices=sorted(DEVICE_KINDS), required=True)
    mesh.add_argument("--chips", type=int, required=True, help="devices (chips): a v5p-32 has 16, a v6e-16 16")
    mesh.add_argument("--mesh", help="one mesh, DATA,FSDP,TENSOR (default: every candidate, best first)")
    mesh.add_argument("--micro", type=int, help="algorithm.micro_batch_size (default: data x fsdp)")
    mesh.add_argument("--slots", type=int, help="rollout.max_concurrent_decodes (default: the preset's)")
    mesh.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="default: the preset's")
    mesh.add_argument("--engine-devices", type=int, default=1,
                      help="devices of a process the engine's slots spread over (default 1: the engine as built)")
    mesh.add_argument("--eval-copy", choices=("sharded", "whole"), default="sharded",
                      help="the evaluation copy of the policy: sharded like the policy (default), or whole")
    table = sub.add_parser("table", help="the Markdown tables of docs/scaling.md")
    table.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    table.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="default: the presets'")
    args = parser.parse_args(argv)
    if args.command == "mesh" and min(args.chips, args.engine_devices) < 1:
        parser.error("--chips and --engine-devices must be positive")
    return args


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
    ARGS = parse_args()
    {"mesh": mesh_main, "table": table_main}.get(ARGS.command, lambda _: main())(ARGS)
