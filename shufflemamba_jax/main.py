"""Command line of training and evaluation.

  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m shufflemamba_jax.main --config=configs/imagenet.py:shufflemamba_base --workdir=DIR \
      --config.batch_size=1024 --config.model.remat=True
  python -m shufflemamba_jax.main --config=configs/digits.py --workdir=/tmp/digits \
      --mode=evaluate --eval_split=validation --eval_image_size=32

`shufflemamba-train` (console script) is the same as `python -m shufflemamba_jax.main`.
The config is locked: a misspelled `--config.field` is an error; a bad value is an error naming
the field, raised by the part of the run it configures before anything compiles.
"""

from absl import app, flags, logging
from ml_collections import config_flags

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
  from shufflemamba_jax.training import trainer  # pylint: disable=g-import-not-at-top

  # Before anything touches the devices: joins the processes of a multi-host run.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  logging.info("JAX devices: %s", jax.devices())
  try:
    if _MODE.value == "train":
      trainer.train_and_evaluate(config, _WORKDIR.value)
    else:
      print(
        trainer.evaluate(
          config,
          _CHECKPOINT.value or config.init_from or _WORKDIR.value,
          split=_EVAL_SPLIT.value,
          image_size=_EVAL_IMAGE_SIZE.value,
        )
      )
  except SettingError as error:
    raise SystemExit(f"error: {error}") from None
  except OSError as error:  # Storage: the message names the path; the traceback goes to the log.
    logging.exception("Stopped by a storage error.")
    raise SystemExit(f"error: {error}") from None


def run():
  """Console-script entry point (`shufflemamba-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
