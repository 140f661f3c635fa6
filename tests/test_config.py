"""Training configs: command-line overrides, locked fields, and value checks naming the field,
run by the parts of a run that the fields configure (`trainer.Settings.from_config`)."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from shufflemamba_jax.training import trainer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _parse(*args, config="digits.py"):
  """Parses a command line like main's (locked config) with fresh flags; returns the config."""
  argv = ["prog", f"--config={os.path.join(CONFIGS, config)}", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_overrides():
  config = _parse(
    "--config.lr=0.01",
    "--config.model.slws.max_prob=0.3",
    "--config.model.slws.schedule=constant",
    "--config.total_steps=7",
    "--config.model.remat=True",
    "--config.aug.mixup_alpha=0.8",
  )
  assert config.lr == 0.01
  assert config.model.slws.max_prob == 0.3
  assert config.model.slws.schedule == "constant"
  assert config.total_steps == 7
  assert config.model.remat is True
  assert config.aug.mixup_alpha == 0.8
  trainer.Settings.from_config(config)


def test_imagenet_config_argument_picks_the_recipe():
  config = _parse("--config.batch_size=256", config="imagenet.py:shufflemamba_reg_base,stage=1")
  assert config.model.variant == "shufflemamba_reg_base"
  assert config.image_size == 128 and config.num_epochs == 300
  assert config.model.slws.max_prob == 0.1
  assert config.batch_size == 256
  trainer.Settings.from_config(config)


def test_required_fields_exist():
  config = _parse()
  for field in (
    "seed",
    "batch_size",
    "num_epochs",
    "total_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "lr",
    "lr_scale_batch",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "grad_clip",
    "grad_accum_steps",
    "ema_decay",
    "dataset",
    "data_dir",
    "image_size",
    "shuffle_buffer",
    "train_split",
    "eval_split",
  ):
    assert field in config, field
  for field in ("variant", "drop_path_rate", "scan_method", "remat", "dtype"):
    assert field in config.model, field
  for field in ("max_prob", "schedule", "group_size"):
    assert field in config.model.slws, field


def test_unknown_field_is_rejected():
  with pytest.raises(AttributeError, match='Did you mean "lr" instead of "lrr"'):
    _parse("--config.lrr=0.1")
  config = _parse()
  with pytest.raises(AttributeError):
    config.model.new_field = 1  # Locked: no new fields, not even in code.


@pytest.mark.parametrize(
  "field, value, words",
  [
    ("batch_size", 0, "batch_size"),
    ("lr", -1.0, "config.lr"),
    ("model.slws.max_prob", 1.5, "model.slws.max_prob"),
    ("model.slws.schedule", "cubic", "model.slws.schedule"),
    ("model.variant", "vim_huge", "model.variant"),
    ("aug.mixup_prob", -0.1, "aug.mixup_prob"),
    ("aug.label_smoothing", 2.0, "aug.label_smoothing"),
    ("model.drop_path_rate", 1.2, "model.drop_path_rate"),
    ("ema_decay", 1.0, "ema_decay"),
    ("grad_accum_steps", 3, "grad_accum_steps"),  # 3 does not divide the batch (64).
    ("image_size", 18, "image_size"),  # Not a multiple of the patch size (4).
    ("model.scan_method", "fft", "model.scan_method"),
    ("keep_best_checkpoints", -1, "keep_best_checkpoints"),
    ("data_shards", 3, "data_shards"),  # 3 does not divide the batch (64).
    ("data_shards", -1, "data_shards"),
    ("best_metric", "eval_loss", "best_metric"),
    ("model.depth", 0, "config.model.depth"),
    ("model.chunk_size", -2, "config.model.chunk_size"),
    ("dataset", "cifar10", "config.dataset"),
    ("total_steps", 0, "config.total_steps"),
    ("aug.crop_area_min", 1.5, "config.aug.crop_area_min"),
    ("aug.repeated_aug", 0, "config.aug.repeated_aug"),
    ("aug.eval_crop_ratio", 0.0, "config.aug.eval_crop_ratio"),
    ("aug.cutmix_alpha", -1.0, "config.aug.cutmix_alpha"),
    ("aug.mixup_group_size", 0, "config.aug.mixup_group_size"),
    ("b2", 1.5, "config.b2"),
  ],
)
def test_invalid_values_are_rejected_naming_the_field(field, value, words):
  config = _parse()
  node = config
  *parents, name = field.split(".")
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ValueError, match=words.replace(".", r"\.")):
    trainer.Settings.from_config(config)


def test_a_mixup_group_must_divide_the_batch_when_mixup_is_on():
  config = _parse("--config.aug.mixup_alpha=0.8", "--config.aug.mixup_group_size=24")
  with pytest.raises(ValueError, match=r"config\.aug\.mixup_group_size=24: must divide the global batch of 32"):
    trainer.Settings.from_config(config)
  config.aug.mixup_alpha = 0.0  # Off: nothing is mixed, the group size is never used.
  trainer.Settings.from_config(config)


def test_ranking_checkpoints_by_the_ema_needs_the_ema():
  config = _parse("--config.ema_decay=0", "--config.best_metric=ema_eval_top1")
  with pytest.raises(ValueError, match=r"config\.best_metric.*ema_decay"):
    trainer.Settings.from_config(config)
  config.keep_best_checkpoints = 0  # Nothing is ranked: the metric is never used.
  trainer.Settings.from_config(config)


def test_the_pallas_scan_is_a_model_setting():
  assert trainer.Settings.from_config(_parse("--config.model.scan_method=pallas")).task.model.scan_method == "pallas"


@pytest.mark.parametrize(
  "override, error",
  [
    ("--config.model.nope=1", "error: --config.model.nope: 'nope' is not a setting of config.model"),
    (
      "--config.modl.nope=1",
      "error: --config.modl.nope: 'modl' is not a setting of config; did you mean config.model?",
    ),
    (
      "--config.model.slws.max_prb=0.1",
      "error: --config.model.slws.max_prb: 'max_prb' is not a setting of config.model.slws; "
      "did you mean config.model.slws.max_prob?",
    ),
  ],
)
def test_the_command_line_names_an_unknown_override_in_one_line(override, error, tmp_path):
  """A leaf or a group the config lacks: exit status 1 and one `error:` line naming the override,
  not ml_collections' traceback. It fails while parsing flags, before any JAX work."""
  command = [sys.executable, "-m", "shufflemamba_jax.main", f"--config={CONFIGS}/digits.py", f"--workdir={tmp_path}"]
  result = subprocess.run([*command, override], capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [error], result.stderr
  assert "Traceback" not in result.stderr
  assert not list(tmp_path.iterdir())
