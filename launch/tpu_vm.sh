#!/usr/bin/env bash
# Cloud TPU VM launcher for shufflemamba-jax: creates a TPU (on-demand, spot or queued), installs
# the package on every worker, prepares ImageNet into a GCS bucket, starts the same training
# command on all workers, shows logs, stops and deletes. `launch/tpu_vm.sh --help` for usage.
# Remote scripts are built in single quotes on purpose: their $(...) expands on the worker.
# shellcheck disable=SC2016
set -euo pipefail

PROG=${0##*/}
# On each TPU worker (or CPU VM), relative to the remote home directory.
REMOTE_REPO=shufflemamba-jax
REMOTE_VENV=smj-venv

usage() {
  cat <<EOF
Usage: $PROG COMMAND [options] [-- extra arguments]

Commands:
  create        Create the TPU VM: on-demand (default), --spot, or --queued (a queued resource;
                add --spot for a spot queued resource). Arguments after -- go to gcloud.
  status        Describe the TPU VM (or its queued resource with --queued).
  setup         On every worker (--worker=all): install Python (if missing), a venv
                ~/$REMOTE_VENV, the repository ~/$REMOTE_REPO from --source (git URL, with --ref)
                or --tarball (a local .tar.gz of the repository root, e.g.
                'git archive --format=tar.gz --output=smj.tar.gz HEAD'), its requirements and
                jax[tpu]. With --cpu-vm=VM, installs on that GCE VM instead (no jax[tpu]).
  prepare-data  On worker 0 (or --cpu-vm=VM): build TFDS imagenet2012 from the manual tars in
                --manual-dir (a path on that machine, or gs://... to copy them down first) into
                --local-data-dir, then copy it to --data-dir on GCS. Runs detached; see 'logs --job=prepare'.
  train         On every worker (--worker=all): start training detached, output appended to
                ~/smj-train.log, with --config, --workdir (gs://) and --data-dir; arguments after
                -- are passed to shufflemamba_jax.main (e.g. --config.batch_size=1024
                --config.mesh.fsdp=-1). Rerunning train with the same --workdir resumes from
                its latest checkpoint (the way to continue after a spot/queued preemption).
  logs          Follow ~/smj-train.log (or ~/smj-prepare.log with --job=prepare) on --worker (0).
  stop          Send SIGTERM to the training process on every worker: it saves a checkpoint and exits.
  delete        Delete the TPU VM (with --queued: the queued resource and its TPU, --force).
                Arguments after -- go to gcloud (e.g. -- --quiet).

Settings (flag, or environment variable; flags win):
  --name=NAME                 TPU_NAME              TPU VM name (all commands without --cpu-vm)
  --zone=ZONE                 TPU_ZONE              zone, e.g. us-central2-b (all commands)
  --project=PROJECT           TPU_PROJECT           Google Cloud project (all commands)
  --accelerator-type=TYPE     TPU_ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16 (create)
  --runtime-version=VERSION   TPU_RUNTIME_VERSION   e.g. tpu-ubuntu2204-base (create)
  --spot                      TPU_SPOT=1            spot capacity (create)
  --queued                    TPU_QUEUED=1          use a queued resource (create, status, delete)
  --queued-resource=ID        TPU_QUEUED_RESOURCE   queued resource id (default: NAME-qr)
  --internal-ip               TPU_INTERNAL_IP=1     ssh/scp over internal IPs
  --cpu-vm=VM                 SMJ_CPU_VM            GCE VM for setup/prepare-data/logs instead of the TPU
  --source=GIT_URL            SMJ_SOURCE            repository to clone (setup)
  --ref=REF                   SMJ_REF               git branch, tag or commit (setup; default main)
  --tarball=FILE              SMJ_TARBALL           local repository tarball, instead of --source (setup)
  --python=PYTHON             SMJ_PYTHON            remote interpreter >= 3.11 (setup; default python3.11,
                                                    installed with apt-get when missing)
  --bucket=BUCKET             GCS_BUCKET            gs://BUCKET; defaults data/work dirs below
  --data-dir=GS_PATH          DATA_DIR              TFDS data_dir on GCS (default gs://BUCKET/tfds)
  --workdir=GS_PATH           WORKDIR               training workdir on GCS (default gs://BUCKET/runs/NAME)
  --config=CONFIG             CONFIG                (default configs/imagenet.py:shufflemamba_base)
  --env=KEY=VALUE             (repeatable)          environment variable for the training process
  --manual-dir=PATH           IMAGENET_MANUAL_DIR   folder (or gs:// prefix) holding the ImageNet tars (prepare-data)
  --local-data-dir=PATH       LOCAL_DATA_DIR        scratch TFDS dir on the preparing machine (default tensorflow_datasets)
  --copy-tool=gcloud|gsutil   COPY_TOOL             'gcloud storage cp --recursive' (default) or 'gsutil -m cp -r'
  --worker=N                                        worker for logs (default 0)
  --job=train|prepare                               log to show (default train)
  --no-follow                                       logs: print the last lines and return
  --dry-run                   DRY_RUN=1             print the gcloud commands (one per line,
                                                    shell-quoted) instead of running them
                                                    (recognized after -- too)
  -h, --help

Example:
  export TPU_NAME=smj-v4 TPU_ZONE=us-central2-b TPU_PROJECT=my-project GCS_BUCKET=my-bucket
  $PROG create --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot
  $PROG setup --source=https://github.com/OWNER/shufflemamba-jax.git
  $PROG prepare-data --cpu-vm=smj-prep --manual-dir=gs://my-bucket/imagenet-tars
  $PROG train -- --config.mesh.fsdp=-1
EOF
}

die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}

# shellcheck source=SCRIPTDIR/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

# Runs a command, or prints it shell-quoted on one line with --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# Dies naming the flag and environment variable of an empty setting.
require() {
  local variable=$1 flag=$2 what=$3
  [[ -n ${!variable} ]] || die "$COMMAND: missing setting $what: pass $flag or set $variable."
}

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
TPU_RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
TPU_SPOT=${TPU_SPOT:-0}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_QUEUED_RESOURCE=${TPU_QUEUED_RESOURCE:-}
TPU_INTERNAL_IP=${TPU_INTERNAL_IP:-0}
SMJ_CPU_VM=${SMJ_CPU_VM:-}
SMJ_SOURCE=${SMJ_SOURCE:-}
SMJ_REF=${SMJ_REF:-main}
SMJ_TARBALL=${SMJ_TARBALL:-}
SMJ_PYTHON=${SMJ_PYTHON:-python3.11}
GCS_BUCKET=${GCS_BUCKET:-}
DATA_DIR=${DATA_DIR:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/imagenet.py:shufflemamba_base}
IMAGENET_MANUAL_DIR=${IMAGENET_MANUAL_DIR:-}
LOCAL_DATA_DIR=${LOCAL_DATA_DIR:-tensorflow_datasets}
COPY_TOOL=${COPY_TOOL:-gcloud}
DRY_RUN=${DRY_RUN:-0}
LOG_WORKER=0
LOG_JOB=train
FOLLOW=1
TRAIN_ENV=()
EXTRA=()
COMMAND=''

set_option() {
  local name=$1 value=$2
  case $name in
    --name) TPU_NAME=$value ;;
    --zone) TPU_ZONE=$value ;;
    --project) TPU_PROJECT=$value ;;
    --accelerator-type) TPU_ACCELERATOR_TYPE=$value ;;
    --runtime-version) TPU_RUNTIME_VERSION=$value ;;
    --queued-resource) TPU_QUEUED_RESOURCE=$value ;;
    --cpu-vm) SMJ_CPU_VM=$value ;;
    --source) SMJ_SOURCE=$value ;;
    --ref) SMJ_REF=$value ;;
    --tarball) SMJ_TARBALL=$value ;;
    --python) SMJ_PYTHON=$value ;;
    --bucket) GCS_BUCKET=$value ;;
    --data-dir) DATA_DIR=$value ;;
    --workdir) WORKDIR=$value ;;
    --config) CONFIG=$value ;;
    --env)
      [[ $value == [A-Za-z_]*=* ]] || die "--env expects KEY=VALUE, got '$value'."
      TRAIN_ENV+=("$value") ;;
    --manual-dir) IMAGENET_MANUAL_DIR=$value ;;
    --local-data-dir) LOCAL_DATA_DIR=$value ;;
    --copy-tool) COPY_TOOL=$value ;;
    --worker) LOG_WORKER=$value ;;
    --job) LOG_JOB=$value ;;
    *) die "unknown option '$name' (see --help)." ;;
  esac
}

