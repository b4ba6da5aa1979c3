"""The training loop: rollouts -> rewards -> GRPO advantages -> updates -> new actor weights.

One RL step (Algorithm 1) per prompt batch:

1. the actor's engine samples ``rollout.n`` completions of each prompt, keeping log p_inf per token
   (and p_inf's top ``rollout.logprobs_top_k`` ids and log-probs, for the update's Z);
2. rewards grade the decoded completions; GRPO normalizes them within each prompt's group;
3. :meth:`Updater.prepare` computes p_old (and the rollout actor's p_omega_old) once;
4. the rollout batch is cut into ``train_batch_size`` mini-batches (more than one = staleness), for
   ``ppo_epochs`` passes, each one jitted :meth:`Updater.update` of both models;
5. the new actor weights go to the engine, device to device.

With several processes (:func:`jackpot_jax.parallel.initialize`) each one runs steps 1-2 for its
slice of the prompt batch on its own engine, the update of step 4 runs on the global mesh over every
process's rows, and each engine gets a process-local copy of the new weights. A run gives the same
batches and rollouts whatever the number of processes (the batcher's slices and the rollout keys
follow the prompts' places in the whole batch), and its checkpoints restore with another.

Every step is determined by ``(config.seed, step)``: the rollout seeds, the mini-batch order and the
OBRS mask keys are derived from them, and the data position is saved with the models, so a run
resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpot_jax import files, losses, parallel
from jackpot_jax.config import ConfigError
from jackpot_jax.controller import KLController
from jackpot_jax.data.batching import PromptBatcher
from jackpot_jax.data.evaluate import evaluate
from jackpot_jax.data.rewards import get_reward
from jackpot_jax.models.hf import end_token_ids
from jackpot_jax.rollout.decode import DecodeCore, core_of
from jackpot_jax.rollout.generate import generate
from jackpot_jax.train import build
from jackpot_jax.train.batch import make_batch, select
from jackpot_jax.train.checkpoint import Checkpointer, ResumeError
from jackpot_jax.train.config import resume_changes, validate
from jackpot_jax.train.export import save_run_files
from jackpot_jax.train.metrics import MetricsWriter, Progress
from jackpot_jax.train.warm_start import unbox, warm_start

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite updates in a row); checkpoints are kept and
    the message names what was not finite (the loss, a gradient, a leaf of the rejected update, or the
    parameters before it)."""


def _mean_metrics(rows: list[dict]) -> dict:
    """Metrics of several updates: the mean of each, the max of ``*_max``, the sum of skips."""
    out = {}
    for key in rows[0]:
        values = np.asarray([float(row[key]) for row in rows])
        out[key] = values.max() if key.endswith("_max") else values.sum() if key.startswith("nonfinite/") else values.mean()
    return out


def split_warm_start(records, config):
    """``(warm-start records, RL records)`` of a run's train ``records``: with ``warm_start.problems =
    n > 0`` the first n problems and the others (disjoint: RL then never sees a problem whose worked
    solution the models were fine-tuned on); with 0, all of them for both. Raises ``ConfigError``
    naming the key when fewer than ``rollout.prompts_per_step`` problems would be left for RL."""
    n = config.warm_start.problems
    if n == 0:
        return records, records
    needed = config.rollout.prompts_per_step
    if n > len(records) - needed:
        raise ConfigError(f"config.warm_start.problems={n} is not allowed: the train split has {len(records)} "
                          f"problems (data.train_limit={config.data.train_limit}) and RL needs at least "
                          f"rollout.prompts_per_step={needed} of them left; use at most {len(records) - needed}.")
    return records[:n], records[n:]


def _batcher(config, records, tokenizer) -> PromptBatcher:
    rollout, data = config.rollout, config.data
    return PromptBatcher(records, tokenizer, prompts_per_batch=rollout.prompts_per_step, n=rollout.n, seed=config.seed,
                         template=data.template, instruction=data.instruction, max_prompt_tokens=data.max_prompt_tokens)


