"""The update step: Algorithm 1, phase 2, as one jitted function per mini-batch.

Once per rollout batch, :meth:`Updater.prepare` runs the policy at the start of the step (p_old)
and the actor that generated the rollouts (p_omega_old) over every sequence: their log-probs of the
sampled tokens, the actor-policy KL over the full vocabulary (a metric), and, when OBRS aligns to
p_old, the normalizers Z of each token. Then :meth:`Updater.update`, per mini-batch, in one jitted
function with explicit shardings:

1. forwards the policy (p_new) and the actor (p_omega) to their final hidden states;
2. computes the sampled tokens' log-probs and the distillation KL (eq. 7) with
   :func:`pallas_kernels.fused_jackpot_stats`, never forming the logits, only where the losses
   read them: with ``window`` (the trainer sets ``rollout.max_new_tokens``), at each sequence's
   completion positions, not its prompt and padding;
3. weights each token by its mode: ``jackpot`` samples the OBRS mask and rho (Z from the top-k
   union with kappa, or exact): with the chunked kernels' top-k Z towards p_new, from the top-k
   sets that step 2's one pass collected (``StepConfig.z_in_first_pass``; p_inf's own top-k taken
   from the batch when the rollout stored at least ``k``, Algorithm 1, phase 1), else with
   :func:`pallas_kernels.fused_obrs_filter` and its own pass over the vocabulary; ``tis``
   truncates p_old / p_inf, ``on_policy`` / ``off_policy`` weigh every token 1;
4. differentiates L = L_policy (eq. 5) + L_actor (eq. 6 + beta eq. 7), the joint objective of
   eq. 8, over micro-batches (gradient accumulation), and applies both optax updates, skipping
   an update whose loss or gradient is not finite.

Which p_inf OBRS sees. The sampled token's log p_inf is the rollout's own (the distribution it was
drawn from, after temperature / top-p / top-k). Z needs p_inf over the whole vocabulary: that is
the actor's forward at the rollout temperature (its current parameters for p_target = p_new, as
the paper's "no extra forward passes"; the rollout-time ones for p_old), which ignores top-p /
top-k truncation; kappa rescales the top-k Z to the measured acceptance either way. With the top-k
Z towards p_new in the first pass and a batch that carries p_inf's top-k (``rollout.logprobs_top_k
>= k``), V_k's p_inf part is the rollout's own top-k (ids and log-probs), as in Algorithm 1, and
the pass gathers p_new there instead of ranking the actor's logits: the same distribution, as the
update's actor is the one that sampled (with ``rollout_actor`` the filter keeps its own pass).
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
from jackpot_jax import losses, obrs, parallel
from jackpot_jax.models.sharding import DEFAULT_RULES, activation_sharding, make_mesh, model_rules, param_shardings
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
    def actor_in_update(self) -> bool:
        """The actor's forward runs in the update: to train it, or as p_inf's Z for p_target = new."""
        return self.train_actor or (self.mode == "jackpot" and self.p_target == "new")

    @property
    def filter_needs_rollout_actor(self) -> bool:
        """The OBRS filter reads p_inf in the update (p_target = new) while the actor is trained, so
        after a rollout's first update p_inf must come from the actor that sampled the batch."""
        return self.train_actor and self.mode == "jackpot" and self.p_target == "new"

    @property
    def z_in_first_pass(self) -> bool:
        """The chunked statistics' one pass gives Z_approx (both top-k sets by raw logits, section
        4.4.1), so the OBRS filter makes no pass over the vocabulary of its own: the top-k Z towards
        p_new, when the filter's p_inf is the actor of that pass (see ``filter_needs_rollout_actor``).
        A batch with p_inf's top-k (``TrainBatch.topk_ids``, at least ``k``) gives that pass p_inf's set."""
        return (self.mode == "jackpot" and self.p_target == "new" and self.z == "topk"
                and self.kernel_impl in ("auto", "chunked"))


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


