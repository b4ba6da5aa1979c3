"""The update step: Algorithm 1, phase 2, as one jitted function per mini-batch.

Once per rollout batch, :meth:`Updater.prepare` runs the policy at the start of the step (p_old) and
the actor that generated the rollouts (p_omega_old) over every sequence: their log-probs of the sampled
tokens, the actor-policy KL over the full vocabulary (a metric) and, when OBRS aligns to p_old, Z.
Then :meth:`Updater.update`, per mini-batch, in one jitted function with explicit shardings:

1. the mini-batch's :class:`~jackpot_jax.train.objective.Scope`: the policy loss's token weights (mask,
   rho) and denominators over the whole mini-batch. Towards p_new they need p_new over all of it: a
   statistics pass over its micro-batches (no gradient) gives log p_new and Z (one pass of
   :func:`pallas_kernels.fused_jackpot_stats` or :func:`~pallas_kernels.fused_obrs_normalizer`), or,
   with one micro-batch, the update's own forward does;
2. per micro-batch, the models' final hidden states at the completion window (``window``:
   ``rollout.max_new_tokens``), the sampled tokens' log-probs and the distillation KL from the fused
   kernels (never forming the logits), and eq. 8's L = L_policy (eq. 5) + L_actor (eq. 6 + beta eq. 7)
   of :mod:`~jackpot_jax.train.objective`, whose gradients add up to the mini-batch's;
3. both optax updates, or neither when the loss, a gradient, or a leaf of the parameters or optimizer
   states they would give is not finite (a NaN learning rate with finite gradients, say).

p_inf in Z is the actor that sampled the batch at the rollout temperature (its top-p / top-k
truncation aside; kappa rescales the top-k Z to the measured acceptance): the update's actor, or
``rollout_actor`` once the trained actor has moved. With a batch that carries p_inf's top-k
(``rollout.logprobs_top_k >= k``) V_k's p_inf part is the rollout's own (Algorithm 1, phase 1).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pallas_kernels as pk
from jackpot_jax import obrs, parallel
from jackpot_jax.models.sharding import DEFAULT_RULES, activation_sharding, make_mesh, model_rules, param_shardings
from jackpot_jax.train import objective
from jackpot_jax.train.batch import TrainBatch, split_micro


class StepConfig(NamedTuple):
    """The static settings of the step, from ``config.algorithm`` (see ``configs/demo.py``)."""

    mode: str
    p_target: str = "new"
    lam: float = 1.0
    target_accept: float = 0.0
    z: str = "topk"
    k: int = 20
    c1: float = 10.0
    c2: float = 10.0
    clip: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "token_mean"
    train_actor: bool = True
    actor_ppo: float = 1.0
    actor_tis_cap: float = 2.0
    beta: float = 1.0
    distill_direction: str = "forward"
    temperature: float = 1.0  # the rollout temperature: p_inf = softmax(actor logits / temperature)
    micro_batch_size: int = 1  # sequences per forward / backward pass (gradient accumulation)
    kernel_impl: str = "auto"
    window: int = 0  # > 0: vocabulary statistics only at each sequence's first `window` generated tokens

    @classmethod
    def from_config(cls, config) -> "StepConfig":
        algo = config.algorithm
        fields = {name: algo[name] for name in cls._fields if name in algo}
        return cls(**fields, temperature=config.rollout.temperature, kernel_impl=config.train.kernel_impl,
                   window=config.rollout.max_new_tokens)

    @property
    def has_actor(self) -> bool:
        return self.mode != "on_policy"

    @property
    def filter_needs_rollout_actor(self) -> bool:
        """The OBRS filter reads p_inf in the update (p_target = new) while the actor is trained, so
        after a rollout's first update p_inf must come from the actor that sampled the batch."""
        return self.train_actor and self.scope_reads_p_new

    @property
    def scope_reads_p_new(self) -> bool:
        """The mini-batch's OBRS scope needs p_new (and Z towards it) over the whole mini-batch."""
        return self.mode == "jackpot" and self.p_target == "new"

    @property
    def z_in_first_pass(self) -> bool:
        """Z towards p_new from the top-k sets that the chunked statistics' one pass collects (section
        4.4.1, both sets ranked by raw logits), so Z takes no pass over the vocabulary of its own; a batch
        with p_inf's top-k (``TrainBatch.topk_ids``, at least ``k``) gives that pass p_inf's set."""
        return self.scope_reads_p_new and self.z == "topk" and self.kernel_impl in ("auto", "chunked")


