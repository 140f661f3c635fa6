"""The detector's box ops against torchvision's own code: RoIAlign (`aligned=True`, sampling ratio 2
and adaptive), the box coder (`models.detection._utils.BoxCoder`) and IoU (`ops.box_iou`).

torchvision 0.28.0 installs from PyPI, but its compiled ops (`torchvision._C`) link the CUDA build of
PyTorch and do not load next to the CPU build the tests use, and `import torchvision` then fails.
So its Python modules are loaded without the package's `__init__` (which registers the compiled ops):
`ops/roi_align.py`'s `_roi_align`, the pure-PyTorch RoIAlign torchvision itself runs where its
kernels are missing (it lacks the kernels' zero rule outside the feature map: see `inside_boxes`),
`ops/boxes.py`'s `box_iou` and the detection `BoxCoder` are plain PyTorch.
torchvision's NMS exists only compiled: tests/test_det_nms.py checks ours against a transcription
of its rule.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from shufflemamba_jax.models.detection import boxes as boxes_lib
from shufflemamba_jax.models.detection.roi_align import roi_align

torch = pytest.importorskip("torch")
if importlib.util.find_spec("torchvision") is None:
  pytest.skip("torchvision is not installed (.ci/run installs it)", allow_module_level=True)

from test_det_roi_align import STRIDE, random_boxes, special_boxes  # noqa: E402


@contextlib.contextmanager
def torchvision_modules(*names: str):
  """torchvision's Python modules `names` (e.g. "ops.roi_align"), imported under a bare package
  object, sys.modules put back afterwards."""
  origin = importlib.util.find_spec("torchvision").origin
  saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torchvision"}
  package = types.ModuleType("torchvision")
  package.__path__ = [os.path.dirname(origin)]
  sys.modules["torchvision"] = package
  try:
    yield [importlib.import_module(f"torchvision.{name}") for name in names]
  finally:
    for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    sys.modules.update(saved)


def inside_boxes(rng, height: int, width: int) -> np.ndarray:
  """special_boxes and random boxes whose every sample lies within [-1, H] x [-1, W] feature pixels.

  Outside that band torchvision's compiled kernel (and mmcv's, and ours, tests/test_det_roi_align.py)
  counts a sample as 0, while its Python `_roi_align` clamps it onto the border: the two torchvision
  implementations differ there, so only the band where they agree is compared here.
  """
  ih, iw = height * STRIDE, width * STRIDE
  margin = 0.5 * STRIDE  # aligned: pixel x is feature x / STRIDE - 0.5, which is -1 at x = -STRIDE / 2.
  special = special_boxes(height, width)
  keep = np.all((special >= -margin) & (special <= np.array([iw, ih, iw, ih]) + margin), axis=1)
  assert keep.sum() == 6  # Whole image, two corners, tiny, zero-size and inverted boxes.
  # Partly outside the image, inside the band: samples between -1 and 0 read the border row / column.
  band = np.array([[-1.5, -1.1, 6.0, 5.0], [iw - 5.0, ih - 7.0, iw + 1.7, ih + 1.3]])
  random = np.clip(random_boxes(rng, 20, height, width), 0, [iw, ih, iw, ih])
  return np.concatenate([special[keep], band, random])


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_equals_torchvision(sampling_ratio):
  """float32 to 1e-5 of the largest value at 1/STRIDE scale, 7x7 and 14x14: corners and edges of the
  image, tiny, zero-size, inverted and random boxes."""
  rng = np.random.default_rng(sampling_ratio)
  height, width = 11, 9
  features = rng.normal(size=(2, height, width, 5)).astype(np.float32)
  boxes = np.stack([inside_boxes(rng, height, width), inside_boxes(rng, height, width)[::-1]]).astype(np.float32)
  rois = np.concatenate([np.repeat(np.arange(2), boxes.shape[1])[:, None], boxes.reshape(-1, 4)], 1)
  with torchvision_modules("ops.roi_align") as (module,):
    for size in (7, 14):
      expected = module._roi_align(
        torch.tensor(features).permute(0, 3, 1, 2), torch.tensor(rois), 1.0 / STRIDE, size, size, sampling_ratio, True
      )
      expected = expected.permute(0, 2, 3, 1).reshape(2, boxes.shape[1], size, size, -1).numpy()
      ours = roi_align(
        jnp.asarray(features), jnp.asarray(boxes), size, spatial_scale=1.0 / STRIDE, sampling_ratio=sampling_ratio
      )
      np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_box_coder_and_iou_equal_torchvision():
  """mmdet's delta coder with stds s is torchvision's BoxCoder with weights 1/s (both clamp dw, dh
  at log(1000 / 16) from above); IoU as `box_iou`."""
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (64, 2))
  proposals = np.concatenate([xy, xy + rng.uniform(1, 60, (64, 2))], 1).astype(np.float32)
  xy = xy + rng.normal(0, 8, (64, 2))
  gt = np.concatenate([xy, xy + rng.uniform(1, 60, (64, 2))], 1).astype(np.float32)
  deltas = rng.normal(0, 1, (64, 4)).astype(np.float32)
  # Past the upper clamp. mmdet also clamps dw, dh from below at -log(1000 / 16), torchvision does
  # not: there ours follows mmdet (the official detector's coder, tests/test_det_boxes.py).
  deltas[:4, 2:] = [[6.0, -2.0], [-3.0, 5.0], [4.2, 0.0], [0.0, 4.3]]
  with torchvision_modules("models.detection._utils", "ops.boxes") as (utils, ops_boxes):
    for stds in ((1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)):
      coder = utils.BoxCoder(tuple(1.0 / s for s in stds))
      expected = coder.encode_single(torch.tensor(gt), torch.tensor(proposals)).numpy()
      ours = boxes_lib.encode_deltas(jnp.asarray(proposals), jnp.asarray(gt), stds=stds)
      np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
      expected = coder.decode_single(torch.tensor(deltas), torch.tensor(proposals)).numpy()
      ours = boxes_lib.decode_deltas(jnp.asarray(proposals), jnp.asarray(deltas), stds=stds)
      np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-3)
    expected = ops_boxes.box_iou(torch.tensor(proposals), torch.tensor(gt)).numpy()
    np.testing.assert_allclose(
      np.asarray(boxes_lib.box_iou(jnp.asarray(proposals), jnp.asarray(gt))), expected, atol=1e-6
    )