def _max_keys(metrics):
    return {key for key in metrics if key.endswith("_max")}


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
        return self._update_jit[rollout_actor is not None](state, batch, old, key, lam_old, rollout_actor,
                                                           self._beta(beta), _scale(actor_lr_scale))

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

    def _hidden(self, which, params, batch, rows=None):
        """``(h [B * T, D], w [D, V])`` of the policy or the actor on a batch's inputs; with ``rows``
        (of :func:`_completion_window`), ``h`` at those positions only."""
        graphdef, rest = (self.policy_def, self.policy_rest) if which == "policy" else (self.actor_def, self.actor_rest)
        model = nnx.merge(graphdef, params, rest)
        with activation_sharding(self.mesh if which == "policy" else self.actor_mesh, self.rules[which]):
            h, _ = model.hidden_states(batch.inputs, attention_mask=batch.input_mask)
        h = _flat(h)
        return (h if rows is None else h[rows]), model.unembedding()

    # ------------------------------------------------------------------ once per rollout batch

    def _prepare(self, policy_params, actor_params, batch: TrainBatch, lam, normalizers: bool = False) -> OldStats:
        """:class:`OldStats` for every sequence of ``batch``, one micro-batch at a time; with
        ``normalizers``, Z towards p_old at this ``lam`` (for p_target = old)."""
        cfg = self.cfg

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

    # ------------------------------------------------------------------ per mini-batch

    def _num_micro(self, rows):
        if rows.shape[0] % self.cfg.micro_batch_size:
            raise ValueError(f"a batch of {rows.shape[0]} sequences does not split into micro-batches of "
                             f"{self.cfg.micro_batch_size}.")
        return rows.shape[0] // self.cfg.micro_batch_size

    def _weights(self, key, mb, tok, h, lse, vk=None):
        """Per-token ``(mask, rho, metrics)`` of the policy loss for this mode (stop-gradient); ``vk``:
        p_inf's and p_new's log-probs on V_k from the first pass (:class:`pk.JackpotStats`), or None."""
        cfg, sg = self.cfg, jax.lax.stop_gradient
        logp_inf, logp_old, logp_new, valid = tok.logp_inf, tok.logp_old, sg(tok.logp_new), tok.valid
        if cfg.mode in ("on_policy", "off_policy"):
            return valid, jnp.ones_like(logp_inf), {}
        if cfg.mode in ("tis", "tis_distill"):
            return valid, losses.truncated_is(logp_old - logp_inf, cfg.c1), {}
        logp_target = logp_new if cfg.p_target == "new" else logp_old
        lam = (obrs.solve_lambda(logp_inf, logp_target, cfg.target_accept, valid) if cfg.target_accept > 0
               else cfg.lam) if cfg.p_target == "new" else mb.lam[0]
        metrics = {"obrs/lam": jnp.asarray(lam, jnp.float32)}
        if vk is not None:  # Z_approx = sum over V_k of min(p_inf, p_new / lam) (eq. 4, section 4.4.1)
            z_topk, z_exact = obrs.normalizer(*vk, lam), None
            f = obrs.obrs_filter(key, logp_inf, logp_old, logp_new, z_topk, valid, lam=lam, c1=cfg.c1, c2=cfg.c2,
                                 target="new")
        elif cfg.p_target == "new":
            (h_pol, w_pol, h_act, w_act), (lse_new, lse_actor) = h, lse
            f = pk.fused_obrs_filter(key, h_act, w_act, lse_actor, h_pol, w_pol, lse_new,
                                     pk.SampledTokens(logp_inf, logp_old, logp_new, valid), lam=lam, c1=cfg.c1,
                                     c2=cfg.c2, k=cfg.k, target="new", exact=cfg.z == "exact",
                                     temperature_inf=cfg.temperature, impl=cfg.kernel_impl)
            z_topk, z_exact = f.z_topk, f.z_exact
        else:
            exact = cfg.z == "exact"
            z_topk, z_exact = _flat(mb.z_topk), _flat(mb.z_exact) if exact else None
            f = obrs.obrs_filter(key, logp_inf, logp_old, logp_new, z_exact if exact else z_topk, valid, lam=lam,
                                 c1=cfg.c1, c2=cfg.c2, target="old", calibrate=not exact)
        rho_max = jnp.max(jnp.where(f.accepted, f.rho, 0.0))
        metrics.update({"obrs/accept_prob_mean": losses.masked_mean(f.accept_prob, valid), "obrs/kappa": f.kappa,
                        "obrs/z_topk_mean": losses.masked_mean(z_topk, valid), "obrs/rho_max": rho_max})
        if z_exact is not None:
            metrics["obrs/z_exact_mean"] = losses.masked_mean(z_exact, valid)
        return f.accepted, f.rho, metrics

    def _micro_loss(self, trainable, frozen_actor, mb, key, rollout_actor=None, beta=None):
        """Eq. 8 on one micro-batch: ``(L_policy + L_actor, metrics)``."""
        rows, mb = _completion_window(mb, self.cfg.window)
        h_pol, w_pol = self._hidden("policy", trainable["policy"], mb, rows)
        cross = self._actor_side(trainable.get("actor", frozen_actor), h_pol, w_pol, mb, rows, key, rollout_actor,
                                 beta)
        policy_loss, metrics = self._policy_loss(cross.logp_new, cross.mask, cross.rho, mb)
        metrics.update(cross.metrics)
        metrics["loss/total"] = total = policy_loss + cross.actor_loss
        return total, metrics

    def _actor_side(self, actor_params, h_pol, w_pol, mb, rows, key, rollout_actor=None, beta=None) -> "_ActorSide":
        """What eq. 8 needs of both models on one (windowed) micro-batch, given the policy's final
        hidden states ``h_pol`` and unembedding ``w_pol``: the sampled tokens' log p_new (its gradient
        reaches ``h_pol``, ``w_pol``), the policy loss's token weights (stop-gradient) and L_actor
        (eq. 6 + beta eq. 7, its gradient reaching only ``actor_params``: p_new is its fixed target;
        ``beta`` default ``StepConfig.beta``)."""
        cfg, sg = self.cfg, jax.lax.stop_gradient
        targets, valid = _flat(mb.targets), _flat(mb.valid)
        vk = None
        if cfg.actor_in_update:
            h_act, w_act = self._hidden("actor", actor_params, mb, rows)
            rollout_p_inf = rollout_actor is not None and cfg.filter_needs_rollout_actor
            z_in_first_pass = cfg.z_in_first_pass and not rollout_p_inf
            stored_topk = z_in_first_pass and mb.topk_ids is not None and mb.topk_ids.shape[-1] >= cfg.k
            inf_topk = (_flat(mb.topk_ids), _flat(mb.topk_logp_inf)) if stored_topk else None
            stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, cfg.k, cfg.lam,
                                           temperature_actor=cfg.temperature, direction=cfg.distill_direction,
                                           normalizers=z_in_first_pass, inf_topk=inf_topk, impl=cfg.kernel_impl)
            logp_new, heads, lse = stats.logp_new, (h_pol, w_pol, h_act, w_act), (stats.lse_new, stats.lse_actor)
            if z_in_first_pass:
                vk = (stats.vk_logp_actor, stats.vk_logp_new)
            if rollout_p_inf:
                # p_inf for the filter: the actor that sampled the batch (stop-gradient)
                h_inf, w_inf = self._hidden("actor", sg(rollout_actor), mb, rows)
                lse_inf = pk.fused_token_stats(h_inf, w_inf, targets, 1, temperature=cfg.temperature,
                                               impl=cfg.kernel_impl)[1]
                heads, lse = (h_pol, w_pol, h_inf, w_inf), (stats.lse_new, lse_inf)
        else:
            logp_new, stats, heads, lse = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl=cfg.kernel_impl)[0], None, None, None
        tok = pk.SampledTokens(_zero(_flat(mb.logp_inf), valid), _zero(_flat(mb.logp_old), valid),
                               _zero(logp_new, valid), valid)
        mask, rho, metrics = self._weights(key, mb, tok, heads, lse, vk)
        mask, rho = sg(mask), sg(rho)
        metrics.update({"obrs/accept_rate": losses.masked_mean(mask, valid), "obrs/rho_mean": losses.masked_mean(rho, mask)})
        metrics.setdefault("obrs/rho_max", jnp.max(jnp.where(mask, rho, 0.0)))
        actor_loss = jnp.zeros((), jnp.float32)
        if cfg.train_actor:
            actor_loss, actor_metrics = losses.actor_loss(
                _zero(stats.logp_actor, valid).reshape(mb.valid.shape), mb.logp_actor_old, mb.logp_inf,
                mb.advantages, mb.valid, stats.distill_kl.reshape(mb.valid.shape),
                beta=cfg.beta if beta is None else beta,
                tis_cap=cfg.actor_tis_cap, eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip=cfg.clip,
                aggregation=cfg.aggregation, ppo_weight=cfg.actor_ppo)
            metrics.update({"loss/actor_ppo": actor_metrics["actor/ppo_loss"],
                            "loss/distill": actor_metrics["actor/distill_kl"]})
        return _ActorSide(logp_new, mask, rho, actor_loss, metrics)

    def _policy_loss(self, logp_new, mask, rho, mb):
        """L_policy (eq. 5) of one (windowed) micro-batch from the sampled tokens' log p_new ``[B * T]``
        and their weights (``mask``, ``rho`` of :meth:`_actor_side`): ``(loss, metrics)``."""
        cfg = self.cfg
        valid = _flat(mb.valid)
        logp_new, logp_inf = _zero(logp_new, valid), _zero(_flat(mb.logp_inf), valid)
        advantages = jnp.repeat(mb.advantages, mb.targets.shape[1])
        ppo, clipped = losses.ppo_token_loss(logp_new, _zero(_flat(mb.logp_old), valid), advantages,
                                             eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip=cfg.clip)
        policy_loss = losses.masked_mean((rho * ppo).reshape(mb.valid.shape), mask.reshape(mb.valid.shape),
                                         cfg.aggregation)
        log_ratio = jax.lax.stop_gradient(logp_new) - logp_inf  # k3 estimator of KL(p_inf || p_new), sampled tokens
        return policy_loss, {"loss/policy": policy_loss, "policy/clip_frac": losses.masked_mean(clipped, mask),
                             "mismatch/kl_inf_new": losses.masked_mean(jnp.expm1(log_ratio) - log_ratio, valid)}

    def _update(self, state: TrainState, batch: TrainBatch, old: OldStats, key, lam_old=1.0, rollout_actor=None,
                beta=None, actor_lr_scale=None):
        """One optimizer update of both models on a mini-batch: ``(new state, metrics)``."""
        cfg = self.cfg
        trainable = {"policy": state.policy, **({"actor": state.actor} if cfg.train_actor else {})}
        frozen_actor = None if cfg.train_actor else state.actor
        num_micro = self._num_micro(batch.inputs)
        micro = split_micro(_MiniBatch.make(batch, old, lam_old), num_micro)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, inputs):
            index, mb = inputs
            (_, metrics), grads = grad_fn(trainable, frozen_actor, mb, jax.random.fold_in(key, index), rollout_actor,
                                          beta)
            grad_sum, metric_sum = carry
            maxed = _max_keys(metrics)
            metric_sum = {k: jnp.maximum(metric_sum[k], v) if k in maxed else metric_sum[k] + v
                          for k, v in metrics.items()}
            return (jax.tree.map(jnp.add, grad_sum, grads), metric_sum), None

        shapes = jax.eval_shape(grad_fn, trainable, frozen_actor, jax.tree.map(lambda x: x[0], micro), key,
                                rollout_actor, beta)
        (_, metric_shapes), _ = shapes
        init = (jax.tree.map(jnp.zeros_like, trainable),
                {k: jnp.full(v.shape, -jnp.inf if k in _max_keys(metric_shapes) else 0.0, v.dtype)
                 for k, v in metric_shapes.items()})
        (grad_sum, metric_sum), _ = jax.lax.scan(accumulate, init, (jnp.arange(num_micro), micro))
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        metrics = {k: v if k in _max_keys(metric_sum) else v / num_micro for k, v in metric_sum.items()}

        norms = {name: optax.tree.norm(g) for name, g in grads.items()}
        finite = jnp.isfinite(metrics["loss/total"]) & functools.reduce(jnp.logical_and, [jnp.isfinite(n) for n in norms.values()])
        new = {"policy": _apply(self.policy_tx, grads["policy"], state.policy_opt, state.policy)}
        if cfg.train_actor:
            new["actor"] = _apply(self.actor_tx, grads["actor"], state.actor_opt, state.actor, actor_lr_scale)
        keep = lambda updated, current: jax.tree.map(lambda u, c: jnp.where(finite, u, c), updated, current)
        policy, policy_opt = keep(new["policy"], (state.policy, state.policy_opt))
        actor, actor_opt = keep(new["actor"], (state.actor, state.actor_opt)) if cfg.train_actor else (state.actor, None)
        metrics.update({f"grad_norm/{name}": n for name, n in norms.items()})
        metrics["nonfinite/skipped"] = 1.0 - finite.astype(jnp.float32)
        if self.policy_lr is not None:
            metrics["lr"] = jnp.asarray(self.policy_lr(state.updates), jnp.float32)
        return TrainState(policy, actor, policy_opt, actor_opt, state.updates + finite.astype(jnp.int32)), metrics


