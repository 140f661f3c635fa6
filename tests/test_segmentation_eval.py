"""Segmentation evaluation as mmsegmentation 1.2.2 does it, against transcriptions of its code:
window placement (EncoderDecoder.slide_inference), the merge of window logits and the resize to
the original size (postprocess_result; torch's bilinear interpolate is the oracle), mmcv's
keep-ratio sizes (Resize with scale or scale_factor), SegTTAModel's averaged softmax, and the
whole evaluation of a tiny segmenter on an ADE20K split of several image sizes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models import tokens, upernet
from shufflemamba_jax.training import steps
from shufflemamba_jax.training.tasks import segmentation

from data_fixtures import write_ade20k_zip
from digits_runs import ROOT, config_with

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
F = torch.nn.functional

NUM_CLASSES = 5


def mmseg_windows(h_img, w_img, crop, stride):
  """EncoderDecoder.slide_inference's loop, transcribed: [(y1, y2, x1, x2)]."""
  (h_crop, w_crop), (h_stride, w_stride) = crop, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  boxes = []
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      boxes.append((y1, y2, x1, x2))
  return boxes


@pytest.mark.parametrize(
  "size", [(512, 683), (683, 512), (400, 1000), (512, 512), (300, 300), (512, 2048), (853, 1366)]
)
def test_window_boxes_are_mmseg_slide_windows(size):
  window, starts = upernet.window_boxes(size, (512, 512), (341, 341))
  boxes = [(top, top + window[0], left, left + window[1]) for top, left in starts]
  assert boxes == mmseg_windows(*size, (512, 512), (341, 341))
  assert upernet.window_boxes(size, None, None) == (size, [(0, 0)])


def test_window_boxes_match_mmseg_on_random_sizes_and_strides():
  rng = np.random.default_rng(0)
  for _ in range(300):
    size = tuple(int(x) for x in rng.integers(1, 200, 2))
    crop = tuple(int(x) for x in rng.integers(1, 100, 2))
    stride = tuple(int(rng.integers(1, c + 1)) for c in crop)
    window, starts = upernet.window_boxes(size, crop, stride)
    assert [(t, t + window[0], left, left + window[1]) for t, left in starts] == mmseg_windows(*size, crop, stride)


def mmcv_keep_ratio_size(height, width, scale):
  """mmcv.image.rescale_size((w, h), scale tuple) -> (new h, new w), transcribed."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def mmcv_ratio_size(height, width, ratio):
  """mmcv Resize(scale_factor=ratio, keep_ratio=True): _scale_size((w, h), ratio), then imrescale."""
  scale = (int(width * float(ratio) + 0.5), int(height * float(ratio) + 0.5))
  return mmcv_keep_ratio_size(height, width, scale)


def test_eval_sizes_are_mmcv_sizes():
  from shufflemamba_jax.data import segment_augment

  rng = np.random.default_rng(1)
  sizes = [(512, 683), (683, 512), (375, 500), (100, 1000), (2000, 30), (1, 1)]
  sizes += [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(200)]
  for height, width in sizes:
    got = [int(x) for x in segment_augment.keep_ratio_size(height, width, (2048, 512))]
    assert tuple(got) == mmcv_keep_ratio_size(height, width, (2048, 512)), (height, width)
    for ratio in segmentation.TTA_RATIOS:
      got = [int(x) for x in segment_augment.ratio_size(height, width, ratio)]
      assert tuple(got) == mmcv_ratio_size(height, width, ratio), (height, width, ratio)


# ---- A stub model: logits on a floored 4x coarser grid, resized to the window (as segment_logits).

WEIGHTS = np.random.default_rng(2).normal(size=(3, NUM_CLASSES)).astype(np.float32) / 40.0


def coarse_numpy(windows):
  """(n, h, w, 3) uint8 -> (n, h // 4, w // 4, C): 4x4 means (the rest of a side dropped, as a
  patch convolution floors) through a linear map, plus a position term so windows differ."""
  n, h, w, _ = windows.shape
  grid = windows[:, : h // 4 * 4, : w // 4 * 4].astype(np.float32).reshape(n, h // 4, 4, w // 4, 4, 3).mean((2, 4))
  rows = np.arange(h // 4, dtype=np.float32)[None, :, None, None] / 3.0
  return grid @ WEIGHTS + rows


def stub_window_fn(windows):
  n, h, w, _ = windows.shape
  grid = windows[:, : h // 4 * 4, : w // 4 * 4].astype(jnp.float32).reshape(n, h // 4, 4, w // 4, 4, 3).mean((2, 4))
  rows = jnp.arange(h // 4, dtype=jnp.float32)[None, :, None, None] / 3.0
  return tokens.resize_bilinear(grid @ jnp.asarray(WEIGHTS) + rows, (h, w))


def torch_resize(logits, size):
  return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def mmseg_inference(coarse_fn, image, original, crop, stride, flip=False):
  """One view (h, w, 3) uint8 -> logits (C, *original), mmseg's way: slide (or whole with crop
  None) with encode_decode's resize to each crop, then postprocess_result (flip back, resize)."""
  h_img, w_img = image.shape[:2]
  if flip:
    image = image[:, ::-1]

  def encode_decode(crop_img):
    coarse = torch.from_numpy(np.array(coarse_fn(np.ascontiguousarray(crop_img)[None]))).permute(0, 3, 1, 2)
    return torch_resize(coarse, crop_img.shape[:2])

  if crop is None:
    seg_logits = encode_decode(image)
  else:
    preds, count_mat = 0.0, torch.zeros((1, 1, h_img, w_img))
    for y1, y2, x1, x2 in mmseg_windows(h_img, w_img, crop, stride):
      crop_seg_logit = encode_decode(image[y1:y2, x1:x2])
      preds = preds + torch.zeros((1, crop_seg_logit.shape[1], h_img, w_img))  # The first window: zeros.
      preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
      count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    seg_logits = preds / count_mat
  if flip:
    seg_logits = seg_logits.flip(dims=(3,))
  return torch_resize(seg_logits, original)[0]


