"""Datasets for RL on math problems, built with TFDS: ``load_split(name, split)``.

Every dataset yields records with three string features: ``problem``, ``answer`` (the reference
final answer, graded by :func:`jackpot_jax.data.rewards.math_reward`) and ``solution`` (a worked
solution, ``""`` when the source has none).

- ``jackpot_arithmetic``: procedurally generated arithmetic (:mod:`jackpot_jax.data.arithmetic`);
  configs ``d1``..``d4`` (word problems, difficulty = number of operations; 12,000 train problems
  for ``d1``, 2,000 for the others) and ``e2``, ``e3`` (expressions of 2 and 3 additions /
  subtractions, 12,000 train problems), 200 test problems each.
- ``gsm8k``: the official ``{"question", "answer"}`` JSONL; ``answer`` is the number after ``####``
  (commas removed), ``solution`` the whole official answer text.
- ``math``: MATH / MATH-500 ``{"problem", "solution"}`` (+ optional ``"answer"``); without an
  ``answer`` field, the answer is the last ``\\boxed{}`` of the solution.
- ``deepscaler``: DeepScaleR ``{"problem", "answer", "solution"}`` (train only).

The last three are read from local files (``manual_dir``, nothing is downloaded), by
:mod:`jackpot_jax.data.manual_files`: see its :data:`~jackpot_jax.data.manual_files.MANUAL_FILES`
and :func:`~jackpot_jax.data.manual_files.manual_instructions`. Accepted formats: JSONL, a JSON
array (DeepScaleR's ``deepscaler.json``) and parquet (needs ``pyarrow``). A malformed line, a record
with a missing field and an empty split raise ``ValueError`` naming the file and line; with the
builder config ``skip_bad_lines`` (``load_split(..., config="skip_bad_lines")``) bad records are
skipped, logged and counted instead (``builder.info.metadata["skipped_records"]``).

Preparing uses TFDS ``download_and_prepare`` into ``data_dir`` (default ``$JACKPOT_TFDS_DIR`` or
``~/.cache/jackpot_jax/tfds``). When the manual files change (path, size or modification time), the
dataset is prepared again. This module does not import TensorFlow: :func:`load_split` imports TFDS
and the builders (:mod:`jackpot_jax.data.builders`) when it is called.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from jackpot_jax.data.manual_files import (MANUAL_DATASETS, MANUAL_SPLITS, manual_fingerprint, require_manual_files,
                                           resolve_manual_dir)
from jackpot_jax.files import atomic_write_text, exclusive_lock

logger = logging.getLogger(__name__)

DATASETS = ("jackpot_arithmetic", "gsm8k", "math", "deepscaler")
SPLITS = {"jackpot_arithmetic": ("train", "test"), **MANUAL_SPLITS}


def default_data_dir() -> str:
    """``$JACKPOT_TFDS_DIR`` or ``~/.cache/jackpot_jax/tfds``."""
    return os.environ.get("JACKPOT_TFDS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jackpot_jax", "tfds")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}: the datasets are {DATASETS}.")


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise ValueError(f"Unknown split {split!r} for dataset {name!r}: its splits are {SPLITS[name]}.")


# ------------------------------------------------------------------------------------------------
# Loading through TFDS
# ------------------------------------------------------------------------------------------------

_FINGERPRINT_FILE = "jackpot_manual_files.sha256"


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _check_config(name: str, config) -> None:
    """``config``: None, a ``BuilderConfig`` or the name of one of ``name``'s configs (checked here: TFDS's
    own error for an unknown name lists no choices). Imports TFDS."""
    import tensorflow_datasets as tfds
    from jackpot_jax.data import builders

    if config is None or isinstance(config, tfds.core.BuilderConfig):
        return
    names = tuple(builders.BUILDERS[name].builder_configs)
    if not isinstance(config, str) or config not in names:
        raise ValueError(f"Dataset {name!r} has no config {config!r}: its configs are {names} (config.data.config "
                         f"in a training config; empty or None: the default, {names[0]!r}).")


def get_builder(name: str, *, data_dir=None, config=None):
    """The TFDS builder of ``name`` (``config``: a config name, a ``BuilderConfig`` or None for the
    default), with its data in ``data_dir``. Imports TFDS."""
    _check_name(name)
    from jackpot_jax.data import builders
    return builders.BUILDERS[name](data_dir=os.fspath(data_dir or default_data_dir()), config=config)


def load_split(name: str, split: str, *, data_dir=None, manual_dir=None, limit=None,
               config=None) -> list[dict]:
    """Records of ``split`` of dataset ``name`` as dicts of ``str`` (``problem``, ``answer``,
    ``solution``), preparing the dataset first if needed (TFDS ``download_and_prepare``).

    ``manual_dir``: for ``gsm8k`` / ``math`` / ``deepscaler``, the directory holding the dataset's
    files, or a root holding one directory per dataset; default ``<data_dir>/manual/<name>``.
    ``limit``: at most this many records (the first ones, in file / generation order; a limit above
    the split's size reads the whole split, and logs so). ``config``: a builder config name
    (``"d1"``..``"d4"``, ``"e2"``, ``"e3"`` for ``jackpot_arithmetic``, ``"default"`` or
    ``"skip_bad_lines"`` for the file datasets; another name raises ``ValueError`` before anything is
    prepared) or a ``BuilderConfig``.
    """
    _check_name(name)
    _check_split(name, split)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} is not allowed: limit must be None or an integer >= 0.")
    data_dir = os.fspath(data_dir or default_data_dir())
    resolved = None
    if name in MANUAL_DATASETS:
        resolved = resolve_manual_dir(name, manual_dir or os.path.join(data_dir, "manual", name))
        require_manual_files(name, split, resolved)  # fail fast, before importing TFDS

    import tensorflow_datasets as tfds

    _check_config(name, config)
    # Two processes preparing one local data_dir at once (two jobs on a fresh machine) would both
    # build it and the second rename would fail: they take turns, and the second finds it prepared.
    local = "://" not in data_dir  # a bucket (gs://...) is left to TFDS as it is
    with exclusive_lock(os.path.join(data_dir, f".{name}.lock")) if local else contextlib.nullcontext():
        builder = get_builder(name, data_dir=data_dir, config=config)
        download_config = tfds.download.DownloadConfig(manual_dir=resolved)
        fingerprint_path = os.path.join(builder.data_dir, _FINGERPRINT_FILE)
        fingerprint = manual_fingerprint(name, resolved) if resolved else None
        if fingerprint and builder.is_prepared():
            old = Path(fingerprint_path).read_text().strip() if os.path.exists(fingerprint_path) else None
            if old != fingerprint:
                logger.info("Dataset %r: the files in %s changed; preparing it again.", name, resolved)
                download_config = tfds.download.DownloadConfig(
                    manual_dir=resolved, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
        builder.download_and_prepare(download_config=download_config)
        builder = get_builder(name, data_dir=data_dir, config=config)  # reads the prepared info
        if fingerprint:
            atomic_write_text(fingerprint_path, fingerprint + "\n")
    if split not in builder.info.splits:
        raise ValueError(f"Dataset {name!r} was prepared without a {split!r} split "
                         f"(splits: {sorted(builder.info.splits)}).")
    size = builder.info.splits[split].num_examples
    if limit is not None and limit > size:
        logger.info("Dataset %r, split %r: limit=%d is more than its %d records: reading all of them.",
                    name, split, limit, size)
        limit = None
    if limit == 0:
        return []
    dataset = builder.as_dataset(split=split if limit is None else f"{split}[:{limit}]",
                                 shuffle_files=False)
    return [{key: _decode(value) for key, value in example.items()} for example in tfds.as_numpy(dataset)]