def _completion_window(mb, width):
    """``(rows [B * width], windowed mini-batch)``: each sequence's first ``width`` target positions
    from its first generated token (a completion's targets are contiguous and at most ``width``:
    ``rollout.max_new_tokens``), as rows of the flattened ``[B * T]`` positions, and the mini-batch
    with its per-token arrays taken there, ``[B, width]``; positions past ``T`` repeat the last one
    and are not ``valid``. The inputs stay whole: the models read every position. ``width`` 0: no
    window, ``(None, mb)``."""
    if not width:
        return None, mb
    b, t = mb.valid.shape
    pos = jnp.argmax(mb.valid, axis=1)[:, None] + jnp.arange(width)[None, :]
    rows = (jnp.arange(b)[:, None] * t + jnp.minimum(pos, t - 1)).reshape(-1)
    take = lambda x: _flat(x)[rows].reshape((b, width) + x.shape[2:])
    fields = ("targets", "valid", "logp_inf", "logp_old", "logp_actor_old", "z_topk", "z_exact") + (
        ("topk_ids", "topk_logp_inf") if mb.topk_ids is not None else ())
    windowed = {name: take(getattr(mb, name)) for name in fields}
    windowed["valid"] = windowed["valid"] & (pos < t)
    return rows, mb._replace(**windowed)


