"""End-to-end training on the embedded digits set: metrics, NaN stop, resume, evaluate mode.

One short run goes through the real command line (`python -m shufflemamba_jax.main`); the
resume, NaN and evaluation checks call the same library functions in-process to save start-up
time. The model is the digits config's tiny one (16x16 images, patch 4, width 48, depth 4).
"""

import os
import shutil
import subprocess

import pytest

from shufflemamba_jax.training import metrics as metrics_lib
from shufflemamba_jax.training import trainer
from shufflemamba_jax.weights import checkpoint as checkpoint_lib

from digits_runs import (
  ROOT,
  SHORT,
  main_command,
  run_two_processes,
  stop_with_sigterm_after_first_metrics,
  without_timings,
)
from digits_runs import digits_config as _digits_config


@pytest.fixture(scope="module")
def data_dir(digits_data_dir):
  return digits_data_dir


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, data_dir):
  """A 4-step digits run through the command line; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  command = main_command(workdir, data_dir, SHORT)
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir


def test_metrics_file_has_the_required_keys(trained_workdir):
  records = metrics_lib.read_metrics(trained_workdir)
  train_records = [r for r in records if "loss" in r]
  eval_records = [r for r in records if "eval_top1" in r]
  assert [r["step"] for r in train_records] == [2, 4]
  for record in train_records:
    for key in ("loss", "train_top1", "lr", "grad_norm", "images_per_s", "step_time_s", "input_wait_fraction"):
      assert key in record, key
    assert 0.0 <= record["input_wait_fraction"] <= 1.0
  assert [r["step"] for r in eval_records] == [4]
  assert 0.0 <= eval_records[0]["eval_top1"] <= eval_records[0]["eval_top5"] <= 1.0
  assert os.listdir(os.path.join(trained_workdir, "tensorboard"))
  with checkpoint_lib.Checkpointer(
    checkpoint_lib.checkpoint_directory(trained_workdir), read_only=True
  ) as checkpointer:
    assert checkpointer.all_steps() == [2, 4]


def test_resume_continues_at_the_next_step(trained_workdir, data_dir, tmp_path):
  workdir = shutil.copytree(trained_workdir, tmp_path / "resumed")  # The fixture stays as it is.
  config = _digits_config(data_dir, total_steps=6)
  trainer.train_and_evaluate(config, workdir)
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]
  assert steps == [2, 4, 6]  # Steps 1-4 were not trained again.
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    assert checkpointer.latest_step() == 6
    assert int(checkpointer.restore_parts(("step",))["step"]) == 6


def test_evaluate_mode(trained_workdir, data_dir, tmp_path):
  """Scores the latest checkpoint, also at twice the training resolution (resized positions),
  and appends the record to the run's metrics."""
  workdir = shutil.copytree(trained_workdir, tmp_path / "run")  # The fixture stays as it is.
  config = _digits_config(data_dir)
  record = trainer.evaluate(config, workdir, split="validation", image_size=32)
  assert record["image_size"] == 32 and record["split"] == "validation"
  assert record["num_examples"] == 360
  assert 0.0 <= record["eval_top1"] <= 1.0
  assert record["step"] == 4
  assert metrics_lib.read_metrics(workdir)[-1] == record


EVAL_MESHES = {"eval_batch_size": 64, "mesh.fsdp_min_size": 256}  # 360 images: the last batch is padded.


def _evaluation(workdir, data_dir, data, fsdp):
  config = _digits_config(data_dir, **EVAL_MESHES, **{"mesh.data": data, "mesh.fsdp": fsdp})
  record = trainer.evaluate(config, workdir)
  assert record["num_examples"] == 360
  return {name: record[name] for name in ("eval_top1", "eval_top5", "eval_loss", "ema_eval_top1", "ema_eval_loss")}


def test_evaluation_does_not_depend_on_the_mesh(trained_workdir, data_dir, tmp_path):
  """One device, 8 data-parallel devices and a 2 x 4 data x FSDP mesh score alike; 360 images in
  batches of 64 end with a padded, masked batch that counts for nothing."""
  import numpy as np

  workdir = shutil.copytree(trained_workdir, tmp_path / "run")
  one = _evaluation(workdir, data_dir, 1, 1)
  for data, fsdp in ((8, 1), (2, 4)):
    for name, value in _evaluation(workdir, data_dir, data, fsdp).items():
      np.testing.assert_allclose(value, one[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} on {data}x{fsdp}")


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, data_dir):
  # A huge learning rate without warmup: step 0 is finite, its update makes step 1's loss NaN/Inf.
  config = _digits_config(
    data_dir,
    lr=1e30,
    warmup_epochs=0.0,
    grad_clip=None,
    total_steps=4,
    eval_every_steps=100,
    checkpoint_every_steps=100,
  )
  with pytest.raises(FloatingPointError, match=r"at step 1 "):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "4"))


