"""Metric logging: one JSON object per line in WORKDIR/metrics.jsonl plus TensorBoard events.

Only process 0 writes, so multi-host runs log once. The JSONL file is the machine-readable record
(tests and the ablation read it); TensorBoard files under WORKDIR/tensorboard are for people.
TensorFlow is imported lazily (it is part of the training install, not of the model package).
"""

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any):
  value = np.asarray(jax.device_get(value))
  if value.ndim != 0:
    raise ValueError(f"metrics must be scalars, got shape {value.shape}.")
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them readable instead of invalid JSON.
  return value


class MetricWriter:
  """Appends `{"step": step, name: value, ...}` lines and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / METRICS_FILE
    self._text = None  # The file's content, on cloud storage (see _append).
    self._summary_writer = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        import tensorflow as tf  # Lazy: only the training path needs TensorFlow.
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # tf.summary.scalar lives in the `tensorboard` package, which tensorflow-cpu does not
        # install; the core tf.summary.write with the scalars plugin tag gives the same events.
        self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        self._summary_writer = tf.summary.create_file_writer(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes scalar `metrics` at `step`; returns the record as Python numbers."""
    record = {"step": int(step)}
    record.update({name: _to_python(value) for name, value in metrics.items()})
    if not self.enabled:
      return record
    try:
      self._append(json.dumps(record) + "\n")
      if self._summary_writer is not None:
        with self._summary_writer.as_default():
          for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
              self._tf.summary.write(
                name, self._tf.constant(float(value), self._tf.float32), step=int(step), metadata=self._scalar_metadata
              )
        self._summary_writer.flush()
    except Exception as error:
      raise OSError(f"Could not write the metrics of step {step} to {self.path.parent}: {error}") from error
    return record

  def _append(self, line: str) -> None:
    if "://" in str(self.path):
      # Cloud objects cannot be appended to (gcsfs opens "a" as "w" and would drop the earlier
      # records): the file is written whole, a few hundred kB at most for a long run. It is read
      # once, at this writer's first record, and kept.
      if self._text is None:
        self._text = self.path.read_text() if self.path.exists() else ""
      self._text += line
      self.path.write_text(self._text)
    else:
      with self.path.open("a") as f:
        f.write(line)

  def close(self):
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None


def read_metrics(workdir: str) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl, in order."""
  text = (epath.Path(workdir) / METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
