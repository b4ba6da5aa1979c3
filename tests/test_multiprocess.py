"""Two real JAX processes on 127.0.0.1 (``launch/local.sh``: gloo collectives, 2 fake CPU devices
each) train the small demo of the resume tests on an FSDP=2 x tensor=2 mesh over their 4 devices,
and give the metrics of one process with 4 devices; the two-process run's sharded checkpoint
restores in a one-process run, which continues with the same next step."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jackpot_jax.train.metrics import read_metrics
from tests.test_train_resume import OVERRIDES, ROOT, TIMING

pytestmark = pytest.mark.slow  # ~4 min: python -m pytest -m slow tests/test_multiprocess.py

STEPS = 3
MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
LOCAL_SH = ROOT / "launch" / "local.sh"


def _flags(workdir, data_dir, *extra):
    overrides = {**OVERRIDES, **MESH, "train.steps": STEPS, "data.data_dir": data_dir}
    return [f"--workdir={workdir}", *[f"--config.{key}={value}" for key, value in overrides.items()], *extra]


def _env(devices):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _one_process(workdir, data_dir, *extra):
    command = [sys.executable, "-c", "from jackpot_jax.train.cli import train_main; train_main()",
               *_flags(workdir, data_dir, *extra)]
    subprocess.run(command, env=_env(4), check=True, timeout=600, capture_output=True)


def _two_processes(workdir, data_dir, log_dir):
    trainer = f"{sys.executable} -c 'from jackpot_jax.train.cli import train_main; train_main()'"
    command = ["bash", str(LOCAL_SH), "--num-processes", "2", "--devices-per-process", "2", "--platform", "cpu",
               "--log-dir", str(log_dir), "--cmd", trainer, "--", *_flags(workdir, data_dir)]
    env = {**_env(2), "XLA_FLAGS": ""}  # local.sh gives each process its device count
    result = subprocess.run(command, env=env, timeout=900, capture_output=True, text=True)
    logs = {path.name: path.read_text()[-3000:] for path in pathlib.Path(log_dir).glob("*.log")}
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}\n{json.dumps(logs, indent=1)}"


def _comparable(workdir):
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith(TIMING)} for row in read_metrics(workdir)}


def _assert_same_metrics(want, got):
    assert set(got) == set(want)
    for step in want:
        assert set(got[step]) == set(want[step]), step
        for name, value in want[step].items():
            np.testing.assert_allclose(got[step][name], value, rtol=2e-4, atol=1e-6, err_msg=f"step {step}: {name}")


def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(tmp_path):
    data_dir = tmp_path / "data"
    _one_process(tmp_path / "one", data_dir)  # also generates the dataset, before two processes read it
    _two_processes(tmp_path / "two", data_dir, tmp_path / "logs")
    one, two = _comparable(tmp_path / "one"), _comparable(tmp_path / "two")
    assert sorted(one) == list(range(1, STEPS + 1))
    _assert_same_metrics(one, two)

    # the two processes' sharded checkpoint of step STEPS - 1, resumed by one process with 4 devices
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))  # the resumed run writes step STEPS's metrics again
    _one_process(resumed, data_dir, "--resume")
    _assert_same_metrics(one, _comparable(resumed))