@pytest.mark.parametrize(
  "size, original, crop, stride",
  [
    ((37, 83), (50, 111), (32, 32), (21, 21)),  # Windows of 32 and clamped last windows.
    ((20, 70), (19, 64), (32, 32), (21, 21)),  # A side under the crop: 20-row windows.
    ((45, 30), (90, 60), None, None),  # Whole mode.
  ],
)
def test_slide_inference_and_resize_to_the_original_size_are_mmseg(size, original, crop, stride):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
  segmenter = segmentation.ImageSegmenter(jax.jit(stub_window_fn), NUM_CLASSES, crop_size=crop, stride=stride)
  scores = np.asarray(segmenter.scores([images], original))
  assert scores.shape == (2, *original, NUM_CLASSES)
  for index, image in enumerate(images):
    expected = mmseg_inference(coarse_numpy, image, original, crop, stride).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(scores[index], expected, rtol=1e-5, atol=1e-5)


def test_tta_averages_the_softmax_of_every_ratio_and_flip_as_seg_tta_model():
  from shufflemamba_jax.data import segment_augment

  rng = np.random.default_rng(4)
  original = (30, 45)
  image = rng.integers(0, 256, (*original, 3), dtype=np.uint8)
  views = segment_augment.eval_views(tf.constant(image), (2048, 512), segmentation.TTA_RATIOS)
  views = [view.numpy() for view in views]
  assert [v.shape[:2] for v in views] == [mmcv_ratio_size(*original, r) for r in segmentation.TTA_RATIOS]
  crop, stride = (24, 24), (16, 16)
  segmenter = segmentation.ImageSegmenter(jax.jit(stub_window_fn), NUM_CLASSES, crop_size=crop, stride=stride, tta=True)
  scores = np.asarray(segmenter.scores([view[None] for view in views], original))[0]
  # SegTTAModel.merge_preds: the views in TestTimeAug's order (ratio outer, flip inner), each
  # seg_logits (already flipped back and resized) softmaxed over classes, summed, divided.
  logits = torch.zeros((NUM_CLASSES, *original))
  for view in views:
    for flip in (False, True):
      logits += mmseg_inference(coarse_numpy, view, original, crop, stride, flip=flip).softmax(dim=0)
  logits /= 2 * len(views)
  np.testing.assert_allclose(scores, logits.permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-6)
  assert not np.allclose(scores, np.asarray(segmenter.scores([views[2][None]], original))[0])


def test_tta_must_be_a_bool_named_in_the_error():
  config = config_with(os.path.join(ROOT, "configs", "digits_seg.py"), None, {})
  assert segmentation.SegmentationTask.from_config(config).tta_ratios is None
  config.seg.tta = True
  assert segmentation.SegmentationTask.from_config(config).tta_ratios == segmentation.TTA_RATIOS
  with pytest.raises(TypeError, match="tta"):  # ml_collections keeps a locked bool a bool...
    config.seg.tta = "yes"
  with config.ignore_type():  # ...but a config built otherwise (e.g. a dict) may hold anything.
    config.seg.tta = "yes"
  with pytest.raises(SettingError, match=r"config\.seg\.tta='yes'"):
    segmentation.SegmentationTask.from_config(config)


# ---- The whole evaluation: a tiny segmenter on an ADE20K split of several sizes. -------------

# (height, width) of the originals; at eval_scale (96, 48) they become (48, 72), (72, 48), (24, 96),
# (48, 48) and (48, 72) again: multiples of 8 (2 x patch size) for this backbone.
VALIDATION_SIZES = [(32, 48), (48, 32), (20, 80), (40, 40), (32, 48)]
EVAL = {"seg_aug.eval_scale": (96, 48), "seg.eval_crop": (32, 32), "seg.eval_stride": (16, 16), "mesh.fsdp": 2}


