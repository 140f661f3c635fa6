"""SLWS ablation on the digits config: no shuffle vs constant P vs linear P, several seeds.

  python -m shufflemamba_jax.ablation --workdir=/tmp/ablation --seeds=3

Trains the digits model (configs/digits.py, or --config=FILE with --config.field overrides)
once per (setting, seed) in WORKDIR/<setting>_seed<k>, then writes WORKDIR/ablation.md (final
train loss, validation loss and top-1 as mean +- std over seeds, plus per-seed values) and
WORKDIR/ablation.png (train loss and validation top-1 curves, mean over seeds). Runs that already
finished are reused (training resumes from the last checkpoint, which is the end), so an
interrupted ablation can be restarted with the same command.
"""

import copy
import pathlib
import time

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from shufflemamba_jax.training import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"),
  "Training config of every run (default: configs/digits.py), with --config.field overrides.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs, the table and the plot.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per setting.")
_MAX_PROB = flags.DEFINE_float("max_prob", None, "P of the shuffled settings (default: the config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's).")
_NUM_EPOCHS = flags.DEFINE_float("num_epochs", None, "Epochs per run (default: the config's).")
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Train nothing: tabulate and plot the seeds that every setting finished."
)

# (name, schedule, uses P): the three settings of the paper's ablation.
SETTINGS = (("no_shuffle", "linear", False), ("constant", "constant", True), ("linear", "linear", True))


def run_summary(workdir: str) -> dict:
  """Final train loss, validation loss/top-1 and the curves of one finished run."""
  records = metrics_lib.read_metrics(workdir)
  train_records = [r for r in records if "loss" in r]
  eval_records = [r for r in records if "eval_top1" in r]
  if not train_records or not eval_records:
    raise ValueError(f"{workdir}/metrics.jsonl has no train or eval records.")
  return {
    "train_loss": train_records[-1]["loss"],
    "eval_loss": eval_records[-1]["eval_loss"],
    "eval_top1": eval_records[-1]["eval_top1"],
    "train_curve": ([r["step"] for r in train_records], [r["loss"] for r in train_records]),
    "eval_curve": ([r["step"] for r in eval_records], [r["eval_top1"] for r in eval_records]),
  }


def _finished(run_dir: str) -> bool:
  """Whether a run wrote its final evaluation (the last record of a finished run)."""
  try:
    records = metrics_lib.read_metrics(run_dir)
  except FileNotFoundError:
    return False
  return bool(records) and "eval_top1" in records[-1]


def _mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def markdown_table(results: dict, max_prob: float) -> str:
  """results: {setting: [summary per seed]} -> a markdown table (mean ± sample std)."""
  lines = [
    "| setting | P | final train loss | validation loss | validation top-1 | seeds |",
    "|---|---|---|---|---|---|",
  ]
  for name, schedule, shuffled in SETTINGS:
    runs = results[name]
    label = "none" if not shuffled else schedule
    lines.append(
      f"| {name} | {max_prob if shuffled else 0.0} ({label}) "
      f"| {_mean_std([r['train_loss'] for r in runs])} "
      f"| {_mean_std([r['eval_loss'] for r in runs])} "
      f"| {_mean_std([100 * r['eval_top1'] for r in runs])} % | {len(runs)} |"
    )
  lines += [
    "",
    "Per seed (validation top-1 %): "
    + "; ".join(
      f"{name}: " + ", ".join(f"{100 * r['eval_top1']:.2f}" for r in results[name]) for name, _, _ in SETTINGS
    ),
  ]
  return "\n".join(lines)


def plot(results: dict, path: str):
  """Train loss and validation top-1 against step, mean over seeds, one line per setting."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=(11, 4))
  for name, _, _ in SETTINGS:
    runs = results[name]
    steps = runs[0]["train_curve"][0]
    loss = np.mean([r["train_curve"][1] for r in runs], axis=0)
    loss_axis.plot(steps, loss, label=name)
    eval_steps = runs[0]["eval_curve"][0]
    top1 = np.mean([r["eval_curve"][1] for r in runs], axis=0) * 100
    top1_axis.plot(eval_steps, top1, marker="o", label=name)
  loss_axis.set(xlabel="step", ylabel="train loss (label-smoothed CE)", title="training loss")
  top1_axis.set(xlabel="step", ylabel="validation top-1 (%)", title="validation top-1")
  for axis in (loss_axis, top1_axis):
    axis.grid(alpha=0.3)
    axis.legend()
  figure.tight_layout()
  with epath.Path(path).open("wb") as f:
    figure.savefig(f, format="png", dpi=120)
  plt.close(figure)


def main(argv):
  del argv
  from shufflemamba_jax.training import trainer  # pylint: disable=g-import-not-at-top

  base = _CONFIG.value
  max_prob = _MAX_PROB.value if _MAX_PROB.value is not None else base.model.slws.max_prob
  workdir = epath.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {name: [] for name, _, _ in SETTINGS}
  # Seed-major order: if the ablation is stopped early, every setting has the same seeds done.
  for seed in range(_SEEDS.value):
    for name, schedule, shuffled in SETTINGS:
      run_dir = workdir / f"{name}_seed{seed}"
      if not _REPORT_ONLY.value:
        config = copy.deepcopy(base)
        config.seed = seed
        config.model.slws.max_prob = max_prob if shuffled else 0.0
        config.model.slws.schedule = schedule
        if _DATA_DIR.value:
          config.data_dir = _DATA_DIR.value
        if _NUM_EPOCHS.value:
          config.num_epochs = _NUM_EPOCHS.value
        start = time.time()
        trainer.train_and_evaluate(config, run_dir)
        logging.info("%s seed %d: %.1f s", name, seed, time.time() - start)
      elif not _finished(run_dir):
        continue
      results[name].append(run_summary(run_dir))
  done = min(len(runs) for runs in results.values())
  if done == 0:
    raise SystemExit(f"No finished runs in {workdir}.")
  results = {name: runs[:done] for name, runs in results.items()}
  table = markdown_table(results, max_prob)
  (workdir / "ablation.md").write_text(table + "\n")
  plot(results, workdir / "ablation.png")
  print(table)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
