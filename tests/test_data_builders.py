"""TFDS builders: jackpot_arithmetic (determinism, disjoint splits, verified answers, difficulty knob)
and gsm8k / math / deepscaler prepared from our fixtures (tests/fixtures/data), plus bad input:
malformed lines, missing fields, empty splits and missing manual files, each with a clear message."""
import json
import logging
import os
import random
import re
import subprocess
import sys

import pytest

from jackpot_jax.data import arithmetic
from jackpot_jax.data import datasets
from jackpot_jax.data.datasets import load_split
from jackpot_jax.data.manual_files import read_manual_split
from jackpot_jax.data.rewards import extract_answer, math_reward

pytest.importorskip("tensorflow_datasets")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One TFDS data_dir shared by the module: each dataset is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    return path


GSM8K_LINE = json.dumps({"question": "Q?", "answer": "2 + 2 = 4\n#### 4"})
MATH_LINE = json.dumps({"problem": "P?", "solution": "So $\\boxed{3}$."})


# ------------------------------------------------------------------------------------------------
# jackpot_arithmetic: the generator
# ------------------------------------------------------------------------------------------------

def test_import_does_not_import_tensorflow():
    code = ("import sys, jackpot_jax.data.datasets, jackpot_jax.data.arithmetic; "
            "heavy = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_arithmetic_same_seed_same_problems(difficulty):
    assert arithmetic.make_split(7, 50, difficulty) == arithmetic.make_split(7, 50, difficulty)
    first = [arithmetic.generate_problem(random.Random(3), difficulty) for _ in range(2)]
    assert first[0] == first[1]
    other = [p["problem"] for p in arithmetic.make_split(8, 50, difficulty)]
    assert other != [p["problem"] for p in arithmetic.make_split(7, 50, difficulty)]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 6])
def test_arithmetic_answers_recomputed_and_difficulty_is_number_of_steps(difficulty):
    problems = arithmetic.make_split(11, 300, difficulty)
    assert len({p["problem"] for p in problems}) == 300  # distinct within a split
    for p in problems:
        value = p["start"]
        for op, operand in p["steps"]:  # recompute independently of arithmetic.evaluate
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        assert p["answer"] == str(value) and value >= 0
        assert len(p["steps"]) == difficulty
        assert p["solution"].count("=") == difficulty
        assert p["solution"].endswith(f"\\boxed{{{value}}}")
        assert extract_answer(p["solution"]) == p["answer"]
        assert len(p["problem"].split()) <= 11 + 3 * difficulty  # short prompts
        if difficulty == 1:
            assert p["problem"].startswith("What is ")
        else:
            assert " has " in p["problem"] and p["problem"].endswith("have?")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_arithmetic_expressions(difficulty):
    problems = arithmetic.make_split(5, 300, difficulty, form="expression")
    assert problems == arithmetic.make_split(5, 300, difficulty, form="expression")
    assert len({p["problem"] for p in problems}) == 300
    for p in problems:
        numbers = [int(t) for t in re.findall(r"\d+", p["problem"])]
        ops = re.findall(r" ([-+]) ", p["problem"])
        assert p["problem"] == "What is " + " ".join(
            [str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:])]) + "?"
        assert len(ops) == difficulty and all(0 <= n <= 49 for n in numbers)
        value = numbers[0]
        for op, n in zip(ops, numbers[1:]):  # left to right, every partial result non-negative
            value = value + n if op == "+" else value - n
            assert value >= 0, p["problem"]
        assert p["answer"] == str(value)
        assert arithmetic.solution_reward(p["solution"], p["answer"]) == 1.0
    assert {op for p in problems for op, _ in p["steps"]} == {"+", "-"}
    with pytest.raises(ValueError, match="form='words' is not allowed.*'expression'"):
        arithmetic.make_split(5, 3, difficulty, form="words")


def test_arithmetic_solution_graded_correct_by_math_reward():
    sample = arithmetic.make_split(5, 2, 1) + arithmetic.make_split(5, 2, 3)
    for p in sample:
        assert math_reward(p["solution"], p["answer"]) == 1.0
        assert math_reward(p["solution"], str(int(p["answer"]) + 1)) == 0.0


def test_arithmetic_exclude_and_bad_arguments(monkeypatch):
    test = arithmetic.make_split(1, 200, 1)
    train = arithmetic.make_split(0, 2000, 1, exclude=[p["problem"] for p in test])
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="difficulty"):
            arithmetic.generate_problem(random.Random(0), bad)
    with pytest.raises(ValueError, match="count"):
        arithmetic.make_split(0, -3, 1)
    monkeypatch.setattr(arithmetic, "MAX_DRAWS_PER_PROBLEM", 1)  # space too small for the draws
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic.make_split(0, 2000, 1)


