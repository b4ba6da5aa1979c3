#!/usr/bin/env bash
# Runs N processes of jackpot-train on this machine, joined by jax.distributed through a
# coordinator on 127.0.0.1: a multi-process run to test without a cluster. See launch/README.md.
set -euo pipefail

readonly SCRIPT_NAME="local.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<EOF
Usage: launch/local.sh [options] [-- JACKPOT_TRAIN_ARGS...]

Starts N processes of jackpot-train on this machine, process i with
  --coordinator_address 127.0.0.1:PORT --num_processes N --process_id i JACKPOT_TRAIN_ARGS
waits for all of them, and stops the others as soon as one fails (exiting with its status).

Options:
  -n, --num-processes N        processes to start (default: 2)
  -d, --devices-per-process D  devices each process sees (default: 1); on cpu through
                               XLA_FLAGS=--xla_force_host_platform_device_count=D, on gpu through
                               CUDA_VISIBLE_DEVICES (process i gets GPUs i*D .. i*D+D-1)
  --platform cpu|gpu           the backend (default: cpu; cpu also sets JAX_PLATFORMS=cpu)
  --port P                     the coordinator's port (default: a free port)
  --cmd "COMMAND"              the trainer command, a shell command line (quotes keep words
                               together; default: \$JACKPOT_TRAIN if set, else
                               .venv/bin/jackpot-train of this repository if it exists, else
                               jackpot-train on PATH), e.g.
                               --cmd "python -c 'from jackpot_jax.train.cli import train_main; train_main()'"
  --log-dir DIR                process i writes DIR/process_i.log (default:
                               runs/local-logs-DATE-TIME); process 0 also writes to the terminal
  --dry-run                    print each process's command, with its environment, one per
                               line, and run nothing
  -h, --help                   show this help

Every process gets the same JACKPOT_TRAIN_ARGS, so pass an explicit --workdir.

Example (2 processes x 4 CPU devices, a mesh of fsdp 4 x data 2):
  launch/local.sh -n 2 -d 4 -- --workdir runs/local --config.mesh.fsdp=4 --config.mesh.data=2
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "${REPO_ROOT}/launch/lib.sh"

require_positive_int() {  # require_positive_int FLAG VALUE
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# Fill TRAIN_COMMAND from --cmd or $JACKPOT_TRAIN (a shell command line: quotes keep words
# together), else the repository's venv, else PATH.
set_train_command() {
  local command_line="$1"
  if [[ -z "${command_line}" ]]; then
    command_line="${JACKPOT_TRAIN:-}"
  fi
  if [[ -n "${command_line}" ]]; then
    TRAIN_COMMAND=()
    eval "TRAIN_COMMAND=(${command_line})" 2>/dev/null || die "--cmd: cannot parse the command line: ${command_line}"
  elif [[ -x "${REPO_ROOT}/.venv/bin/jackpot-train" ]]; then
    TRAIN_COMMAND=("${REPO_ROOT}/.venv/bin/jackpot-train")
  else
    TRAIN_COMMAND=(jackpot-train)
  fi
  [[ ${#TRAIN_COMMAND[@]} -gt 0 ]] || die "--cmd must not be blank"
}

python_for_helpers() {
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    echo "${REPO_ROOT}/.venv/bin/python"
  else
    echo "python3"
  fi
}

free_port() {
  "$(python_for_helpers)" -c '
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])'
}

# The environment assignments (NAME=VALUE words) of process $1.
process_env() {
  local index="$1" first ids=() device
  if [[ "${PLATFORM}" == "cpu" ]]; then
    echo "XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
    echo "JAX_PLATFORMS=cpu"
  else
    first=$((index * DEVICES_PER_PROCESS))
    for ((device = first; device < first + DEVICES_PER_PROCESS; device++)); do
      ids+=("${device}")
    done
    local IFS=,
    echo "CUDA_VISIBLE_DEVICES=${ids[*]}"
  fi
}

# Fill PROCESS_COMMAND with the full command line (env assignments first) of process $1.
build_process_command() {
  local index="$1" assignments=()
  mapfile -t assignments < <(process_env "${index}")
  PROCESS_COMMAND=(env "${assignments[@]}" "${TRAIN_COMMAND[@]}"
    --coordinator_address "127.0.0.1:${PORT}" --num_processes "${NUM_PROCESSES}"
    --process_id "${index}" "${TRAIN_ARGS[@]}")
}

parse_args() {
  NUM_PROCESSES=2
  DEVICES_PER_PROCESS=1
  PLATFORM=cpu
  PORT=""
  COMMAND_STRING=""
  LOG_DIR="runs/local-logs-$(date +%Y%m%d-%H%M%S)"
  DRY_RUN=0
  TRAIN_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      -n | --num-processes) require_value "$1" $#; NUM_PROCESSES="$2"; shift 2 ;;
      -d | --devices-per-process) require_value "$1" $#; DEVICES_PER_PROCESS="$2"; shift 2 ;;
      --platform) require_value "$1" $#; PLATFORM="$2"; shift 2 ;;
      --port) require_value "$1" $#; PORT="$2"; shift 2 ;;
      --cmd) require_value "$1" $#; COMMAND_STRING="$2"; shift 2 ;;
      --log-dir) require_value "$1" $#; LOG_DIR="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; TRAIN_ARGS=("$@"); break ;;
      *) die "unknown option '$1' (jackpot-train's own arguments go after '--')" ;;
    esac
  done
  require_positive_int --num-processes "${NUM_PROCESSES}"
  require_positive_int --devices-per-process "${DEVICES_PER_PROCESS}"
  [[ "${PLATFORM}" == cpu || "${PLATFORM}" == gpu ]] || die "--platform must be cpu or gpu, got '${PLATFORM}'"
  if [[ -n "${PORT}" ]]; then
    require_positive_int --port "${PORT}"
    [[ "${PORT}" -le 65535 ]] || die "--port must be at most 65535, got '${PORT}'"
  fi
  set_train_command "${COMMAND_STRING}"
}