def warm_start_models(config, workdir: str, tokenizer, policy, actor, records, prompt_fn) -> None:
    """The supervised warm start of each model that has one, trained, or loaded when cached with the
    same settings (in ``warm_start.dir``, or ``WORKDIR/warm_start``); none for an actor that starts as
    a copy of the policy (``actor.init="policy"``). ``prompt_fn``: a record's prompt ids, as the run's
    batcher encodes them."""
    ws = config.warm_start
    from_policy = actor is not None and config.actor.init == "policy"
    todo = [(name, model, steps, lr, section)
            for name, model, steps, lr, section in (("policy", policy, ws.policy_steps, ws.policy_lr, config.policy),
                                                    ("actor", actor, ws.actor_steps, ws.actor_lr, config.actor))
            if model is not None and steps > 0 and not section.path and not (name == "actor" and from_policy)]
    if not todo:
        return
    data = {k: v for k, v in config.data.to_dict().items() if k not in ("reward", "eval_split", "eval_limit")}
    spec = {"data": data, "tokenizer": config.tokenizer.to_dict(), "problems": ws.problems}  # what it depends on
    seed = build.model_seed(config)  # also the seed of the models' initial weights (spec: "seed")
    if ws.boxed != 1.0:
        records = unbox(records, ws.boxed, seed)
        spec["boxed"] = ws.boxed
    max_len = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    for name, model, steps, lr, section in todo:
        # without `init` (always "own" here), so that caches made before the key still match
        model_spec = {k: v for k, v in section.to_dict().items() if k != "init"}
        summary = warm_start(model, tokenizer, records, name=name,
                             directory=os.path.join(ws.dir or os.path.join(workdir, "warm_start"), name),
                             steps=steps, batch_size=ws.batch_size, lr=lr, seed=seed, max_len=max_len,
                             prompt_fn=prompt_fn, spec={**spec, "model": model_spec})
        logger.info("warm start of the %s: %s", name, summary)


def check_resume(config, checkpointer: Checkpointer) -> None:
    """Compare the config of the latest checkpoint of ``checkpointer`` with the resuming run's
    ``config`` (:func:`~jackpot_jax.train.config.resume_changes`), before anything is built: log
    every changed key (a warning; logging, IO and layout keys at info), and raise a one-line
    :class:`ResumeError` naming each key that makes the run another experiment (the models, data,
    tokenizer, seed, ...) unless ``config.train.allow_changes``."""
    step, meta = checkpointer.latest_meta()  # the newest step whose meta is good (damaged ones set aside)
    directory = checkpointer.directory
    changes = resume_changes(meta.get("config", {}), config.to_dict())
    for change in changes:
        level = logging.INFO if change.kind == "free" else logging.WARNING
        logger.log(level, "resume: %s changed %r -> %r", f"config.{change.key}", change.saved, change.now)
    refused = [change for change in changes if change.kind == "refused"]
    if refused and not config.train.allow_changes:
        raise ResumeError(f"resume from step {step} of {directory} is refused: the run would be another experiment "
                          f"({'; '.join(map(str, refused))}); resume with the checkpoint's values, or pass "
                          "--config.train.allow_changes=True to continue with the new ones.")


class _Start(NamedTuple):
    """What a run builds before its first step: data and warm-started models."""
    tokenizer: object
    train_records: list
    eval_records: list
    batcher: PromptBatcher
    mesh: object
    actor_mesh: object
    policy: object
    actor: object


def _start(config, workdir: str, tokenizer) -> _Start:
    """The records, the RL batcher, the meshes and the models of a run of ``config`` in
    ``workdir``, warm-started (:func:`warm_start_models`), with its ``tokenizer``
    (:func:`~jackpot_jax.train.build.check_run`'s)."""
    train_records, eval_records = build.load_records(config)
    warm_records, rl_records = split_warm_start(train_records, config)
    batcher = _batcher(config, rl_records, tokenizer)
    mesh, actor_mesh = parallel.meshes_from_config(config)
    policy, actor = build.build_models(config, tokenizer, mesh, actor_mesh)
    warm_start_models(config, workdir, tokenizer, policy, actor, warm_records, batcher.encode_record)
    return _Start(tokenizer, train_records, eval_records, batcher, mesh, actor_mesh, policy, actor)


def warm_start_only(config, workdir: str) -> None:
    """The warm starts of a run of ``config`` in ``workdir`` (``warm_start.dir``, or
    ``WORKDIR/warm_start``), without the run: what :class:`Trainer` would train or load first."""
    validate(config)
    config = build.resolve_tokenizer(config)
    _start(config, os.path.abspath(workdir), build.check_run(config))


LOCK_FILE = "lock"  # in the work dir, held by process 0 of the run


def workdir_in_use(workdir: str, holder: str) -> ConfigError:
    """The one-line error of a run started in a work dir that ``holder`` (the lock file's text) holds."""
    path = os.path.join(workdir, LOCK_FILE)
    return ConfigError(f"workdir {workdir!r} is in use by another run: {holder or 'a process'} holds {path}; two "
                       "runs must never share a work dir: wait for it to end, or choose another --workdir.")