# ------------------------------------------------------------------------------------------------
# jackpot_arithmetic: the TFDS builder
# ------------------------------------------------------------------------------------------------

def test_arithmetic_builder_splits(data_dir):
    train = load_split("jackpot_arithmetic", "train", data_dir=data_dir)
    test = load_split("jackpot_arithmetic", "test", data_dir=data_dir)
    assert (len(train), len(test)) == (12000, 200)
    assert all(isinstance(v, str) for record in train[:5] for v in record.values())
    assert set(train[0]) == {"problem", "answer", "solution"}
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    # d1 is the default config; records are the generator's, in generation order
    from jackpot_jax.data.builders import JackpotArithmetic
    config = JackpotArithmetic.builder_configs["d1"]
    expected = arithmetic.make_split(config.test_seed, 200, 1)
    assert test == [{k: p[k] for k in ("problem", "answer", "solution")} for p in expected]
    assert load_split("jackpot_arithmetic", "test", data_dir=data_dir, limit=3) == test[:3]
    assert load_split("jackpot_arithmetic", "test", data_dir=data_dir, limit=0) == []


def test_arithmetic_builder_difficulty_configs(data_dir):
    for name, steps in (("d1", 1), ("d3", 3)):
        test = load_split("jackpot_arithmetic", "test", data_dir=data_dir, config=name, limit=20)
        assert all(r["solution"].count("=") == steps for r in test)
        assert all(extract_answer(r["solution"]) == r["answer"] for r in test)


def test_arithmetic_builder_expression_config(data_dir):
    from jackpot_jax.data.builders import JackpotArithmetic
    config = JackpotArithmetic.builder_configs["e2"]
    test = load_split("jackpot_arithmetic", "test", data_dir=data_dir, config="e2")
    expected = arithmetic.make_split(config.test_seed, 200, 2, form="expression")
    assert test == [{k: p[k] for k in ("problem", "answer", "solution")} for p in expected]
    train = load_split("jackpot_arithmetic", "train", data_dir=data_dir, config="e2")
    assert len(train) == 12000 and not {r["problem"] for r in train} & {r["problem"] for r in test}


def test_arithmetic_builder_custom_config_and_empty_split(tmp_path):
    from jackpot_jax.data.builders import ArithmeticConfig
    config = ArithmeticConfig(name="tiny", difficulty=2, train_size=30, test_size=5)
    test = load_split("jackpot_arithmetic", "test", data_dir=str(tmp_path), config=config)
    assert len(test) == 5 and all(r["solution"].count("=") == 2 for r in test)
    empty = ArithmeticConfig(name="empty", difficulty=2, train_size=30, test_size=0)
    with pytest.raises(ValueError, match="empty split 'test'"):
        load_split("jackpot_arithmetic", "train", data_dir=str(tmp_path), config=empty)


