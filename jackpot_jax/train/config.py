"""The trainer's config: every key, what it may hold, checked in one place at start-up.

A run's config is an ``ml_collections.ConfigDict`` (``configs/demo.py`` is the reference, and
lists every key with a comment). :func:`validate` checks each section against the rules below
and raises :class:`~jackpot_jax.config.ConfigError` naming the key, the value and what is allowed;
unknown keys are refused too, so a typo in ``--config.algorithm.lamb=...`` cannot pass silently.
On ``--resume``, :func:`resume_changes` sorts the keys that differ from the checkpoint's config into
those that make another experiment (:data:`RESUME_REFUSED`), the free ones (:data:`RESUME_FREE`)
and the others.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

from jackpot_jax.config import ConfigError, validate as validate_section
from jackpot_jax.models.config import PRESETS

MODES = ("on_policy", "off_policy", "tis", "tis_distill", "jackpot")
ACTOR_MODES = MODES[1:]  # every mode but on_policy generates with a separate actor
SCHEDULES = ("constant", "cosine")
IMPLS = ("auto", "reference", "chunked", "pallas")
# "auto": tokenizer.path when set, else the tokenizer files of policy.path (else actor.path), else "char"
TOKENIZER_KINDS = ("auto", "char", "hf")


INT32_MAX = 2**31 - 1  # every integer key's default ceiling: counts and sizes reach int32 arrays
SEED_MAX = 2**32 - 1  # seeds: uint32 (jax.random.fold_in's range; numpy and jax.random.key take more)
FLOAT32_MAX = 3.4028234663852886e38  # float32's largest (np.finfo): float keys reach float32 arrays


def _int(low=None, high=INT32_MAX):
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low) and (high is None or v <= high)
    bounds = " and ".join(s for s in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if s)
    return ok, f"an integer{' ' + bounds if bounds else ''}"


def _float(low=None, high=None, *, low_open=False):
    """A finite number within ``[low, high]`` (``(low, ...`` with ``low_open``) that float32 holds:
    a larger one (``lr=1e300``) would be inf, then NaN, once on the device."""
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > FLOAT32_MAX:
            return False
        return (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
    low_text = f"{'>' if low_open else '>='} {low}" if low is not None else ""
    bounds = " and ".join(s for s in (low_text, f"<= {high}" if high is not None else "") if s)
    # the float32 range in words: test_train_config reads "op number" pairs as the bounds
    return ok, f"a finite number{' ' + bounds if bounds else ''} (within float32's range, up to 3.4e38)"


def _choice(*allowed):
    return (lambda v: v in allowed), f"one of {allowed}"


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_PATH = (lambda v: isinstance(v, str), "a path (a string; empty for none)")

_MODEL = {"model": (lambda v: isinstance(v, str) and bool(v), "a registered model name or an import path"),
          "preset": (lambda v: v in PRESETS, f"a model preset: one of {sorted(PRESETS)}"),
          "path": _PATH,
          "dtype": _choice("", "float32", "bfloat16"), "param_dtype": _choice("", "float32", "bfloat16"),
          "remat": _BOOL}

_MESH_AXIS = (lambda v: _int(1)[0](v) or (_int()[0](v) and v == -1),
              f"an integer >= 1 and <= {INT32_MAX}, or -1 (the devices left over)")
_BELOW_ONE = (lambda v: _float(0)[0](v) and v < 1, "a number in [0, 1)")
_OPTIM = {"lr": _float(0, low_open=True), "schedule": _choice(*SCHEDULES), "warmup_steps": _int(0),
          "weight_decay": _float(0), "clip_norm": _float(0, low_open=True), "b1": _BELOW_ONE, "b2": _BELOW_ONE}

RULES = {
    "seed": _int(0, SEED_MAX),
    "policy": _MODEL,
    "actor": {**_MODEL, "init": _choice("own", "policy")},
    "tokenizer": {"kind": _choice(*TOKENIZER_KINDS), "path": _PATH},
    "data": {"dataset": _STR, "config": _STR, "split": _STR, "eval_split": _STR, "data_dir": _PATH,
             "manual_dir": _PATH, "reward": _STR, "template": _choice("plain", "chat"), "instruction": _STR,
             "max_prompt_tokens": _int(1), "train_limit": _int(0), "eval_limit": _int(0)},
    "warm_start": {"policy_steps": _int(0), "actor_steps": _int(0), "batch_size": _int(1),
                   "policy_lr": _float(0, low_open=True), "actor_lr": _float(0, low_open=True), "problems": _int(0),
                   "boxed": _float(0, 1),
                   "seed": (_int(-1, SEED_MAX)[0], f"an integer >= -1 and <= {SEED_MAX} (-1: config.seed)"),
                   "dir": _PATH},
    "rollout": {"prompts_per_step": _int(1), "n": _int(2), "max_new_tokens": _int(1),
                "temperature": _float(0, low_open=True), "top_p": _float(0, 1, low_open=True), "top_k": _int(0),
                "logprobs_top_k": _int(0), "max_concurrent_decodes": _int(1),
                "engine_devices": (_int(0)[0], f"an integer >= 0 and <= {INT32_MAX} (0: all of a process's devices)")},
    "algorithm": {"mode": _choice(*MODES), "p_target": _choice("old", "new"), "lam": _float(0, low_open=True),
                  "target_accept": _float(0, 1), "z": _choice("topk", "exact"), "k": _int(1),
                  "c1": _float(0, low_open=True), "c2": _float(0, low_open=True), "clip": _BOOL,
                  "eps_low": _BELOW_ONE, "eps_high": _float(0),
                  "train_batch_size": _int(1), "micro_batch_size": _int(1), "ppo_epochs": _int(1),
                  "aggregation": _choice("token_mean", "seq_mean_token_mean"), "train_actor": _BOOL,
                  "actor_sync_every": _int(0),
                  "actor_ppo": _float(0), "actor_tis_cap": _float(0, low_open=True), "beta": _float(0),
                  "distill_direction": _choice("forward", "reverse"), "grpo_std": _BOOL,
                  "controller": {"kind": _choice("none", "kl"), "target_kl": _float(0, low_open=True),
                                 "rate": _float(0, low_open=True), "beta_min": _float(0, low_open=True),
                                 "beta_max": _float(0, low_open=True), "lr_rate": _float(0),
                                 "lr_scale_min": _float(0, 1, low_open=True)}},
    "optim": {"policy": _OPTIM, "actor": _OPTIM},
    "mesh": {axis: _MESH_AXIS for axis in ("data", "fsdp", "tensor")},
    "placement": _choice("colocated", "disaggregated"),
    "actor_mesh": {axis: _int(1) for axis in ("data", "fsdp", "tensor")},
    "train": {"steps": _int(1), "eval_every": _int(0), "eval_k": _int(1), "eval_temperature": _float(0),
              "save_every": _int(1), "keep": _int(1), "max_nonfinite": _int(1), "log_every": _int(1),
              "kernel_impl": _choice(*IMPLS), "progress": _BOOL, "allow_changes": _BOOL},
}


def _check(config, rules, name):
    """Validate one section; nested sections (a dict of rules) recurse. A key left ``None`` (an
    ``ml_collections`` placeholder: presets leave model and data paths to the command line) is
    reported as required."""
    for key in config.keys():
        if config[key] is None and key in rules:
            raise ConfigError(f"{name}.{key} is required by this config: set it with --{name}.{key}=... "
                              f"(it must be {rules[key][1] if not isinstance(rules[key], dict) else 'a section'}).")
    flat = {key: rule for key, rule in rules.items() if not isinstance(rule, dict)}
    nested = {key: rule for key, rule in rules.items() if isinstance(rule, dict)}
    for key, sub_rules in nested.items():
        if key not in config:
            raise ConfigError(f"{name}.{key} is missing; it must be a section with keys {sorted(sub_rules)}.")
        if not hasattr(config[key], "keys"):
            raise ConfigError(f"{name}.{key}={config[key]!r} is not allowed: it must be a section with keys "
                              f"{sorted(sub_rules)}.")
        _check(config[key], sub_rules, f"{name}.{key}")
    validate_section({k: v for k, v in config.items() if k not in nested}, flat, name)


def _check_tokenizer(config) -> None:
    """The character-level tokenizer is for models trained from scratch: a Hugging Face checkpoint
    was trained on its own tokenizer's ids, and reading them as characters would train it silently
    on nonsense. ``tokenizer.path`` is read only by kinds "hf" and "auto"."""
    if config.tokenizer.kind != "char":
        return
    for name in ("policy", "actor"):
        if config[name].path:
            raise ConfigError(f"config.tokenizer.kind='char' is not allowed with config.{name}.path="
                              f"{config[name].path!r}: the checkpoint reads its own tokenizer's ids, not characters; "
                              "set tokenizer.kind='auto' (the checkpoint's tokenizer) or tokenizer.kind='hf' with "
                              "tokenizer.path.")
    if config.tokenizer.path:
        raise ConfigError(f"config.tokenizer.path={config.tokenizer.path!r} is not allowed with tokenizer.kind='char' "
                          "(the built-in character-level tokenizer has no files): set tokenizer.kind='hf' (or "
                          "'auto'), or tokenizer.path=''.")


def validate(config) -> None:
    """Check every key of a trainer config, and the constraints between keys; raises ConfigError."""
    _check(config, RULES, "config")
    algo, rollout = config.algorithm, config.rollout
    rows = rollout.prompts_per_step * rollout.n
    if rows % algo.train_batch_size:
        raise ConfigError(f"config.algorithm.train_batch_size={algo.train_batch_size} is not allowed: it must divide "
                          f"the rollout batch, rollout.prompts_per_step * rollout.n = {rollout.prompts_per_step} * "
                          f"{rollout.n} = {rows} sequences.")
    if algo.train_batch_size % algo.micro_batch_size:
        raise ConfigError(f"config.algorithm.micro_batch_size={algo.micro_batch_size} is not allowed: it must divide "
                          f"algorithm.train_batch_size={algo.train_batch_size}.")
    if algo.mode == "on_policy" and config.placement == "disaggregated":
        raise ConfigError("config.placement='disaggregated' is not allowed with algorithm.mode='on_policy': it puts "
                          "the actor on its own devices and there is no actor; use placement='colocated'.")
    control = algo.controller
    if control.kind != "none" and not algo.train_actor:
        raise ConfigError(f"config.algorithm.controller.kind={control.kind!r} is not allowed with "
                          "algorithm.train_actor=False: it sets the actor's distillation weight; train the actor "
                          "or set controller.kind='none'.")
    if control.beta_min > control.beta_max:
        raise ConfigError(f"config.algorithm.controller.beta_min={control.beta_min} is not allowed: it must be <= "
                          f"controller.beta_max={control.beta_max}.")
    if algo.mode == "on_policy" and algo.train_actor:
        raise ConfigError("config.algorithm.train_actor=True is not allowed with mode='on_policy': the policy "
                          "generates its own rollouts and there is no actor; set it to False.")
    if algo.actor_sync_every and (algo.train_actor or config.actor.init != "policy" or algo.mode == "on_policy"):
        raise ConfigError(f"config.algorithm.actor_sync_every={algo.actor_sync_every} is not allowed with "
                          f"algorithm.mode={algo.mode!r}, train_actor={algo.train_actor}, actor.init="
                          f"{config.actor.init!r}: syncing makes the actor a stale copy of the policy, so it needs "
                          "a mode with an actor, train_actor=False and actor.init='policy' (or set it to 0).")
    if config.actor.init == "policy" and config.actor.path:
        raise ConfigError(f"config.actor.path={config.actor.path!r} is not allowed with actor.init='policy': the "
                          "actor starts as a copy of the policy; set actor.path='' or actor.init='own'.")
    if rollout.logprobs_top_k > 0 and rollout.top_k and rollout.logprobs_top_k > rollout.top_k:
        raise ConfigError(f"config.rollout.logprobs_top_k={rollout.logprobs_top_k} is not allowed: it must be <= "
                          f"rollout.top_k={rollout.top_k} (the sampling distribution has only top_k tokens).")
    if algo.mode == "jackpot" and (rollout.top_p < 1 or rollout.top_k):
        name, value = ("top_p", rollout.top_p) if rollout.top_p < 1 else ("top_k", rollout.top_k)
        raise ConfigError(f"config.rollout.{name}={value} is not allowed with algorithm.mode='jackpot': OBRS' Z "
                          "sums over the actor's untruncated (tempered) distribution, so rollouts must sample from "
                          "it: set rollout.top_p=1.0 and rollout.top_k=0 (rollout.temperature may be any).")
    _check_tokenizer(config)
    if config.tokenizer.kind == "hf" and not config.tokenizer.path:
        raise ConfigError("config.tokenizer.path='' is not allowed with tokenizer.kind='hf': give the tokenizer "
                          "directory.")
    if config.train.eval_every and config.data.eval_limit == 0:
        raise ConfigError(f"config.data.eval_limit=0 is not allowed with config.train.eval_every="
                          f"{config.train.eval_every}: evaluation needs problems (or set train.eval_every=0).")


# --- resuming --------------------------------------------------------------------------------------

# Keys (a section: every key in it) whose change on --resume makes the run another experiment: refused
# unless train.allow_changes=True. The batcher's order depends on rollout.prompts_per_step; warm_start
# gives the starting models and (problems) the RL problems.
RESUME_REFUSED = ("seed", "policy", "actor", "tokenizer", "data", "warm_start", "algorithm.mode",
                  "rollout.prompts_per_step")
# Keys that change only logging, IO, file locations or the layout on devices: they may change freely
# (logged at info). The most specific entry of the two tables decides; any other change (optim,
# algorithm but its mode, rollout sampling, ...) is allowed and logged as a warning.
RESUME_FREE = ("train.steps", "train.eval_every", "train.log_every", "train.progress", "train.save_every",
               "train.keep", "train.allow_changes", "data.data_dir", "data.manual_dir", "warm_start.dir",
               "policy.remat", "actor.remat", "mesh", "actor_mesh", "placement", "rollout.max_concurrent_decodes",
               "rollout.engine_devices")


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # the value of a key one of two configs lacks


class Change(NamedTuple):
    """A config key whose value differs between a checkpoint's run and the resuming one. ``kind``:
    "refused" (another experiment), "changed" (allowed, warned) or "free" (logging / IO / layout)."""
    key: str  # dotted, from the top: "optim.policy.lr"
    saved: object  # ABSENT when the saved config lacks the key
    now: object
    kind: str

    def __str__(self) -> str:
        return f"config.{self.key} {self.saved!r} -> {self.now!r}"


def _flat(tree, prefix="") -> dict:
    """``{dotted key: leaf}`` of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tier(key: str) -> str:
    """"refused", "free" or "changed" for a dotted key: the longest matching entry of the tables."""
    matches = [(len(entry), kind) for kind, table in (("refused", RESUME_REFUSED), ("free", RESUME_FREE))
               for entry in table if key == entry or key.startswith(entry + ".")]
    return max(matches)[1] if matches else "changed"


def resume_changes(saved: dict, current: dict) -> list[Change]:
    """Every key whose value differs between the ``saved`` config dict (a checkpoint's ``meta``) and
    the ``current`` one, compared in JSON form (tuples equal lists), sorted by key. A key the saved
    config lacks (added to the schema since) or the current one lacks (removed) is at most "changed":
    never refused, always named."""
    as_json = lambda tree: _flat(json.loads(json.dumps(tree, default=str)))
    old, new = as_json(saved), as_json(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before != after:
            kind = _tier(key)
            if kind == "refused" and (before is ABSENT or after is ABSENT):
                kind = "changed"
            changes.append(Change(key, before, after, kind))
    return changes
