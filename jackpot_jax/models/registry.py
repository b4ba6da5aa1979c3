"""A registry of model families: any Flax NNX module that satisfies :class:`CausalLM` can serve as
policy or actor, by name or by import path.

The protocol, what the trainer, the kernels and the rollout engine rely on:

* ``model.config`` with ``vocab_size`` (the columns of the unembedding);
* ``model.hidden_states(tokens [B, T], *, positions=None, segment_ids=None, attention_mask=None,
  cache=None) -> (h [B, T, D], cache or None)``: final hidden states; with a cache, ``tokens``
  are appended at each sequence's filled length and the updated cache is returned;
* ``model.unembedding() -> w [D, V]``: logits are ``h @ w``;
* ``model.init_cache(batch, max_len)``: an empty cache (a pytree with ``lengths [B]``);
* every ``nnx.Param`` carries ``logical_axes`` metadata (one name per dimension, covered by the
  sharding rules; see :mod:`jackpot_jax.models.sharding`); a model whose names the default rules
  lack maps them itself in a ``sharding_rules`` attribute, e.g. ``(("hidden", "fsdp"),)``.

``model(tokens)`` returning logits is a convenience, not part of the protocol.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from flax import nnx

from jackpot_jax.imports import import_object


@runtime_checkable
class CausalLM(Protocol):
    config: Any

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, attention_mask=None, cache=None): ...

    def unembedding(self): ...

    def init_cache(self, batch: int, max_len: int): ...


_FACTORIES: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any] | None = None):
    """Register ``factory(config, *, rngs) -> model`` under ``name`` (usable as a decorator)."""
    def add(factory):
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model family {name!r} is already registered.")
        _FACTORIES[name] = factory
        return factory

    return add if factory is None else add(factory)


def resolve(name: str, *, imports: bool = True) -> Callable[..., Any]:
    """The factory registered as ``name``, or imported from ``"package.module:attribute"``; with
    ``imports=False`` (a name read from a checkpoint's metadata, which must never choose code to
    import) registered families only."""
    if name in _FACTORIES:
        return _FACTORIES[name]
    if ":" in name and not imports:
        raise ValueError(f"model family {name!r} is not registered, and an import path read from a checkpoint's "
                         f"metadata is never imported (registered families are {sorted(_FACTORIES)}): register the "
                         f"family first (jackpot_jax.models.registry.register({name!r}, factory)).")
    if ":" in name:
        return import_object(name, "model family")
    raise ValueError(f"model family {name!r} is unknown: registered families are {sorted(_FACTORIES)}, or give an "
                     "import path 'package.module:factory'.")


def build(name: str, config, *, rngs: nnx.Rngs, imports: bool = True):
    """A model of family ``name`` for ``config``, checked against the protocol (``imports``: as
    :func:`resolve`'s)."""
    model = resolve(name, imports=imports)(config, rngs=rngs)
    check_protocol(model)
    return model


def check_protocol(model) -> None:
    """Raise ``TypeError`` naming what ``model`` lacks to serve as policy or actor."""
    missing = [attr for attr in ("config", "hidden_states", "unembedding", "init_cache") if not hasattr(model, attr)]
    if missing:
        raise TypeError(f"{type(model).__name__} cannot serve as policy or actor: it lacks {missing} "
                        "(see jackpot_jax.models.registry.CausalLM).")
    if not hasattr(model.config, "vocab_size"):
        raise TypeError(f"{type(model).__name__}.config has no vocab_size.")
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None or len(axes) != len(variable.shape):
            where = ".".join(str(p) for p in path)
            raise TypeError(f"parameter {where} of {type(model).__name__} (shape {variable.shape}) needs "
                            f"logical_axes metadata with one name per dimension, got {axes!r}.")


def _transformer(config, *, rngs):
    from jackpot_jax.models.transformer import Transformer  # noqa: PLC0415 (avoids an import cycle)

    return Transformer(config, rngs=rngs)


register("transformer", _transformer)

