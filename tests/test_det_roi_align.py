"""RoIAlign and the multi-level RoI extractor against float64 PyTorch transcriptions of the RoIAlign
kernels of torchvision / mmcv and of mmdet's SingleRoIExtractor (tests/torch_reference.py): values,
gradients, boxes on and past the borders, adaptive sampling and its `max_samples` clamp, bf16, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models.detection.roi_align import map_roi_levels, multi_level_roi_align, roi_align

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402

STRIDE = 4
# Jitted once per configuration: eager, each jnp op would compile on its own (a test took 20 s).
align = jax.jit(
  roi_align,
  static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned", "max_samples", "split_weights"),
)


def special_boxes(height: int, width: int) -> np.ndarray:
  """(R, 4) image-pixel boxes of a (height, width) map at STRIDE: borders, outside, tiny and huge.

  No sample falls exactly on the -1 or H (W) edge of the kernels' zero rule: there one rounding of
  the position decides, which differs between kernels (the CUDA one contracts to FMAs) and compilers.
  """
  ih, iw = height * STRIDE, width * STRIDE
  return np.array(
    [
      [0.0, 0.0, iw, ih],  # the whole image
      [0.0, 0.0, 9.0, 7.0],  # top-left corner
      [iw - 9.0, ih - 6.0, iw, ih],  # bottom-right corner
      [-12.2, 3.0, 10.0, 20.0],  # partly left of the image
      [iw - 10.0, ih - 8.0, iw + 14.1, ih + 9.3],  # partly past the bottom-right
      [-40.0, -30.0, -20.0, -10.0],  # wholly outside, beyond the -1 margin
      [-3.0, -2.0, -1.0, 3.0],  # wholly left of the image, partly inside the -1 feature-pixel margin
      [iw + 1.0, 2.0, iw + 5.0, 12.0],  # right of the image, inside the margin
      [10.3, 11.1, 11.0, 11.9],  # tiny, under a feature pixel
      [7.0, 5.0, 7.0, 5.0],  # zero size
      [20.0, 15.0, 12.0, 11.0],  # inverted (negative size)
      [-30.3, -25.7, iw + 30.6, ih + 20.2],  # larger than the image on both axes
    ]
  )


def random_boxes(rng, count: int, height: int, width: int) -> np.ndarray:
  ih, iw = height * STRIDE, width * STRIDE
  xy = rng.uniform([-0.2 * iw, -0.2 * ih], [0.9 * iw, 0.9 * ih], size=(count, 2))
  wh = rng.uniform(0.5, [0.8 * iw, 0.8 * ih], size=(count, 2))
  return np.concatenate([xy, xy + wh], -1)


def oracle(features, boxes, output_size, spatial_scale, sampling_ratio, aligned=True, grad_of=None):
  """torch_reference.roi_align on NHWC features and (N, R, 4) boxes: NHWC result (and feature gradient)."""
  n, r = boxes.shape[:2]
  feats = torch.tensor(np.asarray(features, np.float64)).permute(0, 3, 1, 2).requires_grad_(grad_of is not None)
  rois = np.concatenate([np.repeat(np.arange(n), r)[:, None], np.asarray(boxes, np.float64).reshape(-1, 4)], 1)
  out = torch_reference.roi_align(feats, torch.tensor(rois), output_size, spatial_scale, sampling_ratio, aligned)
  out = out.permute(0, 2, 3, 1).reshape(n, r, *output_size, -1)
  if grad_of is None:
    return out.numpy()
  (out * torch.tensor(np.asarray(grad_of, np.float64))).sum().backward()
  return out.detach().numpy(), feats.grad.permute(0, 2, 3, 1).numpy()


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


# Two non-square maps, taller and wider, so that both contraction orders of the products run.
@pytest.mark.parametrize("shape", [(9, 13), (11, 6)])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_the_kernels(shape, sampling_ratio, aligned):
  height, width = shape
  rng = np.random.default_rng(height + sampling_ratio + aligned)
  features = rng.normal(size=(2, height, width, 3))
  boxes = np.stack([special_boxes(height, width), random_boxes(rng, 12, height, width)]).astype(np.float32)
  output_size = (3, 4)
  # Enough slots for every box here (the largest spans 80 image pixels more than the map): no clamp.
  kwargs = dict(spatial_scale=1 / STRIDE, sampling_ratio=sampling_ratio, aligned=aligned, max_samples=12)
  expected = oracle(features, boxes, output_size, 1 / STRIDE, sampling_ratio, aligned)
  assert np.abs(expected[0, 5]).max() == 0.0 and np.abs(expected[0, 6]).max() > 0.0  # the -1 margin matters
  with jax.enable_x64(True):
    exact = align(jnp.asarray(features), jnp.asarray(boxes), output_size, **kwargs)
    assert exact.dtype == jnp.float64
  # Measured: 4e-16 in float64, 8e-7 in float32.
  assert relative_error(exact, expected) < 1e-13
  single = align(jnp.asarray(features[1], jnp.float32), jnp.asarray(boxes[1], jnp.float32), output_size, **kwargs)
  batched = align(jnp.asarray(features, jnp.float32), jnp.asarray(boxes, jnp.float32), output_size, **kwargs)
  assert single.shape == (12, 3, 4, 3) and batched.dtype == jnp.float32
  assert relative_error(batched, expected) < 1e-5
  np.testing.assert_allclose(single, batched[1], rtol=0, atol=1e-6)  # two compilations: rounding only


def test_roi_align_hand_computed():
  """A 2x2 bin grid of one sample each on a ramp: the samples sit on exact pixel positions."""
  ramp = np.arange(5 * 6, dtype=np.float32).reshape(1, 5, 6, 1)  # value 6 * y + x
  # aligned: x in [0.5, 4.5] - 0.5 -> [0, 4]; bins of 2 pixels, samples at x = 1 and 3 (y likewise).
  box = jnp.array([[[0.5, 0.5, 4.5, 4.5]]])
  out = align(jnp.asarray(ramp), box, 2, spatial_scale=1.0, sampling_ratio=1)
  np.testing.assert_allclose(out[0, 0, :, :, 0], [[7.0, 9.0], [19.0, 21.0]])
  # Adaptive: 2 samples per bin and axis at 0.5, 1.5 and 2.5, 3.5: bin averages at 1 and 3 as well.
  out = align(jnp.asarray(ramp), box, 2, spatial_scale=1.0, sampling_ratio=0)
  np.testing.assert_allclose(out[0, 0, :, :, 0], [[7.0, 9.0], [19.0, 21.0]])
  # A sample at y = -0.8 (inside the -1 margin) reads row 0; one at y = -1.2 reads nothing.
  out = align(jnp.asarray(ramp), jnp.array([[[2.5, -0.3, 2.5, -0.3]]]), 1, spatial_scale=1.0, sampling_ratio=1)
  assert float(out[0, 0, 0, 0, 0]) == 2.0
  out = align(jnp.asarray(ramp), jnp.array([[[2.5, -0.7, 2.5, -0.7]]]), 1, spatial_scale=1.0, sampling_ratio=1)
  assert float(out[0, 0, 0, 0, 0]) == 0.0
  # At the last row and past it (y = 4.3 <= H) the last row is read.
  out = align(jnp.asarray(ramp), jnp.array([[[2.5, 4.8, 2.5, 4.8]]]), 1, spatial_scale=1.0, sampling_ratio=1)
  assert float(out[0, 0, 0, 0, 0]) == 26.0


def test_adaptive_count_of_exact_multiples():
  """A RoI of exactly k * out feature pixels gets k samples per bin, although XLA compiles roi / out as
  roi * (1 / out): 14 * float32(1 / 7) rounds above 2, whose ceil would be 3."""
  rng = np.random.default_rng(2)
  features = rng.normal(size=(1, 20, 24, 2))
  # Sizes 56, 28, 84 and 112 image pixels: 14, 7, 21 and 28 on the map, 2, 1, 3 and 4 times 7.
  boxes = np.array([[[8.0, 8.0, 64.0, 36.0], [8.0, 4.0, 92.0, 60.0], [0.0, 0.0, 112.0, 28.0]]], np.float32)
  out = align(jnp.asarray(features, jnp.float32), jnp.asarray(boxes), 7, spatial_scale=0.25, sampling_ratio=0)
  # Measured 1.3e-6; 0.11 with jnp.ceil(roi / 7).
  assert relative_error(out, oracle(features, boxes, (7, 7), 0.25, 0)) < 1e-5


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_gradient(sampling_ratio):
  height, width = 7, 10
  rng = np.random.default_rng(5)
  features = rng.normal(size=(2, height, width, 2))
  boxes = np.stack([special_boxes(height, width)[:8], random_boxes(rng, 8, height, width)]).astype(np.float32)
  cotangent = rng.normal(size=(2, 8, 2, 3, 2))
  kwargs = dict(spatial_scale=1 / STRIDE, sampling_ratio=sampling_ratio, max_samples=12)
  _, expected = oracle(features, boxes, (2, 3), 1 / STRIDE, sampling_ratio, grad_of=cotangent)

  def loss(f, b):
    return jnp.sum(align(f, b, (2, 3), **kwargs) * cotangent.astype(f.dtype))

  with jax.enable_x64(True):
    grad, box_grad = jax.grad(loss, argnums=(0, 1))(jnp.asarray(features), jnp.asarray(boxes))
  assert relative_error(grad, expected) < 1e-13  # measured 2e-16
  assert np.all(np.asarray(box_grad) == 0.0)  # boxes get no gradient, as in the kernels
  grad32 = jax.grad(loss)(jnp.asarray(features, jnp.float32), jnp.asarray(boxes, jnp.float32))
  assert relative_error(grad32, expected) < 1e-5  # measured 3e-7


def test_max_samples_clamp_on_huge_boxes():
  """Past `max_samples` an axis is sampled with `max_samples` even points: exact within the map by
  default, and the measured error of boxes past the map and of fewer slots than a box needs."""
  height = width = 16
  rng = np.random.default_rng(7)
  # Smooth features (blurred noise, closer to FPN maps) and white noise (the worst case).
  noise = rng.normal(size=(1, height + 4, width + 4, 2))
  smooth = sum(noise[:, i : i + height, j : j + width] for i in range(5) for j in range(5)) / 25
  ih, iw = height * STRIDE, width * STRIDE
  boxes = np.array([[[0.0, 0.0, iw, ih], [-ih, -iw, 2 * iw, 2 * ih], [-0.5 * iw, 0.0, 1.5 * iw, ih]]])
  # Measured (max error / max value): 3x box, 2x-wide box with the default 3 slots; whole image with 2.
  bounds = {"smooth": (0.1, 0.06, 0.04), "white": (0.8, 0.25, 0.2)}  # measured 0.072 0.044 0.030; 0.73 0.19 0.15
  for name, features in (("smooth", smooth), ("white", noise[:, :height, :width])):
    exact = oracle(features, boxes, (7, 7), 1 / STRIDE, 0)
    features, box32 = jnp.asarray(features, jnp.float32), jnp.asarray(boxes, jnp.float32)
    clamped = align(features, box32, output_size=7, spatial_scale=0.25, sampling_ratio=0)
    # The whole-image box needs ceil(16 / 7) = 3 = the default slots: exact.
    assert relative_error(clamped[0, 0], exact[0, 0]) < 1e-5
    # 3x the map on both axes needs 7 samples per axis and gets 3: the oracle's sampling_ratio 3.
    fixed = oracle(np.asarray(features), boxes[:, 1:2], (7, 7), 1 / STRIDE, 3)
    assert relative_error(clamped[0, 1], fixed[0, 0]) < 1e-5
    fewer = align(features, box32, output_size=7, spatial_scale=0.25, sampling_ratio=0, max_samples=2)
    errors = [relative_error(clamped[0, 1], exact[0, 1]), relative_error(clamped[0, 2], exact[0, 2])]
    errors.append(relative_error(fewer[0, 0], exact[0, 0]))
    print(f"max_samples clamp, {name} features, 3x box, 2x-wide box, whole image with 2 slots: {errors}")
    assert all(1e-3 < e < bound for e, bound in zip(errors, bounds[name], strict=True))
    # Slots enough for the largest box (7) make all exact again.
    wide = align(features, box32, output_size=7, spatial_scale=0.25, sampling_ratio=0, max_samples=7)
    assert relative_error(wide, exact) < 1e-5


def test_map_roi_levels_matches_mmdet():
  scales = np.array([1.0, 55.0, 111.9, 112.0, 112.1, 223.9, 224.0, 447.9, 448.0, 448.1, 900.0, 2000.0])
  rng = np.random.default_rng(3)
  aspect = rng.uniform(0.2, 5.0, size=scales.shape)
  w, h = scales * np.sqrt(aspect), scales / np.sqrt(aspect)
  x1, y1 = rng.uniform(0, 100, size=(2, scales.size))
  boxes = np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)
  rois = torch.tensor(np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], 1))
  for levels in (4, 3, 1):
    expected = torch_reference.map_roi_levels(rois, levels).numpy()
    np.testing.assert_array_equal(map_roi_levels(jnp.asarray(boxes), levels), expected)
  # Exact powers of two sit on the upper level: 112 is level 1 (the 1e-6 protects against log2 rounding).
  square = jnp.array([[0.0, 0.0, 112.0, 112.0], [0.0, 0.0, 111.0, 112.0], [0.0, 0.0, 448.0, 448.0]])
  np.testing.assert_array_equal(map_roi_levels(square, 4), [1, 0, 3])
  assert map_roi_levels(square[None], 4).shape == (1, 3)


@pytest.mark.parametrize("output_size", [7, 14])
def test_multi_level_matches_single_roi_extractor(output_size):
  """mmdet's SingleRoIExtractor (strides 4-32, finest_scale 56, RoIAlign sampling 0, aligned)."""
  image_h, image_w, strides = 480, 512, (4, 8, 16, 32)
  rng = np.random.default_rng(output_size)
  feats = [rng.normal(size=(2, image_h // s, image_w // s, 2)) for s in strides]
  # Scales on both sides of the level bounds 112, 224 and 448, in the image.
  scales = np.array([20.0, 60.0, 111.0, 113.0, 210.0, 230.0, 300.0, 440.0, 450.0, 470.0])
  aspect = rng.uniform(0.7, 1.4, size=(2, scales.size))
  w, h = np.minimum(scales * np.sqrt(aspect), image_w), np.minimum(scales / np.sqrt(aspect), image_h)
  x1, y1 = rng.uniform(size=w.shape) * (image_w - w), rng.uniform(size=h.shape) * (image_h - h)
  boxes = np.stack([x1, y1, x1 + w, y1 + h], -1)
  boxes[0, :3] = [[0.0, 0.0, 500.0, 9.0], [-4.0, 200.0, 30.0, 480.0], [0.0, 0.0, image_w, image_h]]
  boxes = boxes.astype(np.float32)  # the same boxes for float32 and float64
  rois = np.concatenate([np.repeat([0, 1], scales.size)[:, None], boxes.reshape(-1, 4)], 1)
  levels = torch_reference.map_roi_levels(torch.tensor(rois), 4).numpy()
  assert np.all(np.bincount(levels, minlength=4) >= 3), levels
  cotangent = rng.normal(size=(2, scales.size, output_size, output_size, 2))
  torch_feats = [torch.tensor(f).permute(0, 3, 1, 2).requires_grad_() for f in feats]
  expected = torch_reference.single_roi_extractor(torch_feats, torch.tensor(rois), (output_size,) * 2, strides)
  (expected * torch.tensor(cotangent).reshape(-1, output_size, output_size, 2).permute(0, 3, 1, 2)).sum().backward()
  expected = expected.detach().permute(0, 2, 3, 1).reshape(cotangent.shape).numpy()
  grads = [f.grad.permute(0, 2, 3, 1).numpy() for f in torch_feats]

  @jax.jit
  def extract(levels_, boxes_, valid=None):
    return multi_level_roi_align(levels_, boxes_, output_size, strides, 0, valid=valid)

  # float64: the semantics (measured 1.3e-14 values and gradients). float32: 7e-6 values, 1.3e-5 gradients
  # (at out 14): positions of up to 128 feature pixels carry 4e-6 pixel rounding, on white-noise maps.
  for dtype, bound, grad_bound in ((jnp.float64, 1e-13, 1e-13), (jnp.float32, 1e-5, 3e-5)):
    with jax.enable_x64(dtype == jnp.float64):
      out, vjp = jax.vjp(extract, [jnp.asarray(f, dtype) for f in feats], jnp.asarray(boxes, dtype))
      jax_grads, _ = vjp(jnp.asarray(cotangent, dtype))
    assert out.shape == cotangent.shape and out.dtype == dtype
    assert relative_error(out, expected) < bound
    for grad, want in zip(jax_grads, grads, strict=True):
      assert relative_error(grad, want) < grad_bound
  valid = np.ones((2, scales.size), bool)
  valid[1, 3:7] = False
  boxes32 = jnp.asarray(boxes, jnp.float32)
  masked = extract([jnp.asarray(f, jnp.float32) for f in feats], boxes32, jnp.asarray(valid))
  assert np.all(np.asarray(masked)[~valid] == 0.0)
  np.testing.assert_array_equal(np.asarray(masked)[valid], np.asarray(out)[valid])


def test_bf16_features():
  height, width = 12, 10
  rng = np.random.default_rng(11)
  features = rng.normal(size=(1, height, width, 8))
  boxes = np.stack([random_boxes(rng, 16, height, width)]).astype(np.float32)
  cotangent = rng.normal(size=(1, 16, 7, 7, 8))
  rounded = np.asarray(jnp.asarray(features, jnp.bfloat16).astype(jnp.float32), np.float64)
  expected, expected_grad = oracle(rounded, boxes, (7, 7), 1 / STRIDE, 0, grad_of=cotangent)
  kwargs = dict(output_size=7, spatial_scale=0.25, sampling_ratio=0, max_samples=4)
  bf16 = jnp.asarray(features, jnp.bfloat16)
  out, vjp = jax.vjp(lambda f: align(f, jnp.asarray(boxes), **kwargs), bf16)
  (grad,) = vjp(jnp.asarray(cotangent, jnp.bfloat16))
  assert out.dtype == grad.dtype == jnp.bfloat16
  # Within the output's own bf16 rounding (2^-9 relative) of the exact pooling of the bf16 features:
  # the weights' high/low split keeps them exact to ~2^-17.
  error = np.abs(np.asarray(out, np.float64) - expected)
  assert np.all(error <= 2.0**-8 * np.abs(expected) + 1e-6)
  assert relative_error(out, oracle(features, boxes, (7, 7), 1 / STRIDE, 0)) < 1e-2  # measured 5.5e-3
  assert relative_error(grad, expected_grad) < 1e-2  # measured 4.1e-3
  # One pass with the weights rounded to bf16 adds their rounding: measured mean relative errors 1.0e-3
  # (the output's bf16 rounding alone) and 2.4e-3.
  single = align(bf16, jnp.asarray(boxes), split_weights=False, **kwargs)
  split_error, single_error = (
    np.mean(np.abs(np.asarray(o, np.float64) - expected) / (np.abs(expected) + 0.01)) for o in (out, single)
  )
  assert split_error < 1.5e-3 and 1.6 * split_error < single_error < 5e-3, (split_error, single_error)


def test_jit_compiles_once_for_new_boxes():
  op = jax.jit(functools.partial(roi_align, output_size=(2, 2), spatial_scale=0.5, sampling_ratio=0))
  features = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 8, 2)), jnp.float32)
  first = op(features, jnp.array([[[0.0, 0.0, 16.0, 12.0]]]))
  second = op(features, jnp.array([[[1.0, 2.0, 5.0, 4.0]]]))
  assert op._cache_size() == 1
  expected = oracle(np.asarray(features), np.array([[[0.0, 0.0, 16.0, 12.0]]]), (2, 2), 0.5, 0)
  assert relative_error(first, expected) < 1e-5
  assert not np.allclose(first, second)
  multi = jax.jit(functools.partial(multi_level_roi_align, output_size=2, strides=(2, 4)))
  levels = [features, features[:, ::2, ::2]]
  multi(levels, jnp.array([[[0.0, 0.0, 16.0, 12.0]]]))
  multi(levels, jnp.array([[[0.0, 0.0, 200.0, 200.0]]]))
  assert multi._cache_size() == 1


def test_bad_arguments_are_named():
  features, boxes = jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 3, 4))
  with pytest.raises(ValueError, match="features"):
    roi_align(features[0, 0], boxes, 2, spatial_scale=1.0, sampling_ratio=0)
  with pytest.raises(ValueError, match="boxes"):
    roi_align(features, jnp.zeros((2, 3, 4)), 2, spatial_scale=1.0, sampling_ratio=0)
  with pytest.raises(SettingError, match="output_size"):
    roi_align(features, boxes, 0, spatial_scale=1.0, sampling_ratio=0)
  with pytest.raises(SettingError, match="spatial_scale"):
    roi_align(features, boxes, 2, spatial_scale=0.0, sampling_ratio=0)
  with pytest.raises(SettingError, match="max_samples"):
    roi_align(features, boxes, 2, spatial_scale=1.0, sampling_ratio=0, max_samples=0)
  with pytest.raises(SettingError, match="strides"):
    multi_level_roi_align([features, features], boxes, 2, strides=(4,))
  with pytest.raises(ValueError, match="valid"):
    multi_level_roi_align([features], boxes, 2, strides=(4,), valid=jnp.ones((1, 2), bool))
