"""Writing files so that a crash never leaves a truncated file under its final name, and a lock
for processes that prepare the same files."""
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
