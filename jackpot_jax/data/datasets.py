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

The last three are read from local files (``manual_dir``, nothing is downloaded): see
:data:`MANUAL_FILES` and :func:`manual_instructions`. Accepted formats: JSONL, a JSON array
(DeepScaleR's ``deepscaler.json``) and parquet (needs ``pyarrow``). A malformed line, a record with
a missing field and an empty split raise ``ValueError`` naming the file and line; with the builder
config ``skip_bad_lines`` (``load_split(..., config="skip_bad_lines")``) bad records are skipped,
logged and counted instead (``builder.info.metadata["skipped_records"]``).

Preparing uses TFDS ``download_and_prepare`` into ``data_dir`` (default ``$JACKPOT_TFDS_DIR`` or
``~/.cache/jackpot_jax/tfds``). When the manual files change (path, size or modification time), the
dataset is prepared again. This module does not import TensorFlow: :func:`load_split` imports TFDS
and the builders (:mod:`jackpot_jax.data.builders`) when it is called.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

from jackpot_jax.files import atomic_write_text, exclusive_lock

logger = logging.getLogger(__name__)

DATASETS = ("jackpot_arithmetic", "gsm8k", "math", "deepscaler")
SPLITS = {"jackpot_arithmetic": ("train", "test"), "gsm8k": ("train", "test"),
          "math": ("train", "test"), "deepscaler": ("train",)}
MANUAL_DATASETS = ("gsm8k", "math", "deepscaler")

# Accepted file names per dataset and split, in order of preference ("*" patterns: every match, in
# sorted order, e.g. the shards of a Hugging Face parquet export).
MANUAL_FILES = {
    "gsm8k": {split: (f"{split}.jsonl", f"{split}.parquet", f"{split}-*.parquet")
              for split in ("train", "test")},
    "math": {split: (f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet")
             for split in ("train", "test")},
    "deepscaler": {"train": ("deepscaler.json", "train.jsonl", "train.json", "train.parquet",
                             "train-*.parquet")},
}
REQUIRED_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"),
                   "deepscaler": ("problem", "answer")}
_FORMATS = {
    "gsm8k": ('the official GSM8K file, one JSON object a line: {"question": ..., "answer": '
              '"...worked solution... #### 72"} (github.com/openai/grade-school-math, '
              'grade_school_math/data/{split}.jsonl; or the Hugging Face openai/gsm8k parquet)'),
    "math": ('MATH or MATH-500, one JSON object a line: {"problem": ..., "solution": "... \\\\boxed{...}"} '
             '(an optional "answer" field is used when present, as in MATH-500\'s test.jsonl)'),
    "deepscaler": ('DeepScaleR\'s deepscaler.json (a JSON array of {"problem", "answer", "solution"}), '
                   'or the same records as train.jsonl / train.parquet'),
}


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


def resolve_manual_dir(name: str, manual_dir: str | os.PathLike) -> str:
    """The directory holding ``name``'s files: ``manual_dir/name`` if that is a directory (a root
    holding several datasets), else ``manual_dir`` itself."""
    manual_dir = os.path.expanduser(os.fspath(manual_dir))
    nested = os.path.join(manual_dir, name)
    return nested if os.path.isdir(nested) else manual_dir


def manual_instructions(name: str, manual_dir: str | None = None, split: str | None = None) -> str:
    """Which files to put where for ``name`` (all splits, or ``split``)."""
    where = manual_dir or f"<manual_dir>/{name}"
    lines = []
    for one in (SPLITS[name] if split is None else (split,)):
        names = MANUAL_FILES[name][one]
        lines.append(f"  {one}: {os.path.join(where, names[0])} (or one of {', '.join(names[1:])})")
    return (f"Dataset {name!r} is read from local files (nothing is downloaded). Put "
            f"{_FORMATS[name].replace('{split}', split or 'train')} at:\n" + "\n".join(lines))


def find_manual_files(name: str, split: str, manual_dir: str) -> list[str]:
    """The files of ``split`` in ``manual_dir`` (already resolved), or ``[]`` when there are none."""
    for pattern in MANUAL_FILES[name][split]:
        found = sorted(glob.glob(os.path.join(glob.escape(manual_dir), pattern)))
        found = [path for path in found if os.path.isfile(path)]
        if found:
            return found
    return []


def require_manual_files(name: str, split: str, manual_dir: str) -> list[str]:
    """:func:`find_manual_files`, raising ``FileNotFoundError`` with instructions when none exist."""
    found = find_manual_files(name, split, manual_dir)
    if not found:
        expected = os.path.join(manual_dir, MANUAL_FILES[name][split][0])
        raise FileNotFoundError(
            f"Dataset {name!r}, split {split!r}: missing file {expected}.\n"
            + manual_instructions(name, manual_dir, split))
    return found


def available_splits(name: str, manual_dir: str) -> tuple[str, ...]:
    """The splits of ``name`` whose files are present in ``manual_dir`` (resolved)."""
    return tuple(split for split in SPLITS[name] if find_manual_files(name, split, manual_dir))


def manual_fingerprint(name: str, manual_dir: str) -> str:
    """A hash of the path, size and modification time of every file ``name`` reads."""
    parts = []
    for split in SPLITS[name]:
        for path in find_manual_files(name, split, manual_dir):
            stat = os.stat(path)
            parts.append(f"{split}\t{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading records (pure Python)
# ------------------------------------------------------------------------------------------------

class BadRecord(ValueError):
    """A record that cannot be used; the message names the file and line."""


def _iter_raw(path: str) -> Iterator[tuple[str, object]]:
    """``(where, record_or_exception)`` for each record of ``path``; ``where`` is ``path:line N``
    (JSONL), ``path:item N`` (JSON array) or ``path:row N`` (parquet), counted from 1."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"Reading {path} needs pyarrow (pip install pyarrow), or convert the file "
                              "to JSONL.") from err
        for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {row}", record
        return
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:  # a JSON array is one document: no record to skip to
            raise ValueError(f"{path}:line {err.lineno}: malformed JSON ({err.msg}).") from err
        for item, record in enumerate(records, start=1):
            yield f"{path}:item {item}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:line {lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path}:line {lineno}", BadRecord(f"{path}:line {lineno}: malformed JSON ({err.msg}).")


def _field(record: dict, field: str, where: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None or (required and str(value).strip() == ""):
        if required:
            raise BadRecord(f"{where}: missing field {field!r} (the record has {sorted(record)}).")
        return ""
    return str(value)


def _gsm8k_answer(text: str, where: str) -> str:
    if "####" not in text:
        raise BadRecord(f"{where}: field 'answer' has no '#### <final answer>' line.")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise BadRecord(f"{where}: field 'answer' has an empty '####' final answer.")
    return answer


def convert_record(name: str, record, where: str) -> dict:
    """``{"problem", "answer", "solution"}`` from one source record; ``BadRecord`` if unusable."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if name == "gsm8k":
        official = _field(record, "answer", where)
        return {"problem": _field(record, "question", where),
                "answer": _gsm8k_answer(official, where), "solution": official}
    if name == "math":
        solution = _field(record, "solution", where)
        answer = _field(record, "answer", where, required=False).strip()
        if not answer:
            from jackpot_jax.data.rewards import extract_answer
            answer = extract_answer(solution) or ""
            if not answer:
                raise BadRecord(f"{where}: no field 'answer' and no \\boxed{{}} answer in field 'solution'.")
        return {"problem": _field(record, "problem", where), "answer": answer, "solution": solution}
    if name == "deepscaler":
        return {"problem": _field(record, "problem", where), "answer": _field(record, "answer", where).strip(),
                "solution": _field(record, "solution", where, required=False)}
    raise ValueError(f"Dataset {name!r} is not read from files: the file datasets are {MANUAL_DATASETS}.")


def read_manual_split(name: str, split: str, manual_dir: str, *,
                      skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """``(records, skipped)`` for ``split`` of ``name`` from ``manual_dir`` (resolved).

    Raises ``FileNotFoundError`` (with instructions) when the split's file is missing, ``ValueError``
    naming file and line for a malformed line or a missing field (unless ``skip_bad_lines``: then
    such records are skipped, logged and counted), and ``ValueError`` when no record is left.
    """
    _check_name(name)
    _check_split(name, split)
    paths = require_manual_files(name, split, manual_dir)
    records, skipped = [], 0
    for path in paths:
        for where, raw in _iter_raw(path):
            try:
                if isinstance(raw, Exception):
                    raise raw
                records.append(convert_record(name, raw, where))
            except BadRecord as err:
                if not skip_bad_lines:
                    raise BadRecord(f"Dataset {name!r}, split {split!r}: {err} (config 'skip_bad_lines' "
                                    "skips such records)") from None
                skipped += 1
                logger.warning("Dataset %r, split %r: skipped: %s", name, split, err)
    if skipped:
        logger.warning("Dataset %r, split %r: skipped %d bad records, kept %d.", name, split, skipped,
                       len(records))
    if not records:
        raise ValueError(f"Dataset {name!r}, split {split!r}: empty split: no usable record in "
                         f"{', '.join(paths)}" + (f" ({skipped} bad records skipped)." if skipped else "."))
    return records, skipped


# ------------------------------------------------------------------------------------------------
# Loading through TFDS
# ------------------------------------------------------------------------------------------------

_FINGERPRINT_FILE = "jackpot_manual_files.sha256"


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


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
    ``limit``: at most this many records (the first ones, in file / generation order). ``config``:
    a builder config name (``"d1"``..``"d4"`` for ``jackpot_arithmetic``, ``"skip_bad_lines"`` for the
    file datasets) or a ``BuilderConfig``.
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
    if limit == 0:
        return []
    dataset = builder.as_dataset(split=split if limit is None else f"{split}[:{limit}]",
                                 shuffle_files=False)
    return [{key: _decode(value) for key, value in example.items()} for example in tfds.as_numpy(dataset)]
