"""The disaggregated placement: the policy on one mesh, the actor (with its rollout engine) on another.

In the colocated placement (:class:`~jackpot_jax.train.step.Updater`) one jitted function computes
eq. 8 for both models on one mesh. Here the policy and its optimizer state live on ``mesh``, the actor,
its optimizer state and the rollout engine on ``actor_mesh`` (disjoint devices): the actor's new
weights reach the engine without leaving its devices, and the two models' work runs side by side.

Eq. 8 splits at a stop-gradient: L_actor's target is SG(p_new) (eq. 7) and the policy loss's OBRS
weights are stop-gradient, so each model's gradient needs only values of the other. Per micro-batch:

1. on ``mesh``: the policy's final hidden states ``h_pol`` at the completion window; they go to
   ``actor_mesh`` device to device, with the policy's unembedding ``w_pol`` (once per update);
2. on ``actor_mesh``: :meth:`Updater._actor_side`, the colocated step's own code: both models'
   vocabulary statistics in one pass, the OBRS mask and rho (eqs. 3-4, section 4.4), L_actor and its
   gradient; the mask and rho go back to ``mesh``;
3. on ``mesh``: the policy's forward again under the gradient, and L_policy (eq. 5) with that mask
   and rho (:meth:`Updater._policy_loss`).

Both optimizers then apply their mean gradients, or neither does when the loss or a gradient norm is
not finite (as colocated). The price of the split: the policy forwards twice per micro-batch (as
activation rematerialization would) and its unembedding's logits are computed on both meshes. The
rollout batch and its :class:`~jackpot_jax.train.step.OldStats` are placed on both meshes; the
results equal the colocated step's within float32 rounding (tests/test_parallel.py).
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
from jackpot_jax.train.step import OldStats, TrainState, Updater, _apply, _completion_window, _flat, _MiniBatch, _scale


def _micro(batch, num_micro: int, index):
    """Micro-batch ``index`` (traced) of ``batch``'s contiguous split into ``num_micro``."""
    return jax.tree.map(lambda x: x[index], split_micro(batch, num_micro))


