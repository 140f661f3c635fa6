"""Command line of training and evaluation.

  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m shufflemamba_jax.main --config=configs/imagenet.py:shufflemamba_base --workdir=DIR \
      --config.batch_size=1024 --config.model.remat=True
  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=evaluate --eval_split=validation --eval_image_size=32

`shufflemamba-train` (console script) is the same as `python -m shufflemamba_jax.main`.
The config is locked: a misspelled `--config.field` is an error; a bad value is an error naming
the field, raised by the part of the run it configures before anything compiles. Errors of the
user's making (settings, storage) end with one `error: ...` line on stderr and exit status 1.
"""

import concurrent.futures
import difflib
import os
import re
import sys
import traceback

from absl import app, flags, logging
from etils import epath
from ml_collections import config_dict, config_flags

from shufflemamba_jax.training import config_files

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file, optionally with an argument: configs/imagenet.py:vim_tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "evaluate"], "train: train (resuming from WORKDIR); evaluate: score a checkpoint."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "evaluate mode: a checkpoint step folder or workdir (default: --workdir)."
)
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "evaluate mode: split (default config.eval_split).")
_EVAL_IMAGE_SIZE = flags.DEFINE_integer(
  "eval_image_size", None, "evaluate mode: resolution (default config.image_size)."
)

_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process: HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS); "
  "not needed on TPU VMs and SLURM, where it is detected.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-process: number of processes (or JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process, 0-based (or JAX_PROCESS_ID).")


# A workdir whose storage does not answer (no network or credentials, a mistyped bucket) fails
# within this many seconds at the start, not after gcsfs's ~35 s of retries (README.md).
STORAGE_TIMEOUT_S = 20


def _unknown_override(argv) -> str:
  """Names the first `--config.a.b` of `argv` that is not a setting of the config, with close names."""
  args = "\n".join(argv)  # One per line: `--config=FILE` and `--config FILE` alike.
  config = config_files.get_config(*re.search(r"^--?config[=\n](.*)", args, re.M)[1].split(":", 1))
  for override in re.findall(r"^--?(?:no)?config\.([^=\n]+)", args, re.M):
    node, parent = config, "config"
    for name in override.split("."):
      names = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      if name not in names:
        close = [f"{parent}.{n}" for n in difflib.get_close_matches(name, names)]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"--config.{override}: {name!r} is not a setting of {parent}{hint}"
      node, parent = node[name], f"{parent}.{name}"
  return "an unknown --config override"


def _parse_flags(argv):
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):  # ml_collections' raw error for an unknown field names no path.
    raise SystemExit(f"error: {_unknown_override(argv)}") from None


def _check_storage(path: str, write: bool, process: int) -> None:
  """Raises an OSError naming `path` unless its storage answers (takes a write, for a workdir)
  within STORAGE_TIMEOUT_S."""
  folder, probe = epath.Path(path), epath.Path(path) / f".write-probe-{process}"
  # On gs:// a mkdir cannot tell an unreachable bucket: a small write can.
  touch = lambda: (folder.mkdir(parents=True, exist_ok=True), probe.write_text(""), probe.unlink())
  # Never joined: a touch that hangs is left behind, and the process ends with os._exit.
  future = concurrent.futures.ThreadPoolExecutor(1).submit(touch if write else folder.exists)
  try:
    future.result(timeout=STORAGE_TIMEOUT_S)
  except concurrent.futures.TimeoutError:
    raise OSError(f"{path}: its storage did not answer within {STORAGE_TIMEOUT_S} s") from None
  except Exception as error:
    reason = " ".join(str(error).split())  # One line: gcsfs puts the server's message on its own line.
    raise OSError(f"{path} cannot be {'written' if write else 'read'}: {type(error).__name__}: {reason}") from error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None and not (_MODE.value == "evaluate" and _CHECKPOINT.value):
    raise app.UsageError("--workdir is required.")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/digits.py.")

  import jax  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax.checks import SettingError  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  # Before anything touches the devices: joins the processes of a multi-host run.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  logging.info("JAX devices: %s", jax.devices())
  code = 1
  try:
    checkpoint = _CHECKPOINT.value or config.init_from or _WORKDIR.value
    train = _MODE.value == "train"
    _check_storage(_WORKDIR.value if train else checkpoint, train, jax.process_index())
    from shufflemamba_jax.training import trainer  # pylint: disable=g-import-not-at-top

    if train:  # trainer.train_and_evaluate, but `run` (its tf.data stream) lives to the exit below.
      run = trainer.setup(config, _WORKDIR.value)
      try:
        trainer.train(run)
      finally:
        run.close()
    else:
      print(
        trainer.evaluate(
          config, checkpoint, split=_EVAL_SPLIT.value, image_size=_EVAL_IMAGE_SIZE.value, results_dir=_WORKDIR.value
        )
      )
    code = 0
  except SettingError as error:
    print(f"error: {error}", file=sys.stderr)
  except OSError as error:  # Storage: the message names the path; the traceback is logged at --verbosity=1.
    logging.debug("Stopped by a storage error.", exc_info=True)
    print(f"error: {error}", file=sys.stderr)
  except BaseException:
    traceback.print_exc()
  finally:
    # Everything is saved, closed and written; flush and end now. A normal exit frees the train
    # stream's tf.data iterator, whose destructor can wait up to ~50 s for tf.data's autotuning
    # thread (EXPERIMENTS.md), and runs atexit handlers, of which only JAX's matter (below).
    jax.effects_barrier()
    jax.distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run():
  """Console-script entry point (`shufflemamba-train`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
