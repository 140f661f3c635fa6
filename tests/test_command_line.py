"""How the command line ends: one `error:` line for the user's mistakes, and an exit that does
not wait for tf.data's threads once everything is written (main ends with os._exit).

Each run goes through `runpy` behind an atexit handler that prints a marker: a normal interpreter
exit runs it, os._exit does not."""

import subprocess
import sys
import threading
import time

import pytest

from shufflemamba_jax.weights import checkpoint as checkpoint_lib

from digits_runs import SHORT, main_command

MARKER = "ATEXIT HANDLERS RAN"
BEHIND_ATEXIT = (
  f"import atexit, runpy, sys; atexit.register(print, {MARKER!r}); del sys.argv[0]; "
  "runpy.run_module('shufflemamba_jax.main', run_name='__main__', alter_sys=True)"
)


def run_main(workdir, data_dir, overrides, cwd):
  """Runs the command line behind the atexit marker; returns (status, output, seconds from its last
  output line to its exit)."""
  command = main_command(workdir, data_dir, overrides)
  process = subprocess.Popen(
    [sys.executable, "-c", BEHIND_ATEXIT, *command[2:]],
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines, last = [], [time.perf_counter()]

  def read():
    for line in process.stdout:
      lines.append(line)
      last[0] = time.perf_counter()

  reader = threading.Thread(target=read)
  reader.start()
  status = process.wait(timeout=600)
  exited = time.perf_counter()
  reader.join()
  return status, "".join(lines), exited - last[0]


def test_a_setting_error_is_one_line_and_the_exit_skips_atexit(tmp_path):
  status, output, _ = run_main(str(tmp_path / "run"), str(tmp_path / "data"), {"lr": -1.0}, tmp_path)
  assert status == 1, output[-4000:]
  (error,) = [line for line in output.splitlines() if line.startswith("error:")]
  assert error.startswith("error: config.lr=-1.0: "), output[-4000:]
  assert "Traceback" not in output and MARKER not in output


def test_a_workdir_that_cannot_be_written_is_one_line_naming_it(tmp_path):
  """Checked before anything else: the run stops at once, naming the path, with no traceback."""
  (tmp_path / "file").write_text("")
  workdir = str(tmp_path / "file" / "run")  # A folder under a file: cannot be made.
  status, output, _ = run_main(workdir, str(tmp_path / "data"), SHORT, tmp_path)
  assert status == 1, output[-4000:]
  (error,) = [line for line in output.splitlines() if line.startswith("error:")]
  assert error.startswith(f"error: {workdir} cannot be written: "), error
  assert "Traceback" not in output and MARKER not in output


@pytest.mark.slow
def test_a_finished_run_exits_at_once_with_everything_written(digits_data_dir, tmp_path):
  """Status 0, the last checkpoint complete and the metrics written, the interpreter's exit
  skipped (tf.data's iterator destructor can wait ~50 s for its autotuner), and the process gone
  within seconds of its last output line."""
  workdir = tmp_path / "run"
  status, output, last_line_to_exit = run_main(str(workdir), digits_data_dir, SHORT, tmp_path)
  assert status == 0, output[-4000:]
  assert MARKER not in output
  assert last_line_to_exit < 5.0
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir)), read_only=True) as checkpointer:
    assert checkpointer.latest_step() == SHORT["total_steps"]
  records = (workdir / "metrics.jsonl").read_text().splitlines()
  assert '"eval_top1"' in records[-1] and '"step": 4' in records[-1]
