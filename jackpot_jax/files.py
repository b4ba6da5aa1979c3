"""Writing files so that a crash never leaves a truncated file under its final name, locks: one
for processes that prepare the same files (waiting), one that a run holds on its work dir (never
waiting: :func:`try_exclusive_lock`)."""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator


def atomic_write(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to a temporary path beside ``path``, which then replaces
    ``path`` in one rename."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    """``text`` into ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


@contextlib.contextmanager
def exclusive_lock(path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (``fcntl.flock``; the file is created if missing)
    for the block, so that processes preparing the same files take turns. The kernel releases it
    when its process dies: a crash leaves no stale lock."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LockHeld(RuntimeError):
    """Another process (or another open of the file) holds the lock on ``path``; ``owner`` is what
    its holder wrote there ("" when unknown)."""

    def __init__(self, path: str, owner: str):
        super().__init__(f"{path} is locked by {owner or 'another process'}")
        self.path, self.owner = path, owner


class HeldLock:
    """An exclusive ``fcntl.flock`` held on an open file until :meth:`release` (or the process's
    end: the kernel releases it when its holder dies, so a crash leaves no stale lock)."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empties the file (it names a holder only while held) and unlocks it; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 (at interpreter exit; the kernel releases it anyway)
            pass


def try_exclusive_lock(path, owner: str = "") -> HeldLock:
    """An exclusive lock on ``path`` (created if missing) taken without waiting, with ``owner`` (one
    line: who holds it) written into the file for the process that finds it taken. Raises
    :class:`LockHeld` naming the holder when another open file holds it (even in this process: a
    flock belongs to an open file, not to a process); other ``OSError`` s (a filesystem without
    locks) propagate."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        raise LockHeld(path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (owner.strip() + "\n").encode("utf-8"), 0)
    return HeldLock(path, fd)


def lock_holder(path) -> str | None:
    """What the holder of the lock on ``path`` (:func:`try_exclusive_lock`) wrote there ("" when
    nothing yet), or None when it is free or missing; probes without taking it or writing."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 4096).decode("utf-8", "replace").strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
