"""The metrics record of a training run (metrics.jsonl, TensorBoard events, the progress bar) and
jackpot-plot, which draws it."""
import glob
import json
import logging
import math
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jackpot_jax.train import plot
from jackpot_jax.train.metrics import MetricsWriter, Progress, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tensorboard_scalars(logdir):
    """``{(tag, step): value}`` from the event files under ``logdir``, read by their record format
    (length u64, its masked CRC u32, an ``Event`` proto, its masked CRC u32), since TensorBoard
    itself, which has a reader, is not a dependency."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    files = glob.glob(f"{logdir}/events.out.tfevents.*")
    assert files, f"no TensorBoard event file under {logdir}"
    for name in files:
        data = open(name, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_written_rows_read_back_equal(tmp_path):
    metrics = {"loss/policy": 0.25, "count": 7, "np/f32": np.float32(0.1), "np/i64": np.int64(-3),
               "jax/f32": jnp.float32(1.5), "jax/i32": jnp.int32(4), "jax/bf16": jnp.bfloat16(0.5),
               "bad/nan": float("nan"), "bad/inf": np.float64(np.inf), "bad/ninf": -math.inf}
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, metrics)
        writer.write(np.int64(1), {"count": 8})
    rows = read_metrics(tmp_path)
    assert rows[1] == {"step": 1, "count": 8}
    row = rows[0]
    assert list(row) == ["step", *metrics]
    assert row["step"] == 0 and row["loss/policy"] == 0.25 and row["np/f32"] == float(np.float32(0.1))
    assert row["count"] == 7 and row["np/i64"] == -3 and row["jax/i32"] == 4
    assert all(type(row[k]) is int for k in ("count", "np/i64", "jax/i32"))
    assert row["jax/f32"] == 1.5 and row["jax/bf16"] == 0.5 and type(row["jax/bf16"]) is float
    assert math.isnan(row["bad/nan"]) and row["bad/inf"] == math.inf and row["bad/ninf"] == -math.inf
    first_line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(first_line)["bad/nan"] == "NaN"  # strict JSON: non-finite floats as strings


def test_bad_values_are_rejected_before_anything_is_written(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="'reward/per_sample'"):
            writer.write(0, {"ok": 1.0, "reward/per_sample": np.ones(3)})
        with pytest.raises(TypeError, match="'name'"):
            writer.write(0, {"name": "text"})
        with pytest.raises(ValueError, match="'step'"):
            writer.write(0, {"step": 3})
    assert read_metrics(tmp_path) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(1, {"ok": 1.0})


def test_tensorboard_events_hold_the_scalars(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with MetricsWriter(tmp_path) as writer:
        writer.write(0, {"reward/mean": 0.5, "lr": np.float32(1e-6)})
        writer.write(1, {"reward/mean": jnp.float32(0.75), "lr": 2e-6, "loss/policy": math.nan,
                         "eval/policy/mean@4": 0.25, "/time/per step (s)": 3.0})
        with pytest.raises(ValueError, match="'eval/policy/mean_at_4' is 'eval/policy/mean@4'"):
            writer.write(2, {"eval/policy/mean_at_4": 1.0})  # one TensorBoard tag for two names
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == pytest.approx({("reward/mean", 0): 0.5, ("lr", 0): 1e-6, ("reward/mean", 1): 0.75,
                                     ("lr", 1): 2e-6, ("eval/policy/mean_at_4", 1): 0.25,
                                     ("time/per_step__s_", 1): 3.0})  # NaN: metrics.jsonl only
    assert all(re.fullmatch(r"[A-Za-z0-9_.-][A-Za-z0-9_./-]*", tag) for tag, _ in scalars)
    assert not [r.getMessage() for r in caplog.records if "illegal" in r.getMessage()]  # tensorboardX renamed none
    assert [sorted(row) for row in read_metrics(tmp_path)][1] == sorted(  # metrics.jsonl keeps the names
        ["step", "reward/mean", "lr", "loss/policy", "eval/policy/mean@4", "/time/per step (s)"])


def test_resume_drops_rows_from_start_step_and_a_truncated_last_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(6):
            writer.write(step, {"x": step / 2})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x": 3.')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(6))
    with MetricsWriter(tmp_path, start_step=3, tensorboard=False) as writer:
        assert read_metrics(tmp_path) == [{"step": s, "x": s / 2} for s in range(3)]
        writer.write(3, {"x": 30.0})
    assert read_metrics(tmp_path) == [{"step": 0, "x": 0.0}, {"step": 1, "x": 0.5}, {"step": 2, "x": 1.0},
                                      {"step": 3, "x": 30.0}]
    MetricsWriter(tmp_path, start_step=0, tensorboard=False).close()  # a run that starts over
    assert read_metrics(tmp_path) == []


def test_metrics_are_appended_and_a_resume_truncates_once_to_the_checkpoint(tmp_path):
    """A writer with nothing to drop leaves the file as it is (same inode, same bytes) and appends; a
    resume from checkpoint step 3 (``start_step=4``) keeps exactly the rows with step <= 3, by one
    rename (a new inode), after which the rows are appended to that file."""
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(6):
            writer.write(step, {"x": float(step)})
    before, inode = path.read_bytes(), path.stat().st_ino
    with MetricsWriter(tmp_path, start_step=6, tensorboard=False) as writer:
        assert path.stat().st_ino == inode and path.read_bytes() == before  # not rewritten
        writer.write(6, {"x": 6.0})
    assert path.stat().st_ino == inode and path.read_bytes().startswith(before)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(7))

    with MetricsWriter(tmp_path, start_step=3 + 1, tensorboard=False) as writer:
        truncated = path.stat().st_ino
        assert truncated != inode and not (tmp_path / "metrics.jsonl.tmp").exists()
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
        kept = path.read_bytes()
        assert before.startswith(kept)  # the kept rows, byte for byte
        writer.write(4, {"x": 40.0})
    assert path.stat().st_ino == truncated and path.read_bytes().startswith(kept)
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0),
                                                                      (4, 40.0)]


def test_disabled_writer_and_progress_touch_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, start_step=5, enabled=False) as writer:
        writer.write(5, {"x": 1.0})
    assert not workdir.exists()
    with Progress(10, initial=5, enabled=False) as bar:
        bar.update(5, {"reward/mean": 1.0})
    assert capsys.readouterr().err == ""


def test_read_metrics_names_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x": \n{"step": 2, "x": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
        read_metrics(path)
    path.write_text('{"step": 0}\n["not", "a", "row"]\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2: not a metrics row"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_metrics(tmp_path / "missing")


def test_progress_shows_key_figures(capsys):
    with Progress(4, initial=1) as bar:
        bar.update(1, {"reward/mean": 0.5, "obrs/accept_rate": jnp.float32(0.25), "eval/gsm8k/mean@4": 0.125,
                       "time/update_s": 2.0, "loss/policy": 9.0})
        assert bar._bar.n == 2
    err = capsys.readouterr().err
    assert "2/4" in err
    assert "reward=0.5" in err and "accept=0.25" in err and "gsm8k/mean@4=0.125" in err and "update_s=2" in err
    assert "loss" not in err


def test_moving_average_is_trailing():
    np.testing.assert_allclose(plot.moving_average(np.array([1.0, 2.0, 3.0, 6.0]), 2), [1.0, 1.5, 2.5, 4.5])
    constant = np.full(100_000, 0.3)  # a running sum would drift by ~1e-12 here
    np.testing.assert_allclose(plot.moving_average(constant, 10), 0.3, rtol=1e-15)


def test_plot_writes_one_png_per_group(tmp_path, capsys):
    rows = [{"step": s, "reward/mean": s / 10, "reward/std": 1.0, "obrs/accept_rate": 0.5, "lr": 1e-6,
             "eval/mean@4": 0.2, "time/update_s": "slow", "loss/nan": "NaN"} for s in range(5)]
    rows[2].pop("eval/mean@4")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "figs"
    plot.main([str(tmp_path), "--out", str(out), "--smooth", "3"])
    printed = capsys.readouterr().out.split()
    names = ["eval.png", "misc.png", "obrs.png", "reward.png"]  # time and loss hold no number
    assert printed == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert plot.plot_metrics(tmp_path) == [str(tmp_path / "plots" / n) for n in names]


def test_plot_errors_clearly_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match=r"jackpot-plot: No metrics file at .*metrics\.jsonl"):
        plot.main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "note": "x"}\n')
    with pytest.raises(ValueError, match="no numeric metric"):
        plot.plot_metrics(tmp_path)