def test_two_processes_preparing_one_fresh_data_dir_both_get_the_dataset(tmp_path):
    """Without the lock, the second of two processes preparing a fresh data_dir at once fails to
    rename its copy onto the first's (FileExistsError); with it, they take turns."""
    script = ("import json, sys; from jackpot_jax.data.datasets import load_split; "
              "print(json.dumps(load_split('jackpot_arithmetic', 'test', data_dir=sys.argv[1], config='d2')))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert len(first) == 200 and first == second


# ------------------------------------------------------------------------------------------------
# gsm8k / math / deepscaler from the fixtures
# ------------------------------------------------------------------------------------------------

def test_gsm8k_from_fixtures(data_dir):
    train = load_split("gsm8k", "train", data_dir=data_dir, manual_dir=FIXTURES)
    assert [r["answer"] for r in train] == ["15", "1250", "7"]
    with open(os.path.join(FIXTURES, "gsm8k", "train.jsonl")) as file:
        official = [json.loads(line) for line in file]
    assert [r["problem"] for r in train] == [o["question"] for o in official]
    assert [r["solution"] for r in train] == [o["answer"] for o in official]  # the full answer text
    test = load_split("gsm8k", "test", data_dir=data_dir, manual_dir=os.path.join(FIXTURES, "gsm8k"))
    assert [r["answer"] for r in test] == ["36", "14"]
    assert all(math_reward(r["solution"], r["answer"]) == 1.0 for r in test)


def test_math_from_fixtures(data_dir):
    train = load_split("math", "train", data_dir=data_dir, manual_dir=FIXTURES)
    # no answer field: the last \boxed{} of the solution
    assert [r["answer"] for r in train] == ["5", "1", "\\frac{2}{3}"]
    test = load_split("math", "test", data_dir=data_dir, manual_dir=FIXTURES)  # MATH-500 style
    assert [r["answer"] for r in test] == ["7", "\\{-2, 2\\}", "6"]
    assert test[0]["problem"].startswith("Find the sum of the roots")
    assert all(r["solution"] for r in train + test)


def test_deepscaler_from_fixtures(data_dir):
    train = load_split("deepscaler", "train", data_dir=data_dir, manual_dir=FIXTURES)
    assert [r["answer"] for r in train] == ["25", "6", "4"]
    assert train[2]["solution"] == ""
    assert train[1]["problem"] == "Compute $\\sqrt{2} \\cdot \\sqrt{18}$."
    with pytest.raises(ValueError, match="splits are \\('train',\\)"):
        load_split("deepscaler", "test", data_dir=data_dir, manual_dir=FIXTURES)


def test_deepscaler_jsonl_and_parquet(tmp_path):
    records = [{"problem": "P1", "answer": "1", "solution": "s1"}, {"problem": "P2", "answer": 2}]
    _write(str(tmp_path / "jsonl" / "train.jsonl"), [json.dumps(r) for r in records])
    got = load_split("deepscaler", "train", data_dir=str(tmp_path / "tfds1"), manual_dir=str(tmp_path / "jsonl"))
    assert got == [{"problem": "P1", "answer": "1", "solution": "s1"},
                   {"problem": "P2", "answer": "2", "solution": ""}]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    os.makedirs(tmp_path / "pq")
    table = pa.table({"question": ["Q1?", "Q2?"], "answer": ["a\n#### 1,000", "b\n#### -3"]})
    pq.write_table(table, str(tmp_path / "pq" / "train-00000-of-00001.parquet"))  # Hugging Face layout
    got = load_split("gsm8k", "train", data_dir=str(tmp_path / "tfds2"), manual_dir=str(tmp_path / "pq"))
    assert [r["answer"] for r in got] == ["1000", "-3"]
    bad = pa.table({"question": ["Q1?", "Q2?"], "answer": ["a\n#### 1", "no final answer"]})
    pq.write_table(bad, str(tmp_path / "pq" / "test.parquet"))
    with pytest.raises(ValueError, match=r"test\.parquet:row 2: field 'answer' has no '####"):
        read_manual_split("gsm8k", "test", str(tmp_path / "pq"))


def test_changed_manual_files_are_prepared_again(tmp_path):
    path = _write(str(tmp_path / "m" / "test.jsonl"), [MATH_LINE])
    assert [r["answer"] for r in load_split("math", "test", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))] == ["3"]
    _write(path, [MATH_LINE, json.dumps({"problem": "P2", "solution": "x", "answer": "9"})])
    got = load_split("math", "test", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
    assert [r["answer"] for r in got] == ["3", "9"]
    # a split whose file appears later is prepared then too; a split without file is an error
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_split("math", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
    _write(str(tmp_path / "m" / "train.jsonl"), [MATH_LINE])
    assert len(load_split("math", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))) == 1


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="jackpot_arithmetic.*gsm8k.*math.*deepscaler"):
        load_split("gsm9k", "train")
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        load_split("gsm8k", "validation")
    with pytest.raises(ValueError, match="limit"):
        load_split("jackpot_arithmetic", "train", limit=-1)


def test_unknown_builder_config_is_one_line_before_anything_is_prepared(tmp_path):
    """The demo's config="d1" left on dataset gsm8k: TFDS's own error lists no configs."""
    with pytest.raises(ValueError) as info:
        load_split("gsm8k", "test", data_dir=str(tmp_path), manual_dir=FIXTURES, config="d1")
    message = str(info.value)
    assert message.startswith("Dataset 'gsm8k' has no config 'd1': its configs are ('default', 'skip_bad_lines')")
    assert "config.data.config" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"no config 'd9': its configs are \('d1', 'd2', 'd3', 'd4', 'e2', 'e3'\)"):
        load_split("jackpot_arithmetic", "train", data_dir=str(tmp_path), config="d9")
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing prepared


def test_limit_is_at_most(data_dir, caplog):
    """A limit above the split's size reads the whole split (TFDS would refuse the slice), and says so."""
    caplog.set_level(logging.INFO, logger="jackpot_jax.data.datasets")
    everything = load_split("gsm8k", "test", data_dir=data_dir, manual_dir=FIXTURES)
    assert load_split("gsm8k", "test", data_dir=data_dir, manual_dir=FIXTURES, limit=12000) == everything
    assert "limit=12000 is more than its 2 records" in caplog.text
    caplog.clear()
    assert load_split("gsm8k", "test", data_dir=data_dir, manual_dir=FIXTURES, limit=2) == everything
    assert load_split("gsm8k", "test", data_dir=data_dir, manual_dir=FIXTURES, limit=1) == everything[:1]
    assert "limit=" not in caplog.text


