# shellcheck shell=bash
# Shell-quoting for the printed (--dry-run) and remote commands of the launch scripts, sourced
# by tpu_vm.sh and gpu_multinode.sh. (gpu_slurm.sbatch keeps its own copy: Slurm runs a copy of
# the batch script from its spool directory, where this file is not beside it.)

# Quotes one word: plain words stay as they are, anything else goes in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces.
quote_all() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
