"""What the command lines (``jackpot-train``, ``jackpot-export``, ``jackpot-eval``) share: a quiet start-up and
user errors in one line.

- :func:`quiet_startup`: environment defaults (``os.environ.setdefault``: a value the user set wins) that
  silence the C++ start-up logs of TensorFlow (which TFDS imports) and XLA; set before either is imported.
- :func:`user_errors`: a user's mistake (a bad config, value or path) ends the command with ``prog: message``
  on stderr and exit status 1 (``sys.exit(message)``), without a traceback; a bug keeps its traceback.

``JACKPOT_DEBUG=1`` (or ``--debug``) keeps both: the start-up logs and every traceback. This module imports
neither JAX nor TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
import sys

DEBUG_ENV = "JACKPOT_DEBUG"

# Each default is one that works (checked with TensorFlow 2.21 and jaxlib 0.10). Lines TensorFlow logs while
# it loads, before it reads its settings ("All log messages before absl::InitializeLog() ...", "Could not
# find cuda drivers"), cannot be silenced from the environment.
QUIET_ENV = {
    # INFO and WARNING lines of TensorFlow's and XLA's C++ logging (cpu_feature_guard's instruction sets,
    # XLA's compiler notes); errors stay.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # TensorFlow's "oneDNN custom operations are on" notice, twice at import. TensorFlow only reads the
    # datasets here: oneDNN's kernels (matmuls, convolutions) are never used.
    "TF_ENABLE_ONEDNN_OPTS": "0",
}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def debug_requested(argv=()) -> bool:
    """Whether ``$JACKPOT_DEBUG`` is set (to anything but ``""``, ``0``, ``false``, ``no``) or ``argv``
    holds ``--debug`` (``--debug=true``, ``--debug=1``: absl's spellings)."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no") or any(
        arg.lower() in ("--debug", "--debug=true", "--debug=1") for arg in argv)


def quiet_startup(debug: bool) -> None:
    """Sets the :data:`QUIET_ENV` defaults the user has not set (none with ``debug``). Call it before JAX
    or TensorFlow is imported: they read these once."""
    if not debug:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def _raised_in_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is jackpot_jax code (one of its checks)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def is_user_error(error: BaseException, own: tuple = ()) -> bool:
    """Whether ``error`` reports a user's mistake: one of the command's ``own`` exception classes (e.g.
    ``ConfigError``), a ``FileNotFoundError`` (a path the user gave), or a ``ValueError`` that jackpot_jax
    raised itself (its checks of values and files). A ``ValueError`` from inside a library (JAX, NumPy,
    TFDS) is taken for a bug, as is every other exception."""
    if isinstance(error, own) or isinstance(error, FileNotFoundError):
        return True
    return isinstance(error, ValueError) and _raised_in_package(error)


@contextlib.contextmanager
def user_errors(prog: str, *, debug: bool, own: tuple = ()):
    """Ends the command with ``sys.exit(f"{prog}: {error}")`` (stderr, status 1) on a user error
    (:func:`is_user_error`); a bug, and with ``debug`` every error, propagates with its traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (re-raised unless it is a user error)
        if debug or not is_user_error(error, own):
            raise
        sys.exit(f"{prog}: {error}")
