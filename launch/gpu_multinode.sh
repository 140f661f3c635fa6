#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every node (one process per node,
# driving all of its GPUs) with the same COORDINATOR_ADDRESS and NUM_NODES and its own NODE_RANK.
#
#   COORDINATOR_ADDRESS=10.0.0.1:12355 NUM_NODES=2 NODE_RANK=0 WORKDIR=/shared/runs/smj \
#       launch/gpu_multinode.sh -- --config.batch_size=2048 --config.mesh.fsdp=-1
#   (and NODE_RANK=1 on the second node; add --dry-run to print the commands only)
#
# Environment: COORDINATOR_ADDRESS (HOST:PORT that node 0 listens on and every node reaches),
# NUM_NODES, NODE_RANK (0 .. NUM_NODES-1), WORKDIR (shared by all nodes: a network filesystem
# or gs://), all required; GPUS_PER_NODE (optional: use only the first N GPUs of each node),
# CONFIG (default configs/imagenet.py:shufflemamba_base), DATA_DIR (TFDS data_dir, optional),
# PYTHON (default python3), REPO_DIR (default the repository holding this script), DRY_RUN=1.
# They become JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (and
# JAX_LOCAL_DEVICE_IDS), read by jax.distributed.initialize() in the training program.
# Arguments other than --dry-run and --help go to shufflemamba_jax.main.
#
# The training process replaces this script (exec), so a SIGTERM sent to it reaches the trainer,
# which saves a checkpoint and exits 0; running the script again with the same WORKDIR resumes.
set -euo pipefail

die() {
  printf 'gpu_multinode.sh: %s\n' "$*" >&2
  exit 2
}

# shellcheck source=SCRIPTDIR/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

DRY_RUN=${DRY_RUN:-0}
OVERRIDES=()
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) OVERRIDES+=("$1") ;;
  esac
  shift
done

COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS:-}
NUM_NODES=${NUM_NODES:-}
NODE_RANK=${NODE_RANK:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/imagenet.py:shufflemamba_base}
DATA_DIR=${DATA_DIR:-}
PYTHON=${PYTHON:-python3}
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

[[ -n $COORDINATOR_ADDRESS ]] || die "missing setting COORDINATOR_ADDRESS: HOST:PORT of node 0, the same on every node."
[[ $COORDINATOR_ADDRESS =~ ^[^[:space:]]+:[0-9]+$ ]] \
  || die "COORDINATOR_ADDRESS must be HOST:PORT (e.g. 10.0.0.1:12355), got '$COORDINATOR_ADDRESS'."
[[ -n $NUM_NODES ]] || die "missing setting NUM_NODES: the number of nodes (processes), the same on every node."
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be an integer >= 1, got '$NUM_NODES'."
[[ -n $NODE_RANK ]] || die "missing setting NODE_RANK: this node's index, 0 .. NUM_NODES-1 (0 on the coordinator)."
if ! [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] || ((NODE_RANK >= NUM_NODES)); then
  die "NODE_RANK must be an integer in [0, NUM_NODES=$NUM_NODES), got '$NODE_RANK'."
fi
if [[ -n $GPUS_PER_NODE ]]; then
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be an integer >= 1, got '$GPUS_PER_NODE'."
fi
[[ -n $WORKDIR ]] || die "missing setting WORKDIR: the training workdir shared by all nodes (e.g. WORKDIR=/shared/runs/smj)."
cd "$REPO_DIR" || die "REPO_DIR '$REPO_DIR' is not a directory."
[[ -f ${CONFIG%%:*} ]] || die "CONFIG file '${CONFIG%%:*}' not found under REPO_DIR '$REPO_DIR'."

export JAX_COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS
export JAX_NUM_PROCESSES=$NUM_NODES
export JAX_PROCESS_ID=$NODE_RANK
exported=(JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID)
if [[ -n $GPUS_PER_NODE ]]; then
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  export JAX_LOCAL_DEVICE_IDS
  exported+=(JAX_LOCAL_DEVICE_IDS)
fi

command=("$PYTHON" -m shufflemamba_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
if [[ -n $DATA_DIR ]]; then command+=("--config.data_dir=$DATA_DIR"); fi
command+=("${OVERRIDES[@]}")

if [[ $DRY_RUN == 1 ]]; then
  printf 'cd %s\n' "$(quote "$PWD")"
  for name in "${exported[@]}"; do
    printf 'export %s=%s\n' "$name" "$(quote "${!name}")"
  done
  printf '%s\n' "$(quote_all "${command[@]}")"
  exit 0
fi
exec "${command[@]}"