class TrainState(NamedTuple):
    """Everything an update changes: both models' parameters, both optimizer states, the count."""

    policy: Any  # nnx.State of the policy's parameters
    actor: Any  # nnx.State of the actor's parameters, or None (on_policy)
    policy_opt: Any
    actor_opt: Any  # None unless the actor is trained
    updates: jax.Array  # int32: optimizer updates applied so far (skipped ones not counted)


class OldStats(NamedTuple):
    """Per token ``[B, T]``, computed once per rollout batch by :meth:`Updater.prepare`."""

    logp_old: jax.Array  # log p_old(x_t): the policy at the start of the step
    logp_actor_old: jax.Array  # log p_omega_old(x_t): the rollout actor at the rollout temperature
    kl_full: jax.Array  # KL(p_omega_old || p_old) over the vocabulary, per position
    z_topk: jax.Array  # Z_approx towards p_old (ones unless p_target = old)
    z_exact: jax.Array  # exact Z towards p_old (ones unless p_target = old with z = exact)


def _flat(x):
    return x.reshape((-1,) + x.shape[2:])


class Updater:
    """The jitted prepare and update functions for a policy, an optional actor and their optimizers.

    ``policy_tx`` / ``actor_tx`` are optax transformations (``actor_tx`` None when the actor is not
    trained); ``policy_lr`` an optional schedule, reported as the ``lr`` metric. Parameters live on
    ``mesh`` (default: one device) as the logical-axis ``rules`` (with each model's own
    ``sharding_rules``, :func:`~jackpot_jax.models.sharding.model_rules`) place them, optimizer states beside
    them; batches are split over the mesh's ``("data", "fsdp")`` axes along the sequences. Both
    functions are jitted with these input and output shardings, fixed by :meth:`init_state`.
    """

    def __init__(self, cfg: StepConfig, policy_model, actor_model, policy_tx, actor_tx=None, policy_lr=None, *,
                 mesh=None, rules=DEFAULT_RULES):
        if cfg.has_actor != (actor_model is not None):
            raise ValueError(f"mode={cfg.mode!r} {'needs' if cfg.has_actor else 'takes no'} actor model.")
        if cfg.train_actor != (actor_tx is not None):
            raise ValueError(f"train_actor={cfg.train_actor} needs actor_tx {'set' if cfg.train_actor else 'None'}.")
        self.cfg = cfg
        self.policy_def, _, self.policy_rest = nnx.split(policy_model, nnx.Param, ...)
        self.actor_def, _, self.actor_rest = (nnx.split(actor_model, nnx.Param, ...) if actor_model is not None
                                              else (None, None, None))
        self.policy_tx, self.actor_tx, self.policy_lr = policy_tx, actor_tx, policy_lr
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])
        self.actor_mesh = self.mesh  # colocated: both models on one mesh (see train/disaggregated.py)
        self.rules = {name: None if model is None else model_rules(model, rules)  # each model's own table
                      for name, model in (("policy", policy_model), ("actor", actor_model))}
        self._param_shardings = {
            name: None if model is None else param_shardings(nnx.state(model, nnx.Param), self.mesh, self.rules[name])
            for name, model in (("policy", policy_model), ("actor", actor_model))}
        self._prepare_jit = self._update_jit = None

    def init_state(self, policy_params, actor_params=None) -> TrainState:
        """A fresh state: the given parameters placed on the mesh, fresh optimizer states, no update
        yet. Fixes the shardings the jitted functions take and return."""
        place = lambda params, name: None if params is None else jax.device_put(params, self._param_shardings[name])
        policy_params, actor_params = place(policy_params, "policy"), place(actor_params, "actor")
        bad = nonfinite_leaves({"policy": policy_params, "actor": actor_params})
        if bad:  # before any update: no learning rate made them so
            raise ValueError(f"the parameters are not finite (NaN or inf) before any update, first at {bad[0]} "
                             f"({len(bad)} leaves): the model or checkpoint they come from is corrupt.")
        # optax's init outside jit: its parameter-shaped leaves (AdamW's mu, nu) keep the parameters'
        # shardings (under jit XLA would be free to replicate them); the others (a step count) land on
        # one device and are replicated over the mesh below
        actor_opt = self.actor_tx.init(actor_params) if self.cfg.train_actor else None
        state = TrainState(policy_params, actor_params, self.policy_tx.init(policy_params), actor_opt,
                           jnp.zeros((), jnp.int32))
        def on(mesh, tree):  # each leaf's own sharding when it spans the mesh, else replicated over it
            devices, replicated = set(mesh.devices.flat), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            return jax.tree.map(lambda x: x.sharding if x.sharding.device_set == devices else replicated, tree)

        shardings = TrainState(on(self.mesh, state.policy), on(self.actor_mesh, state.actor),
                               on(self.mesh, state.policy_opt), on(self.actor_mesh, state.actor_opt),
                               on(self.mesh, state.updates))
        state = jax.device_put(state, shardings)  # committed, as update's outputs: one compilation, not two
        self._check_names = self._checks_of(shardings)
        self._compile(shardings)
        return state

    def abstract_state(self, policy_params, actor_params=None) -> TrainState:
        """The shapes and dtypes of :meth:`init_state`'s result (``jax.ShapeDtypeStruct`` leaves,
        no shardings), without allocating anything: what a checkpoint is restored into on one device."""
        def build(policy, actor):
            actor_opt = self.actor_tx.init(actor) if self.cfg.train_actor else None
            return TrainState(policy, actor, self.policy_tx.init(policy), actor_opt, jnp.zeros((), jnp.int32))
        return jax.eval_shape(build, policy_params, actor_params)

    @property
    def replicated(self):
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    @property
    def rows(self):
        """Per-sequence arrays (a batch, its :class:`OldStats`): split over ``("data", "fsdp")``."""
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def _compile(self, state_shardings):
        """jit ``prepare`` and ``update`` with explicit input and output shardings."""
        rows = self.rows
        repl = self.replicated
        self._prepare_jit = {
            normalizers: jax.jit(functools.partial(self._prepare, normalizers=normalizers),
                                 in_shardings=(state_shardings.policy, state_shardings.actor, rows, repl),
                                 out_shardings=rows)
            for normalizers in (False, True)}
        self._update_jit = {  # without / with the rollout actor's parameters (see update)
            with_rollout: jax.jit(self._update, donate_argnums=(0,),
                                  in_shardings=(state_shardings, rows, rows, repl, repl,
                                                state_shardings.actor if with_rollout else None, repl, repl),
                                  out_shardings=(state_shardings, repl))
            for with_rollout in (False, True)}

    def prepare(self, policy_params, actor_params, batch: TrainBatch, lam, normalizers: bool = False) -> OldStats:
        """:class:`OldStats` of a rollout batch (see :meth:`_prepare`), jitted on the mesh."""
        return self._prepare_jit[normalizers](policy_params, actor_params, jax.device_put(batch, self.rows), lam)

    def update(self, state: TrainState, batch: TrainBatch, old: OldStats, key, lam_old=1.0, rollout_actor=None,
               beta=None, actor_lr_scale=None):
        """One update of both models on a mini-batch (see :meth:`_update`); ``state`` is donated.

        ``rollout_actor``: the actor parameters that sampled ``batch`` (not ``state.actor`` itself,
        which is donated: the rollout engine's copy). The OBRS filter's p_inf is the distribution
        the tokens were drawn from; once the trained actor has moved (a second mini-batch or PPO
        epoch on the same rollouts) that is this one, not ``state.actor``. ``None``: ``state.actor``
        is the rollout actor (the first update after a rollout, or a frozen actor).

        ``beta``: the distillation weight of eq. 8 for this update (default ``StepConfig.beta``; the
        KL controller's, :mod:`jackpot_jax.controller`), an argument, not a compiled constant.
        ``actor_lr_scale``: a factor on the actor's optimizer update, its learning rate times this
        (default None: none; the KL controller's second lever), an argument too."""
        self._check_window(batch)
        if rollout_actor is not None:  # into the actor's shardings (a no-op when already there)
            rollout_actor = parallel.from_local(rollout_actor, self._param_shardings["actor"])
        # a mini-batch cut from a rollout batch on the device may have another layout: into the rows'
        batch, old = jax.device_put((batch, old), self.rows)
        state, metrics = self._update_jit[rollout_actor is not None](state, batch, old, key, lam_old, rollout_actor,
                                                                     self._beta(beta), lr_scale_arg(actor_lr_scale))
        self.last_checks = metrics.pop("nonfinite/checks")  # on the device: read only by skip_cause
        return state, metrics

    def _checks_of(self, state) -> list[str]:
        """The names of the update's finiteness checks, in the order of its ``nonfinite/checks``: the
        loss, each gradient, then each leaf of the updated parameters and optimizer states."""
        grads = ["the policy's gradient"] + (["the actor's gradient"] if self.cfg.train_actor else [])
        return ["the loss"] + grads + leaf_names(self._candidate(state.policy, state.policy_opt, state.actor,
                                                                  state.actor_opt))

    def _candidate(self, policy, policy_opt, actor, actor_opt) -> dict:
        """What an update changes, by name (the actor's part when it is trained)."""
        parts = {"policy": policy, "policy_opt": policy_opt}
        return {**parts, "actor": actor, "actor_opt": actor_opt} if self.cfg.train_actor else parts

    def skip_cause(self, state: TrainState) -> tuple[str, bool]:
        """``(what was not finite, corrupt)`` for the last update skipped (host side, after a stop):
        ``corrupt`` when ``state``'s parameters, kept from before the skipped updates, are themselves
        not finite (the model or checkpoint the run started from), else what the last update's checks
        found: the loss, a gradient, or the first non-finite leaf of the update it would have applied."""
        bad = nonfinite_leaves({"policy": state.policy, "actor": state.actor})
        if bad:
            return f"the parameters before the update, first at {bad[0]} ({len(bad)} leaves)", True
        checks = np.asarray(jax.device_get(getattr(self, "last_checks", np.ones(0, bool))))
        failed = [name for name, ok in zip(self._check_names, checks) if not ok]
        if not failed:
            return "nothing (the last update was applied)", False
        if failed[0].startswith("the "):
            return failed[0], False
        return (f"the updated parameters / optimizer state, first at {failed[0]} ({len(failed)} leaves; "
                "loss and gradients finite: the learning rate or an optimizer setting overflows)"), False

    def _beta(self, beta):
        """The update's beta argument: ``beta``, or the config's when None."""
        return np.float32(self.cfg.beta if beta is None else beta)

    def _check_window(self, batch: TrainBatch):
        """Refuse a batch with a completion longer than the step's ``window`` (its statistics would
        miss tokens)."""
        if self.cfg.window:
            valid = batch.valid  # this process's rows (all of them with one process)
            rows = [s.data for s in valid.addressable_shards] if isinstance(valid, jax.Array) else [valid]
            longest = max(int(np.max(np.sum(np.asarray(r), axis=1), initial=0)) for r in rows)
            if longest > self.cfg.window:
                raise ValueError(f"a sequence of the batch has {longest} generated tokens, more than the step's "
                                 f"window={self.cfg.window} (rollout.max_new_tokens).")

    # ------------------------------------------------------------------ forward passes

    def _hidden(self, which, params, batch, positions=None):
        """``(h [B * W, D], w [D, V])`` of the policy or the actor on a batch's inputs, ``h`` at
        ``positions`` ``[B, W]`` (:func:`objective.completion_positions`), or at every position."""
        graphdef, rest = (self.policy_def, self.policy_rest) if which == "policy" else (self.actor_def, self.actor_rest)
        model = nnx.merge(graphdef, params, rest)
        with activation_sharding(self.mesh if which == "policy" else self.actor_mesh, self.rules[which]):
            h, _ = model.hidden_states(batch.inputs, attention_mask=batch.input_mask)
        if positions is not None:
            h = objective.at_positions(h, positions)
        return _flat(h), model.unembedding()

    def _hidden_at(self, which, params, mb: "MiniBatch"):
        """:meth:`_hidden` at a mini-batch's token positions (its completion window, if any)."""
        return self._hidden(which, params, mb, mb.positions if self.cfg.window else None)

    # ------------------------------------------------------------------ once per rollout batch

    def _prepare(self, policy_params, actor_params, batch: TrainBatch, lam, normalizers: bool = False) -> OldStats:
        """:class:`OldStats` for every sequence of ``batch``, one micro-batch at a time; with
        ``normalizers``, Z towards p_old at this ``lam`` (for p_target = old)."""
        def one(mb):
            return self._old_stats(*self._hidden("policy", policy_params, mb), actor_params, mb, lam, normalizers)

        stats = jax.lax.map(one, split_micro(batch, self._num_micro(batch.inputs)))
        return jax.lax.stop_gradient(jax.tree.map(_flat, stats))

    def _old_stats(self, h_pol, w_pol, actor_params, mb, lam, normalizers: bool) -> OldStats:
        """:class:`OldStats` of one micro-batch from the policy's final hidden states ``h_pol``
        ``[B * T, D]`` and unembedding ``w_pol`` (the actor forwards here)."""
        cfg = self.cfg
        targets, shape = _flat(mb.targets), mb.targets.shape
        ones = jnp.ones(shape, jnp.float32)
        if not cfg.has_actor:
            logp_old = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl=cfg.kernel_impl)[0]
            return OldStats(logp_old.reshape(shape), logp_old.reshape(shape), 0 * ones, ones, ones)
        h_act, w_act = self._hidden("actor", actor_params, mb)
        stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, cfg.k, lam,
                                       temperature_actor=cfg.temperature, exact=cfg.z == "exact",
                                       direction="reverse", normalizers=normalizers, impl=cfg.kernel_impl)
        z_topk = stats.z_topk.reshape(shape) if normalizers else ones
        z_exact = stats.z_exact.reshape(shape) if normalizers and cfg.z == "exact" else ones
        return OldStats(stats.logp_new.reshape(shape), stats.logp_actor.reshape(shape),
                        stats.distill_kl.reshape(shape), z_topk, z_exact)

    def solve_old_lam(self, batch: TrainBatch, old: OldStats):
        """lam whose mean acceptance towards p_old is ``target_accept`` over a rollout batch."""
        return obrs.solve_lambda(batch.logp_inf, old.logp_old, self.cfg.target_accept, batch.valid)

    # ------------------------------------------------------------------ per mini-batch: its scope

    def _num_micro(self, rows):
        if rows.shape[0] % self.cfg.micro_batch_size:
            raise ValueError(f"a batch of {rows.shape[0]} sequences does not split into micro-batches of "
                             f"{self.cfg.micro_batch_size}.")
        return rows.shape[0] // self.cfg.micro_batch_size

    def _tokens(self, mb: "MiniBatch", logp_new) -> objective.Tokens:
        """The sampled tokens of ``mb`` as the scope reads them, 0 off the valid ones."""
        return objective.Tokens(_zero(mb.logp_inf, mb.valid), _zero(mb.logp_old, mb.valid),
                                _zero(logp_new, mb.valid), mb.valid, mb.u)

    def _stored_topk(self, mb: "MiniBatch"):
        """p_inf's top-k as the rollout stored it ``([N, K], [N, K])``, when it holds at least ``k``."""
        if mb.topk_ids is None or mb.topk_ids.shape[-1] < self.cfg.k:
            return None
        return _flat(mb.topk_ids), _flat(mb.topk_logp_inf)

    def _z_heads(self, lam, policy_heads, inf_heads):
        """``(z_topk, z_exact or None)`` ``[N]`` towards p_new at ``lam``, a pass over the vocabulary of
        ``policy_heads`` and ``inf_heads`` (each ``(h, w, lse)``)."""
        cfg = self.cfg
        sg = jax.lax.stop_gradient
        return pk.fused_obrs_normalizer(*sg(inf_heads), *sg(policy_heads), lam, cfg.k, cfg.z == "exact",
                                        temperature_inf=cfg.temperature, impl=cfg.kernel_impl)

    def _inf_params(self, actor_params, rollout_actor):
        """The actor whose distribution is p_inf: ``rollout_actor`` once given (and read), else the update's."""
        return rollout_actor if rollout_actor is not None and self.cfg.filter_needs_rollout_actor else actor_params

    def _inf_heads(self, actor_params, mb: "MiniBatch"):
        """``(h, w, lse)`` of p_inf: ``actor_params`` at the rollout temperature (stop-gradient)."""
        h, w = self._hidden_at("actor", jax.lax.stop_gradient(actor_params), mb)
        lse = pk.fused_token_stats(h, w, _flat(mb.targets), 1, temperature=self.cfg.temperature,
                                   impl=self.cfg.kernel_impl)[1]
        return h, w, lse

    def _statistics(self, h_pol, w_pol, inf_params, mb: "MiniBatch", lam) -> "_Statistics":
        """What the scope towards p_new needs of one micro-batch (no gradient), given the policy's final
        hidden states: log p_new and, with the top-k sets of the one pass (``z_in_first_pass``), both
        models' log-probs on V_k; else, at a known ``lam``, Z; with ``lam`` None, log p_new alone."""
        cfg, sg = self.cfg, jax.lax.stop_gradient
        h_pol, w_pol, targets = sg(h_pol), sg(w_pol), _flat(mb.targets)
        shape = mb.valid.shape
        if cfg.z_in_first_pass:
            h_inf, w_inf = self._hidden_at("actor", sg(inf_params), mb)
            stats = pk.fused_jackpot_stats(h_pol, w_pol, h_inf, w_inf, targets, cfg.k, cfg.lam,
                                           temperature_actor=cfg.temperature, inf_topk=self._stored_topk(mb),
                                           impl=cfg.kernel_impl)
            vk = (stats.vk_logp_actor.reshape(shape + (-1,)), stats.vk_logp_new.reshape(shape + (-1,)))
            return _Statistics(stats.logp_new.reshape(shape), vk=vk)
        logp_new, lse_new = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl=cfg.kernel_impl)[:2]
        if lam is None:
            return _Statistics(logp_new.reshape(shape))
        z_topk, z_exact = self._z_heads(lam, (h_pol, w_pol, lse_new), self._inf_heads(inf_params, mb))
        return _Statistics(logp_new.reshape(shape), z=(z_topk.reshape(shape),
                                                       None if z_exact is None else z_exact.reshape(shape)))

    def _scope_from_statistics(self, mb: "MiniBatch", run, lam_old) -> objective.Scope:
        """The jackpot scope towards p_new from ``run(lam)``, the :class:`_Statistics` of the whole
        mini-batch: a budget's lam first needs p_new alone, unless the one pass gives V_k."""
        cfg = self.cfg
        lam_of = lambda stats: objective.obrs_lam(cfg, self._tokens(mb, stats.logp_new), lam_old)
        if cfg.target_accept > 0 and not cfg.z_in_first_pass:
            lam = lam_of(run(None))
            stats = run(lam)
        else:
            stats = run(None if cfg.z_in_first_pass else cfg.lam)
            lam = lam_of(stats)
        z_topk, z_exact = (obrs.normalizer(*stats.vk, lam), None) if stats.vk is not None else stats.z
        return objective.policy_scope(cfg, self._tokens(mb, stats.logp_new), z_topk, z_exact, lam)

    def _scope_from_batch(self, mb: "MiniBatch", lam_old) -> objective.Scope:
        """The scope of a mode that needs no p_new: the baselines, and OBRS towards p_old (its Z from
        :meth:`prepare`, its lam the rollout batch's)."""
        tokens = self._tokens(mb, jnp.zeros_like(mb.logp_old))  # p_new is read by neither
        return objective.policy_scope(self.cfg, tokens, mb.z_topk, mb.z_exact if self.cfg.z == "exact" else None,
                                      lam_old)

    def _scope(self, state: TrainState, mini: "MiniBatch", num_micro, lam_old, rollout_actor):
        """The mini-batch's :class:`objective.Scope`, or None when its one micro-batch's forward gives it."""
        cfg = self.cfg
        if not cfg.scope_reads_p_new:
            return self._scope_from_batch(mini, lam_old)
        if num_micro == 1:
            return None
        inf_params = self._inf_params(state.actor, rollout_actor)
        micro = split_micro(mini, num_micro)

        def run(lam):
            def one(mb):
                return self._statistics(*self._hidden_at("policy", state.policy, mb), inf_params, mb, lam)

            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), jax.lax.map(one, micro))

        return self._scope_from_statistics(mini, run, lam_old)

    # ------------------------------------------------------------------ per mini-batch: the losses

    def _micro_loss(self, trainable, frozen_actor, mb: "MiniBatch", valid_weight, rho, weight, lam_old,
                    rollout_actor=None, beta=None):
        """Eq. 8 on one micro-batch: ``(L_policy + L_actor, metrics)``, both parts of the mini-batch's
        sums. ``rho`` / ``weight``: the mini-batch scope's at these tokens, or None (the micro-batch is the
        whole mini-batch, and its forward gives the scope)."""
        cfg, sg = self.cfg, jax.lax.stop_gradient
        h_pol, w_pol = self._hidden_at("policy", trainable["policy"], mb)
        targets, shape = _flat(mb.targets), mb.valid.shape
        in_pass = rho is None
        rollout_p_inf = rollout_actor is not None and cfg.filter_needs_rollout_actor
        vk_here = in_pass and cfg.z_in_first_pass and not rollout_p_inf
        stats = None
        if cfg.train_actor or (in_pass and not rollout_p_inf):
            h_act, w_act = self._hidden_at("actor", trainable.get("actor", frozen_actor), mb)
            stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, cfg.k, cfg.lam,
                                           temperature_actor=cfg.temperature, direction=cfg.distill_direction,
                                           normalizers=vk_here, inf_topk=self._stored_topk(mb) if vk_here else None,
                                           impl=cfg.kernel_impl)
            logp_new, lse_new = stats.logp_new, stats.lse_new
        else:
            logp_new, lse_new = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl=cfg.kernel_impl)[:2]
        logp_new = _zero(logp_new.reshape(shape), mb.valid)
        metrics = {}
        if in_pass:
            tokens = self._tokens(mb, sg(logp_new))
            lam = objective.obrs_lam(cfg, tokens, lam_old)
            if vk_here:
                z_topk, z_exact = obrs.normalizer(stats.vk_logp_actor, stats.vk_logp_new, lam), None
            else:
                inf = self._inf_heads(rollout_actor, mb) if rollout_p_inf else (h_act, w_act, stats.lse_actor)
                z_topk, z_exact = self._z_heads(lam, (h_pol, w_pol, lse_new), inf)
            scope = objective.policy_scope(cfg, tokens, z_topk.reshape(shape),
                                           None if z_exact is None else z_exact.reshape(shape), lam)
            rho, weight, metrics = scope.rho, scope.weight, dict(scope.metrics)
        policy_loss, policy_metrics = self._policy_loss(logp_new, mb, rho, weight, valid_weight)
        metrics.update(policy_metrics)
        actor_loss = jnp.zeros((), jnp.float32)
        if cfg.train_actor:
            actor_loss, actor_metrics = self._actor_loss(stats, mb, valid_weight, beta)
            metrics.update(actor_metrics)
        metrics["loss/total"] = policy_loss + actor_loss
        return metrics["loss/total"], metrics

    def _policy_loss(self, logp_new, mb: "MiniBatch", rho, weight, valid_weight):
        """L_policy (eq. 5) of one micro-batch from its sampled tokens' log p_new ``[B, W]`` and the scope's
        token weights there."""
        cfg = self.cfg
        return objective.policy_loss(_zero(logp_new, mb.valid), _zero(mb.logp_old, mb.valid),
                                     _zero(mb.logp_inf, mb.valid), mb.advantages, rho, weight, valid_weight,
                                     eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip=cfg.clip)

    def _actor_loss(self, stats, mb: "MiniBatch", valid_weight, beta):
        """L_actor (eq. 6 + beta eq. 7) of one micro-batch from the fused statistics of the actor."""
        cfg, shape = self.cfg, mb.valid.shape
        return objective.actor_loss(
            _zero(stats.logp_actor.reshape(shape), mb.valid), _zero(mb.logp_actor_old, mb.valid),
            _zero(mb.logp_inf, mb.valid), mb.advantages, _zero(stats.distill_kl.reshape(shape), mb.valid),
            valid_weight, beta=cfg.beta if beta is None else beta, tis_cap=cfg.actor_tis_cap, eps_low=cfg.eps_low,
            eps_high=cfg.eps_high, clip=cfg.clip, ppo_weight=cfg.actor_ppo)

    def _update(self, state: TrainState, batch: TrainBatch, old: OldStats, key, lam_old=1.0, rollout_actor=None,
                beta=None, actor_lr_scale=None):
        """One optimizer update of both models on a mini-batch: ``(new state, metrics)``."""
        cfg = self.cfg
        trainable = {"policy": state.policy, **({"actor": state.actor} if cfg.train_actor else {})}
        frozen_actor = None if cfg.train_actor else state.actor
        num_micro = self._num_micro(batch.inputs)
        mini = MiniBatch.make(batch, old, key, cfg.window)
        valid_weight = objective.aggregation_weights(mini.valid, cfg.aggregation)
        scope = self._scope(state, mini, num_micro, lam_old, rollout_actor)
        rho, weight = (None, None) if scope is None else (scope.rho, scope.weight)
        parts = split_micro((mini, valid_weight, rho, weight), num_micro)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, part):
            (_, metrics), grads = grad_fn(trainable, frozen_actor, *part, lam_old, rollout_actor, beta)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        shapes = jax.eval_shape(grad_fn, trainable, frozen_actor, *jax.tree.map(lambda x: x[0], parts), lam_old,
                                rollout_actor, beta)
        (_, metric_shapes), grad_shapes = shapes
        init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grad_shapes, metric_shapes))
        (grads, metrics), _ = jax.lax.scan(accumulate, init, parts)  # sums: the mini-batch's gradient and loss
        if scope is not None:
            metrics.update(scope.metrics)

        norms = {name: optax.tree.norm(g) for name, g in grads.items()}
        new = {"policy": apply_updates(self.policy_tx, grads["policy"], state.policy_opt, state.policy)}
        if cfg.train_actor:
            new["actor"] = apply_updates(self.actor_tx, grads["actor"], state.actor_opt, state.actor, actor_lr_scale)
        # the loss, the gradients and everything the update would apply: one flag each (see _checks_of)
        checks = jnp.concatenate([jnp.stack([jnp.isfinite(metrics["loss/total"])]
                                            + [jnp.isfinite(n) for n in norms.values()]),
                                  finite_flags(self._candidate(*new["policy"], *new.get("actor", (None, None))))])
        finite = jnp.all(checks)
        keep = lambda updated, current: jax.tree.map(lambda u, c: jnp.where(finite, u, c), updated, current)
        policy, policy_opt = keep(new["policy"], (state.policy, state.policy_opt))
        actor, actor_opt = (keep(new["actor"], (state.actor, state.actor_opt)) if cfg.train_actor
                             else (state.actor, None))
        metrics.update({f"grad_norm/{name}": n for name, n in norms.items()})
        metrics["nonfinite/skipped"] = 1.0 - finite.astype(jnp.float32)
        metrics["nonfinite/checks"] = checks  # popped by update
        if self.policy_lr is not None:
            metrics["lr"] = jnp.asarray(self.policy_lr(state.updates), jnp.float32)
        return TrainState(policy, actor, policy_opt, actor_opt, state.updates + finite.astype(jnp.int32)), metrics


