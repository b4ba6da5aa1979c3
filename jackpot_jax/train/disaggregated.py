"""The disaggregated placement: the policy on one mesh, the actor (with its rollout engine) on another.

In the colocated placement (:class:`~jackpot_jax.train.step.Updater`) one jitted function computes
eq. 8 for both models on one mesh. Here the policy and its optimizer state live on ``mesh``, the actor,
its optimizer state and the rollout engine on ``actor_mesh`` (disjoint devices): the actor's new
weights reach the engine without leaving its devices, and the two models' work runs side by side.

Eq. 8 splits at a stop-gradient: L_actor's target is SG(p_new) (eq. 7) and the policy loss's OBRS
weights are stop-gradient, so each model's gradient needs only values of the other. Per mini-batch:

1. the scope (:class:`~jackpot_jax.train.objective.Scope`, the colocated step's own code): towards
   p_new, the policy's final hidden states ``h_pol`` of each micro-batch go to ``actor_mesh`` device to
   device, with its unembedding ``w_pol`` (once per update), where the statistics pass runs;
2. per micro-batch, on ``actor_mesh``: L_actor and its gradient, from ``h_pol`` again;
3. per micro-batch, on ``mesh``: the policy's forward under the gradient, and L_policy (eq. 5) with the
   scope's token weights, moved there once.

Both optimizers then apply their gradients, or neither does when the loss, a gradient norm or a leaf
of the updated parameters or optimizer states is not finite (as colocated). The price of the split: the
policy forwards two or three times per micro-batch (as activation rematerialization would) and its
unembedding's logits are computed on both meshes. The rollout batch and its
:class:`~jackpot_jax.train.step.OldStats` are placed on both meshes; the results equal the colocated
step's within float32 rounding (tests/test_parallel.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels as pk
from jackpot_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
from jackpot_jax.train.batch import TrainBatch, split_micro
from jackpot_jax.train import objective
from jackpot_jax.train.step import (MiniBatch, OldStats, TrainState, Updater, apply_updates, finite_flags,
                                    lr_scale_arg)


def _micro(batch, num_micro: int, index):
    """Micro-batch ``index`` (traced) of ``batch``'s contiguous split into ``num_micro``."""
    return jax.tree.map(lambda x: x[index], split_micro(batch, num_micro))


