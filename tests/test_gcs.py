"""Training on a pod's storage: gs:// workdirs and data end to end, against a local GCS emulator.

tests/gcs_emulator.py starts fake-gcs-server and points TensorStore (Orbax's arrays), gcsfs
(etils.epath) and TensorFlow's own client (TFDS records, TensorBoard) at it. The runs go
through the command line, as on a pod, in a working folder of their own: no local folder named
"gs:" may appear there.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from shufflemamba_jax import main as main_lib
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training import trainer
from shufflemamba_jax.training.tasks import classification
from shufflemamba_jax.weights import checkpoint as checkpoint_lib

from digits_runs import ROOT, SHORT, digits_config, main_command, stop_with_sigterm_after_first_metrics, without_timings
from gcs_emulator import BUCKET, GcsEmulator

pytestmark = pytest.mark.slow
BUCKET_URL = f"gs://{BUCKET}"
# 48 steps cross the digits epoch (44 steps); every step is logged, so the metrics of the two
# halves of an interrupted run can be compared with an uninterrupted run's one by one.
RUN = {
  **SHORT,
  "total_steps": 48,
  "log_every_steps": 1,
  "eval_every_steps": 48,
  "checkpoint_every_steps": 12,
  "async_checkpointing": True,
  "model.drop_path_rate": 0.1,
  "model.slws.group_size": 2,
}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, with this process's clients pointed at it for the module's tests."""
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs")).start()
  with pytest.MonkeyPatch.context() as patch:
    for name, value in emulator.environment().items():
      patch.setenv(name, value)
    yield emulator
  emulator.stop()


def copy_tree(source, target):
  """Copies a local folder into the bucket, as `gcloud storage cp --recursive` would."""
  for path in pathlib.Path(source).rglob("*"):
    if path.is_file():
      (epath.Path(target) / path.relative_to(source)).write_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def gcs_data_dir(gcs, digits_data_dir):
  """The prepared digits dataset on the bucket, as launch/tpu_vm.sh prepare-data leaves it."""
  target = f"{BUCKET_URL}/tfds"
  copy_tree(digits_data_dir, target)
  return target


def run_main(workdir, data_dir, overrides, cwd, *flags, timeout=600):
  """Runs the command line to its end; returns (exit status, output)."""
  result = subprocess.run(
    main_command(workdir, data_dir, overrides, *flags),
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=timeout,
  )
  return result.returncode, result.stdout


def final_state(workdir, step):
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    assert checkpointer.latest_step() == step
    return checkpointer.restore_parts(("step", "params", "opt_state", "ema", "nonfinite_step"))


def test_a_gs_run_stopped_by_sigterm_resumes_and_ends_like_a_local_run(gcs, gcs_data_dir, digits_data_dir, tmp_path):
  """--workdir and --config.data_dir on gs://: SIGTERM saves and exits 0, the same command resumes,
  and the final state is bit for bit that of an uninterrupted run on local disk."""
  workdir = f"{BUCKET_URL}/sigterm"
  stop_with_sigterm_after_first_metrics(main_command(workdir, gcs_data_dir, RUN), workdir, tmp_path, poll_s=0.2)
  stopped_at = len(metrics_lib.read_metrics(workdir))
  assert 1 <= stopped_at < RUN["total_steps"]

  status, output = run_main(workdir, gcs_data_dir, RUN, tmp_path)  # The same command again.
  assert status == 0, output[-4000:]
  assert f"Resumed from {workdir}/checkpoints at step {stopped_at}" in output

  local = str(tmp_path / "local")
  trainer.train_and_evaluate(digits_config(digits_data_dir, **RUN), local)
  assert without_timings(metrics_lib.read_metrics(workdir)) == without_timings(metrics_lib.read_metrics(local))
  jax.tree.map(np.testing.assert_array_equal, final_state(workdir, 48), final_state(local, 48))
  assert (epath.Path(workdir) / "tensorboard").is_dir() and list((epath.Path(workdir) / "tensorboard").iterdir())
  assert not (tmp_path / "gs:").exists()
  assert not (epath.Path(ROOT) / "gs:").exists()


