"""The one door to google-jetstream 0.2.2 (the last release; the project is archived): our code
imports JetStream's modules from here, never from ``jetstream`` directly.

Importing this module patches exactly two things, both only as needed:

1. ``jax.tree_map`` is restored as an alias of ``jax.tree.map`` when missing. JAX 0.10 removed
   it, and JetStream still calls it: ``jetstream/core/orchestrator.py``, line 118, in
   ``delete_pytree`` (which the generate thread runs on every prefix it inserts). The alias is set
   before any JetStream module is imported; it changes nothing when ``jax.tree_map`` exists.
2. ``jetstream/core/orchestrator.py`` (lines 101-110) sets the root logger to DEBUG and adds a
   stdout handler when imported, which would print every DEBUG record of every library (JAX's
   compilation logs among them) in any process that imports our engine. Both are undone right
   after the import; the root logger keeps the level and handlers it had before.

Importing JetStream imports ``seqio`` and TensorFlow (``jetstream/engine/token_utils.py``): a few
seconds, once per process.
"""
from __future__ import annotations

import logging

import jax

if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map


def _import_orchestrator():
    """``jetstream.core.orchestrator``, with the root logger as it was before the import."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from jetstream.core import orchestrator  # noqa: PLC0415

    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    return orchestrator


orchestrator = _import_orchestrator()

from jetstream.core import config_lib, server_lib  # noqa: E402
from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc  # noqa: E402
from jetstream.engine import engine_api, tokenizer_api, tokenizer_pb2  # noqa: E402

__all__ = ["config_lib", "engine_api", "jetstream_pb2", "jetstream_pb2_grpc", "orchestrator", "server_lib",
           "tokenizer_api", "tokenizer_pb2"]
