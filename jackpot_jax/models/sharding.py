"""Logical-axis sharding: every parameter names its axes (``logical_axes`` metadata), one rule
table maps those names to the mesh axes ``("data", "fsdp", "tensor")``.

The default rules give FSDP over ``"fsdp"`` (the model dimension of every matrix, and the batch)
and tensor parallelism over ``"tensor"`` (heads, MLP width and vocabulary). A dimension whose size
does not divide its mesh axes is replicated instead, so one rule table serves every model size.
Activations are constrained through :func:`constrain` under :func:`activation_sharding`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None):
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``data * fsdp * tensor`` devices, in
    JAX's automatic sharding mode (XLA propagates shardings from the parameters' and the
    constraints'; the models are written for it)."""
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes, shape, mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` and ``shape`` on ``mesh``.

    Each logical name maps through ``rules`` (unknown names raise ``ValueError``); mesh axes the
    mesh lacks are dropped, a mesh axis is used at most once per array, and a dimension that its
    mesh axes' total size does not divide is replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule: rules cover {sorted(table)}.")
        target = table[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(a for a in targets if a in mesh.shape and a not in used)
        if not targets or size % math.prod(mesh.shape[a] for a in targets):
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def model_rules(model, rules=DEFAULT_RULES):
    """The rule table for ``model``: ``rules``, then the model's own ``sharding_rules`` (a model
    of the registry with logical axis names of its own adds their rules there; later entries win)."""
    return tuple(rules) + tuple(getattr(model, "sharding_rules", ()))


def _axes(variable):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"a parameter of shape {variable.shape} has no logical_axes metadata: every parameter "
                         "of a model to shard must name its axes (see jackpot_jax.models.transformer.param).")
    return axes


def param_shardings(state, mesh, rules=DEFAULT_RULES):
    """A tree of ``NamedSharding`` for an ``nnx.State`` of parameters (real or abstract)."""
    return jax.tree.map(lambda v: NamedSharding(mesh, logical_to_spec(_axes(v), v.shape, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh, rules=DEFAULT_RULES):
    """Place every parameter of ``model`` on ``mesh`` as the rules say (in place; returns it)."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, jax.device_put(values, shardings))
    return model


def create_sharded(factory, mesh, rules=DEFAULT_RULES):
    """Build ``factory()`` (a model constructor) with its parameters born sharded: the
    initializers run under ``jit`` with the rules' output shardings, never whole on one device."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)

    params = jax.jit(lambda: nnx.state(factory(), nnx.Param), out_shardings=shardings)()
    model = nnx.merge(graphdef, abstract_state)
    nnx.update(model, params)
    return model


_ACTIVATIONS = contextvars.ContextVar("jackpot_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules=DEFAULT_RULES):
    """Within this context, :func:`constrain` pins activations to the rules' shardings on
    ``mesh`` (use it around tracing a sharded step)."""
    token = _ACTIVATIONS.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x, axes):
    """``with_sharding_constraint`` of ``x`` to its logical ``axes``; a no-op outside
    :func:`activation_sharding`."""
    active = _ACTIVATIONS.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