def _reduce(rows: list[dict]) -> dict:
    """The micro-batches' metrics as the colocated step reduces them: the max of ``*_max``, else the mean."""
    return {key: np.max([row[key] for row in rows]) if key.endswith("_max") else np.mean([row[key] for row in rows])
            for key in rows[0]}


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
    def _tokens(mesh, shape):
        """Per-token arrays ``[B * T, ...]`` on ``mesh``: their rows split over ``("data", "fsdp")``
        (replicated when they do not divide)."""
        split = mesh.shape["data"] * mesh.shape["fsdp"]
        return NamedSharding(mesh, PartitionSpec(("data", "fsdp")) if shape[0] % split == 0 else PartitionSpec())

    def _compile(self, state_shardings):
        """The jitted pieces; each runs on one mesh (see the module docstring)."""
        self._unembed = jax.jit(lambda params: nnx.merge(self.policy_def, params, self.policy_rest).unembedding())
        self._policy_hidden = {window: jax.jit(functools.partial(self._policy_hidden_impl, window=window),
                                               static_argnums=(2,)) for window in (False, True)}
        self._old = {normalizers: jax.jit(functools.partial(self._old_impl, normalizers=normalizers),
                                          static_argnums=(2,))
                     for normalizers in (False, True)}
        self._actor_micro = jax.jit(self._actor_micro_impl, static_argnums=(2,), donate_argnums=(9,))
        self._policy_micro = jax.jit(self._policy_micro_impl, static_argnums=(2,), donate_argnums=(6,))
        self._norm = jax.jit(lambda grad_sum, n: optax.tree.norm(jax.tree.map(lambda g: g / n, grad_sum)))
        self._apply_policy = jax.jit(self._apply_impl("policy"), donate_argnums=(0, 1, 2),
                                     out_shardings=(state_shardings.policy, state_shardings.policy_opt,
                                                    state_shardings.updates))
        if self.cfg.train_actor:
            self._apply_actor = jax.jit(self._apply_impl("actor"), donate_argnums=(0, 1),
                                        out_shardings=(state_shardings.actor, state_shardings.actor_opt))

    # ------------------------------------------------------------------ the jitted pieces

    def _policy_hidden_impl(self, policy_params, batch, num_micro, index, window: bool):
        """The policy's final hidden states on micro-batch ``index``: at its completion window
        (``window``, for the update) or every position (for ``prepare``)."""
        rows, mb = _completion_window(_micro(batch, num_micro, index), self.cfg.window if window else 0)
        return self._hidden("policy", policy_params, mb, rows)[0]

    def _old_impl(self, actor_params, batch, num_micro, index, h_pol, w_pol, lam, normalizers: bool):
        return self._old_stats(h_pol, w_pol, actor_params, _micro(batch, num_micro, index), lam, normalizers)

    def _actor_micro_impl(self, actor_params, batch, num_micro, index, h_pol, w_pol, key, rollout_actor, beta,
                          grad_sum):
        """:meth:`Updater._actor_side` on micro-batch ``index``: ``(grad_sum + its L_actor gradient,
        (mask, rho, L_actor, metrics))``."""
        rows, mb = _completion_window(_micro(batch, num_micro, index), self.cfg.window)
        side = functools.partial(self._actor_side, h_pol=h_pol, w_pol=w_pol, mb=mb, rows=rows,
                                 key=jax.random.fold_in(key, index), rollout_actor=rollout_actor, beta=beta)
        if not self.cfg.train_actor:
            out = side(actor_params)
            return grad_sum, (out.mask, out.rho, out.actor_loss, out.metrics)

        def loss(actor):
            out = side(actor)
            return out.actor_loss, out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(actor_params)
        return jax.tree.map(jnp.add, grad_sum, grads), (out.mask, out.rho, out.actor_loss, out.metrics)

    def _policy_micro_impl(self, policy_params, batch, num_micro, index, mask, rho, grad_sum):
        """L_policy (eq. 5) on micro-batch ``index`` with the actor side's ``mask`` and ``rho``:
        ``(grad_sum + its gradient, metrics)``."""
        rows, mb = _completion_window(_micro(batch, num_micro, index), self.cfg.window)

        def loss(policy):
            h, w = self._hidden("policy", policy, mb, rows)
            logp_new = pk.fused_token_stats(h, w, _flat(mb.targets), 1, impl=self.cfg.kernel_impl)[0]
            return self._policy_loss(logp_new, mask, rho, mb)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(policy_params)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    def _apply_impl(self, name):
        tx = self.policy_tx if name == "policy" else self.actor_tx

        def apply(params, opt_state, *rest, scale=None):
            *updates, grad_sum, num_micro, finite = rest
            grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
            new = _apply(tx, grads, opt_state, params, scale)
            params, opt_state = jax.tree.map(lambda u, c: jnp.where(finite, u, c), new, (params, opt_state))
            return (params, opt_state, updates[0] + finite.astype(jnp.int32)) if updates else (params, opt_state)

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
            h_pol = self._policy_hidden[False](policy_params, on_policy, num_micro, index)
            h_pol = jax.device_put(h_pol, self._tokens(self.actor_mesh, h_pol.shape))
            parts.append(self._old[normalizers](actor_params, on_actor, num_micro, index, h_pol, w_pol, lam))
        old = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        return jax.device_put(old, self.rows)

    # ------------------------------------------------------------------ per mini-batch

    def update(self, state: TrainState, batch: TrainBatch, old: OldStats, key, lam_old=1.0, rollout_actor=None,
               beta=None, actor_lr_scale=None):
        """One update of both models on a mini-batch, as :meth:`Updater.update` (``state`` is donated)."""
        cfg = self.cfg
        self._check_window(batch)
        num_micro = self._num_micro(batch.inputs)
        mini = _MiniBatch.make(batch, old, lam_old)
        on_policy, on_actor = jax.device_put(mini, self.rows), jax.device_put(mini, self.actor_rows)
        key = jax.device_put(key, NamedSharding(self.actor_mesh, PartitionSpec()))
        if rollout_actor is not None:
            rollout_actor = jax.device_put(rollout_actor, self._param_shardings["actor"])
        w_pol = jax.device_put(self._unembed(state.policy), self._w_pol)
        policy_grads = self._zeros["policy"](state.policy)
        actor_grads = self._zeros["actor"](state.actor) if cfg.train_actor else None
        results = []
        for index in range(num_micro):  # dispatched asynchronously: the two meshes work side by side
            h_pol = self._policy_hidden[True](state.policy, on_policy, num_micro, index)
            h_pol = jax.device_put(h_pol, self._tokens(self.actor_mesh, h_pol.shape))
            actor_grads, (mask, rho, actor_loss, actor_metrics) = self._actor_micro(
                state.actor, on_actor, num_micro, index, h_pol, w_pol, key, rollout_actor, self._beta(beta),
                actor_grads)
            mask, rho = jax.device_put((mask, rho), self._tokens(self.mesh, mask.shape))
            policy_grads, policy_metrics = self._policy_micro(state.policy, on_policy, num_micro, index, mask, rho,
                                                              policy_grads)
            results.append((actor_loss, actor_metrics, policy_metrics))
        norms = {"policy": self._norm(policy_grads, num_micro),
                 **({"actor": self._norm(actor_grads, num_micro)} if cfg.train_actor else {})}
        results, norms, updates = jax.device_get((results, norms, state.updates))
        metrics = _reduce([{**a, **p, "loss/total": p["loss/policy"] + loss} for loss, a, p in results])
        finite = np.asarray(np.isfinite(metrics["loss/total"]) and all(np.isfinite(n) for n in norms.values()))
        policy, policy_opt, updated = self._apply_policy(state.policy, state.policy_opt, state.updates, policy_grads,
                                                         num_micro, finite)
        actor, actor_opt = (self._apply_actor(state.actor, state.actor_opt, actor_grads, num_micro, finite,
                                              scale=_scale(actor_lr_scale))
                            if cfg.train_actor else (state.actor, None))
        metrics.update({f"grad_norm/{name}": n for name, n in norms.items()})
        metrics["nonfinite/skipped"] = np.float32(1.0 - finite)
        if self.policy_lr is not None:
            metrics["lr"] = np.asarray(self.policy_lr(updates), np.float32)
        return TrainState(policy, actor, policy_opt, actor_opt, updated), metrics