def finite_flags(parts: dict) -> jax.Array:
    """``[leaves]`` bool: each leaf of ``parts`` (a dict of trees, in its order) all finite; integer
    leaves are. Traceable: inside the update, one reduction per leaf fused with the update itself."""
    leaves = [x for tree in parts.values() for x in jax.tree.leaves(tree)]
    flags = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.ones((), bool) for x in leaves]
    return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def leaf_names(parts: dict) -> list[str]:
    """The names of :func:`finite_flags`' leaves, e.g. ``policy['layers'][0]['mlp']['down']['kernel']``."""
    return [name + jax.tree_util.keystr(path).removesuffix(".value")
            for name, tree in parts.items() for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


_finite_flags = jax.jit(finite_flags)


def nonfinite_leaves(parts: dict) -> list[str]:
    """The names of the leaves of ``parts`` (a dict of trees) with a NaN or an inf, on the host (one
    jitted reduction per tree: each may live on its own mesh): ``[]`` when all are finite."""
    bad = []
    for name, tree in parts.items():
        flags = np.asarray(jax.device_get(_finite_flags({name: tree})))
        bad += [leaf for leaf, ok in zip(leaf_names({name: tree}), flags) if not ok]
    return bad


def _zero(x, valid):
    """``x`` with 0 off ``valid``: padding never reaches a ratio (nor its gradient)."""
    return jnp.where(valid, x, 0.0)


class _Statistics(NamedTuple):
    """:meth:`Updater._statistics` of (micro-)batch tokens ``[B, W]``: log p_new, and V_k's log-probs
    ``([B, W, 2k], [B, W, 2k])`` or Z ``(z_topk, z_exact or None)`` towards p_new, when computed."""

    logp_new: jax.Array
    vk: tuple | None = None
    z: tuple | None = None


def apply_updates(tx, grads, opt_state, params, scale=None):
    """``(params, opt_state)`` after one step of ``tx``, its update times ``scale`` (the learning
    rate times ``scale``: optax's update is proportional to it); ``None``: the update as it is."""
    updates, opt_state = tx.update(grads, opt_state, params)
    if scale is not None:
        updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state



def lr_scale_arg(actor_lr_scale):
    """The update's actor learning-rate factor argument: None (no factor: the program without the
    multiply) or a float32 scalar."""
    return None if actor_lr_scale is None else np.float32(actor_lr_scale)


class MiniBatch(NamedTuple):
    """A mini-batch as the update reads it: the models' inputs ``[B, T]``; each per-token array at the
    completion positions ``[B, W]`` (:func:`objective.completion_positions`; ``W = T`` without a window),
    the rollout batch's :class:`OldStats` rows and the tokens' uniform draws among them."""

    inputs: jax.Array
    input_mask: jax.Array
    positions: jax.Array
    targets: jax.Array
    valid: jax.Array
    logp_inf: jax.Array
    advantages: jax.Array  # [B]
    topk_ids: jax.Array | None  # [B, W, K]
    topk_logp_inf: jax.Array | None
    logp_old: jax.Array
    logp_actor_old: jax.Array
    z_topk: jax.Array
    z_exact: jax.Array
    u: jax.Array

    @classmethod
    def make(cls, batch: TrainBatch, old: OldStats, key, width: int) -> "MiniBatch":
        positions = objective.completion_positions(batch.valid, width)
        take = (lambda x: None if x is None else objective.at_positions(x, positions)) if width else (lambda x: x)
        valid = objective.window_valid(batch.valid, positions) if width else batch.valid
        return cls(batch.inputs, batch.input_mask, positions, take(batch.targets), valid, take(batch.logp_inf),
                   batch.advantages, take(batch.topk_ids), take(batch.topk_logp_inf), take(old.logp_old),
                   take(old.logp_actor_old), take(old.z_topk), take(old.z_exact),
                   take(objective.uniforms(key, batch.valid)))
