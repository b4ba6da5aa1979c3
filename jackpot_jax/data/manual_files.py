"""The datasets read from a user's local files: ``gsm8k``, ``math``, ``deepscaler``.

Which files to put where (:data:`MANUAL_FILES`, :func:`manual_instructions`), finding them, and
reading their records (pure Python, no TensorFlow) into ``{"problem", "answer", "solution"}``:
:func:`read_manual_split`. Used by both :func:`jackpot_jax.data.datasets.load_split` (to fail fast and
to fingerprint the files) and the TFDS builders of :mod:`jackpot_jax.data.builders` (to read them).

- ``gsm8k``: the official ``{"question", "answer"}`` JSONL; ``answer`` is the number after ``####``
  (commas removed), ``solution`` the whole official answer text.
- ``math``: MATH / MATH-500 ``{"problem", "solution"}`` (+ optional ``"answer"``); without an
  ``answer`` field, the answer is the last ``\\boxed{}`` of the solution.
- ``deepscaler``: DeepScaleR ``{"problem", "answer", "solution"}`` (train only).

Accepted formats: JSONL (UTF-8), a JSON array (DeepScaleR's ``deepscaler.json``) and parquet (needs
``pyarrow``). A malformed or non-UTF-8 line, a record over :data:`MAX_RECORD_BYTES`, a record with
a missing field and an empty split raise ``ValueError`` naming the file and line; with
``skip_bad_lines`` bad records are skipped, logged and counted instead (a JSON array is one document:
its decoding errors cannot be skipped).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)

# The largest record (a JSONL line, a JSON array item, a parquet row as JSON), in UTF-8 bytes: longer
# ones are bad records (skippable), so one huge line cannot take the memory of the preparation.
MAX_RECORD_BYTES = 1 << 20

MANUAL_SPLITS = {"gsm8k": ("train", "test"), "math": ("train", "test"), "deepscaler": ("train",)}
MANUAL_DATASETS = tuple(MANUAL_SPLITS)

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
_FORMATS = {
    "gsm8k": ('the official GSM8K file, one JSON object a line: {"question": ..., "answer": '
              '"...worked solution... #### 72"} (github.com/openai/grade-school-math, '
              'grade_school_math/data/{split}.jsonl; or the Hugging Face openai/gsm8k parquet)'),
    "math": ('MATH or MATH-500, one JSON object a line: {"problem": ..., "solution": "... \\\\boxed{...}"} '
             '(an optional "answer" field is used when present, as in MATH-500\'s test.jsonl)'),
    "deepscaler": ('DeepScaleR\'s deepscaler.json (a JSON array of {"problem", "answer", "solution"}), '
                   'or the same records as train.jsonl / train.parquet'),
}


def _check_split(name: str, split: str) -> None:
    if name not in MANUAL_DATASETS:
        raise ValueError(f"Dataset {name!r} is not read from files: the file datasets are {MANUAL_DATASETS}.")
    if split not in MANUAL_SPLITS[name]:
        raise ValueError(f"Unknown split {split!r} for dataset {name!r}: its splits are {MANUAL_SPLITS[name]}.")


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
    for one in (MANUAL_SPLITS[name] if split is None else (split,)):
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
    return tuple(split for split in MANUAL_SPLITS[name] if find_manual_files(name, split, manual_dir))


def manual_fingerprint(name: str, manual_dir: str) -> str:
    """A hash of the path, size and modification time of every file ``name`` reads."""
    parts = []
    for split in MANUAL_SPLITS[name]:
        for path in find_manual_files(name, split, manual_dir):
            stat = os.stat(path)
            parts.append(f"{split}\t{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file and line."""


def _too_big(where: str, size: int) -> BadRecord:
    return BadRecord(f"{where}: the record has {size} bytes or more, over the limit of MAX_RECORD_BYTES="
                     f"{MAX_RECORD_BYTES} (jackpot_jax.data.manual_files).")


def _record_size(record) -> int:
    """The UTF-8 size of ``record`` as JSON (for records of parquet files and JSON arrays)."""
    return len(json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"{where}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start} of the "
                        "line).") from None


def _read_lines(file) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, bytes, size)`` per line of the binary ``file``; a line over
    :data:`MAX_RECORD_BYTES` is never held whole: its bytes are ``None`` (``size``: as read)."""
    lineno = 0
    while True:
        line = file.readline(MAX_RECORD_BYTES + 2)  # + the newline (and a \r before it)
        if not line:
            return
        lineno += 1
        size = len(line)
        if size > MAX_RECORD_BYTES + 1 and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the line, a block at a time
                line = file.readline(1 << 20)
                size += len(line)
            yield lineno, None, size
            continue
        stripped = line.rstrip(b"\r\n")
        yield lineno, (None if len(stripped) > MAX_RECORD_BYTES else stripped), len(stripped)


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[str, object]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:  # a JSON array is one document: no record to skip to
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:line {line}: not UTF-8 (byte 0x{data[err.start]:02x}).") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:line {err.lineno}: malformed JSON ({err.msg}).") from err
    for item, record in enumerate(records, start=1):
        size = _record_size(record)
        yield f"{path}:item {item}", (_too_big(f"{path}:item {item}", size) if size > MAX_RECORD_BYTES else record)


def _iter_raw(path: str) -> Iterator[tuple[str, object]]:
    """``(where, record_or_exception)`` for each record of ``path``; ``where`` is ``path:line N``
    (JSONL), ``path:item N`` (JSON array) or ``path:row N`` (parquet), counted from 1. JSONL is read
    a line at a time, as bytes: a line that is not UTF-8 or JSON, or longer than
    :data:`MAX_RECORD_BYTES`, is a :class:`BadRecord` (skippable)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"Reading {path} needs pyarrow (pip install pyarrow), or convert the file "
                              "to JSONL.") from err
        for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            size = _record_size(record)
            yield f"{path}:row {row}", (_too_big(f"{path}:row {row}", size) if size > MAX_RECORD_BYTES else record)
        return
    with open(path, "rb") as file:
        if path.endswith(".json"):
            head = b""
            while not head and (chunk := file.read(4096)):  # the first non-blank byte
                head = chunk.lstrip()
            file.seek(0)
            if head.startswith(b"["):
                yield from _iter_json_array(path, file.read())
                return
        for lineno, line, size in _read_lines(file):
            where = f"{path}:line {lineno}"
            if line is None:
                yield where, _too_big(where, size)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(_decode(line, where))
            except BadRecord as err:
                yield where, err
            except json.JSONDecodeError as err:
                yield where, BadRecord(f"{where}: malformed JSON ({err.msg}).")


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