while (($#)); do
  case $1 in
    --)
      shift
      # A --dry-run after -- still means one: printing by mistake beats running by mistake.
      for word in "$@"; do
        if [[ $word == --dry-run ]]; then DRY_RUN=1; else EXTRA+=("$word"); fi
      done
      break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) TPU_SPOT=1 ;;
    --queued) TPU_QUEUED=1 ;;
    --internal-ip) TPU_INTERNAL_IP=1 ;;
    --no-follow) FOLLOW=0 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*)
      (($# >= 2)) || die "option '$1' needs a value."
      set_option "$1" "$2"
      shift ;;
    -*) die "unknown option '$1' (see --help)." ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time, got '$COMMAND' and '$1'."
      COMMAND=$1 ;;
  esac
  shift
done

[[ -n $COMMAND ]] || { usage >&2; die "missing COMMAND (create, status, setup, prepare-data, train, logs, stop, delete)."; }

# A bucket is accepted as 'name' or 'gs://name'.
if [[ -n $GCS_BUCKET ]]; then
  GCS_BUCKET=gs://${GCS_BUCKET#gs://}
  GCS_BUCKET=${GCS_BUCKET%/}
fi
TPU_QUEUED_RESOURCE=${TPU_QUEUED_RESOURCE:-${TPU_NAME:+$TPU_NAME-qr}}

# Commands that take no extra arguments refuse them rather than drop them silently.
no_extra() {
  ((${#EXTRA[@]} == 0)) || die "$COMMAND takes no arguments after --, got: $(quote_all "${EXTRA[@]}")"
}

location_flags() {
  require TPU_ZONE --zone=ZONE zone
  require TPU_PROJECT --project=PROJECT project
  LOCATION=("--zone=$TPU_ZONE" "--project=$TPU_PROJECT")
}

tpu_flags() {
  require TPU_NAME --name=NAME 'TPU name'
  location_flags
}

ssh_options() {
  SSH_OPTIONS=()
  if [[ $TPU_INTERNAL_IP == 1 ]]; then SSH_OPTIONS+=(--internal-ip); fi
}

# Runs a remote command on TPU worker(s) $1 ('all' or an index) or, with --cpu-vm, on that VM.
remote() {
  local worker=$1 command=$2
  ssh_options
  if [[ -n $SMJ_CPU_VM ]]; then
    run gcloud compute ssh "$SMJ_CPU_VM" "${LOCATION[@]}" "${SSH_OPTIONS[@]}" "--command=$command"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" "--worker=$worker" \
      "${SSH_OPTIONS[@]}" "--command=$command"
  fi
}

remote_flags() {
  if [[ -n $SMJ_CPU_VM ]]; then location_flags; else tpu_flags; fi
}

data_dir_setting() {
  if [[ -z $DATA_DIR && -n $GCS_BUCKET ]]; then DATA_DIR=$GCS_BUCKET/tfds; fi
  [[ -n $DATA_DIR ]] || die "$COMMAND: missing setting data dir: pass --data-dir=gs://... or --bucket=BUCKET (or set DATA_DIR or GCS_BUCKET)."
  [[ $DATA_DIR == gs://* ]] || die "$COMMAND: --data-dir (DATA_DIR) must be on GCS (gs://...) so that every worker reads it, got '$DATA_DIR'."
}

# Remote test, true while the process in ~/smj-train.pid is still our trainer (sets $pid); the
# command line check keeps a reused pid of an unrelated process from counting.
TRAINING_RUNNING='pid=$(cat smj-train.pid 2>/dev/null) && tr "\0" " " 2>/dev/null < "/proc/$pid/cmdline" | grep -q shufflemamba_jax.main'

cmd_create() {
  tpu_flags
  require TPU_ACCELERATOR_TYPE --accelerator-type=TYPE 'accelerator type (e.g. v4-32)'
  require TPU_RUNTIME_VERSION --runtime-version=VERSION 'runtime version (e.g. tpu-ubuntu2204-base)'
  local spot=()
  if [[ $TPU_SPOT == 1 ]]; then spot=(--spot); fi
  if [[ $TPU_QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_QUEUED_RESOURCE" "--node-id=$TPU_NAME" \
      "${LOCATION[@]}" "--accelerator-type=$TPU_ACCELERATOR_TYPE" \
      "--runtime-version=$TPU_RUNTIME_VERSION" "${spot[@]}" "${EXTRA[@]}"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      "--accelerator-type=$TPU_ACCELERATOR_TYPE" "--version=$TPU_RUNTIME_VERSION" \
      "${spot[@]}" "${EXTRA[@]}"
  fi
}

cmd_status() {
  tpu_flags
  if [[ $TPU_QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_QUEUED_RESOURCE" "${LOCATION[@]}" "${EXTRA[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" "${EXTRA[@]}"
  fi
}

cmd_delete() {
  tpu_flags
  if [[ $TPU_QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_QUEUED_RESOURCE" "${LOCATION[@]}" --force "${EXTRA[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" "${EXTRA[@]}"
  fi
}

cmd_setup() {
  no_extra
  remote_flags
  if [[ -n $SMJ_SOURCE && -n $SMJ_TARBALL ]]; then
    die "setup: give either --source (SMJ_SOURCE) or --tarball (SMJ_TARBALL), not both."
  fi
  [[ -n $SMJ_SOURCE || -n $SMJ_TARBALL ]] \
    || die "setup: missing setting package source: pass --source=GIT_URL or --tarball=FILE (or set SMJ_SOURCE or SMJ_TARBALL)."
  [[ $SMJ_PYTHON =~ ^[A-Za-z0-9_./-]+$ ]] || die "setup: --python (SMJ_PYTHON) must be a plain command or path, got '$SMJ_PYTHON'."
  ssh_options
  local get_source
  if [[ -n $SMJ_TARBALL ]]; then
    [[ -f $SMJ_TARBALL ]] || die "setup: --tarball (SMJ_TARBALL) '$SMJ_TARBALL' is not a file."
    if [[ -n $SMJ_CPU_VM ]]; then
      run gcloud compute scp "${LOCATION[@]}" "${SSH_OPTIONS[@]}" "$SMJ_TARBALL" "$SMJ_CPU_VM:$REMOTE_REPO.tar.gz"
    else
      run gcloud compute tpus tpu-vm scp "$SMJ_TARBALL" "$TPU_NAME:$REMOTE_REPO.tar.gz" "${LOCATION[@]}" \
        --worker=all "${SSH_OPTIONS[@]}"
    fi
    get_source="rm -rf $REMOTE_REPO && mkdir $REMOTE_REPO && tar -xf $REMOTE_REPO.tar.gz -C $REMOTE_REPO"
  else
    get_source="rm -rf $REMOTE_REPO && git clone --quiet $(quote "$SMJ_SOURCE") $REMOTE_REPO"
    get_source+=" && git -C $REMOTE_REPO checkout --quiet $(quote "$SMJ_REF")"
  fi
  # The TPU images ship an older Python; jax 0.10 needs >= 3.11.
  local apt_python=${SMJ_PYTHON##*/}
  local install_python="if ! $SMJ_PYTHON -c 'import ensurepip, venv' >/dev/null 2>&1; then sudo apt-get update -q"
  install_python+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $apt_python $apt_python-venv; fi"
  # requirements.txt pins jax; the 'jax[tpu]' extra adds the matching libtpu.
  local packages="-r requirements.txt"
  if [[ -z $SMJ_CPU_VM ]]; then packages+=" 'jax[tpu]'"; fi
  local script="set -e; $install_python; $get_source"
  script+=" && $SMJ_PYTHON -m venv $REMOTE_VENV && $REMOTE_VENV/bin/python -m pip install --upgrade pip"
  script+=" && cd $REMOTE_REPO && ../$REMOTE_VENV/bin/python -m pip install $packages"
  script+=" && echo \"\$(hostname): shufflemamba-jax installed in ~/$REMOTE_VENV\""
  remote all "$script"
}

cmd_prepare_data() {
  no_extra
  remote_flags
  data_dir_setting
  require IMAGENET_MANUAL_DIR --manual-dir=PATH 'ImageNet tar folder (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)'
  local copy
  case $COPY_TOOL in
    gcloud) copy=(gcloud storage cp --recursive) ;;
    gsutil) copy=(gsutil -m cp -r) ;;
    *) die "prepare-data: --copy-tool (COPY_TOOL) must be gcloud or gsutil, got '$COPY_TOOL'." ;;
  esac
  local manual_dir=$IMAGENET_MANUAL_DIR steps=()
  if [[ $manual_dir == gs://* ]]; then
    # TFDS reads the tars from local disk: copy them next to the scratch TFDS dir first.
    manual_dir=imagenet_manual
    steps+=("mkdir -p $manual_dir")
    steps+=("$(quote_all "${copy[@]}" "${IMAGENET_MANUAL_DIR%/}/ILSVRC2012_img_train.tar" \
      "${IMAGENET_MANUAL_DIR%/}/ILSVRC2012_img_val.tar" "$manual_dir/")")
  fi
  steps+=("$(quote_all "$REMOTE_VENV/bin/python" -m shufflemamba_jax.prepare --dataset=imagenet2012 \
    "--manual_dir=$manual_dir" "--data_dir=$LOCAL_DATA_DIR")")
  steps+=("$(quote_all "${copy[@]}" "${LOCAL_DATA_DIR%/}/imagenet2012" "${DATA_DIR%/}/")")
  steps+=("echo \"prepare-data done: ${DATA_DIR%/}/imagenet2012\"")
  local job='' step
  for step in "${steps[@]}"; do job+="${job:+ && }$step"; done
  # Detached (hours of work): a dropped ssh connection must not stop it.
  remote 0 "nohup setsid sh -c $(quote "$job") >> smj-prepare.log 2>&1 < /dev/null & echo \"\$(hostname): prepare-data started, log ~/smj-prepare.log\""
}

cmd_train() {
  [[ -z $SMJ_CPU_VM ]] || die "train: --cpu-vm (SMJ_CPU_VM) is for setup/prepare-data; training runs on the TPU."
  tpu_flags
  data_dir_setting
  if [[ -z $WORKDIR && -n $GCS_BUCKET ]]; then WORKDIR=$GCS_BUCKET/runs/$TPU_NAME; fi
  [[ -n $WORKDIR ]] || die "train: missing setting workdir: pass --workdir=gs://... or --bucket=BUCKET (or set WORKDIR or GCS_BUCKET)."
  [[ $WORKDIR == gs://* ]] || die "train: --workdir (WORKDIR) must be on GCS (gs://...): all workers write checkpoints there and a resumed run reads them, got '$WORKDIR'."
  local train=("../$REMOTE_VENV/bin/python" -m shufflemamba_jax.main "--config=$CONFIG" \
    "--workdir=$WORKDIR" "--config.data_dir=$DATA_DIR" "${EXTRA[@]}")
  if ((${#TRAIN_ENV[@]})); then train=(env "${TRAIN_ENV[@]}" "${train[@]}"); fi
  # The pid is the python process itself (exec), so SIGTERM from `stop` or a preemption reaches
  # the trainer, which saves a checkpoint and exits.
  local launcher="cd $REMOTE_REPO && echo \$\$ > \"\$HOME/smj-train.pid\" && exec \"\$@\""
  local script="if $TRAINING_RUNNING; then"
  script+=' echo "$(hostname): training is already running (pid $pid); run stop first." >&2; exit 1; fi;'
  script+=" nohup setsid sh -c $(quote "$launcher") sh $(quote_all "${train[@]}")"
  script+=' >> smj-train.log 2>&1 < /dev/null & echo "$(hostname): training started, log ~/smj-train.log"'
  remote all "$script"
}

cmd_logs() {
  no_extra
  remote_flags
  [[ $LOG_JOB == train || $LOG_JOB == prepare ]] || die "logs: --job must be train or prepare, got '$LOG_JOB'."
  [[ $LOG_WORKER =~ ^[0-9]+$ ]] || die "logs: --worker must be a worker index (0, 1, ...), got '$LOG_WORKER'."
  local follow=''
  if [[ $FOLLOW == 1 ]]; then follow=' -F'; fi
  remote "$LOG_WORKER" "tail -n 100$follow smj-$LOG_JOB.log"
}

cmd_stop() {
  no_extra
  [[ -z $SMJ_CPU_VM ]] || die "stop: --cpu-vm (SMJ_CPU_VM) is not used by stop; training runs on the TPU."
  tpu_flags
  local script="if $TRAINING_RUNNING;"
  script+=' then kill -TERM "$pid" && echo "$(hostname): sent SIGTERM (training saves and exits)";'
  script+=' else echo "$(hostname): no training running"; fi'
  remote all "$script"
}

case $COMMAND in
  create) cmd_create ;;
  status) cmd_status ;;
  setup) cmd_setup ;;
  prepare-data) cmd_prepare_data ;;
  train) cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  *) die "unknown command '$COMMAND' (create, status, setup, prepare-data, train, logs, stop, delete)." ;;
esac
