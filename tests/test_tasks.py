"""The task layer: a config's task, each task's protocol, metric names and final reductions."""

import os

import numpy as np
import pytest

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.training import tasks, trainer
from shufflemamba_jax.training.tasks import base, classification, segmentation

from digits_runs import ROOT, config_with

pytest.importorskip("tensorflow_datasets")


def _config(name, **overrides):
  return config_with(os.path.join(ROOT, "configs", name), None, overrides)


def test_the_dataset_chooses_the_task_unless_config_task_does():
  assert tasks.name_of(_config("digits.py")) == "classification"
  assert tasks.name_of(_config("digits_seg.py")) == "segmentation"
  assert tasks.name_of(_config("imagenet.py")) == "classification"
  assert tasks.name_of(_config("digits_det.py", task=None)) == "detection"
  assert isinstance(tasks.from_config(_config("digits_seg.py")), segmentation.SegmentationTask)
  with pytest.raises(SettingError, match=r"config\.task='tracking'"):
    tasks.from_config(_config("digits.py", task="tracking"))
  # Detection needs its blocks, which the classification config lacks.
  with pytest.raises(SettingError, match=r"config\.det=None"):
    tasks.from_config(_config("digits.py", task="detection"))
  # An explicit task checks its own settings: segmentation needs config.seg.
  with pytest.raises(SettingError, match=r"config\.seg=None"):
    tasks.from_config(_config("digits.py", task="segmentation"))


@pytest.mark.parametrize("task", list(tasks.TASKS.values()), ids=list(tasks.TASKS))
def test_every_task_has_every_member_of_the_protocol(task):
  members = [name for name in vars(base.Task) if not name.startswith("_")]
  assert {"name", "ranking_metrics", "evaluation", "reduce", "predict"} <= set(members) | set(base.Task.__annotations__)
  for name in members + list(base.Task.__annotations__):
    assert hasattr(task, name), f"{task.__name__} lacks {name}"


def test_best_metrics_are_the_tasks_ranking_metrics_of_the_model_and_its_ema():
  settings = trainer.Settings.from_config(_config("digits.py"))
  assert base.best_metrics(settings.task) == ("eval_top1", "eval_top5", "ema_eval_top1", "ema_eval_top5")
  with pytest.raises(SettingError, match=r"config\.best_metric='eval_miou'"):
    trainer.Settings.from_config(_config("digits.py", best_metric="eval_miou"))
  assert "ema_eval_miou" in base.best_metrics(trainer.Settings.from_config(_config("digits_seg.py")).task)


def test_classification_reduces_sums_to_means_over_real_examples():
  task = tasks.from_config(_config("digits.py"))
  totals = {"top1": np.float64(3.0), "top5": np.float64(4.0), "loss": np.float64(2.0), "num_examples": np.float64(4)}
  assert task.reduce(totals) == ({"top1": 0.75, "top5": 1.0, "loss": 0.5}, {})


def test_segmentation_reduces_areas_of_the_whole_split_with_class_names():
  task = tasks.from_config(_config("digits_seg.py"))
  num_classes = len(segmentation.pipeline.class_names("digits_seg"))
  intersect = np.arange(num_classes, dtype=np.int64)
  totals = {
    "area_intersect": intersect,
    "area_union": intersect + 2,
    "area_pred_label": intersect + 1,
    "area_label": intersect + 1,
    "num_examples": np.float64(5),
  }
  scalars, details = task.reduce(totals)
  iou = intersect / (intersect + 2)
  assert scalars["miou"] == pytest.approx(iou.mean())
  assert scalars["macc"] == pytest.approx((intersect / (intersect + 1)).mean())
  assert scalars["aacc"] == pytest.approx(intersect.sum() / (intersect + 1).sum())
  assert list(details["iou"]) == list(segmentation.pipeline.class_names("digits_seg"))
  np.testing.assert_allclose(list(details["iou"].values()), iou)


def test_segmentation_refuses_the_classification_recipe_naming_the_field():
  for field, value in (("aug.mixup_alpha", 0.8), ("grad_accum_steps", 2), ("aug.repeated_aug", 3)):
    with pytest.raises(SettingError, match=rf"config\.{field.replace('.', '[.]')}={value}"):
      tasks.from_config(_config("digits_seg.py", **{field: value}))


def test_classification_checks_its_batch_settings():
  with pytest.raises(SettingError, match=r"config\.grad_accum_steps=3: must divide config\.batch_size=32"):
    classification.ClassificationTask.from_config(_config("digits.py", grad_accum_steps=3))
