"""Training metrics: one JSON line per step in ``WORKDIR/metrics.jsonl``, the same scalars as
TensorBoard events under ``WORKDIR/tensorboard``, and a progress bar for the console.

``metrics.jsonl`` is the durable record (``jackpot-plot`` reads it): every line is flushed as it
is written, so a crash loses at most the line being written, and a resumed run first drops the
rows it is about to write again. Non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (strict JSON has no such numbers); :func:`read_metrics`
turns them back into floats.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Mapping

import numpy as np

from jackpot_jax.files import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_TENSORBOARD_ILLEGAL = re.compile(r"[^A-Za-z0-9_./-]")


def tensorboard_tag(name: str) -> str:
    """``name`` in TensorBoard's legal characters (``[A-Za-z0-9_./-]``, no leading ``/``): ``@`` becomes
    ``_at_`` (``eval/policy/mean@4`` is ``eval/policy/mean_at_4``), any other illegal character ``_``.
    Given a legal tag, tensorboardX neither renames it nor logs an "illegal summary name" line for it."""
    return _TENSORBOARD_ILLEGAL.sub("_", name.replace("@", "_at_")).lstrip("/")


def _scalar(key, value):
    """``value`` (Python, NumPy or 0-d JAX number) as a Python int or float; TypeError naming
    ``key`` for anything else."""
    arr = np.asarray(value)
    if arr.shape != () or (arr.dtype.kind not in "biuf" and arr.dtype.name != "bfloat16"):
        raise TypeError(f"Metric {key!r} must be a scalar number, got {type(value).__name__} "
                        f"with shape {arr.shape} and dtype {arr.dtype}.")
    return int(arr) if arr.dtype.kind in "biu" else float(arr)


def _encode_line(row: Mapping) -> str:
    """One JSON line for ``row``, non-finite floats as their string tokens."""
    def encode(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return v

    return json.dumps({k: encode(v) for k, v in row.items()}, allow_nan=False) + "\n"


def _parse_line(path, lineno, line) -> dict:
    """One row of ``path``; ValueError naming the file and line when it is not a metrics row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {lineno}: not valid JSON ({err}): {line[:200]!r}") from err
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        raise ValueError(f"{path}, line {lineno}: not a metrics row (a JSON object with an integer "
                         f"'step'): {line[:200]!r}")
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def read_metrics(workdir_or_file) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (or of ``DIR/metrics.jsonl`` when given a directory), in
    file order. A final line that does not parse (a run killed mid-write) is skipped; a bad line
    before it raises ValueError naming the file and the line number."""
    path = os.fspath(workdir_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics file at {path} (a training run writes WORKDIR/{METRICS_FILE}).")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for i, (lineno, line) in enumerate(lines):
        try:
            rows.append(_parse_line(path, lineno, line))
        except ValueError:
            if i < len(lines) - 1:
                raise
            logger.warning("%s, line %d: skipping a truncated last line.", path, lineno)
    return rows


def _truncate(path: str, start_step: int) -> None:
    """Drops the rows of ``path`` with ``step >= start_step`` (and a truncated last line), crash-safe:
    the kept rows go to a temporary file renamed over ``path``; a file with nothing to drop is left
    as it is (no rewrite)."""
    with open(path, "rb") as f:
        complete = f.read().endswith(b"\n") or os.path.getsize(path) == 0
    rows = read_metrics(path)
    kept = [row for row in rows if row["step"] < start_step]
    if len(kept) == len(rows) and complete:
        return
    atomic_write_text(path, "".join(_encode_line(row) for row in kept))
    logger.info("%s: dropped %d rows from step %d on (the run restarts there).", path, len(rows) - len(kept),
                start_step)


class MetricsWriter:
    """Writes each step's scalars to ``WORKDIR/metrics.jsonl`` and (``tensorboard=True``) to
    TensorBoard events under ``WORKDIR/tensorboard``. With ``enabled=False`` (every JAX process
    but the first) every call is a no-op and nothing is touched on disk.

    TensorBoard gets the finite values only (tensorboardX warns on every NaN; metrics.jsonl keeps
    them), under legal tags (:func:`tensorboard_tag`: ``eval/mean@8`` is ``eval/mean_at_8`` there;
    metrics.jsonl keeps the names); two names with one tag raise ``ValueError``.

    A run that starts at ``start_step`` keeps only the existing rows with ``step < start_step``
    (all rows are dropped when a run starts over from step 0): the rows after the resume point
    are written again by the resumed run. That truncation is the only rewrite of the file (once,
    when rows are dropped, by a rename: crash-safe); every row after it is appended. TensorBoard
    drops its events from that step on too (``purge_step``). One writer per file: the trainer's
    lock on its work dir (:func:`jackpot_jax.train.loop.lock_workdir`) keeps a second run out.
    """

    def __init__(self, workdir, *, start_step: int = 0, enabled: bool = True, tensorboard: bool = True):
        workdir = os.fspath(workdir)
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self._file = self._tb = None
        self._tags = {}  # TensorBoard tag -> metric name
        if not enabled:
            return
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            _truncate(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError as err:
                raise ImportError("MetricsWriter(tensorboard=True) needs tensorboardX "
                                  "(pip install tensorboardX), or pass tensorboard=False.") from err
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), purge_step=start_step)

    def write(self, step: int, metrics: Mapping) -> None:
        """Appends ``{"step": step, **metrics}`` as one flushed line, and the scalars to TensorBoard.
        Every value is checked before anything is written, so a bad one writes nothing."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"The MetricsWriter for {self.path} is closed.")
        step = _scalar("step", step)
        if not isinstance(step, int):
            raise TypeError(f"step must be an integer, got {step!r}.")
        row = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str) or key == "step":
                raise ValueError(f"Metric names must be strings other than 'step', got {key!r}.")
            row[key] = _scalar(key, value)
        tags = self._tensorboard_tags(row) if self._tb is not None else {}
        self._file.write(_encode_line(row))
        self._file.flush()
        if self._tb is not None:
            for key, tag in tags.items():
                if math.isfinite(row[key]):
                    self._tb.add_scalar(tag, row[key], global_step=step)
            self._tb.flush()

    def _tensorboard_tags(self, row: Mapping) -> dict:
        """``{name: tag}`` of the metrics of ``row``; ValueError when a tag is empty or is already
        another name's (this step's or an earlier one's)."""
        tags, known = {}, dict(self._tags)
        for key in row:
            if key == "step":
                continue
            tag = tags[key] = tensorboard_tag(key)
            if not tag or known.setdefault(tag, key) != key:
                raise ValueError(f"Metric {key!r} has no TensorBoard tag of its own: its tag {tag!r} is "
                                 + (f"{known[tag]!r}'s too." if tag else "empty."))
        self._tags = known
        return tags

    def close(self) -> None:
        """Flushes and closes both outputs; further writes raise (a no-op when disabled)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    """A tqdm bar over the training steps with a few key figures as its postfix (those present
    among reward, OBRS acceptance, the actor/policy KL, Mean@k evaluations and step timings)."""

    POSTFIX = {"reward/mean": "reward", "obrs/accept_rate": "accept", "mismatch/kl_inf_new": "kl_inf",
               "time/rollout_s": "rollout_s", "time/update_s": "update_s"}

    def __init__(self, total_steps: int, *, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm  # noqa: PLC0415

        self._bar = tqdm(total=total_steps, initial=initial, disable=not enabled, desc="train", unit="step")

    def update(self, step: int, metrics: Mapping) -> None:
        """Marks step ``step`` (0-based) as done, which advances the bar by one in a run without
        gaps, and shows the key figures among ``metrics``."""
        postfix = {}
        for key, value in metrics.items():
            name = self.POSTFIX.get(key)
            if name is None and key.startswith("eval/") and "mean" in key:
                name = key[len("eval/"):]
            if name is not None:
                postfix[name] = f"{float(np.asarray(value)):.4g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(int(step) + 1 - self._bar.n)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
