"""Writing files so that a crash never leaves a truncated file under its final name."""
from __future__ import annotations

import os
from typing import Callable


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