warn_without_workdir() {
  local arg
  for arg in "${TRAIN_ARGS[@]}"; do
    [[ "${arg}" == --workdir || "${arg}" == --workdir=* ]] && return 0
  done
  echo "${SCRIPT_NAME}: warning: no --workdir among jackpot-train's arguments; every process must" \
    "write to the same one, so pass one explicitly." >&2
}

PIDS=()      # PIDS[i]: process i, the leader of its own process group (set -m)
RUNNING=()   # indices of the processes not yet reaped

start_processes() {
  local index log
  mkdir -p "${LOG_DIR}"
  set -m  # each background process gets its own process group: stop_processes kills whole groups
  for ((index = 0; index < NUM_PROCESSES; index++)); do
    build_process_command "${index}"
    log="${LOG_DIR}/process_${index}.log"
    if [[ "${index}" -eq 0 ]]; then
      "${PROCESS_COMMAND[@]}" </dev/null > >(tee "${log}") 2>&1 &
    else
      "${PROCESS_COMMAND[@]}" </dev/null >"${log}" 2>&1 &
    fi
    PIDS[index]=$!
    RUNNING+=("${index}")
  done
  set +m
  echo "${SCRIPT_NAME}: started ${NUM_PROCESSES} processes (coordinator 127.0.0.1:${PORT}); logs in ${LOG_DIR}/" >&2
}

# Send SIGTERM to the process groups of all started processes (with whatever children they
# left behind), then SIGKILL to the groups still alive 10 s later.
stop_processes() {
  local pid tries
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-${pid}" 2>/dev/null || true
  done
  for ((tries = 0; tries < 100; tries++)); do
    if ! any_group_alive; then
      return 0
    fi
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do
    kill -KILL -- "-${pid}" 2>/dev/null || true
  done
}

any_group_alive() {
  local pid
  for pid in "${PIDS[@]}"; do
    if kill -0 -- "-${pid}" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# On any exit (success, a failure, a signal, an error in this script): stop what is still running.
on_exit() {
  if any_group_alive; then
    stop_processes
  fi
}

on_signal() {  # on_signal STATUS
  echo "${SCRIPT_NAME}: interrupted: stopping the ${#RUNNING[@]} running processes" >&2
  exit "$1"
}

report_failure() {  # report_failure INDEX STATUS
  local log="${LOG_DIR}/process_$1.log"
  {
    echo "${SCRIPT_NAME}: process $1 (pid ${PIDS[$1]}) exited with status $2; its log: ${log}"
    echo "${SCRIPT_NAME}: the last lines of ${log}:"
    tail -n 20 "${log}" | sed 's/^/    /'
    echo "${SCRIPT_NAME}: stopping the other ${#RUNNING[@]} processes"
  } >&2
}

remove_running() {  # remove_running INDEX
  local index kept=()
  for index in "${RUNNING[@]}"; do
    if [[ "${index}" -ne "$1" ]]; then
      kept+=("${index}")
    fi
  done
  RUNNING=("${kept[@]}")
}

# Reap the processes as they end; at the first non-zero status exit with it (on_exit stops the rest).
wait_for_processes() {
  local index status
  while [[ ${#RUNNING[@]} -gt 0 ]]; do
    for index in "${RUNNING[@]}"; do
      if kill -0 "${PIDS[index]}" 2>/dev/null; then
        continue
      fi
      status=0
      wait "${PIDS[index]}" || status=$?
      remove_running "${index}"
      if [[ "${status}" -ne 0 ]]; then
        report_failure "${index}" "${status}"
        exit "${status}"
      fi
    done
    if [[ ${#RUNNING[@]} -gt 0 ]]; then
      sleep 0.2
    fi
  done
}

main() {
  parse_args "$@"
  [[ -n "${PORT}" ]] || PORT="$(free_port)"
  if [[ "${DRY_RUN}" -eq 1 ]]; then
    local index
    for ((index = 0; index < NUM_PROCESSES; index++)); do
      build_process_command "${index}"
      quote_words "${PROCESS_COMMAND[@]:1}"  # without the leading `env`
    done
    return 0
  fi
  command -v "${TRAIN_COMMAND[0]}" >/dev/null ||
    die "no command ${TRAIN_COMMAND[0]}: create .venv with 'make test', or pass --cmd"
  warn_without_workdir
  trap on_exit EXIT
  trap 'on_signal 130' INT
  trap 'on_signal 143' TERM
  trap 'on_signal 129' HUP
  start_processes
  wait_for_processes
  echo "${SCRIPT_NAME}: all ${NUM_PROCESSES} processes finished; logs in ${LOG_DIR}/" >&2
}

main "$@"
