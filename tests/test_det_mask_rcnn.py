"""The whole Mask R-CNN: its loss and predictions trace once, mask targets from box crops agree with
mmdet's full-size ones, masks paste as mmdet pastes them, a tiny detector overfits a few synthetic
images, and its training step on 8 devices equals 1 device with no batch-sized collective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shufflemamba_jax.models import SettingError
from shufflemamba_jax.models.detection import boxes as boxes_lib
from shufflemamba_jax.models.detection import mask_rcnn, roi_align
from shufflemamba_jax.parallel import sharding

SIZE = 64


class TinyBackbone(nnx.Module):
  """Four maps at strides 4 to 32 from a patchify conv and three stride-2 convs (a stand-in for the adapter)."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, channels, (4, 4), strides=4, rngs=rngs)
    self.down = nnx.List([nnx.Conv(channels, channels, (3, 3), strides=2, rngs=rngs) for _ in range(3)])

  def __call__(self, images, *, train, key):
    del train, key
    x = jax.nn.relu(self.stem(images))
    maps = [x]
    for conv in self.down:
      x = jax.nn.relu(conv(x))
      maps.append(x)
    return maps


CONFIG = mask_rcnn.MaskRCNNConfig(
  num_classes=2,
  in_channels=(16,) * 4,
  fpn_channels=32,
  fc_channels=64,
  mask_channels=32,
  max_gt=4,
  mask_crop_size=32,
  rpn_num=64,
  rpn_nms_pre=200,
  rpn_max_proposals=100,
  rcnn_num=64,
  max_mask_rois=16,
  test_nms_pre=100,
  test_max_proposals=100,
  test_max_detections=10,
  test_pre_nms_top_k=256,
)


def tiny_detector(seed=0) -> mask_rcnn.MaskRCNN:
  return mask_rcnn.MaskRCNN(CONFIG, rngs=nnx.Rngs(seed), backbone=TinyBackbone(16, nnx.Rngs(seed + 1)))