def lock_workdir(workdir: str):
    """The run's exclusive lock on ``workdir`` (:func:`~jackpot_jax.files.try_exclusive_lock` on
    ``WORKDIR/lock``, naming this process), taken by process 0 only (None in the others): never two
    runs in one work dir. Raises a one-line ConfigError naming the process that holds it. A
    filesystem without locks gives a warning and no lock."""
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, LOCK_FILE)
    owner = f"pid {os.getpid()} on host {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S %Z')})"
    try:
        return files.try_exclusive_lock(path, owner)
    except files.LockHeld as held:
        raise workdir_in_use(workdir, held.owner) from None
    except OSError as error:  # e.g. ENOLCK / EOPNOTSUPP on some network filesystems
        logger.warning("%s: the work dir cannot be locked (%s): nothing stops another run from using it too.",
                       path, error)
        return None


class Trainer:
    """A run of ``config`` in ``workdir`` (resumed from its latest checkpoint when there is one)."""

    def __init__(self, config, workdir: str, *, resume: bool = True):
        validate(config)
        if "://" in os.fspath(workdir):
            raise ConfigError(f"workdir {workdir!r} is not allowed: URLs are not supported yet (the work dir is written "
                              f"with local file calls); give a path, on a filesystem every process mounts when there "
                              f"are several (e.g. a bucket mounted with gcsfuse).")
        processes = jax.process_count()
        if config.rollout.prompts_per_step % processes:
            raise ConfigError(f"config.rollout.prompts_per_step={config.rollout.prompts_per_step} is not allowed with "
                              f"{processes} processes: each generates an equal slice of the prompts; use a multiple "
                              f"of {processes}.")
        config = build.resolve_tokenizer(config)  # what the checkpoints record: "auto" resolved
        tokenizer = build.check_run(config)  # the checks of seconds, before the data and compilation
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.reward = get_reward(config.data.reward)
        os.makedirs(self.workdir, exist_ok=True)
        self._lock = lock_workdir(self.workdir)  # before anything in it is read or written
        try:
            self._init(config, tokenizer, resume)
        except BaseException:
            self.close()
            raise

    def _init(self, config, tokenizer, resume: bool) -> None:
        """What ``__init__`` builds once the work dir is locked: checkpointer, data, models, engine."""
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), save_every=config.train.save_every,
                                         keep=config.train.keep)
        if resume and self.checkpointer.latest_step() is not None:
            check_resume(config, self.checkpointer)  # before the data and the models
        algo, rollout = config.algorithm, config.rollout
        start = _start(config, self.workdir, tokenizer)
        self.tokenizer, self.batcher = start.tokenizer, start.batcher
        self.train_records, self.eval_records = start.train_records, start.eval_records
        policy, actor = start.policy, start.actor
        if actor is not None and config.actor.init == "policy":
            build.init_actor_from_policy(policy, actor)
            logger.info("the actor starts as a copy of the policy (config.actor.init='policy')")
        rows = rollout.prompts_per_step * rollout.n
        self.updates_per_step = algo.ppo_epochs * rows // algo.train_batch_size
        self.updater = build.make_updater(config, policy, actor, config.train.steps * self.updates_per_step,
                                          start.mesh, start.actor_mesh)
        self.step_config = self.updater.cfg
        params = lambda model: None if model is None else jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
        self.state = self.updater.init_state(params(policy), params(actor))
        generator = actor if actor is not None else policy
        if jax.process_count() > 1 or config.placement == "disaggregated":
            # each engine drives its own process's devices; disaggregated, the actor's mesh
            nnx.update(generator, self._generating_weights())
        self.engine = build.rollout_engine(generator, config)
        self.eval_core = None

        self.step, self.nonfinite_in_row = 0, 0
        self.controller = KLController.from_config(config.algorithm)  # None: beta stays algorithm.beta
        self.base_key = jax.random.key(config.seed)  # every step's keys are folded from it and the step
        if resume and self.checkpointer.latest_step() is not None:
            self._restore()
        self._push_actor()
        # the rows after the checkpoint go (all of them when the run starts at step 0: its row 0 is written again)
        self.writer = MetricsWriter(self.workdir, start_step=self.step + 1 if self.step else 0,
                                    enabled=jax.process_index() == 0)
        if jax.process_index() == 0:  # what jackpot-export needs, kept in the run dir (once; after a resume's checks)
            save_run_files(self.workdir, config, self.tokenizer, policy, actor)

    # ------------------------------------------------------------------ setup

    def _meta(self) -> dict:
        meta = {"step": self.step, "data": self.batcher.state_dict(), "config": self.config.to_dict(),
                "rng": np.asarray(jax.random.key_data(self.base_key)).tolist()}
        if self.controller is not None:
            meta["controller"] = self.controller.state_dict()
        return meta

    def _restore(self):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        checked = self.checkpointer.latest_step()
        self.state, meta = self.checkpointer.restore(abstract, config=self.config.to_dict())
        if self.checkpointer.latest_step() != checked:  # it fell back past a damaged step: check the config again
            check_resume(self.config, self.checkpointer)
        try:
            self.batcher.load_state_dict(meta["data"])
        except ValueError as error:  # another data order (allowed by train.allow_changes)
            raise ResumeError(f"resume from {self.checkpointer.directory}: {error}") from None
        self.step = int(meta["step"])
        self.base_key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        if self.controller is not None and "controller" in meta:
            self.controller.load_state_dict(meta["controller"])
        logger.info("resumed from step %d of %s", self.step, self.checkpointer.directory)

    def _local(self, params, mesh=None):
        """A copy of the state's ``params`` (on ``mesh``, default the policy's) on this process's
        devices (the update step donates its state; the engines keep their own)."""
        return parallel.local_copy(params, self.updater.mesh if mesh is None else mesh)

    def _generating_weights(self):
        """A local copy of the weights that generate rollouts: the actor's (on its mesh), or the
        policy's in on_policy mode."""
        if self.step_config.has_actor:
            return self._local(self.state.actor, self.updater.actor_mesh)
        return self._local(self.state.policy)

    def _push_actor(self):
        """The rollout engine gets the current generating weights, device to device."""
        self.engine.update_params(self._generating_weights())

    # ------------------------------------------------------------------ one step

    def _rollout(self, batch, seed):
        rollout_cfg = self.config.rollout
        out = generate(self.engine, batch.prompt_ids, rollout_cfg.max_new_tokens, temperature=rollout_cfg.temperature,
                       top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, seed=seed,
                       first_prompt=batch.first_prompt * rollout_cfg.n,  # the rows repeat each prompt n times
                       eos_token_ids=end_token_ids(self.tokenizer))
        texts = self.tokenizer.batch_decode(out.completions, skip_special_tokens=True)
        rewards = np.asarray([self.reward(text, answer) for text, answer in zip(texts, batch.answers)], np.float32)
        return out, rewards

    def run_step(self) -> dict:
        """One RL step; returns its metrics."""
        config, algo = self.config, self.config.algorithm
        seed = (config.seed * 1_000_003 + self.step) % 2**31
        key = jax.random.fold_in(self.base_key, self.step)
        start = time.perf_counter()
        prompts = self.batcher.next_batch()
        out, rewards = self._rollout(prompts, seed)
        rollout_s = time.perf_counter() - start

        start = time.perf_counter()
        advantages = losses.grpo_advantages(rewards, config.rollout.n, normalize_std=algo.grpo_std)
        length = config.data.max_prompt_tokens + config.rollout.max_new_tokens
        batch = make_batch(out.prompts, out.completions, out.logprobs, np.asarray(advantages), length,
                           pad_id=self.tokenizer.pad_token_id or 0, topk_ids=out.topk_ids,
                           topk_logprobs=out.topk_logprobs)
        batch = parallel.global_rows(batch, self.updater.rows)  # this process's rows of the global batch
        use_old_z = algo.mode == "jackpot" and algo.p_target == "old"
        lam = algo.lam
        old = self.updater.prepare(self.state.policy, self.state.actor, batch, lam, normalizers=False)
        if use_old_z:
            lam = self.updater.solve_old_lam(batch, old) if algo.target_accept > 0 else lam
            old = self.updater.prepare(self.state.policy, self.state.actor, batch, lam, normalizers=True)
        kl_full = losses.masked_mean(old.kl_full, jnp.asarray(batch.valid))  # KL(p_omega_old || p_old), on device
        # the controller reads it on the host before the updates; without one, it is read after them
        beta = None if self.controller is None else self.controller.update(float(kl_full))
        # the factor only when the controller moves it: otherwise the update is the one without it
        actor_lr_scale = self.controller.lr_scale if self.controller is not None and self.controller.lr_rate else None
        update_metrics = []
        order = np.random.default_rng([config.seed, self.step])
        # the actor that sampled the batch, for the filter's p_inf once updates have moved the trained
        # actor: the engine's copy, from the second update on (the first one's actor is that actor)
        rollout_actor = self.engine.params if self.step_config.filter_needs_rollout_actor else None
        for epoch in range(algo.ppo_epochs):
            perm = order.permutation(batch.num_sequences)
            for u in range(batch.num_sequences // algo.train_batch_size):
                rows = np.sort(perm[u * algo.train_batch_size:(u + 1) * algo.train_batch_size])
                update_key = jax.random.fold_in(jax.random.fold_in(key, epoch), u)
                self.state, metrics = self.updater.update(self.state, select(batch, rows), select(old, rows),
                                                          update_key, lam, beta=beta,
                                                          rollout_actor=rollout_actor if epoch or u else None,
                                                          actor_lr_scale=actor_lr_scale)
                update_metrics.append(jax.device_get(metrics))
                self.nonfinite_in_row = self.nonfinite_in_row + 1 if update_metrics[-1]["nonfinite/skipped"] else 0
        if algo.actor_sync_every and (self.step + 1) % algo.actor_sync_every == 0:
            # the next rollouts come from the policy as it is now (algorithm.actor_sync_every)
            self.state = self.state._replace(actor=build.copy_params(self.state.policy, self.state.actor))
        self._push_actor()
        metrics = _mean_metrics(update_metrics)
        update_s = time.perf_counter() - start

        rewards = parallel.allgather(rewards)  # every process's rows, in the global batch's order
        lengths = parallel.allgather(np.asarray([len(c) for c in out.completions]))
        generated = int(lengths.sum())
        metrics.update({
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "mismatch/kl_full": float(kl_full),
            "rollout/mean_length": generated / len(lengths),
            "time/rollout_s": rollout_s, "time/update_s": update_s,
            "throughput/tokens_per_s": generated / (rollout_s + update_s),
        })
        if not self.step_config.has_actor:
            metrics.pop("mismatch/kl_full")
        if beta is not None:
            metrics["controller/beta"] = beta
            metrics["controller/actor_lr_scale"] = self.controller.lr_scale
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """Mean@k / Pass@k of the policy (and the actor) on the eval records (every process
        evaluates them all on its own devices, with the same keys: the same figures everywhere)."""
        cfg = self.config
        cores = {"policy": self.engine}
        if self.step_config.has_actor:
            if self.eval_core is None:  # the policy's own decoding core; the actor's is the rollout engine
                policy = nnx.merge(self.updater.policy_def, self._local(self.state.policy), self.updater.policy_rest)
                engine = core_of(self.engine)
                self.eval_core = DecodeCore(policy, devices=build.engine_devices(self.config, policy),
                                            max_concurrent_decodes=engine.slots,
                                            max_prefill_length=engine.prefill_buckets[-1],
                                            max_target_length=engine.max_target_length)
            self.eval_core.update_params(self._local(self.state.policy))
            cores = {"policy": self.eval_core, "actor": self.engine}
        out = {}
        for name, core in cores.items():
            result = evaluate(core, self.tokenizer, self.eval_records, k=cfg.train.eval_k,
                              template=cfg.data.template, instruction=cfg.data.instruction,
                              max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.train.eval_temperature,
                              top_p=1.0, seed=cfg.seed, reward=cfg.data.reward)
            k = cfg.train.eval_k
            out.update({f"eval/{name}/mean@{k}": result["mean@k"], f"eval/{name}/pass@{k}": result["pass@k"]})
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict]:
        """Train until ``config.train.steps``; returns the metrics of the steps run here."""
        cfg = self.config.train
        history = []
        progress = Progress(cfg.steps, initial=self.step, enabled=cfg.progress and jax.process_index() == 0)
        try:
            if self.step == 0 and cfg.eval_every:
                self.writer.write(0, self.evaluate())
            while self.step < cfg.steps:
                metrics = self.run_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    metrics.update(self.evaluate())
                self.writer.write(self.step, metrics)
                history.append({"step": self.step, **metrics})
                progress.update(self.step - 1, metrics)
                self.checkpointer.save(self.step, self.state, self._meta(), force=self.step == cfg.steps)
                if self.nonfinite_in_row >= cfg.max_nonfinite:
                    cause, corrupt = self.updater.skip_cause(self.state)
                    advice = ("the model or checkpoint the run started from is corrupt: rebuild it, or resume from an "
                              "older checkpoint" if corrupt else
                              f"the checkpoints in {self.checkpointer.directory} are intact (no skipped update was "
                              "applied): lower the learning rate or lam, then resume")
                    raise TrainingStopped(
                        f"step {self.step}: {self.nonfinite_in_row} updates in a row had a non-finite loss, gradient or "
                        f"update (train.max_nonfinite={cfg.max_nonfinite}) and were skipped; not finite: {cause}. "
                        f"{advice[0].upper() + advice[1:]}.")
        finally:
            progress.close()
            self.checkpointer.wait()
            self.writer.close()
            self.close()
        return history

    def close(self) -> None:
        """Releases the work dir's lock (:func:`lock_workdir`; idempotent): :meth:`run` does at its end."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
