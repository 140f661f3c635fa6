"""Segmentation training steps on the embedded digits_seg stream: 8 devices train like 1.

Evaluation is tested end to end in test_segmentation_run.py and test_segmentation_predict.py.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tensorflow_datasets")

from shufflemamba_jax.data import digits_seg, pipeline
from shufflemamba_jax.models import upernet, variants
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import optim, steps
from shufflemamba_jax.training.tasks import segmentation

SEG_AUG = dict(scale=(64, 32), crop_size=32, eval_scale=(64, 64))


def tiny_segmenter():
  backbone = variants.model_config(
    "shufflemamba_tiny", embed_dim=48, depth=4, img_size=32, patch_size=8, drop_path_rate=0.2, remat=False
  )
  config = upernet.UperNetConfig(backbone=backbone, num_classes=digits_seg.NUM_CLASSES, channels=16, aux_channels=8)
  return nnx.split(upernet.create_segmenter(config, rngs=nnx.Rngs(0)), nnx.Param, ...)


@pytest.mark.slow  # Two compilations of a segmenter's training step (about 30 s on 2 cores).
def test_training_steps_on_8_devices_equal_1_device(digits_seg_data_dir):
  """BatchNorm on the global batch, drop path, dropout and the loss do not depend on the mesh."""
  graphdef, params, model_state = tiny_segmenter()
  schedule = optim.warmup_poly_schedule(0.05, warmup_steps=1, warmup_factor=0.1, total_steps=10)
  # Plain SGD: Adam's normalization would magnify float rounding in near-zero gradients.
  tx = optax.sgd(schedule)
  batches = list(
    pipeline.create_train_dataset(
      dataset="digits_seg", data_dir=digits_seg_data_dir, global_batch_size=8, shuffle_buffer=256, seg_aug=SEG_AUG
    )
    .take(3)
    .as_numpy_iterator()
  )
  results = []
  for devices in (1, 8):
    mesh = sharding.create_mesh(data=devices, devices=jax.devices()[:devices])
    state = steps.init_train_state(
      jax.tree.map(np.asarray, params), tx, ema_decay=0.0, model_state=nnx.to_pure_dict(model_state)
    )
    train_step = segmentation.make_train_step(graphdef, tx, schedule, seed=0, donate=False)
    losses = []
    for batch in sharding.prefetch_to_mesh(({"image": b["image"], "label": b["label"]} for b in batches), mesh):
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss"]))
    results.append((jax.device_get(state), losses))
  (state_1, losses_1), (state_8, losses_8) = results
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  jax.tree.map(close, state_8["params"], state_1["params"])
  jax.tree.map(close, state_8["model_state"], state_1["model_state"])
  assert int(state_8["step"]) == 3
