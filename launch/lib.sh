# shellcheck shell=bash
# Helpers that launch/local.sh and launch/tpu_pod.sh source (each sets SCRIPT_NAME first).
# gpu_slurm.sbatch keeps its own copies: sbatch runs a spooled copy of the script, away from this file.

die() {
  echo "${SCRIPT_NAME}: $*" >&2
  echo "Run 'launch/${SCRIPT_NAME} --help' for the usage." >&2
  exit 2
}

# Quote one word for a POSIX shell: as is when it holds only safe characters, else in single quotes.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_words() {  # the words, quoted, on one line that can be pasted back into a shell
  local words=() word
  for word in "$@"; do
    words+=("$(shell_quote "${word}")")
  done
  echo "${words[*]}"
}

require_value() {  # require_value FLAG ARGC: the flag must be followed by a value
  [[ "$2" -ge 2 ]] || die "$1 needs a value"
}
