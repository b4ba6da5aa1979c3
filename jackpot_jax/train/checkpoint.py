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

A complete step can still be damaged afterwards (a truncated or bit-flipped data file, a missing
``state/_METADATA``, no ``state/``, a garbage ``meta``). :meth:`Checkpointer.restore` of the latest
step therefore verifies what it reads (``meta`` a JSON dict whose ``step`` matches, every array
read back, floating arrays finite) and falls back to the newest good step: each bad step gets one
warning line naming what is wrong and is renamed aside to ``<step>.corrupt`` (kept for inspection,
never listed as a step again, so the next save of that step number does not collide with it).
With no good step left it raises a one-line :class:`CorruptCheckpointError`.
"""
from __future__ import annotations

import gc
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_MAX_LISTED = 10
_MAX_REASON = 200  # characters of a library error quoted in a one-line reason
CORRUPT_SUFFIX = ".corrupt"
CHECKSUMS = "_checksums"  # the key in the saved meta of each leaf's checksum (:func:`digests`); never returned

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint does not match the state it is restored into."""


class CorruptCheckpointError(ResumeError):
    """A saved step cannot be read back whole: an item missing or unreadable, or non-finite values."""


class _Damaged(Exception):
    """What is wrong with one step (a one-line reason), raised while verifying it."""


def _reason(error: BaseException) -> str:
    """A library error as one short line: the type and first message line of its root cause
    (Orbax wraps TensorStore's ``DATA_LOSS: ...`` in a generic ``Exception``)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_late_callback(error) -> bool:
    """Whether ``error`` is the ``Event loop is closed`` that TensorStore's callbacks raise when a
    read of an abandoned restore finishes after Orbax closed its event loop."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _is_read_noise(error) -> bool:
    """Whether ``error`` is raised by what a failed restore abandons: a late callback
    (:func:`_is_late_callback`), or a pending read coroutine of Orbax closed when collected."""
    if _is_late_callback(error) or isinstance(error, GeneratorExit):
        return True
    tb = getattr(error, "__traceback__", None)
    while tb is not None:
        if "/orbax/checkpoint/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _quiet_aftermath() -> None:
    """Keeps the noise of a failed restore off stderr (one traceback per array still being read,
    under the real error): collects its pending reads now, dropping their errors
    (:func:`_is_read_noise`), and from then on drops the late callbacks' errors that TensorStore
    prints through ``sys.excepthook`` (:func:`_is_late_callback`); any other error goes to the
    hooks there were."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if _is_read_noise(u.exc_value) else previous(u)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    if not getattr(sys.excepthook, "jackpot_drops_late_callbacks", False):
        hook = sys.excepthook

        def filtered(kind, value, tb):
            if not _is_late_callback(value):
                hook(kind, value, tb)

        filtered.jackpot_drops_late_callbacks = True
        sys.excepthook = filtered


def _agreed(read, what: str):
    """``read()``, or :class:`_Damaged` naming ``what`` and the error, decided alike on every
    process (each reads its own shards, so one may fail where the others do not)."""
    try:
        value, reason = read(), ""
    except Exception as error:  # noqa: BLE001 (any library error reads as damage)
        value, reason = None, f"{what} ({_reason(error)})"
        error = None  # noqa: F841 (drops the traceback that holds the pending reads)
    if reason:
        _quiet_aftermath()
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(bool(reason)))
        if failed.any() and not reason:
            reason = f"{what} (on process {int(np.flatnonzero(failed)[0])})"
    if reason:
        raise _Damaged(reason)
    return value


def _check_meta(meta, step: int) -> dict:
    """``meta`` if it is a well-formed checkpoint meta of ``step`` (a dict whose ``step``, when
    present, is that int); raises :class:`_Damaged` otherwise."""
    if not isinstance(meta, dict):
        raise _Damaged(f"meta is a {type(meta).__name__}, not a JSON object")
    if "step" in meta and (isinstance(meta["step"], bool) or meta["step"] != step):
        raise _Damaged(f"meta names step {meta['step']!r}, not {step}")
    return meta


@jax.jit
def _digests(leaves):
    """Per leaf: the sum of its bytes modulo 2**32 (a single flipped bit always changes it) and
    whether it is finite (True for non-floating leaves)."""
    def digest(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        data = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, jnp.uint8)
        return jnp.sum(data, dtype=jnp.uint32), finite

    return [digest(x) for x in leaves]


def digests(tree) -> dict[str, tuple[int, bool]]:
    """``{dotted path: (checksum, finite)}`` of every leaf of ``tree`` (:func:`_digests`; one
    compiled reduction for the whole tree, the same on every process)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    values = jax.device_get(_digests([leaf for _, leaf in flat]))
    return {_path_name(path): (int(total), bool(finite)) for (path, _), (total, finite) in zip(flat, values)}


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