def test_load_model_from_a_training_run(trained_workdir):
  import jax
  import numpy as np

  import shufflemamba_jax

  ema_model = shufflemamba_jax.load_model(trained_workdir, step=4)
  raw_model = shufflemamba_jax.load_model(trained_workdir, step=4, ema=False)
  assert ema_model.config.num_classes == 10 and ema_model.config.img_size == 16
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ema_logits, raw_logits = ema_model(images), raw_model(images)
  assert ema_logits.shape == (2, 10)
  assert not np.allclose(ema_logits, raw_logits)  # EMA and raw parameters differ after 4 steps.
  with checkpoint_lib.Checkpointer(
    checkpoint_lib.checkpoint_directory(trained_workdir), read_only=True
  ) as checkpointer:
    best = checkpointer.step("best")
  best_model = shufflemamba_jax.load_model(trained_workdir, step="best")
  np.testing.assert_array_equal(best_model(images), shufflemamba_jax.load_model(trained_workdir, step=best)(images))


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_run_bitwise(tmp_path, data_dir):
  """SIGTERM mid-run: save at a step boundary, exit 0; the restarted run ends bit for bit where
  an uninterrupted run ends (losses of every step, final evaluation and parameters), on one
  CPU device, with SLWS, drop path, EMA and augmentation all drawing random numbers."""

  import jax
  import numpy as np

  # 48 steps cross the epoch boundary (44 steps); every step is logged, so the losses of the
  # two halves can be compared with the uninterrupted run's one by one.
  run = {
    **SHORT,
    "total_steps": 48,
    "log_every_steps": 1,
    "eval_every_steps": 10_000,
    "checkpoint_every_steps": 10_000,
    "model.drop_path_rate": 0.1,
    "model.slws.max_prob": 0.5,
    "model.slws.group_size": 2,
  }
  workdir = str(tmp_path / "preempted")
  stop_with_sigterm_after_first_metrics(main_command(workdir, data_dir, run), workdir, ROOT)
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), read_only=True) as checkpointer:
    stopped_at = checkpointer.latest_step()
  assert 1 <= stopped_at < 48
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == list(range(1, stopped_at + 1))

  resumed = _digits_config(data_dir, **run)
  trainer.train_and_evaluate(resumed, workdir)  # The same command again: resumes.
  uninterrupted = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(_digits_config(data_dir, **run), uninterrupted)

  def records(path):
    return without_timings(metrics_lib.read_metrics(path))

  assert records(workdir) == records(uninterrupted)  # Every loss, lr, grad norm and the eval.

  def final_state(path):
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(path), read_only=True) as checkpointer:
      assert checkpointer.latest_step() == 48
      return checkpointer.restore_parts(("step", "params", "opt_state", "ema", "nonfinite_step"))

  jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(uninterrupted))


# Five steps with SLWS (group size 2) and drop path, so that the per-step randomness shows in the
# losses; two data shards, so that 1 and 2 processes read the same global batches.
FIVE_STEPS = {
  "total_steps": 5,
  "log_every_steps": 1,
  "eval_every_steps": 100,
  "checkpoint_every_steps": 100,
  "mesh.fsdp_min_size": 256,
  "data_shards": 2,
  "model.drop_path_rate": 0.1,
  "model.slws.max_prob": 0.5,
  "model.slws.group_size": 2,
}


def _five_step_run(workdir, data_dir, data, fsdp):
  config = _digits_config(data_dir, **FIVE_STEPS, **{"mesh.data": data, "mesh.fsdp": fsdp})
  trainer.train_and_evaluate(config, workdir)
  return workdir


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory, data_dir):
  losses = _losses(_five_step_run(str(tmp_path_factory.mktemp("one_device")), data_dir, 1, 1))
  assert len(losses) == 5
  return losses


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, data_dir):
  """The five-step run on 8 devices of this one process (data parallel)."""
  return _five_step_run(str(tmp_path_factory.mktemp("eight_devices")), data_dir, 8, 1)


