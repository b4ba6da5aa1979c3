#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: creates the TPU VM (or reuses it), copies this repository to
# every worker and installs it, then runs `jackpot-train --distributed` on all workers at once.
# See launch/README.md.
set -euo pipefail

readonly SCRIPT_NAME="tpu_pod.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --config PATH --workdir DIR [options]
                         [-- JACKPOT_TRAIN_ARGS...]

1. creates the TPU VM NAME with gcloud (unless it exists: then it is reused),
2. copies this repository to every worker (or clones --repo there) and installs it with
   pip install -e '.[tpu]',
3. runs on every worker (--worker=all):
     jackpot-train --distributed --config PATH --workdir DIR JACKPOT_TRAIN_ARGS
   jax.distributed.initialize() finds the other workers of the slice by itself.

Required:
  --name NAME               the TPU VM (pod slice) name
  --zone ZONE               its zone, e.g. us-east5-a
  --config PATH             the config file, relative to the repository root
                            (e.g. configs/qwen3_1p7b_to_8b_deepscaler.py)
  --workdir DIR             where checkpoints and metrics go: a path that every worker mounts
                            (a shared filesystem, or a bucket mounted with gcsfuse at the same
                            path everywhere); gs:// URLs are refused (the trainer writes its work
                            dir with local file calls), and a worker-local disk gives each worker
                            its own, inconsistent copy
  --accelerator-type TYPE   e.g. v5p-64, v5litepod-16, v6e-16, v4-32 (only needed to create)

Options:
  --runtime-version V       the TPU software version (default from the accelerator type:
                            v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5 for v5p,
                            v2-alpha-tpuv5-lite for v5e (v5litepod), tpu-ubuntu2204-base for v4)
  --project PROJECT         the Google Cloud project (default: gcloud's configured one)
  --create                  create the TPU VM if it does not exist (the default)
  --no-create               only reuse an existing TPU VM; fail if there is none
  --repo URL                git clone URL on each worker instead of copying this checkout
  --ref REF                 the branch or tag to clone with --repo (default: its default branch)
  --remote-dir DIR          the code's directory on each worker, relative to the home directory
                            (default: jackpot-jax; replaced on every run)
  --skip-setup              neither copy nor install: rerun the code already on the workers
  --dry-run                 print every command (gcloud and local) exactly, and run none
  -h, --help                show this help

Everything after '--' goes to jackpot-train on every worker (e.g. --resume, --config.KEY=VALUE).

Example:
  launch/tpu_pod.sh --name jackpot-v5p --zone us-east5-a --accelerator-type v5p-64 \\
      --config configs/qwen3_1p7b_to_8b_deepscaler.py --workdir /mnt/shared/runs/qwen3-8b \\
      -- --config.mesh.fsdp=32
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "${REPO_ROOT}/launch/lib.sh"

# Print a command as a pasteable line (--dry-run), or print it on stderr and run it.
run() {
  if [[ "${DRY_RUN}" -eq 1 ]]; then
    quote_words "$@"
  else
    echo "+ $(quote_words "$@")" >&2
    "$@"
  fi
}


default_runtime_version() {  # default_runtime_version ACCELERATOR_TYPE
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) echo "" ;;
  esac
}

parse_args() {
  NAME="" ZONE="" ACCELERATOR_TYPE="" RUNTIME_VERSION="" PROJECT="" CONFIG="" WORKDIR=""
  CREATE=1 REPO_URL="" REF="" REMOTE_DIR="jackpot-jax" SKIP_SETUP=0 DRY_RUN=0
  TRAIN_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --name) require_value "$1" $#; NAME="$2"; shift 2 ;;
      --zone) require_value "$1" $#; ZONE="$2"; shift 2 ;;
      --accelerator-type) require_value "$1" $#; ACCELERATOR_TYPE="$2"; shift 2 ;;
      --runtime-version) require_value "$1" $#; RUNTIME_VERSION="$2"; shift 2 ;;
      --project) require_value "$1" $#; PROJECT="$2"; shift 2 ;;
      --config) require_value "$1" $#; CONFIG="$2"; shift 2 ;;
      --workdir) require_value "$1" $#; WORKDIR="$2"; shift 2 ;;
      --create) CREATE=1; shift ;;
      --no-create) CREATE=0; shift ;;
      --repo) require_value "$1" $#; REPO_URL="$2"; shift 2 ;;
      --ref) require_value "$1" $#; REF="$2"; shift 2 ;;
      --remote-dir) require_value "$1" $#; REMOTE_DIR="$2"; shift 2 ;;
      --skip-setup) SKIP_SETUP=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; TRAIN_ARGS=("$@"); break ;;
      *) die "unknown option '$1' (jackpot-train's own arguments go after '--')" ;;
    esac
  done
  validate_args
}