@pytest.mark.parametrize("name,split,expected", [("gsm8k", "train", "train.jsonl"),
                                                 ("math", "test", "test.jsonl"),
                                                 ("deepscaler", "train", "deepscaler.json")])
def test_missing_manual_files(tmp_path, name, split, expected):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_split(name, split, data_dir=str(tmp_path), manual_dir=str(manual))
    message = str(info.value)
    assert os.path.join(str(manual), expected) in message and repr(name) in message
    # default manual_dir: <data_dir>/manual/<name>
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "manual", name, expected)):
        load_split(name, split, data_dir=str(tmp_path))


def test_builder_without_manual_dir_says_where(tmp_path):
    from jackpot_jax.data.builders import Gsm8k
    import tensorflow_datasets as tfds
    builder = Gsm8k(data_dir=str(tmp_path))
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        builder.download_and_prepare(download_config=config)


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(str(tmp_path / "gsm8k" / "train.jsonl"), [GSM8K_LINE, '{"question": "Q?", "answer": ', GSM8K_LINE])
    with pytest.raises(ValueError, match=f"{path}:line 2: malformed JSON"):
        read_manual_split("gsm8k", "train", str(tmp_path / "gsm8k"))
    with pytest.raises(ValueError, match=f"{path}:line 2: malformed JSON"):  # through TFDS
        load_split("gsm8k", "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    records, skipped = read_manual_split("gsm8k", "train", str(tmp_path / "gsm8k"), skip_bad_lines=True)
    assert (len(records), skipped) == (2, 1)


def test_skip_bad_lines_config_counts(tmp_path):
    _write(str(tmp_path / "math" / "test.jsonl"),
           [MATH_LINE, "not json", "", json.dumps({"problem": "P"}), json.dumps([1, 2]), MATH_LINE])
    got = load_split("math", "test", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path),
                     config="skip_bad_lines")
    assert [r["answer"] for r in got] == ["3", "3"]
    builder = datasets.get_builder("math", data_dir=str(tmp_path / "tfds"), config="skip_bad_lines")
    assert builder.info.metadata["skipped_records"] == {"test": 3}


@pytest.mark.parametrize("name,record,field", [
    ("gsm8k", {"question": "Q?"}, "'answer'"),
    ("gsm8k", {"answer": "#### 1"}, "'question'"),
    ("math", {"problem": "P?"}, "'solution'"),
    ("math", {"solution": "$\\boxed{1}$"}, "'problem'"),
    ("deepscaler", {"problem": "P?", "solution": "s"}, "'answer'"),
    ("deepscaler", {"problem": "P?", "answer": ""}, "'answer'"),
])
def test_missing_field_names_field_file_and_line(tmp_path, name, record, field):
    good = {"gsm8k": GSM8K_LINE, "math": MATH_LINE,
            "deepscaler": json.dumps({"problem": "P", "answer": "1"})}[name]
    split = "train"
    path = _write(str(tmp_path / "train.jsonl"), [good, good, json.dumps(record)])
    with pytest.raises(ValueError, match=f"{path}:line 3: missing field {field}"):
        read_manual_split(name, split, str(tmp_path))


def test_answer_missing_from_solution(tmp_path):
    path = _write(str(tmp_path / "test.jsonl"), [json.dumps({"question": "Q", "answer": "four"})])
    with pytest.raises(ValueError, match=f"{path}:line 1: field 'answer' has no '#### <final answer>'"):
        read_manual_split("gsm8k", "test", str(tmp_path))
    path = _write(str(tmp_path / "test.jsonl"), [json.dumps({"problem": "P", "solution": "It is 4."})])
    with pytest.raises(ValueError, match=f"{path}:line 1: no field 'answer' and no \\\\boxed"):
        read_manual_split("math", "test", str(tmp_path))


