"""The tasks of the training loop (`base.Task`): classification, semantic segmentation and
detection (with instance segmentation).

A config names its task in `config.task`, or leaves it None to take its dataset's: segmentation
for a label-map dataset (`pipeline.SEGMENTATION_DATASETS`), detection for an instance dataset
(`pipeline.DETECTION_DATASETS`), classification otherwise.
"""

from shufflemamba_jax import checks
from shufflemamba_jax.data import pipeline
from shufflemamba_jax.training.tasks import base, classification, detection, segmentation

TASKS = {
  task.name: task
  for task in (classification.ClassificationTask, segmentation.SegmentationTask, detection.DetectionTask)
}


def name_of(config) -> str:
  """The task of a training config: config.task, else the task of config.dataset."""
  if config.get("task") is not None:
    return checks.one_of("config.task", config.task, TASKS)
  if config.dataset in pipeline.SEGMENTATION_DATASETS:
    return segmentation.SegmentationTask.name
  return detection.DetectionTask.name if config.dataset in pipeline.DETECTION_DATASETS else "classification"


def from_config(config) -> base.Task:
  """The task of a training config, its settings checked (a SettingError names a bad field)."""
  return TASKS[name_of(config)].from_config(config)


def of_saved(saved) -> type[base.Task]:
  """The task class whose model a checkpoint holds (`weights.SavedWeights`)."""
  if saved.is_detector:
    return detection.DetectionTask
  return segmentation.SegmentationTask if saved.is_segmenter else classification.ClassificationTask