validate_args() {
  [[ -n "${NAME}" ]] || die "--name is required: the TPU VM to create or reuse"
  [[ -n "${ZONE}" ]] || die "--zone is required: the TPU VM's zone, e.g. us-east5-a"
  [[ -n "${CONFIG}" ]] || die "--config is required: a config file relative to the repository root"
  [[ -n "${WORKDIR}" ]] || die "--workdir is required: a path on a filesystem every worker mounts"
  [[ -z "${REF}" || -n "${REPO_URL}" ]] || die "--ref needs --repo"
  [[ "${REMOTE_DIR}" =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && "${REMOTE_DIR}" != *..* ]] ||
    die "--remote-dir must be a plain path relative to the home directory, got '${REMOTE_DIR}'"
  if [[ "${CREATE}" -eq 1 ]]; then
    [[ -n "${ACCELERATOR_TYPE}" ]] ||
      die "--accelerator-type is required to create the TPU VM (e.g. v5p-64); pass --no-create to reuse an existing one"
    [[ -n "${RUNTIME_VERSION}" ]] || RUNTIME_VERSION="$(default_runtime_version "${ACCELERATOR_TYPE}")"
    [[ -n "${RUNTIME_VERSION}" ]] ||
      die "--runtime-version is required: there is no default for accelerator type '${ACCELERATOR_TYPE}'"
  fi
  if [[ -z "${REPO_URL}" && "${SKIP_SETUP}" -eq 0 && ! -f "${REPO_ROOT}/${CONFIG}" ]]; then
    die "--config: no file ${CONFIG} in ${REPO_ROOT} (the path is relative to the repository root)"
  fi
  if [[ "${WORKDIR}" == *://* ]]; then
    die "--workdir ${WORKDIR}: URLs are not supported yet: the trainer writes it with local file calls: mount the bucket on every worker (e.g. gcsfuse) or use a shared filesystem, and pass that path"
  fi
}

# The flags every gcloud compute tpus tpu-vm command takes after the TPU name.
location_flags() {
  LOCATION=(--zone "${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    LOCATION+=(--project "${PROJECT}")
  fi
}

tpu_exists() {
  gcloud compute tpus tpu-vm describe "${NAME}" "${LOCATION[@]}" --format="value(state)" >/dev/null 2>&1
}

ensure_tpu() {
  local describe=(gcloud compute tpus tpu-vm describe "${NAME}" "${LOCATION[@]}" --format="value(state)")
  local create=(gcloud compute tpus tpu-vm create "${NAME}" "${LOCATION[@]}"
    --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}")
  if [[ "${DRY_RUN}" -eq 1 ]]; then
    quote_words "${describe[@]}"
    if [[ "${CREATE}" -eq 1 ]]; then
      echo "# only if the TPU VM does not exist:"
      quote_words "${create[@]}"
    fi
    return 0
  fi
  if tpu_exists; then
    echo "${SCRIPT_NAME}: reusing the TPU VM ${NAME} in ${ZONE}" >&2
  elif [[ "${CREATE}" -eq 1 ]]; then
    run "${create[@]}"
  else
    die "the TPU VM ${NAME} does not exist in ${ZONE} (--no-create): create it, or drop --no-create"
  fi
}

ssh_all() {  # ssh_all REMOTE_COMMAND: run it on every worker
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${LOCATION[@]}" --worker=all --command "$1"
}

# Copy this checkout (without .git, .venv, runs and caches) to every worker, or clone --repo there.
copy_code() {
  local dir
  dir="$(shell_quote "${REMOTE_DIR}")"
  if [[ -n "${REPO_URL}" ]]; then
    local clone=(git clone --depth 1)
    if [[ -n "${REF}" ]]; then
      clone+=(--branch "${REF}")
    fi
    clone+=("${REPO_URL}" "${REMOTE_DIR}")
    ssh_all "rm -rf ${dir} && $(quote_words "${clone[@]}")"
    return 0
  fi
  local archive="${TMPDIR:-/tmp}/jackpot-jax-${NAME}.tar.gz"
  run tar -czf "${archive}" -C "${REPO_ROOT}" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:jackpot-jax.tar.gz" "${LOCATION[@]}" --worker=all
  ssh_all "rm -rf ${dir} && mkdir -p ${dir} && tar -xzf jackpot-jax.tar.gz -C ${dir}"
}

install_code() {
  local pip="python3 -m pip install"
  ssh_all "cd $(shell_quote "${REMOTE_DIR}") && ${pip} --upgrade pip && ${pip} -e \".[tpu]\""
}

# pip installs into ~/.local on a TPU VM, whose bin/ a non-login ssh shell lacks on its PATH.
train_command() {
  echo "cd $(shell_quote "${REMOTE_DIR}") && PATH=\"\$HOME/.local/bin:\$PATH\" $(quote_words \
    jackpot-train --distributed --config "${CONFIG}" --workdir "${WORKDIR}" "${TRAIN_ARGS[@]}")"
}

main() {
  parse_args "$@"
  location_flags
  ensure_tpu
  if [[ "${SKIP_SETUP}" -eq 0 ]]; then
    copy_code
    install_code
  fi
  ssh_all "$(train_command)"
}

main "$@"