def synthetic(n, seed=0):
  """n noisy 64x64 images with 1-3 objects each: class 0 red rectangles, class 1 green ellipses,
  14-35 pixels a side, their tight boxes and full-size masks, padded to 4 per image."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0, 0.3, (n, SIZE, SIZE, 3)).astype(np.float32)
  gt = np.zeros((n, 4, 4), np.float32)
  labels = np.zeros((n, 4), np.int32)
  valid = np.zeros((n, 4), bool)
  masks = np.zeros((n, 4, SIZE, SIZE), np.float32)
  yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
  for i in range(n):
    for j in range(rng.integers(1, 4)):
      w, h = rng.integers(14, 36, 2)
      x0, y0 = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
      cls = rng.integers(0, 2)
      if cls == 0:
        inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
      else:
        inside = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
      images[i][inside] = (1.0, -1.0, 0.5) if cls == 0 else (-1.0, 1.0, 0.5)
      ys, xs = np.nonzero(inside)
      gt[i, j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
      labels[i, j], valid[i, j], masks[i, j] = cls, True, inside
  return images, gt, labels, valid, masks


def targets_of(gt, labels, valid, masks) -> mask_rcnn.Targets:
  crops = jax.vmap(mask_rcnn.crop_masks, in_axes=(0, 0, None))(
    jnp.asarray(masks), jnp.asarray(gt), CONFIG.mask_crop_size
  )
  sizes = jnp.full((len(gt), 2), SIZE, jnp.int32)
  return mask_rcnn.Targets(jnp.asarray(gt), jnp.asarray(labels), jnp.asarray(valid), crops, sizes)


def train_step_fn(graphdef, tx):
  def loss_fn(params, rest, images, targets, key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss, terms = model.loss(images, targets, key=key)
    return loss, (terms, nnx.state(model, nnx.Not(nnx.Param)))

  def step(params, rest, opt_state, images, targets, key):
    (loss, (terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, images, targets, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss, terms

  return step


def test_loss_and_predictions_trace_once_with_finite_values():
  model = tiny_detector()
  images, gt, labels, valid, masks = synthetic(2)
  traces = []

  @nnx.jit
  def loss(model, images, targets, key):
    traces.append(1)
    return model.loss(images, targets, key=key)

  for seed in range(2):
    images, gt, labels, valid, masks = synthetic(2, seed=seed)
    total, terms = loss(model, jnp.asarray(images), targets_of(gt, labels, valid, masks), jax.random.key(seed))
    assert np.isfinite(float(total)) and set(terms) >= {
      "loss_rpn_cls",
      "loss_rpn_bbox",
      "loss_cls",
      "loss_bbox",
      "loss_mask",
    }
    # A fresh RPN (normal 0.01, zero bias) predicts 0.5 everywhere: the sigmoid loss is log 2.
    np.testing.assert_allclose(float(terms["loss_rpn_cls"]), np.log(2), rtol=0.05)
  assert len(traces) == 1
  det = nnx.jit(lambda m, x, s: m.predict(x, s))(model, jnp.asarray(images), jnp.full((2, 2), SIZE, jnp.int32))
  assert det.boxes.shape == (2, 10, 4) and det.masks.shape == (2, 10, 28, 28)
  valid = np.asarray(det.valid)
  assert all(np.all(row[: row.sum()]) for row in valid)  # A prefix.
  scores = np.asarray(det.scores)
  assert all(np.all(np.diff(s[v]) <= 0) for s, v in zip(scores, valid))  # Best first.
  assert np.all(scores[valid] > CONFIG.test_score_thr)
  inside = np.asarray(det.boxes)[valid]
  assert np.all(inside >= 0) and np.all(inside <= SIZE)


def test_mask_targets_from_box_crops_agree_with_full_size_masks():
  """mmdet takes RoIAlign of the full-size mask at each positive RoI; from a 112-pixel crop of the
  mask over its box, the 28x28 binarized targets agree on all but a sliver of boundary pixels."""
  rng = np.random.default_rng(0)
  size, count = 256, 64
  yy, xx = np.mgrid[:size, :size] + 0.5
  masks, gts, rois = [], [], []
  for _ in range(count):
    w, h = rng.uniform(20, 200, 2)
    cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
    mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
    ys, xs = np.nonzero(mask)
    gt = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    # A positive RoI: the gt box jittered by up to 15% of its size (IoU well above 0.5).
    jitter = rng.uniform(-0.15, 0.15, 4) * np.array([w, h, w, h])
    masks.append(mask)
    gts.append(gt)
    rois.append(np.clip(gt + jitter, 0, size).astype(np.float32))
  masks, gts, rois = np.stack(masks).astype(np.float32), np.stack(gts), np.stack(rois)
  assert np.all(np.diag(np.asarray(boxes_lib.box_iou(jnp.asarray(gts), jnp.asarray(rois)))) > 0.5)
  crops = mask_rcnn.crop_masks(jnp.asarray(masks), jnp.asarray(gts), 112)
  ours = np.asarray(mask_rcnn.mask_targets_from_crops(jnp.asarray(rois), jnp.asarray(gts), crops, 28))
  full = roi_align.roi_align(
    jnp.asarray(masks)[:, :, :, None], jnp.asarray(rois)[:, None], 28, spatial_scale=1.0, sampling_ratio=0
  )
  reference = np.asarray(full)[:, 0, :, :, 0] >= 0.5
  disagree = np.mean(ours != reference)
  assert disagree < 0.01, disagree  # Measured 0.3%.


def test_paste_masks_equals_mmdet():
  torch = pytest.importorskip("torch")
  del torch
  import torch_reference  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  masks = rng.uniform(size=(6, 28, 28)).astype(np.float32)
  x0, y0 = rng.uniform(-10, 50, 2 * 6).reshape(2, 6)
  w, h = rng.uniform(3, 60, 2 * 6).reshape(2, 6)
  det_boxes = np.stack([x0, y0, x0 + w, y0 + h], -1).astype(np.float32)
  ours = np.asarray(mask_rcnn.paste_masks(jnp.asarray(masks), jnp.asarray(det_boxes), 48, 64))
  reference = torch_reference.paste_masks(masks, det_boxes, 48, 64).numpy()
  assert ours.shape == (6, 48, 64)
  assert np.mean(ours != reference) < 1e-3  # Only pixels within float32 rounding of the threshold.


def test_config_is_checked():
  with pytest.raises(SettingError, match="in_channels"):
    mask_rcnn.MaskRCNNConfig(in_channels=(16, 16))
  with pytest.raises(SettingError, match="adapter"):
    from shufflemamba_jax.models import variants  # pylint: disable=g-import-not-at-top

    mask_rcnn.MaskRCNNConfig(backbone=variants.model_config("shufflemamba_tiny", slws_max_prob=0.0))
  with pytest.raises(ValueError, match="multiples of 32"):
    tiny_detector().predict(jnp.zeros((1, 48, 64, 3)), jnp.full((1, 2), 48, jnp.int32))


@pytest.mark.slow  # 150 training steps of a tiny detector (about 60 s on 2 cores).
def test_a_tiny_mask_rcnn_overfits_synthetic_images():
  """Trained on 8 images for 150 steps, it finds (score >= 0.5, right class, IoU >= 0.5) at least
  80% of the objects and their pasted masks reach a mean IoU of 0.8 (measured: 17 of 18 objects,
  mean mask IoU 0.92, after 200 steps; 150 steps keep a margin)."""
  model = tiny_detector()
  images, gt, labels, valid, masks = synthetic(8)
  targets = targets_of(gt, labels, valid, masks)
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  step = jax.jit(train_step_fn(graphdef, tx))
  for i in range(150):
    params, rest, opt_state, loss, _ = step(params, rest, opt_state, jnp.asarray(images), targets, jax.random.key(i))
  assert float(loss) < 0.6
  model = nnx.merge(graphdef, params, rest)
  det = nnx.jit(lambda m, x, s: m.predict(x, s))(model, jnp.asarray(images), targets.image_sizes)
  found, mask_ious = 0, []
  for i in range(len(images)):
    for j in np.flatnonzero(valid[i]):
      candidates = np.asarray(det.valid[i]) & (np.asarray(det.labels[i]) == labels[i, j])
      candidates &= np.asarray(det.scores[i]) >= 0.5
      ious = np.where(candidates, np.asarray(boxes_lib.box_iou(jnp.asarray(gt[i, j][None]), det.boxes[i]))[0], 0)
      best = int(np.argmax(ious))
      if ious[best] >= 0.5:
        found += 1
        pasted = np.asarray(mask_rcnn.paste_masks(det.masks[i, best][None], det.boxes[i, best][None], SIZE, SIZE))[0]
        truth = masks[i, j] > 0
        mask_ious.append((pasted & truth).sum() / (pasted | truth).sum())
  assert found >= 0.8 * valid.sum(), (found, valid.sum())
  assert np.mean(mask_ious) >= 0.8, mask_ious


@pytest.mark.slow  # Two compilations of the detector's training step (about 40 s on 2 cores).
def test_training_steps_on_8_devices_equal_1_device(tmp_path):
  """Samplers keyed per image, BatchNorm on the global batch: the mesh changes nothing. The
  compiled 8-device step gathers nothing: the batch never leaves its device."""
  images, gt, labels, valid, masks = synthetic(8, seed=3)
  targets = targets_of(gt, labels, valid, masks)
  tx = optax.sgd(1e-2)
  results = []
  for devices in (1, 8):
    model = tiny_detector()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.create_mesh(data=devices, devices=jax.devices()[:devices])
    batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    step = jax.jit(train_step_fn(graphdef, tx))
    state = jax.device_put((params, rest, tx.init(params)), replicated)
    inputs = jax.device_put((jnp.asarray(images), targets), batch)
    losses = []
    for i in range(2):
      with jax.set_mesh(mesh):
        *state, loss, _ = step(*state, *inputs, jax.random.key(i))
      losses.append(float(loss))
    if devices == 8:
      with jax.set_mesh(mesh):
        hlo = step.lower(*state, *inputs, jax.random.key(0)).compile().as_text()
    results.append((losses, jax.device_get(state[0])))
  (losses_1, params_1), (losses_8, params_8) = results
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), params_8, params_1)
  # Parameters are replicated here, so the only collectives are the gradients' and the loss's
  # all-reduces: nothing is gathered, nothing of the batch moves (the per-image top-k, sorting
  # and NMS run in shard_map; without it XLA gathers their inputs, e.g. s32[8,1023]).
  collectives = [line for line in hlo.splitlines() if " all-gather" in line or " all-to-all" in line]
  assert not collectives, collectives[:3]
  assert any(" all-reduce" in line for line in hlo.splitlines())


def test_convert_reads_and_writes_an_official_adapter_detector(tmp_path):
  """`convert --from-pytorch` of an mmdet Mask R-CNN with the adapter (sizes read from its
  tensors) and `--to-pytorch` back: the same tensors, BatchNorm counters included."""
  torch = pytest.importorskip("torch")
  from shufflemamba_jax import convert  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.models import adapter, variants  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import mmdet  # pylint: disable=g-import-not-at-top
  from shufflemamba_jax.weights import params as params_lib  # pylint: disable=g-import-not-at-top

  backbone = variants.model_config(
    "shufflemamba_tiny", embed_dim=48, depth=4, d_state=8, norm="layernorm", slws_max_prob=0.0, remat=False
  )
  config = mask_rcnn.MaskRCNNConfig(
    num_classes=3,
    backbone=backbone,
    adapter=adapter.AdapterConfig(conv_inplane=8, deform_num_heads=6, deform_ratio=0.5),
    pos_embed_size=32,
    in_channels=(48,) * 4,
    fpn_channels=32,
    fc_channels=64,
    mask_channels=32,
  )
  model = mask_rcnn.MaskRCNN(config, rngs=nnx.Rngs(2))
  params, model_state = (nnx.to_pure_dict(nnx.state(model, kind)) for kind in (nnx.Param, nnx.Not(nnx.Param)))
  state_dict = mmdet.export_detector(params, model_state)
  # mmdet's names and layouts, spot-checked.
  assert state_dict["neck.lateral_convs.2.conv.weight"].shape == (32, 48, 1, 1)
  assert state_dict["neck.fpn_convs.0.bn.num_batches_tracked"].dtype == np.int64
  assert state_dict["rpn_head.rpn_reg.weight"].shape == (12, 32, 1, 1)
  assert state_dict["roi_head.bbox_head.shared_fcs.0.weight"].shape == (64, 32 * 7 * 7)
  assert state_dict["roi_head.bbox_head.fc_cls.weight"].shape == (4, 64)
  assert state_dict["roi_head.mask_head.upsample.weight"].shape == (32, 32, 2, 2)
  assert state_dict["backbone.interactions.3.extra_extractors.0.ffn.dwconv.dwconv.weight"].shape == (12, 1, 3, 3)
  source = tmp_path / "mask_rcnn.pth"
  torch.save({"state_dict": {name: torch.from_numpy(np.array(v)) for name, v in state_dict.items()}}, source)
  workdir = str(tmp_path / "converted")
  assert convert.main(["--from-pytorch", str(source), "--out", workdir]) == 0
  saved = checkpoint_lib.read_weights(workdir)
  assert saved.is_detector and saved.model_config.num_classes == 3 and saved.model_config.adapter == config.adapter
  for ours, back in ((params, saved.params), (model_state, saved.model_state)):
    ours, back = params_lib.flatten(ours), params_lib.flatten(back)
    assert sorted(ours) == sorted(back)
    assert all(np.array_equal(np.asarray(ours[name]), back[name]) for name in ours)
  out = tmp_path / "back.pth"
  assert convert.main(["--to-pytorch", workdir, "--out", str(out)]) == 0
  written = torch.load(out, weights_only=True)["model"]
  assert sorted(written) == sorted(state_dict)
  assert all(np.array_equal(written[name].numpy(), state_dict[name]) for name in state_dict)
  # A tensor missing from the checkpoint is named by its official name.
  del state_dict["roi_head.mask_head.conv_logits.bias"]
  with pytest.raises(ValueError, match="roi_head.mask_head.conv_logits.bias"):
    mmdet.import_detector(state_dict, saved.model_config, source="test")