@pytest.mark.parametrize(
  "data,fsdp", [(2, 4), pytest.param(8, 1, marks=pytest.mark.slow), pytest.param(1, 8, marks=pytest.mark.slow)]
)
def test_meshes_give_the_losses_of_one_device(tmp_path, data_dir, data, fsdp, single_device_losses, request):
  """Data-parallel, FSDP and mixed meshes over 8 simulated devices train like one device (the fast
  tier runs the mixed mesh, which splits both the batch and the parameters)."""
  import jax
  import numpy as np

  assert jax.device_count() == 8
  if (data, fsdp) == (8, 1):
    workdir = request.getfixturevalue("eight_device_run")
  else:
    workdir = _five_step_run(str(tmp_path / f"mesh_{data}x{fsdp}"), data_dir, data, fsdp)
  np.testing.assert_allclose(_losses(workdir), single_device_losses, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_8_devices(tmp_path, data_dir, eight_device_run):
  """2 processes x 4 CPU devices on 127.0.0.1, joined by jax.distributed, train one 8-device
  model: the same losses as 1 process with 8 devices, since with config.data_shards fixed the
  global batches do not depend on the number of processes. Only process 0 writes metrics, and
  both write the checkpoint together."""
  import numpy as np

  multi = str(tmp_path / "two_processes")
  run_two_processes(multi, data_dir, {**SHORT, **FIVE_STEPS, "mesh.data": 8})
  records = [r for r in metrics_lib.read_metrics(multi) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # Written once, by process 0 only.
  np.testing.assert_allclose(_losses(multi), _losses(eight_device_run), rtol=1e-5, atol=1e-6)
  (evaluation,) = [r for r in metrics_lib.read_metrics(multi) if "eval_top1" in r]
  (expected,) = [r for r in metrics_lib.read_metrics(eight_device_run) if "eval_top1" in r]
  assert evaluation["step"] == 5
  for key in ("eval_top1", "eval_loss", "ema_eval_top1"):
    np.testing.assert_allclose(evaluation[key], expected[key], rtol=1e-5, atol=1e-6)
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(multi), read_only=True) as checkpointer:
    assert checkpointer.all_steps() == [5]  # Saved collectively by both processes.


@pytest.mark.slow
def test_two_processes_evaluate_like_one_device(trained_workdir, data_dir, tmp_path):
  """--mode=evaluate on 2 processes x 4 devices: every example of every process is scored once
  (the last, padded batch masked), the sums are global, and only process 0 writes the record."""
  import numpy as np

  workdir = shutil.copytree(trained_workdir, tmp_path / "run")
  expected = _evaluation(workdir, data_dir, 1, 1)
  records = len(metrics_lib.read_metrics(workdir))
  run_two_processes(workdir, data_dir, {**SHORT, **EVAL_MESHES, "mesh.data": 8}, "--mode=evaluate")
  (record,) = metrics_lib.read_metrics(workdir)[records:]
  assert record["num_examples"] == 360 and record["step"] == 4
  for name, value in expected.items():
    np.testing.assert_allclose(record[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_an_epoch_counts_the_configured_train_split(tmp_path, data_dir):
  """config.train_split may be a TFDS slice: the epoch (and the warmup in epochs) counts its size,
  here 718 images, 22 steps of 32, not the 1437 of the whole train split (checked on the built run,
  before any step)."""
  run = trainer.setup(_digits_config(data_dir, train_split="train[:50%]", total_steps=1), str(tmp_path))
  try:
    assert (run.epoch_steps, run.total_steps) == (22, 1)
  finally:
    run.close()
  run = trainer.setup(
    _digits_config(data_dir, train_split="train[:50%]", total_steps=None, num_epochs=2), str(tmp_path)
  )
  try:
    assert run.total_steps == 44
  finally:
    run.close()


def test_an_implicit_transfer_in_the_loop_is_an_error(tmp_path, data_dir, monkeypatch):
  """jax.transfer_guard("disallow") holds around the training loop: a host value mixed into a
  device array there (here, in the metric window) fails instead of stalling a pod silently."""
  import jax

  add = trainer._Progress.add
  monkeypatch.setattr(trainer._Progress, "add", lambda self, metrics, wait: add(self, metrics["loss"] * 2.0, wait))
  with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
    trainer.train_and_evaluate(_digits_config(data_dir, total_steps=1), str(tmp_path))


def test_profile_steps_write_a_trace(tmp_path, data_dir):
  """config.profile_steps = (1, 3) traces steps 1 and 2 into WORKDIR/profile."""
  config = _digits_config(data_dir, total_steps=3, eval_every_steps=100, checkpoint_every_steps=100)
  config.profile_steps = (1, 3)
  trainer.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