def _zero(x, valid):
    """``x`` with 0 off ``valid``: padding never reaches a ratio (nor its gradient)."""
    return jnp.where(valid, x, 0.0)


class _ActorSide(NamedTuple):
    """:meth:`Updater._actor_side`'s result for one micro-batch ``[B * T]``."""

    logp_new: jax.Array
    mask: jax.Array
    rho: jax.Array
    actor_loss: jax.Array
    metrics: dict


def _apply(tx, grads, opt_state, params, scale=None):
    """``(params, opt_state)`` after one step of ``tx``, its update times ``scale`` (the learning
    rate times ``scale``: optax's update is proportional to it); ``None``: the update as it is."""
    updates, opt_state = tx.update(grads, opt_state, params)
    if scale is not None:
        updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state


def _scale(actor_lr_scale):
    """The update's actor learning-rate factor argument: None (no factor: the program without the
    multiply, bit for bit the one from before the controller had it) or a float32 scalar."""
    return None if actor_lr_scale is None else np.float32(actor_lr_scale)


class _MiniBatch(NamedTuple):
    """A mini-batch's rollout arrays with its rows of :class:`OldStats` (and p_old's lam)."""

    inputs: jax.Array
    targets: jax.Array
    input_mask: jax.Array
    valid: jax.Array
    logp_inf: jax.Array
    advantages: jax.Array
    topk_ids: jax.Array | None
    topk_logp_inf: jax.Array | None
    logp_old: jax.Array
    logp_actor_old: jax.Array
    z_topk: jax.Array
    z_exact: jax.Array
    lam: jax.Array

    @classmethod
    def make(cls, batch: TrainBatch, old: OldStats, lam):
        rows = batch.inputs.shape[0]
        return cls(*batch, old.logp_old, old.logp_actor_old, old.z_topk, old.z_exact,
                   jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (rows,)))