class DisaggregatedUpdater(Updater):
    """:class:`Updater` with the policy on ``mesh`` and the actor on ``actor_mesh`` (disjoint
    devices); the same ``prepare`` / ``update`` interface and results. One process (see the
    trainer's check)."""

    def __init__(self, cfg, policy_model, actor_model, policy_tx, actor_tx=None, policy_lr=None, *, mesh,
                 actor_mesh, rules=DEFAULT_RULES):
        if actor_model is None:
            raise ValueError(f"the disaggregated placement needs an actor: mode={cfg.mode!r} has none.")
        shared = set(mesh.devices.flat) & set(actor_mesh.devices.flat)
        if shared:
            raise ValueError(f"the policy's and the actor's meshes share devices {sorted(d.id for d in shared)}: "
                             "the disaggregated placement gives each model its own devices.")
        super().__init__(cfg, policy_model, actor_model, policy_tx, actor_tx, policy_lr, mesh=mesh, rules=rules)
        self.actor_mesh = actor_mesh
        self._param_shardings["actor"] = param_shardings(nnx.state(actor_model, nnx.Param), actor_mesh,
                                                         self.rules["actor"])
        d, v = policy_model.config.hidden_size, policy_model.unembedding().shape[1]
        self._w_pol = NamedSharding(actor_mesh, logical_to_spec(("embed", "vocab"), (d, v), actor_mesh))
        self._zeros = {name: jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=shardings)
                       for name, shardings in (("policy", self._param_shardings["policy"]),
                                               ("actor", self._param_shardings["actor"]))}

    @property
    def actor_rows(self):
        """Per-sequence arrays on the actor's mesh, split over its ``("data", "fsdp")``."""
        return NamedSharding(self.actor_mesh, PartitionSpec(("data", "fsdp")))

    @staticmethod
    def _tokens_on(mesh, shape):
        """Per-token arrays ``[B * T, ...]`` on ``mesh``: their rows split over ``("data", "fsdp")``
        (replicated when they do not divide)."""
        split = mesh.shape["data"] * mesh.shape["fsdp"]
        return NamedSharding(mesh, PartitionSpec(("data", "fsdp")) if shape[0] % split == 0 else PartitionSpec())

    def _compile(self, state_shardings):
        """The jitted pieces; each runs on one mesh (see the module docstring)."""
        cfg = self.cfg
        self._unembed = jax.jit(lambda params: nnx.merge(self.policy_def, params, self.policy_rest).unembedding())
        self._policy_hidden = jax.jit(self._policy_hidden_impl, static_argnums=(2, 4))
        self._old = {normalizers: jax.jit(functools.partial(self._old_impl, normalizers=normalizers),
                                          static_argnums=(2,))
                     for normalizers in (False, True)}
        self._mini = jax.jit(lambda batch, old, key: MiniBatch.make(batch, old, key, cfg.window))
        self._valid_weight = jax.jit(lambda mini: objective.aggregation_weights(mini.valid, cfg.aggregation))
        self._statistics_micro = jax.jit(self._statistics_impl, static_argnums=(2,))
        self._scope_from_batch_jit = jax.jit(self._scope_from_batch)
        self._actor_micro = jax.jit(self._actor_micro_impl, static_argnums=(2,), donate_argnums=(8,))
        self._policy_micro = jax.jit(self._policy_micro_impl, static_argnums=(2,), donate_argnums=(7,))
        self._norm = jax.jit(optax.tree.norm)
        # not donated: the old state stays until the checks of both models' updates are read
        self._apply_policy = jax.jit(self._apply_impl("policy"),
                                     out_shardings=(state_shardings.policy, state_shardings.policy_opt,
                                                    NamedSharding(self.mesh, PartitionSpec())))
        self._count = jax.jit(lambda n: n + 1, donate_argnums=(0,), out_shardings=state_shardings.updates)
        if cfg.train_actor:
            self._apply_actor = jax.jit(self._apply_impl("actor"),
                                        out_shardings=(state_shardings.actor, state_shardings.actor_opt,
                                                       NamedSharding(self.actor_mesh, PartitionSpec())))

    # ------------------------------------------------------------------ the jitted pieces

    def _policy_hidden_impl(self, policy_params, batch, num_micro, index, window: bool):
        """The policy's final hidden states on micro-batch ``index`` of a :class:`MiniBatch` at its
        token positions (``window``, for the update) or of a rollout batch at every position (``prepare``)."""
        mb = _micro(batch, num_micro, index)
        hidden = self._hidden_at if window else self._hidden
        return hidden("policy", policy_params, mb)[0]

    def _old_impl(self, actor_params, batch, num_micro, index, h_pol, w_pol, lam, normalizers: bool):
        return self._old_stats(h_pol, w_pol, actor_params, _micro(batch, num_micro, index), lam, normalizers)

    def _statistics_impl(self, inf_params, mini, num_micro, index, h_pol, w_pol, lam):
        """:meth:`Updater._statistics` of micro-batch ``index``, on the actor's mesh."""
        return self._statistics(h_pol, w_pol, inf_params, _micro(mini, num_micro, index), lam)

    def _actor_micro_impl(self, actor_params, mini, num_micro, index, valid_weight, h_pol, w_pol, beta, grad_sum):
        """``grad_sum`` plus L_actor's gradient on micro-batch ``index``, and ``(L_actor, its metrics)``."""
        cfg = self.cfg
        mb, weight = _micro((mini, valid_weight), num_micro, index)

        def loss(actor):
            h_act, w_act = self._hidden_at("actor", actor, mb)
            stats = pk.fused_jackpot_stats(jax.lax.stop_gradient(h_pol), w_pol, h_act, w_act, mb.targets.reshape(-1),
                                           cfg.k, cfg.lam, temperature_actor=cfg.temperature,
                                           direction=cfg.distill_direction, normalizers=False, impl=cfg.kernel_impl)
            return self._actor_loss(stats, mb, weight, beta)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(actor_params)
        return jax.tree.map(jnp.add, grad_sum, grads), (value, metrics)

    def _policy_micro_impl(self, policy_params, mini, num_micro, index, valid_weight, rho, weight, grad_sum):
        """``grad_sum`` plus L_policy's (eq. 5) gradient on micro-batch ``index`` with the scope's token
        weights ``rho``, ``weight``, and its metrics."""
        cfg = self.cfg
        mb, valid_weight, rho, weight = _micro((mini, valid_weight, rho, weight), num_micro, index)

        def loss(policy):
            h, w = self._hidden_at("policy", policy, mb)
            logp_new = pk.fused_token_stats(h, w, mb.targets.reshape(-1), 1, impl=cfg.kernel_impl)[0]
            return self._policy_loss(logp_new.reshape(mb.valid.shape), mb, rho, weight, valid_weight)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(policy_params)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    def _apply_impl(self, name):
        tx = self.policy_tx if name == "policy" else self.actor_tx

        def apply(params, opt_state, grads, scale=None):
            """The updated ``(params, opt_state)`` and a finiteness flag per leaf of each (``finite_flags``)."""
            params, opt_state = apply_updates(tx, grads, opt_state, params, scale)
            return params, opt_state, finite_flags({name: params, f"{name}_opt": opt_state})

        return apply

    # ------------------------------------------------------------------ once per rollout batch

    def prepare(self, policy_params, actor_params, batch: TrainBatch, lam, normalizers: bool = False) -> OldStats:
        """:class:`OldStats` of a rollout batch, as :meth:`Updater.prepare`'s: the policy's hidden
        states move to the actor's mesh, which computes them; the result is on the policy's mesh."""
        num_micro = self._num_micro(batch.inputs)
        on_policy, on_actor = jax.device_put(batch, self.rows), jax.device_put(batch, self.actor_rows)
        lam = jax.device_put(jnp.asarray(lam, jnp.float32), NamedSharding(self.actor_mesh, PartitionSpec()))
        w_pol = jax.device_put(self._unembed(policy_params), self._w_pol)
        parts = []
        for index in range(num_micro):
            h_pol = self._policy_hidden(policy_params, on_policy, num_micro, index, False)
            h_pol = jax.device_put(h_pol, self._tokens_on(self.actor_mesh, h_pol.shape))
            parts.append(self._old[normalizers](actor_params, on_actor, num_micro, index, h_pol, w_pol, lam))
        old = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        return jax.device_put(old, self.rows)

    # ------------------------------------------------------------------ per mini-batch

    def _policy_hidden_on_actor(self, policy_params, on_policy, num_micro, index):
        h_pol = self._policy_hidden(policy_params, on_policy, num_micro, index, True)
        return jax.device_put(h_pol, self._tokens_on(self.actor_mesh, h_pol.shape))

    def _scope_on_actor(self, state, on_policy, on_actor, num_micro, lam_old, rollout_actor, w_pol):
        """The mini-batch's scope, computed on the actor's mesh (see the module docstring, step 1)."""
        cfg = self.cfg
        lam_old = jax.device_put(jnp.asarray(lam_old, jnp.float32), NamedSharding(self.actor_mesh, PartitionSpec()))
        if not cfg.scope_reads_p_new:
            return self._scope_from_batch_jit(on_actor, lam_old)
        inf_params = self._inf_params(state.actor, rollout_actor)

        def run(lam):
            parts = [self._statistics_micro(inf_params, on_actor, num_micro, index,
                                            self._policy_hidden_on_actor(state.policy, on_policy, num_micro, index),
                                            w_pol, lam)
                     for index in range(num_micro)]
            return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)

        return self._scope_from_statistics(on_actor, run, lam_old)  # eager: a few small ops on the actor's mesh

    def update(self, state: TrainState, batch: TrainBatch, old: OldStats, key, lam_old=1.0, rollout_actor=None,
               beta=None, actor_lr_scale=None):
        """One update of both models on a mini-batch, as :meth:`Updater.update` (``state`` is donated)."""
        cfg = self.cfg
        self._check_window(batch)
        num_micro = self._num_micro(batch.inputs)
        mini = self._mini(*jax.device_put((batch, old), self.rows), key)
        on_policy, on_actor = jax.device_put(mini, self.rows), jax.device_put(mini, self.actor_rows)
        weight_on_policy = self._valid_weight(on_policy)
        weight_on_actor = jax.device_put(weight_on_policy, self.actor_rows)
        if rollout_actor is not None:
            rollout_actor = jax.device_put(rollout_actor, self._param_shardings["actor"])
        w_pol = jax.device_put(self._unembed(state.policy), self._w_pol)
        scope = self._scope_on_actor(state, on_policy, on_actor, num_micro, lam_old, rollout_actor, w_pol)
        rho, weight = jax.device_put((scope.rho, scope.weight), self.rows)
        policy_grads = self._zeros["policy"](state.policy)
        actor_grads = self._zeros["actor"](state.actor) if cfg.train_actor else None
        results = []
        for index in range(num_micro):  # dispatched asynchronously: the two meshes work side by side
            actor_loss, actor_metrics = 0.0, {}
            if cfg.train_actor:
                h_pol = self._policy_hidden_on_actor(state.policy, on_policy, num_micro, index)
                actor_grads, (actor_loss, actor_metrics) = self._actor_micro(state.actor, on_actor, num_micro, index,
                                                               weight_on_actor, h_pol, w_pol, self._beta(beta),
                                                               actor_grads)
            policy_grads, policy_metrics = self._policy_micro(state.policy, on_policy, num_micro, index,
                                                              weight_on_policy, rho, weight, policy_grads)
            results.append((actor_loss, {**actor_metrics, **policy_metrics}))
        norms = {"policy": self._norm(policy_grads), **({"actor": self._norm(actor_grads)} if cfg.train_actor else {})}
        results, norms, updates, scope_metrics = jax.device_get((results, norms, state.updates, scope.metrics))
        rows = [{**row, "loss/total": row["loss/policy"] + actor_loss} for actor_loss, row in results]
        metrics = {key: np.sum([row[key] for row in rows]) for key in rows[0]}  # parts of the mini-batch's
        metrics.update(scope_metrics)
        checks = [np.isfinite(metrics["loss/total"])] + [np.isfinite(n) for n in norms.values()]
        candidate = (state.policy, state.policy_opt, state.actor, state.actor_opt)
        if all(checks):  # both models' updates, each checked on its own mesh; applied only if all finite
            policy, policy_opt, policy_flags = self._apply_policy(state.policy, state.policy_opt, policy_grads)
            actor, actor_opt, actor_flags = (self._apply_actor(state.actor, state.actor_opt, actor_grads,
                                                               scale=lr_scale_arg(actor_lr_scale))
                                             if cfg.train_actor else (state.actor, None, np.ones(0, bool)))
            candidate = (policy, policy_opt, actor, actor_opt)
            checks += list(np.concatenate(jax.device_get((policy_flags, actor_flags))))
        finite = all(checks)
        policy, policy_opt, actor, actor_opt = candidate if finite else (state.policy, state.policy_opt, state.actor,
                                                                         state.actor_opt)
        updated = self._count(state.updates) if finite else state.updates
        self.last_checks = np.asarray(checks + [True] * (len(self._check_names) - len(checks)), bool)
        metrics.update({f"grad_norm/{name}": n for name, n in norms.items()})
        metrics["nonfinite/skipped"] = np.float32(1.0 - finite)
        if self.policy_lr is not None:
            metrics["lr"] = np.asarray(self.policy_lr(updates), np.float32)
        return TrainState(policy, actor, policy_opt, actor_opt, updated), metrics
