"""End to end segmentation on the embedded digits_seg set through the classification trainer:
`python -m shufflemamba_jax.main --config=configs/digits_seg.py` runs, checkpoints (params,
optimizer state and BatchNorm statistics) when stopped, resumes exactly where an uninterrupted
run ends, and evaluate mode reports mIoU, mAcc, aAcc and per-class IoU; warm start
fills the backbone from a classifier."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.data import digits_seg
from shufflemamba_jax.models import SettingError, upernet, variants
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training import trainer
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

from digits_runs import ROOT, config_with, run_two_processes, stop_with_sigterm_after_first_metrics, without_timings

pytest.importorskip("tensorflow_datasets")

CONFIG = os.path.join(ROOT, "configs", "digits_seg.py")
# Six steps, each logged; no evaluation or checkpoint before the end (a SIGTERM saves one).
RUN = {
  "total_steps": 6,
  "log_every_steps": 1,
  "eval_every_steps": 100,
  "checkpoint_every_steps": 100,
  "async_checkpointing": False,
  "mesh.data": 1,
  "seg.warmup_steps": 2,
}
# The config evaluates whole 32x32 canvases; this evaluates them upscaled to 48x48 in four
# overlapping 32x32 windows, the ADE20K recipe's way.
SLIDING_WINDOWS = {"seg.eval_crop": (32, 32), "seg.eval_stride": (16, 16), "seg_aug.eval_scale": (48, 48)}


def seg_config(data_dir, **overrides):
  """configs/digits_seg.py with RUN and `overrides` (dotted names) applied."""
  return config_with(CONFIG, data_dir, {**RUN, **overrides})


@pytest.mark.slow  # A command-line run, two in-process runs and an evaluation: 85-112 s on the shared 2 cores.
def test_command_line_run_stopped_then_resumed_exactly(digits_seg_data_dir, tmp_path):
  """`main --config=configs/digits_seg.py` stopped by SIGTERM saves (params, optimizer state and
  BatchNorm statistics); the same run resumed ends bit for bit where an uninterrupted run ends
  (one CPU device; tests/test_segmentation_train.py compares meshes); evaluate mode reports
  per-class IoU."""
  workdir = str(tmp_path / "preempted")
  command = [sys.executable, "-m", "shufflemamba_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
  command += [f"--config.data_dir={digits_seg_data_dir}"] + [f"--config.{k}={v}" for k, v in RUN.items()]
  stop_with_sigterm_after_first_metrics(command, workdir, ROOT)
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    stopped_at = checkpointer.latest_step()
    assert "model_state" in checkpointer.restore_parts(("model_state",))
  assert 1 <= stopped_at < 6

  trainer.train_and_evaluate(seg_config(digits_seg_data_dir), workdir)  # The same run again.
  uninterrupted = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(seg_config(digits_seg_data_dir), uninterrupted)

  def records(path):
    return without_timings(metrics_lib.read_metrics(path))

  train = [r for r in records(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  for key in ("decode_loss", "aux_loss", "train_pixel_acc", "lr", "grad_norm"):
    assert key in train[0], key
  assert records(workdir) == records(uninterrupted)  # Every loss, lr, grad norm and the evaluation.
  (evaluation,) = [r for r in records(workdir) if "eval_miou" in r]
  assert evaluation["step"] == 6
  assert all(0.0 <= evaluation[f"eval_{name}"] <= 1.0 for name in ("miou", "macc", "aacc"))

  def final_state(path):
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(path), read_only=True) as checkpointer:
      assert checkpointer.latest_step() == 6
      return checkpointer.restore_parts(("step", "params", "model_state"))

  jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(uninterrupted))

  # Evaluate mode: per-class IoU, and the scalars appended to the run's metrics.
  record = trainer.evaluate(seg_config(digits_seg_data_dir), workdir)
  assert record["step"] == 6 and record["split"] == "validation"
  assert record["eval_miou"] == pytest.approx(evaluation["eval_miou"])
  assert set(record["eval_iou"]) == set(digits_seg.CLASS_NAMES)
  assert metrics_lib.read_metrics(workdir)[-1] == {k: v for k, v in record.items() if k != "eval_iou"}
  with pytest.raises(SettingError, match="eval_image_size"):
    trainer.evaluate(seg_config(digits_seg_data_dir), workdir, image_size=64)
  sliding = trainer.evaluate(seg_config(digits_seg_data_dir, **SLIDING_WINDOWS), workdir)
  assert all(0.0 <= sliding[f"eval_{name}"] <= 1.0 for name in ("miou", "macc", "aacc"))
  assert set(sliding["eval_iou"]) == set(digits_seg.CLASS_NAMES)


def test_init_from_a_classifier_fills_the_backbone(tmp_path, digits_seg_data_dir):
  """config.init_from a classification checkpoint at another resolution (16 px): the backbone
  takes its weights (the cls row dropped, the table resized to the 8x8 grid of pos_embed_size
  32), the heads stay fresh."""
  settings = trainer.Settings.from_config(seg_config(digits_seg_data_dir))
  segmenter_config = settings.task.model_config(digits_seg.NUM_CLASSES)
  backbone = segmenter_config.backbone
  sizes = {name: getattr(backbone, name) for name in ("patch_size", "embed_dim", "depth", "d_state")}
  classifier = variants.create_model("shufflemamba_tiny", rngs=nnx.Rngs(1), num_classes=10, img_size=16, **sizes)
  classifier_params = jax.tree.map(np.asarray, params_lib.param_tree(classifier))
  with checkpoint_lib.Checkpointer(str(tmp_path / "classifier" / "checkpoints"), async_save=False) as checkpointer:
    checkpointer.save(0, {"params": classifier_params}, model=classifier.config, force=True)
  fresh = params_lib.param_tree(upernet.create_segmenter(segmenter_config, rngs=nnx.Rngs(0)))
  filled = settings.task.warm_start(str(tmp_path / "classifier"), fresh, segmenter_config)
  np.testing.assert_array_equal(filled["backbone"]["patch_embed"]["kernel"], classifier_params["patch_embed"]["kernel"])
  assert (
    filled["backbone"]["pos_embed"].shape
    == fresh["backbone"]["pos_embed"].shape
    != (classifier_params["pos_embed"].shape)
  )
  np.testing.assert_array_equal(
    filled["decode_head"]["classifier"]["kernel"], fresh["decode_head"]["classifier"]["kernel"]
  )


def test_a_converted_official_segmenter_evaluates_and_predicts(tmp_path, digits_seg_data_dir):
  """`convert --from-pytorch` of a reference-layout mmseg checkpoint (sizes read from its tensors)
  gives a workdir that evaluate mode reads strictly against the run's config, that `predict`
  turns into label maps, and that `load_model` returns as a segmenter."""
  import torch  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax import convert, predict  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import mmseg  # pylint: disable=g-import-not-at-top

  config = seg_config(digits_seg_data_dir)
  segmenter_config = trainer.Settings.from_config(config).task.model_config(digits_seg.NUM_CLASSES)
  model = upernet.create_segmenter(segmenter_config, rngs=nnx.Rngs(4))
  parts = [nnx.to_pure_dict(nnx.state(model, selector)) for selector in (nnx.Param, nnx.Not(nnx.Param))]
  state_dict = mmseg.export_segmenter(*parts, pool_scales=segmenter_config.pool_scales)
  source = tmp_path / "upernet.pth"
  torch.save({"state_dict": {name: torch.from_numpy(np.array(v)) for name, v in state_dict.items()}}, source)
  workdir = str(tmp_path / "converted")
  assert convert.main(["--from-pytorch", str(source), "--out", workdir, "--set", "img_size=32"]) == 0
  loaded = checkpoint_lib.load_model(workdir)
  assert isinstance(loaded, upernet.UperNet) and loaded.config.backbone.norm == segmenter_config.backbone.norm
  record = trainer.evaluate(config, workdir)
  assert record["step"] == 0 and 0.0 <= record["eval_miou"] <= 1.0
  image = tmp_path / "canvas.png"
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.io.write_file(str(image), tf.io.encode_png(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)))
  out = tmp_path / "labels"
  assert predict.main(["--checkpoint", workdir, "--output-dir", str(out), str(image)]) == 0
  assert tf.io.decode_png(tf.io.read_file(str(out / "canvas.png"))).shape == (40, 56, 3)


@pytest.mark.slow  # Two command-line processes and one in-process evaluation: about a minute on 2 cores.
def test_two_processes_evaluate_a_segmenter_like_one_process(tmp_path, digits_seg_data_dir):
  """--mode=evaluate on 2 processes x 4 devices, sliding windows: each process scores its share
  of the split image by image and the per-class areas are summed over the processes once, so the
  metrics equal one process with 8 devices exactly; process 0 alone writes the record."""
  overrides = {**SLIDING_WINDOWS, "mesh.data": 8, "eval_batch_size": 64}
  config = seg_config(digits_seg_data_dir, **overrides)
  segmenter_config = trainer.Settings.from_config(config).task.model_config(digits_seg.NUM_CLASSES)
  model = upernet.create_segmenter(segmenter_config, rngs=nnx.Rngs(5))
  state = {
    "params": params_lib.param_tree(model),
    "model_state": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))),
  }
  workdir = tmp_path / "run"
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir)), async_save=False) as saver:
    saver.save(0, jax.tree.map(np.asarray, state), model=segmenter_config, force=True)
  (workdir / metrics_lib.METRICS_FILE).touch()  # A training workdir: evaluate mode appends its record.
  expected = trainer.evaluate(config, str(workdir))
  assert expected["num_examples"] == 400
  run_two_processes(
    str(workdir), digits_seg_data_dir, {**RUN, **overrides}, "--mode=evaluate", config=CONFIG, dataset="digits_seg"
  )
  records = metrics_lib.read_metrics(str(workdir))
  assert len(records) == 2  # One per evaluation: in-process, then the two processes' one.
  for name in ("eval_miou", "eval_macc", "eval_aacc", "num_examples"):
    assert records[1][name] == expected[name], name