def _path_name(path) -> str:
    """A tree path as Orbax names it: namedtuple fields and dict keys alike by name, sequence
    items by index, joined by dots."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return ".".join(name(k) for k in path)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` (:func:`_path_name`), typed PRNG keys as their uint32
    key data."""
    def shape_dtype(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): shape_dtype(leaf) for path, leaf in flat}


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
        if CHECKSUMS in meta:
            raise ValueError(f"checkpoint meta for step {step} may not hold the key {CHECKSUMS!r} (reserved)")
        if not (force or self._manager.should_save(step)):
            return False  # (before the checksums: they wait for the state to be computed)
        sums = {path: total for path, (total, _) in digests(state).items()}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave({**meta, CHECKSUMS: sums}))
        return self._manager.save(step, args=args, force=force)

    @staticmethod
    def has_checkpoints(directory) -> bool:
        """Whether ``directory`` holds a complete checkpoint (read without creating anything)."""
        path = epath.Path(directory)
        return path.is_dir() and bool(ocp.utils.checkpoint_steps(path))

    def read_meta(self, step: int) -> dict:
        """The ``meta`` dict saved with ``step`` (without reading the state); raises a one-line
        :class:`CorruptCheckpointError` if it is missing, not JSON or not a well-formed meta."""
        try:
            meta = self._meta(step)
        except _Damaged as damage:
            raise CorruptCheckpointError(self._bad(step, damage)) from None
        meta.pop(CHECKSUMS, None)
        return meta

    def latest_meta(self) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest step whose ``meta`` is readable and well-formed, or None
        without steps; a step found bad on the way is set aside with a warning (see
        :meth:`restore`), and a one-line :class:`CorruptCheckpointError` says when none is good."""
        found = self._newest_good(self._meta)
        if found is not None:
            found[1].pop(CHECKSUMS, None)
        return found

    def latest_step(self) -> int | None:
        """The newest complete step (in the saving process: also one still being written)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The kept steps, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None, *, config: dict | None = None):
        """``(state, meta)`` of ``step`` (default: the newest good step) with the tree structure,
        shapes, dtypes and shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with
        ``.sharding``, or arrays); each process reads only its own shards. A leaf without a
        sharding is restored whole onto the default device.

        Every step read is verified: ``meta`` well-formed, every array read back, floating
        arrays finite. Without ``step``, a damaged newest step is logged (one warning line with
        the reason), renamed aside to ``<step>.corrupt`` and the next older one tried; a
        :class:`CorruptCheckpointError` (one line, every step's reason) says when none is good,
        or when the given ``step`` is damaged.

        Raises :class:`ResumeError` if the saved tree differs from ``abstract_state``, listing
        the leaves and, given the current ``config`` dict, the config keys that changed.
        """
        self.wait()
        steps = self.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = "checkpoint" if step is None else f"checkpoint step {step}"
            raise FileNotFoundError(f"no {wanted} in {self.directory}; saved steps: {steps}")
        abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        read = lambda s: self._restore_step(s, abstract_state, config)  # noqa: E731
        if step is not None:
            try:
                return read(step)
            except _Damaged as damage:
                raise CorruptCheckpointError(self._bad(step, damage)) from None
        return self._newest_good(read)[1]

    # ------------------------------------------------------------------ verification

    def _bad(self, step: int, damage) -> str:
        return f"checkpoint step {step} in {self.directory} is damaged: {damage}"

    def _newest_good(self, read):
        """``(step, read(step))`` for the newest step that ``read`` gets without :class:`_Damaged`,
        setting the others aside; None without steps."""
        self.wait()
        reasons = []
        for step in reversed(self.all_steps()):
            try:
                return step, read(step)
            except _Damaged as damage:
                aside = self._set_aside(step)
                logger.warning("%s; set aside as %s, trying the previous step", self._bad(step, damage), aside)
                reasons.append(f"step {step}: {damage}")
        if reasons:
            raise CorruptCheckpointError(f"no good checkpoint in {self.directory} (the damaged steps are set aside "
                                         f"as <step>{CORRUPT_SUFFIX}): " + "; ".join(reasons))
        return None

    def _set_aside(self, step: int) -> str:
        """Renames the directory of ``step`` to ``<step>.corrupt`` (``.corrupt.2``, ... if taken),
        which Orbax does not list as a step; returns the new name."""
        path = self.directory / str(step)
        aside, n = path.parent / f"{step}{CORRUPT_SUFFIX}", 1
        while aside.exists():
            n += 1
            aside = path.parent / f"{step}{CORRUPT_SUFFIX}.{n}"
        if jax.process_index() == 0:
            path.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jackpot_checkpoint_set_aside_{step}")
        self._manager.reload()
        return aside.name

    def _meta(self, step: int) -> dict:
        """The well-formed ``meta`` of ``step``, or :class:`_Damaged`."""
        if not (self.directory / str(step) / "meta").is_dir():
            raise _Damaged("no meta/ directory")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as error:  # noqa: BLE001 (any library error reads as damage)
            raise _Damaged(f"meta unreadable ({_reason(error)})") from None
        if meta is None:
            raise _Damaged("meta unreadable (no data)")
        return _check_meta(meta, step)

    def _restore_step(self, step: int, abstract_state, config: dict | None):
        """``(state, meta)`` of ``step``, verified; :class:`ResumeError` on a tree mismatch,
        :class:`_Damaged` on damage (the same verdict on every process)."""
        meta = self._meta(step)
        state_dir = self.directory / str(step) / "state"
        if not state_dir.is_dir():
            raise _Damaged("no state/ directory")
        if not (state_dir / "_METADATA").exists():
            raise _Damaged("state/_METADATA is missing")
        saved = _agreed(lambda: self._manager.item_metadata(step).state.tree, "state/_METADATA unreadable")
        problems = _tree_diff(_leaves(saved), _leaves(abstract_state))
        if problems and config is not None:
            problems += _listed("config keys that differ:", config_diff(meta.get("config", {}), config))
        if problems:
            raise ResumeError(f"checkpoint step {step} in {self.directory} does not match the "
                              "state to restore into:\n" + "\n".join(problems))
        state = _agreed(lambda: self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state, "array data unreadable")
        saved_sums = meta.pop(CHECKSUMS, None)  # None in checkpoints written before checksums
        for path, (total, finite) in digests(state).items():
            if not finite:
                raise _Damaged(f"leaf {path} holds NaN or infinite values")
            if saved_sums is not None and saved_sums.get(path, total) != total:
                raise _Damaged(f"leaf {path} differs from what was saved (checksum {total}, saved {saved_sums[path]})")
        return state, meta

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
