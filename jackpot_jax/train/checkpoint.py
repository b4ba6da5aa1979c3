"""Orbax checkpoints of the training state: one pytree of arrays plus a small JSON ``meta`` dict.

Each step is a directory ``<directory>/<step>/`` with two items: ``state`` (the pytree, sharded
arrays written by every process for its own shards) and ``meta`` (``step``, data position, the
run's config as a plain dict, ...). Restoring checks the saved tree against the one the caller
expects first and fails with a :class:`ResumeError` that names every differing leaf and config
key, instead of a traceback from deep inside Orbax.

On disk, a save is never visible before it is complete: Orbax's default atomicity (which we keep)
writes on a POSIX filesystem into ``<step>.orbax-checkpoint-tmp/`` and renames it to ``<step>/``
once every item is written, and on GCS writes ``commit_success.txt`` last; steps lacking either
are not listed. So a process killed mid-save (tested with SIGKILL) leaves the previous
checkpoints as they were, old steps are deleted only after a newer one is complete, and the next
:class:`Checkpointer` deletes the partial directory in the background (``cleanup_tmp_directories``).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_MAX_LISTED = 10


class ResumeError(ValueError):
    """A checkpoint does not match the state it is restored into."""


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def config_diff(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two nested config dicts, as ``"a.b: saved X, now Y"``.

    Both are compared in their JSON form (tuples equal lists), as ``meta`` is stored as JSON.
    A key present on one side only reads ``(absent)`` on the other.
    """
    def as_json(d):
        return json.loads(json.dumps(d, default=str))

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                yield from walk(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix[:-1]}: saved {_show(a)}, now {_show(b)}"

    return list(walk(as_json(saved), as_json(current), ""))


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}``; paths as Orbax names them (namedtuple fields and dict
    keys alike by name, sequence items by index), and typed PRNG keys as their uint32 key data."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    def shape_dtype(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(name(k) for k in path): shape_dtype(leaf) for path, leaf in flat}


def _listed(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    more = [f"  ... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else []
    return [title] + [f"  {line}" for line in lines[:_MAX_LISTED]] + more


def _tree_diff(saved: dict, expected: dict) -> list[str]:
    """Message lines for the leaves that differ, are missing or are extra (empty if none)."""
    def fmt(shape_dtype):
        return f"{shape_dtype[0]} {shape_dtype[1]}"

    differing = [f"{p}: saved {fmt(saved[p])}, expected {fmt(expected[p])}"
                 for p in sorted(set(saved) & set(expected)) if saved[p] != expected[p]]
    return (_listed("leaves whose shape or dtype differ:", differing)
            + _listed("leaves missing from the checkpoint:", sorted(set(expected) - set(saved)))
            + _listed("leaves in the checkpoint but not in the state:",
                      sorted(set(saved) - set(expected))))


class Checkpointer:
    """Saves every ``save_every`` steps into ``directory``, keeping the latest ``keep`` steps.

    With ``async_save`` (the default), :meth:`save` returns once the arrays are copied off the
    devices and the write goes on in a background thread; :meth:`wait` blocks until it is done.
    Every process of a multi-host run makes the same calls. Use as a context manager, or call
    :meth:`close`, so that the last save is finished before the program exits.
    """

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        for name, value in (("save_every", save_every), ("keep", keep)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Checkpointer {name} must be an int >= 1, got {value!r}")
        # Orbax's default policy would also save the first step seen in an empty directory;
        # only multiples of save_every (and preemption sync points on multi-host runs) save here.
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=policy, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    @property
    def directory(self):
        return self._manager.directory

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Saves ``state`` and ``meta`` as ``step`` if it is a multiple of ``save_every`` (or
        ``force``) and newer than the latest saved step; returns whether it saved."""
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta for step {step} is not JSON-serializable: {e}") from e
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    @staticmethod
    def has_checkpoints(directory) -> bool:
        """Whether ``directory`` holds a complete checkpoint (read without creating anything)."""
        path = epath.Path(directory)
        return path.is_dir() and bool(ocp.utils.checkpoint_steps(path))

    def read_meta(self, step: int) -> dict:
        """The ``meta`` dict saved with ``step`` (without reading the state)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def latest_step(self) -> int | None:
        """The newest complete step (in the saving process: also one still being written)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The kept steps, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None, *, config: dict | None = None):
        """``(state, meta)`` of ``step`` (default: the latest) with the tree structure, shapes,
        dtypes and shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with
        ``.sharding``, or arrays); each process reads only its own shards. A leaf without a
        sharding is restored whole onto the default device.

        Raises :class:`ResumeError` if the saved tree differs from ``abstract_state``, listing
        the leaves and, given the current ``config`` dict, the config keys that changed.
        """
        self.wait()
        steps = self.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = "checkpoint" if step is None else f"checkpoint step {step}"
            raise FileNotFoundError(f"no {wanted} in {self.directory}; saved steps: {steps}")
        step = steps[-1] if step is None else step
        abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        problems = _tree_diff(_leaves(self._manager.item_metadata(step).state.tree),
                              _leaves(abstract_state))
        if problems and config is not None:
            problems += _listed("config keys that differ:",
                                config_diff(self.read_meta(step).get("config", {}), config))
        if problems:
            raise ResumeError(f"checkpoint step {step} in {self.directory} does not match the "
                              "state to restore into:\n" + "\n".join(problems))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        """Blocks until any background save has finished writing."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes any background save and releases Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