def test_gs_checkpoints_load_predict_evaluate_convert_and_initialize_training(gcs, gcs_data_dir, tmp_path):
  """load_model, predict, evaluate mode, convert --out and init_from, all on gs:// paths."""
  import json

  from PIL import Image

  import shufflemamba_jax as smj

  workdir = f"{BUCKET_URL}/short"
  status, output = run_main(workdir, gcs_data_dir, SHORT, tmp_path)
  assert status == 0, output[-4000:]

  # load_model and predict, the image on the bucket too.
  pixels = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
  with epath.Path(f"{BUCKET_URL}/images/digit.png").open("wb") as file:
    Image.fromarray(pixels).save(file, format="PNG")
  model = smj.load_model(workdir)
  from shufflemamba_jax.data import device

  images, ok = next(classification.image_batches([f"{BUCKET_URL}/images/digit.png"], 16, crop_ratio=1.0))
  assert ok.all()
  expected = int(np.argmax(model(device.normalize(images))[0]))
  command = [sys.executable, "-m", "shufflemamba_jax.predict", f"--checkpoint={workdir}", "--json"]
  result = subprocess.run([*command, f"{BUCKET_URL}/images/digit.png"], cwd=tmp_path, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-4000:]
  assert json.loads(result.stdout)["top"][0]["index"] == expected

  # Evaluate mode appends its record to the run's metrics on the bucket, keeping the others.
  before = metrics_lib.read_metrics(workdir)
  status, output = run_main(workdir, gcs_data_dir, SHORT, tmp_path, "--mode=evaluate")
  assert status == 0, output[-4000:]
  after = metrics_lib.read_metrics(workdir)
  assert after[:-1] == before and after[-1]["step"] == 4 and after[-1]["num_examples"] == 360

  # Export to PyTorch names on the bucket, import back onto the bucket, and start training from
  # it: the same losses as starting from the run itself.
  convert = [sys.executable, "-m", "shufflemamba_jax.convert"]
  exported, converted = f"{BUCKET_URL}/weights/digits.safetensors", f"{BUCKET_URL}/converted"
  settings = ["--set=patch_size=4", "--set=embed_dim=48", "--set=depth=4", "--set=d_state=8", "--set=img_size=16"]
  for args in (
    ["--to-pytorch", workdir, "--out", exported],
    ["--from-pytorch", exported, "--variant=shufflemamba_tiny", *settings, "--num-classes=10", "--out", converted],
  ):
    result = subprocess.run([*convert, *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
  losses = []
  for source in (converted, workdir):
    target = f"{BUCKET_URL}/from_{source.rsplit('/', 1)[-1]}"
    status, output = run_main(target, gcs_data_dir, {**SHORT, "init_from": source}, tmp_path)
    assert status == 0, output[-4000:]
    losses.append([record["loss"] for record in metrics_lib.read_metrics(target) if "loss" in record])
  assert losses[0] == losses[1]
  assert not (tmp_path / "gs:").exists()


def test_the_command_the_tpu_launcher_prints_runs_to_its_first_checkpoint(gcs, gcs_data_dir, tmp_path):
  """`launch/tpu_vm.sh train --dry-run` prints what each worker runs; that command, run here as
  one process against the emulator (the worker's venv interpreter swapped for this one), trains
  and checkpoints on the bucket."""
  import os
  import shlex

  settings = {"TPU_NAME": "smj-v4", "TPU_ZONE": "us-central2-b", "TPU_PROJECT": "my-proj", "GCS_BUCKET": BUCKET}
  overrides = [f"--config.{name}={value}" for name, value in {**SHORT, "checkpoint_every_steps": 2}.items()]
  result = subprocess.run(
    [
      str(pathlib.Path(ROOT) / "launch" / "tpu_vm.sh"),
      "train",
      "--dry-run",
      "--config=configs/digits.py",
      "--",
      *overrides,
    ],
    env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **settings},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  (ssh,) = [shlex.split(line) for line in result.stdout.splitlines()]
  (remote,) = [shlex.split(word[len("--command=") :]) for word in ssh if word.startswith("--command=")]
  command = remote[remote.index("setsid") + 5 : remote.index(">>")]  # nohup setsid sh -c LAUNCHER sh COMMAND...
  assert command[0] == "../smj-venv/bin/python" and f"--config.data_dir={gcs_data_dir}" in command
  workdir = f"{BUCKET_URL}/runs/smj-v4"
  assert f"--workdir={workdir}" in command
  run = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    assert checkpointer.all_steps()[0] == 2


def test_a_bucket_that_refuses_writes_stops_the_run_naming_the_path_and_the_run_resumes_after(
  gcs, gcs_data_dir, tmp_path
):
  """Storage refusing writes mid-run: the run exits non-zero, soon, with an error naming the gs://
  path it could not write. Once the storage is back (restarted with its data), the same command
  resumes from the last complete checkpoint and finishes."""
  workdir = f"{BUCKET_URL}/refused"
  run = {**RUN, "checkpoint_every_steps": 4, "log_every_steps": 100}  # The next write is a checkpoint.
  first = checkpoint_lib.checkpoint_directory(workdir) / "4"
  process = subprocess.Popen(
    main_command(workdir, gcs_data_dir, run), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  try:
    deadline = time.time() + 300
    while not (first / "commit_success.txt").exists() and time.time() < deadline:
      assert process.poll() is None, process.stdout.read()[-4000:]
      time.sleep(0.2)
    gcs.refuse_writes()
    refused_at = time.time()
    output, _ = process.communicate(timeout=180)
  finally:
    process.kill()
    gcs.stop()  # A restart of the storage, with its data; it takes writes again.
    gcs.start()
  assert process.returncode != 0, output[-4000:]
  assert time.time() - refused_at < 120
  (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
  assert workdir in error, output[-4000:]
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    complete = checkpointer.latest_step()
  assert complete is not None and complete >= 4

  status, output = run_main(workdir, gcs_data_dir, run, tmp_path)
  assert status == 0, output[-4000:]
  assert f"Resumed from {workdir}/checkpoints at step {complete}" in output
  assert [record["step"] for record in metrics_lib.read_metrics(workdir) if "loss" in record][-1] == 48


@pytest.mark.parametrize("where", ["closed_port", "missing_bucket", "refused_writes"])
def test_a_workdir_that_cannot_be_reached_stops_the_run_at_once_naming_it(gcs, tmp_path, where):
  """No storage at the endpoint (a closed port: as no network), a mistyped bucket, or a bucket
  that refuses writes (as without permission): exit status 1 within the stated bound (35 s:
  STORAGE_TIMEOUT_S plus start-up, README.md), one `error:` line naming the gs:// workdir, no
  traceback. gcsfs alone would retry a closed port for ~35 s and print aiohttp's traceback."""
  environment, workdir = dict(os.environ), f"{BUCKET_URL}/unreachable"
  if where == "closed_port":
    with socket.socket() as probe:  # Bound, never listening, then closed: nothing answers there.
      probe.bind(("127.0.0.1", 0))
      environment["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{probe.getsockname()[1]}"
  elif where == "missing_bucket":
    workdir = "gs://no-such-bucket/run"
  else:
    gcs.refuse_writes()
  start = time.time()
  try:
    result = subprocess.run(
      main_command(workdir, f"{BUCKET_URL}/tfds", SHORT),
      cwd=tmp_path,
      env=environment,
      capture_output=True,
      text=True,
      timeout=300,
    )
  finally:
    gcs.accept_writes()
  elapsed = time.time() - start
  assert result.returncode == 1, result.stderr[-4000:]
  (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error.startswith(f"error: {workdir}"), result.stderr[-4000:]
  assert "Traceback" not in result.stderr
  assert elapsed < main_lib.STORAGE_TIMEOUT_S + 15, elapsed  # 15 s: start-up on a busy 2-core machine.
  assert not (tmp_path / "gs:").exists()
