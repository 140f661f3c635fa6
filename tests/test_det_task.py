"""The detection task on the embedded digits_det set, through the same trainer as the others:
its settings are checked by name, `main --config=configs/digits_det.py` checkpoints (params,
optimizer state, BatchNorm statistics) when stopped and resumes exactly; evaluate mode gives the
24 COCO numbers and writes the COCO result JSON; predict draws detections; 8 devices train like
1; two processes evaluate like one."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.data import digits_det, pipeline
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import coco_eval, optim, steps, tasks, trainer
from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training.tasks import detection
from shufflemamba_jax.weights import checkpoint as checkpoint_lib

from digits_runs import ROOT, config_with, run_two_processes, stop_with_sigterm_after_first_metrics, without_timings

pytest.importorskip("tensorflow_datasets")

CONFIG = os.path.join(ROOT, "configs", "digits_det.py")
# Six steps of 8 canvases, each logged; no evaluation or checkpoint before the end (a SIGTERM
# saves one); the evaluation on the first 24 validation canvases; fewer proposals (compiles faster).
RUN = {
  "total_steps": 6,
  "batch_size": 8,
  "log_every_steps": 1,
  "eval_every_steps": 100,
  "checkpoint_every_steps": 100,
  "async_checkpointing": False,
  "mesh.data": 1,
  "eval_split": "validation[:24]",
  "eval_batch_size": 8,
  "det.warmup_steps": 2,
  "det.rpn_nms_pre": 100,
  "det.test_nms_pre": 100,
}


def det_config(data_dir, **overrides):
  """configs/digits_det.py with RUN and `overrides` (dotted names) applied."""
  return config_with(CONFIG, data_dir, {**RUN, **overrides})


def test_digits_det_is_a_detection_run_and_bad_settings_name_their_field():
  config = det_config(None)
  assert tasks.name_of(config) == "detection" == tasks.name_of(det_config(None, task=None))
  task = tasks.from_config(config)
  model_config = task.model_config(digits_det.NUM_CLASSES)
  assert model_config.num_classes == 10 and model_config.in_channels == (48,) * 4
  assert (model_config.max_gt, model_config.mask_crop_size) == (8, 28)  # From det_aug.
  assert model_config.adapter.deform_num_heads == 6 and model_config.rpn_nms_pre == 100
  assert task.ranking_metrics == detection.METRICS and len(detection.METRICS) == 2 * len(coco_eval.stat_names("bbox"))
  cases = {
    "det.rpn_num": (0, r"config\.det\.rpn_num=0"),
    "det.adapter.deform_num_heads": (5, r"config\.det\.adapter\.deform_num_heads=5"),
    "det_aug.canvas": ((60, 64), r"config\.det_aug\.canvas"),
    "det.lr_epochs": ((11, 8), r"config\.det\.lr_epochs"),
    "model.patch_size": (8, r"config\.model\.patch_size=8"),
    "model.slws.max_prob": (0.5, r"config\.model\.slws_max_prob|config\.model\.slws\.max_prob"),
    "aug.mixup_alpha": (0.8, r"config\.aug\.mixup_alpha=0\.8"),
    "dataset": ("digits", r"config\.dataset='digits'"),
  }
  for name, (value, message) in cases.items():
    with pytest.raises(SettingError, match=message):
      tasks.from_config(det_config(None, **{name: value}))


def test_reduce_names_the_24_coco_numbers_and_category_ids():
  task = tasks.from_config(det_config(None))
  stats = np.arange(24, dtype=np.float64) / 100
  scalars, details = task.reduce({"stats": stats, "num_examples": np.int64(3)})
  assert details == {} and scalars["bbox_map"] == 0.0 and scalars["bbox_map_50"] == 0.01
  assert scalars["segm_map"] == 0.12 and scalars["segm_ar_l"] == 0.23 and len(scalars) == 24
  assert detection.category_ids("digits_det", 10) == tuple(range(1, 11))
  assert detection.category_ids("coco", 80)[-1] == 90


def test_the_schedule_warms_up_then_decays_by_epoch():
  config = det_config(None, **{"det.warmup_steps": 10, "det.warmup_factor": 0.1, "det.lr_epochs": (2, 3)})
  task = tasks.from_config(config)
  settings = optim.OptimizerSettings.from_config(config_with(CONFIG, None, {"lr": 1e-3}))
  _, schedule = task.optimizer(settings, batch_size=8, epoch_steps=20, total_steps=100)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 9, 39, 40, 59, 60)], [1e-4, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5], rtol=1e-5
  )


@pytest.mark.slow  # A command-line run, two in-process runs, an evaluation and a prediction: ~3 min on 2 cores.
def test_command_line_run_stopped_then_resumed_exactly_then_evaluated_and_drawn(digits_det_data_dir, tmp_path):
  workdir = str(tmp_path / "preempted")
  command = [sys.executable, "-m", "shufflemamba_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
  command += [f"--config.data_dir={digits_det_data_dir}"] + [f"--config.{k}={v}" for k, v in RUN.items()]
  stop_with_sigterm_after_first_metrics(command, workdir, ROOT)
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    stopped_at = checkpointer.latest_step()
    assert "model_state" in checkpointer.restore_parts(("model_state",))
  assert 1 <= stopped_at < 6

  trainer.train_and_evaluate(det_config(digits_det_data_dir), workdir)  # The same run again.
  uninterrupted = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(det_config(digits_det_data_dir), uninterrupted)

  def records(path):
    return without_timings(metrics_lib.read_metrics(path))

  train = [r for r in records(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "lr", "grad_norm"):
    assert np.isfinite(train[0][key]), key
  assert records(workdir) == records(uninterrupted)  # Every loss, lr, grad norm and the evaluation.
  (evaluation,) = [r for r in records(workdir) if "eval_bbox_map" in r]
  assert evaluation["step"] == 6 and evaluation["num_examples"] == 24
  assert all(-1.0 <= evaluation[f"eval_{name}"] <= 1.0 for name in detection.METRICS)

  def final_state(path):
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(path), read_only=True) as checkpointer:
      assert checkpointer.latest_step() == 6
      return checkpointer.restore_parts(("step", "params", "model_state"))

  jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(uninterrupted))

  # Evaluate mode: the same numbers, the record appended, the COCO results and metrics written.
  results_dir = tmp_path / "evaluated"
  record = trainer.evaluate(det_config(digits_det_data_dir), workdir, results_dir=str(results_dir))
  assert record["eval_bbox_map"] == pytest.approx(evaluation["eval_bbox_map"])
  assert metrics_lib.read_metrics(workdir)[-1] == record
  written = json.loads((results_dir / "coco_metrics_validation[:24].json").read_text())
  assert written["bbox_mAP"] == pytest.approx(record["eval_bbox_map"])
  results = json.loads((results_dir / "coco_results_validation[:24].segm.json").read_text())
  assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
  with pytest.raises(SettingError, match="eval_image_size"):
    trainer.evaluate(det_config(digits_det_data_dir), workdir, image_size=128)

  # predict: a drawing per image at its own size, and the detections as JSON.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax import predict  # pylint: disable=g-import-not-at-top

  images = tmp_path / "images"
  images.mkdir()
  validation = pipeline.get_builder("digits_det", digits_det_data_dir).as_dataset(split="validation[:2]")
  for index, example in enumerate(validation):
    tf.io.write_file(str(images / f"canvas{index}.png"), tf.io.encode_png(example["image"]))
  out = tmp_path / "drawn"
  assert predict.main(["--checkpoint", workdir, "--output-dir", str(out), str(images)]) == 0
  for index in range(2):
    assert tf.io.decode_png(tf.io.read_file(str(out / f"canvas{index}.png"))).shape == (64, 64, 3)
  detections = json.loads((out / "detections.json").read_text())
  for found in detections:
    assert found["file_name"].endswith(".png") and found["category_name"] == str(found["label"])
    assert found["category_id"] == found["label"] + 1 and 0.05 < found["score"] <= 1.0
  assert predict.main(["--checkpoint", workdir, str(images)]) == 1  # No --output-dir: a clear error.


@pytest.mark.slow  # Two compilations of the detector's training step (about 50 s on 2 cores).
def test_training_steps_on_8_devices_equal_1_device(digits_det_data_dir):
  """The task's step on the digits_det stream: per-image samplers, BatchNorm on the global batch
  and the losses do not depend on the mesh."""
  config = det_config(digits_det_data_dir)
  task = tasks.from_config(config)
  graphdef, params, rest = steps.split_model(task.create_model(task.model_config(10), nnx.Rngs(0)))
  import optax  # pylint: disable=g-import-not-at-top

  tx = optax.sgd(0.01)  # Adam's normalization would magnify float rounding in near-zero gradients.
  stream = pipeline.create_train_dataset(config, global_batch_size=8)
  batches = [
    {k: v for k, v in b.items() if k not in ("example_id", "epoch")} for b in stream.take(2).as_numpy_iterator()
  ]
  results = []
  for devices in (1, 8):
    mesh = sharding.create_mesh(data=devices, devices=jax.devices()[:devices])
    state = steps.init_train_state(
      jax.tree.map(np.asarray, params), tx, ema_decay=0.0, model_state=nnx.to_pure_dict(rest)
    )
    train_step = detection.make_train_step(graphdef, tx, lambda step: 0.01, seed=0, donate=False)
    losses = []
    for batch in sharding.prefetch_to_mesh(iter(batches), mesh):
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch)
      losses.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})
    results.append((jax.device_get(state), losses))
  (state_1, losses_1), (state_8, losses_8) = results
  for one, eight in zip(losses_1, losses_8):
    np.testing.assert_allclose(list(eight.values()), list(one.values()), rtol=2e-5, atol=1e-6)
  # Sums in another order over 8 shards: up to ~1e-5 apart on weights of order 0.1 after two
  # steps (as tests/test_det_mask_rcnn.py's tiny detector).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
  jax.tree.map(close, state_8["params"], state_1["params"])
  jax.tree.map(close, state_8["model_state"], state_1["model_state"])


@pytest.mark.slow  # Two command-line processes and one in-process evaluation: about a minute on 2 cores.
def test_two_processes_evaluate_a_detector_like_one_process(tmp_path, digits_det_data_dir):
  """--mode=evaluate on 2 processes x 4 devices: each process predicts its share, the results are
  gathered and process 0 runs COCOeval once: the numbers equal one process with 8 devices."""
  overrides = {"mesh.data": 8, "eval_batch_size": 8}
  config = det_config(digits_det_data_dir, **overrides)
  task = tasks.from_config(config)
  model_config = task.model_config(10)
  model = task.create_model(model_config, nnx.Rngs(5))
  _, params, rest = steps.split_model(model)
  state = {"params": params, "model_state": nnx.to_pure_dict(rest)}
  workdir = tmp_path / "run"
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir)), async_save=False) as saver:
    saver.save(0, jax.tree.map(np.asarray, state), model=model_config, force=True)
  (workdir / metrics_lib.METRICS_FILE).touch()  # A training workdir: evaluate mode appends its record.
  expected = trainer.evaluate(config, str(workdir))
  assert expected["num_examples"] == 24
  run_two_processes(
    str(workdir), digits_det_data_dir, {**RUN, **overrides}, "--mode=evaluate", config=CONFIG, dataset="digits_det"
  )
  records = metrics_lib.read_metrics(str(workdir))
  assert len(records) == 2  # One per evaluation: in-process, then the two processes' one.
  for name in ("eval_bbox_map", "eval_bbox_map_50", "eval_segm_map", "eval_segm_ar_100", "num_examples"):
    assert records[1][name] == expected[name], name


def test_init_from_a_classifier_fills_the_blocks_and_refuses_a_detector(tmp_path):
  """config.init_from a classifier: the Vim blocks take its weights (the table resized to the 6x6
  grid of pos_embed_size 96), the adapter, FPN and heads stay fresh; a detector checkpoint is refused."""
  from shufflemamba_jax.models import variants  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import params as params_lib  # pylint: disable=g-import-not-at-top

  task = tasks.from_config(det_config(None))
  model_config = task.model_config(10)
  backbone = model_config.backbone
  sizes = {name: getattr(backbone, name) for name in ("patch_size", "embed_dim", "depth", "d_state")}
  classifier = variants.create_model("shufflemamba_tiny", rngs=nnx.Rngs(1), num_classes=10, img_size=32, **sizes)
  classifier_params = jax.tree.map(np.asarray, params_lib.param_tree(classifier))
  with checkpoint_lib.Checkpointer(str(tmp_path / "classifier" / "checkpoints"), async_save=False) as checkpointer:
    checkpointer.save(0, {"params": classifier_params}, model=classifier.config, force=True)
  fresh = params_lib.param_tree(task.create_model(model_config, nnx.Rngs(0)))
  filled = task.warm_start(str(tmp_path / "classifier"), fresh, model_config)
  np.testing.assert_array_equal(filled["backbone"]["patch_embed"]["kernel"], classifier_params["patch_embed"]["kernel"])
  np.testing.assert_array_equal(
    filled["backbone"]["layers"]["mixer"]["A_log"], classifier_params["layers"]["mixer"]["A_log"]
  )
  assert filled["backbone"]["pos_embed"].shape == fresh["backbone"]["pos_embed"].shape == (36, 48)
  np.testing.assert_array_equal(filled["rpn_head"]["rpn_cls"]["kernel"], fresh["rpn_head"]["rpn_cls"]["kernel"])
  with checkpoint_lib.Checkpointer(str(tmp_path / "detector" / "checkpoints"), async_save=False) as checkpointer:
    checkpointer.save(0, {"params": fresh}, model=model_config, force=True)
  with pytest.raises(SettingError, match=r"config\.init_from=.*a detector resumes"):
    task.warm_start(str(tmp_path / "detector"), fresh, model_config)
