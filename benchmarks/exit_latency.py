"""Exit-latency benchmark: seconds from a training command's last output line to its exit.

  python benchmarks/exit_latency.py --runs=20 [--steps=20] [--workdir=DIR] [--baseline] [--json]

Runs `python -m shufflemamba_jax.main --config=configs/digits.py` (`--steps` steps, one log, one
evaluation and one checkpoint at the last step) `--runs` times, each in a fresh workdir, and
times, per run, the last line the process printed (stdout and stderr, stamped as they arrive)
to the process's exit. A normal interpreter exit used to wait up to ~50 s here in some runs:
tf.data's iterator destructor waits for its autotuning thread (EXPERIMENTS.md).

--baseline runs the same training as `trainer.train_and_evaluate` followed by a normal
interpreter exit (what the command line did before it ended with os._exit), for comparison.

The digits dataset is prepared once under WORKDIR/tfds; one untimed run first fills a JAX
compilation cache shared by the runs (WORKDIR/jax_cache), so each run is mostly start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = (
  "from absl import app, flags; from ml_collections import config_flags; "
  "config = config_flags.DEFINE_config_file('config', lock_config=True); "
  "flags.DEFINE_string('workdir', None, ''); from shufflemamba_jax.training import trainer; "
  "app.run(lambda argv: trainer.train_and_evaluate(config.value, flags.FLAGS.workdir) and None)"
)


def command(workdir: str, data_dir: str, steps: int, baseline: bool) -> list[str]:
  start = [sys.executable, "-c", BASELINE] if baseline else [sys.executable, "-m", "shufflemamba_jax.main"]
  overrides = {
    "data_dir": data_dir,
    "total_steps": steps,
    "log_every_steps": steps,
    "eval_every_steps": steps,
    "checkpoint_every_steps": steps,
    "mesh.data": 1,
  }
  config = [f"--config={ROOT}/configs/digits.py", f"--workdir={workdir}"]
  return start + config + [f"--config.{name}={value}" for name, value in overrides.items()]


def timed_run(argv: list[str], env: dict) -> dict:
  """Runs `argv`; returns its exit status, wall time, seconds from its last line to its exit, and
  the last lines of its output if it failed."""
  start = time.perf_counter()
  process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  last, lines = [start], []

  def read(stream):
    for line in iter(stream.readline, b""):
      last[0] = time.perf_counter()
      lines.append(line.decode(errors="replace"))

  readers = [threading.Thread(target=read, args=(s,)) for s in (process.stdout, process.stderr)]
  for reader in readers:
    reader.start()
  status = process.wait()
  end = time.perf_counter()
  for reader in readers:
    reader.join()
  result = {"status": status, "wall_s": end - start, "last_line_to_exit_s": end - last[0]}
  return {**result, "output_tail": "".join(lines[-20:])} if status else result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--workdir", default=None, help="Default: a fresh temporary folder.")
  parser.add_argument("--baseline", action="store_true", help="Normal interpreter exit (before os._exit).")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="exit_latency_")
  data_dir = os.path.join(root, "tfds")
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
  if not os.path.isdir(os.path.join(data_dir, "digits")):
    subprocess.run(
      [sys.executable, "-c", f"from shufflemamba_jax.data import pipeline; pipeline.prepare('digits', {data_dir!r})"],
      cwd=ROOT,
      env=env,
      check=True,
      capture_output=True,
    )
  warmup = timed_run(command(os.path.join(root, "warmup"), data_dir, args.steps, args.baseline), env)
  assert warmup["status"] == 0, warmup
  results = []
  for index in range(args.runs):
    result = timed_run(command(os.path.join(root, f"run{index}"), data_dir, args.steps, args.baseline), env)
    results.append(result)
    print(
      f"run {index + 1:2d}: exit status {result['status']}, wall {result['wall_s']:6.1f} s, "
      f"last line to exit {result['last_line_to_exit_s']:6.3f} s",
      flush=True,
    )
  latencies = [r["last_line_to_exit_s"] for r in results]
  summary = {
    "runs": len(results),
    "failed": sum(r["status"] != 0 for r in results),
    "min_s": min(latencies),
    "median_s": statistics.median(latencies),
    "max_s": max(latencies),
    "baseline": args.baseline,
  }
  print(
    f"last line to exit over {summary['runs']} runs ({summary['failed']} failed): min {summary['min_s']:.3f} s, "
    f"median {summary['median_s']:.3f} s, max {summary['max_s']:.3f} s"
  )
  if args.json:
    print(json.dumps({**summary, "per_run": results}))


if __name__ == "__main__":
  main()
