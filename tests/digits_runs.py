"""Short training runs of the digits config, in-process or through the command line, shared by
the training and storage tests."""

import os
import sys

from shufflemamba_jax.training import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "configs", "digits.py")
# Short-run overrides: 2 steps between logs and checkpoints, evaluation at step 4. The digits
# config's sequential scan is also the fastest to compile, which is most of a 4-step run.
SHORT = {
  "batch_size": 32,
  "total_steps": 4,
  "log_every_steps": 2,
  "eval_every_steps": 4,
  "checkpoint_every_steps": 2,
  "eval_batch_size": 120,
  "async_checkpointing": False,
  "mesh.data": 1,
}


def digits_config(data_dir, **overrides):
  """The digits config with SHORT and `overrides` (dotted names) applied."""
  return config_with(DIGITS_CONFIG, data_dir, {**SHORT, **overrides})


def config_with(path, data_dir, overrides):
  """The config file at `path` reading `data_dir`, with `overrides` (dotted names) applied."""
  config = config_files.get_config(path)
  config.data_dir = data_dir
  return config_files.override(config, overrides)


def main_command(workdir, data_dir, overrides, *flags, config=DIGITS_CONFIG):
  """The command line of a run of `config` (the digits one by default) with `--config.name=value`
  overrides."""
  command = [sys.executable, "-m", "shufflemamba_jax.main", f"--config={config}", f"--workdir={workdir}"]
  command += [f"--config.data_dir={data_dir}", *flags]
  return command + [f"--config.{name}={value}" for name, value in overrides.items()]


def run_two_processes(workdir, data_dir, overrides, *flags, config=DIGITS_CONFIG, dataset="digits"):
  """The command line as 2 processes x 4 CPU devices on 127.0.0.1, joined by jax.distributed."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  # Prepared once beforehand, as for any multi-host run: two processes must not both build it.
  pipeline.get_dataset_info(dataset, data_dir)
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
  coordinator = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
  workers = [
    subprocess.Popen(
      main_command(workdir, data_dir, overrides, *coordinator, f"--process_id={rank}", *flags, config=config),
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for rank in range(2)
  ]
  outputs = [worker.communicate(timeout=600)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-4000:]


def without_timings(records):
  """Metric records without the wall-clock fields, which differ from run to run."""
  timings = ("images_per_s", "step_time_s", "input_wait_fraction")
  return [{k: v for k, v in record.items() if k not in timings} for record in records]


def stop_with_sigterm_after_first_metrics(command, workdir, cwd, poll_s=0.05) -> str:
  """Starts `command`, sends SIGTERM once WORKDIR/metrics.jsonl has a record, and returns the
  output of a run that saved and exited 0."""
  import signal
  import subprocess
  import time

  from etils import epath

  metrics = epath.Path(workdir) / "metrics.jsonl"
  process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    assert process.poll() is None, process.stdout.read()[-4000:]
    time.sleep(poll_s)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-4000:]
  assert "Stopped by SIGTERM after step" in output
  return output