@pytest.fixture(scope="module")
def ade20k_dir(tmp_path_factory):
  from shufflemamba_jax.data import pipeline

  root = tmp_path_factory.mktemp("ade20k_eval")
  labels = write_ade20k_zip(str(root / "manual"), seed=5, validation_sizes=VALIDATION_SIZES)
  pipeline.prepare("ade20k", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"), compute_stats=False)
  return str(root / "tfds"), labels


def _ade20k_config(data_dir, **overrides):
  config = config_with(os.path.join(ROOT, "configs", "digits_seg.py"), data_dir, {**EVAL, **overrides})
  config.dataset = "ade20k"
  return config


def _oracle_areas(model, transform, data_dir, crop, stride):
  """Per image, mmseg's inference with the model's coarse logits per window (one at a time), its
  prediction at the original size, and IoUMetric's areas against the original label map."""
  import tensorflow_datasets as tfds

  from shufflemamba_jax.data import pipeline, segment_augment

  coarse = jax.jit(lambda x: model(transform(x)))
  totals = {name: np.zeros(150, np.int64) for name in segmentation.AREAS}
  builder = pipeline.get_builder("ade20k", data_dir)
  for example in tfds.as_numpy(builder.as_dataset(split="validation")):
    image, label = example["image"], example["label"][..., 0]
    size = mmcv_keep_ratio_size(*image.shape[:2], (96, 48))
    view = segment_augment.resize_pair(tf.constant(image), None, size)[0].numpy()  # Our pixel resampler.
    logits = mmseg_inference(lambda w: np.asarray(coarse(w)), view, label.shape, crop, stride)
    prediction = logits.argmax(dim=0).numpy()
    areas = segmentation.intersect_and_union(prediction[None], label[None], 150)
    for name in segmentation.AREAS:
      totals[name] += np.asarray(areas[name], np.int64)
  return totals


@pytest.mark.parametrize("windows", ["slide", pytest.param("whole", marks=pytest.mark.slow)])  # whole: ~70 s
def test_evaluation_of_a_split_of_several_sizes_is_mmseg(ade20k_dir, windows):
  from shufflemamba_jax.parallel import sharding
  from shufflemamba_jax.training import trainer

  data_dir, _ = ade20k_dir
  overrides = {} if windows == "slide" else {"seg.eval_crop": None, "seg.eval_stride": None}
  config = _ade20k_config(data_dir, **overrides)
  settings = trainer.Settings.from_config(config)
  model = upernet.create_segmenter(settings.task.model_config(150), rngs=nnx.Rngs(0))
  # A trained-looking classifier: the fresh one's 0.01-scale logits would make argmax ties likely.
  kernel = model.decode_head.classifier.kernel
  kernel[...] = kernel[...] * 100.0
  graphdef, params, rest = steps.split_model(model)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  params = jax.device_put(params, sharding.state_shardings(params, mesh, 0))
  totals_fn = settings.task.evaluation(config, graphdef, rest, 150, settings.input_transform, mesh)
  totals = totals_fn(params, nnx.to_pure_dict(rest))
  assert int(totals["num_examples"]) == len(VALIDATION_SIZES)
  crop, stride = (None, None) if windows == "whole" else ((32, 32), (16, 16))
  expected = _oracle_areas(model, settings.input_transform, data_dir, crop, stride)
  assert expected["area_label"].sum() > 0
  for name in segmentation.AREAS:
    np.testing.assert_array_equal(totals[name], expected[name], err_msg=name)
  if windows == "whole":
    return  # Its model compiles once per image size: batching is checked in slide mode.
  # Evaluated one image at a time: the same areas.
  one_by_one = settings.task.evaluation(
    _ade20k_config(data_dir, eval_batch_size=1, **overrides), graphdef, rest, 150, settings.input_transform, mesh
  )(params, nnx.to_pure_dict(rest))
  for name in segmentation.AREAS:
    np.testing.assert_array_equal(one_by_one[name], totals[name], err_msg=name)


def test_segmentation_eval_stream_keeps_original_labels(ade20k_dir):
  from shufflemamba_jax.data import pipeline

  data_dir, labels = ade20k_dir
  stream = pipeline.create_segmentation_eval_dataset(
    dataset="ade20k", data_dir=data_dir, seg_aug={"eval_scale": (96, 48)}
  )
  examples = list(stream.as_numpy_iterator())
  assert sorted(e["label"].shape for e in examples) == sorted(VALIDATION_SIZES)
  for example in examples:
    (view,) = example["views"]
    assert view.shape[:2] == mmcv_keep_ratio_size(*example["label"].shape, (96, 48)) and view.dtype == np.uint8
    assert example["mask"] == 1.0
  with_tta = pipeline.create_segmentation_eval_dataset(
    dataset="ade20k", data_dir=data_dir, ratios=segmentation.TTA_RATIOS, process_index=1, process_count=2
  )
  shares = list(with_tta.as_numpy_iterator())
  assert len(shares) == 2  # Process 1 of 2: the second share of the five examples.
  for example in shares:
    shape = example["label"].shape
    assert [v.shape[:2] for v in example["views"]] == [mmcv_ratio_size(*shape, r) for r in segmentation.TTA_RATIOS]
  with pytest.raises(ValueError, match="create_segmentation_eval_dataset"):
    pipeline.create_eval_dataset(dataset="ade20k", data_dir=data_dir, global_batch_size=2)