def test_empty_split(tmp_path):
    _write(str(tmp_path / "gsm8k" / "test.jsonl"), ["", "  "])
    with pytest.raises(ValueError, match="split 'test': empty split"):
        load_split("gsm8k", "test", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    _write(str(tmp_path / "gsm8k" / "test.jsonl"), ["{oops", "[]"])
    with pytest.raises(ValueError, match="empty split.*2 bad records skipped"):
        read_manual_split("gsm8k", "test", str(tmp_path / "gsm8k"), skip_bad_lines=True)
    _write(str(tmp_path / "deepscaler" / "deepscaler.json"), ["[]"])
    with pytest.raises(ValueError, match="empty split"):
        read_manual_split("deepscaler", "train", str(tmp_path / "deepscaler"))


def test_malformed_json_array(tmp_path):
    path = _write(str(tmp_path / "deepscaler.json"), ["[", '  {"problem": "P", "answer": "1"},', "  {oops}", "]"])
    with pytest.raises(ValueError, match=f"{path}:line 3: malformed JSON"):
        read_manual_split("deepscaler", "train", str(tmp_path))
    path = _write(str(tmp_path / "deepscaler.json"), ['[{"problem": "P", "answer": "1"}, {"problem": "P"}]'])
    with pytest.raises(ValueError, match=f"{path}:item 2: missing field 'answer'"):
        read_manual_split("deepscaler", "train", str(tmp_path))


def test_non_utf8_and_oversized_records_name_file_and_line_and_are_skippable(tmp_path, monkeypatch):
    from jackpot_jax.data import manual_files

    assert manual_files.MAX_RECORD_BYTES == 1 << 20
    monkeypatch.setattr(manual_files, "MAX_RECORD_BYTES", len(GSM8K_LINE) + 2)  # tiny: the long line stays cheap
    path = str(tmp_path / "train.jsonl")
    with open(path, "wb") as file:
        file.write(b"\n".join([GSM8K_LINE.encode(), GSM8K_LINE.encode()[:-2] + b'\xff"}',
                               GSM8K_LINE.encode()[:-1] + b" " * 3_000_000 + b"}", GSM8K_LINE.encode()]) + b"\n")
    with pytest.raises(ValueError, match=f"{path}:line 2: not UTF-8 \\(byte 0xff") as error:
        read_manual_split("gsm8k", "train", str(tmp_path))
    assert "skip_bad_lines" in str(error.value)
    with open(path, "r+b") as file:  # line 2 fixed: line 3 (3 MB) is next
        file.seek(len(GSM8K_LINE) + 1 + len(GSM8K_LINE) - 2)
        file.write(b' "')
    with pytest.raises(ValueError, match=f"{path}:line 3: the record has 3000[0-9]* bytes or more, over the limit "
                                         f"of MAX_RECORD_BYTES={len(GSM8K_LINE) + 2}"):
        read_manual_split("gsm8k", "train", str(tmp_path))
    with open(path, "r+b") as file:
        file.seek(len(GSM8K_LINE) + 1 + len(GSM8K_LINE) - 2)
        file.write(b'\xff"')
    records, skipped = read_manual_split("gsm8k", "train", str(tmp_path), skip_bad_lines=True)
    assert (len(records), skipped) == (2, 2) and records[0] == records[1]
    # a JSON array is one document: its decoding error names the line, and a too-big item is skippable
    path = str(tmp_path / "deepscaler.json")
    with open(path, "wb") as file:
        file.write(b'[\n{"problem": "P", "answer": "1"},\n{"problem": "\xe9", "answer": "1"}]')
    with pytest.raises(ValueError, match=f"{path}:line 3: not UTF-8 \\(byte 0xe9\\)"):
        read_manual_split("deepscaler", "train", str(tmp_path))
    with open(path, "w") as file:
        json.dump([{"problem": "P", "answer": "1"}, {"problem": "P" * 100, "answer": "1"}], file)
    with pytest.raises(ValueError, match=f"{path}:item 2: the record has [0-9]+ bytes or more"):
        read_manual_split("deepscaler", "train", str(tmp_path))
    assert read_manual_split("deepscaler", "train", str(tmp_path), skip_bad_lines=True)[1] == 1


def test_format_reward_and_answer_extraction_are_linear_on_pathological_completions():
    import time

    from jackpot_jax.data.rewards import format_reward

    cases = [("\\boxed{" * 20_000, 0.0, None),  # was quadratic: 347 s
             ("\\boxed{1}" + "\\boxed{" * 20_000, 0.0, "1"),
             ("\\boxed{" + "{" * 20_000 + "x" + "}" * 20_000 + "}", 1.0, "{" * 20_000 + "x" + "}" * 20_000),
             ("\\boxed{\\{1, 2\\}}" + " \\\\" * 50_000, 0.0, "\\{1, 2\\}")]
    for completion, reward, answer in cases:
        start = time.perf_counter()
        assert (format_reward(completion), extract_answer(completion)) == (reward, answer)
        assert time.perf_counter() - start < 1.0
