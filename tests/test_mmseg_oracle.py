"""mmsegmentation 1.2.2 itself as the oracle: its UPerHead and FCNHead against ours through the
weight mapping of weights/mmseg.py (both directions), its IoUMetric against our areas and
metrics, and its CrossEntropyLoss (through a head's loss_by_feat) against our loss.

mmseg is imported despite two mismatches with the pure-Python mmcv-lite that pip installs
(`import_mmseg`); without mmseg, mmcv or torch the module is skipped.
"""

import contextlib
import importlib
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax.data import IGNORE_INDEX
from shufflemamba_jax.models import upernet, variants
from shufflemamba_jax.training.tasks import segmentation
from shufflemamba_jax.weights import mmseg as mmseg_weights
from shufflemamba_jax.weights import params as params_lib
from shufflemamba_jax.weights import pytorch

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402

mmcv = pytest.importorskip("mmcv", reason="mmcv-lite (pip install -r requirements.txt) is the oracle's dependency")

# mmseg 1.2.2 asserts MMCV_MIN <= mmcv < MMCV_MAX = 2.2.0 in its __init__, but the only mmcv
# installable from pip without compiling is mmcv-lite 2.2.0; the heads, metric and loss use
# nothing of mmcv that changed in 2.2.0 (ConvModule, build_norm_layer, the registries).
ACCEPTED_MMCV = "2.1.0"
# Compiled ops that mmseg imports unguarded at module level; mmcv-lite has none. The tests call
# none of them.
UNGUARDED_OPS = ("point_sample", "sigmoid_focal_loss")


def _missing_compiled_ops() -> types.ModuleType:
  """A stand-in `mmcv.ops`: the unguarded names fail when called; any other name raises
  ModuleNotFoundError as mmcv-lite's own `mmcv.ops` does, which mmseg's guarded imports catch."""
  ops = types.ModuleType("mmcv.ops")

  def absent(name):
    def call(*args, **kwargs):
      raise NotImplementedError(f"mmcv.ops.{name} needs mmcv's compiled ops, which mmcv-lite lacks")

    return call

  for name in UNGUARDED_OPS:
    setattr(ops, name, absent(name))

  def module_getattr(name):
    if name.startswith("__"):
      raise AttributeError(name)
    raise ModuleNotFoundError(f"mmcv.ops.{name} needs mmcv's compiled ops, which mmcv-lite lacks")

  ops.__getattr__ = module_getattr
  return ops


@contextlib.contextmanager
def _mmseg_compatible_mmcv():
  """While mmseg imports: an accepted mmcv.__version__ and, without compiled ops, a stand-in
  mmcv.ops; both undone afterwards (mmseg's modules keep what they imported)."""
  from packaging.version import Version  # pylint: disable=g-import-not-at-top

  real_version = mmcv.__version__
  stand_in = None
  try:
    importlib.import_module("mmcv.ops")
  except ImportError:
    stand_in = sys.modules["mmcv.ops"] = _missing_compiled_ops()
  if Version(real_version) >= Version("2.2.0"):
    mmcv.__version__ = ACCEPTED_MMCV
  try:
    yield
  finally:
    mmcv.__version__ = real_version
    if stand_in is not None and sys.modules.get("mmcv.ops") is stand_in:
      del sys.modules["mmcv.ops"]


def import_mmseg() -> types.SimpleNamespace:
  """mmseg's UPerHead, FCNHead, IoUMetric and SegDataSample, and mmengine's PixelData; skips
  this module with the import error when mmseg cannot be imported."""
  try:
    with _mmseg_compatible_mmcv(), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # mmcv-lite's "install mmcv for MultiScaleDeformableAttention".
      import mmseg  # noqa: F401  # pylint: disable=g-import-not-at-top
      from mmengine.structures import PixelData  # pylint: disable=g-import-not-at-top
      from mmseg.evaluation import IoUMetric  # pylint: disable=g-import-not-at-top
      from mmseg.models.decode_heads import FCNHead, UPerHead  # pylint: disable=g-import-not-at-top
      from mmseg.structures import SegDataSample  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    pytest.skip(f"mmsegmentation cannot be imported: {error!r}", allow_module_level=True)
  if mmseg.__version__ != "1.2.2":
    pytest.skip(f"the oracle is mmsegmentation 1.2.2, not {mmseg.__version__}", allow_module_level=True)
  return types.SimpleNamespace(
    UPerHead=UPerHead, FCNHead=FCNHead, IoUMetric=IoUMetric, SegDataSample=SegDataSample, PixelData=PixelData
  )


MMSEG = import_mmseg()
pytestmark = pytest.mark.filterwarnings(
  "ignore:``build_loss`` would be deprecated:UserWarning",  # mmseg's heads build their losses so.
  "ignore:Default ``avg_non_ignore`` is False:UserWarning",
)

IN_CHANNELS, CHANNELS, AUX_CHANNELS, NUM_CLASSES = 32, 16, 24, 7
POOL_SCALES = (1, 2, 3, 6)
BATCH_NORM = dict(type="BN", requires_grad=True)
# Four maps (height, width): the official neck-free layout (all at 1/16), non-square, and a
# pyramid with sizes that do not divide, which exercises every FPN resize and a PPM bin count
# (6) above the last map's size.
LEVEL_SIZES = {"square": [(8, 8)] * 4, "non_square": [(6, 10)] * 4, "pyramid": [(16, 20), (8, 10), (4, 5), (2, 3)]}


def mmseg_heads(*, pool_scales=POOL_SCALES, **fcn_settings):
  """mmseg's UPerHead and FCNHead as in the UperNet configs (BN, dropout 0.1, aux in_index=3)."""
  decode_head = MMSEG.UPerHead(
    in_channels=[IN_CHANNELS] * 4,
    in_index=[0, 1, 2, 3],
    pool_scales=pool_scales,
    channels=CHANNELS,
    dropout_ratio=0.1,
    num_classes=NUM_CLASSES,
    norm_cfg=BATCH_NORM,
    align_corners=False,
  )
  aux_head = MMSEG.FCNHead(
    **{
      **dict(
        in_channels=IN_CHANNELS,
        in_index=3,
        channels=AUX_CHANNELS,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=NUM_CLASSES,
        norm_cfg=BATCH_NORM,
        align_corners=False,
      ),
      **fcn_settings,
    }
  )
  return decode_head, aux_head


def randomize(head, seed: int):
  """Random weights of unit-scale activations, random affine BatchNorms and random running
  statistics (positive variances), so that no parameter can go unnoticed; float64, eval mode."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, value in head.named_parameters():
      if value.ndim == 4:
        value.copy_(torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5)
      elif name.endswith("bn.weight"):
        value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
      else:
        value.copy_(torch.randn(value.shape, generator=generator) * 0.5)
    for name, value in head.named_buffers():
      if name.endswith("running_mean"):
        value.copy_(torch.randn(value.shape, generator=generator) * 0.5)
      elif name.endswith("running_var"):
        value.copy_(torch.rand(value.shape, generator=generator) * 1.5 + 0.5)
  return head.double().eval()


def state_dict_of(decode_head, aux_head) -> dict[str, np.ndarray]:
  """The heads' entries of an EncoderDecoder's state dict, as numpy arrays."""
  return {
    f"{prefix}.{name}": value.numpy()
    for prefix, head in (("decode_head", decode_head), ("auxiliary_head", aux_head))
    for name, value in head.state_dict().items()
  }


def load_into_mmseg(state_dict, decode_head, aux_head):
  for prefix, head in (("decode_head.", decode_head), ("auxiliary_head.", aux_head)):
    head.load_state_dict(
      {name[len(prefix) :]: torch.from_numpy(v) for name, v in state_dict.items() if name.startswith(prefix)},
      strict=True,
    )
  return decode_head.double().eval(), aux_head.double().eval()


def tiny_config(pool_scales=POOL_SCALES) -> upernet.UperNetConfig:
  backbone = variants.model_config("shufflemamba_tiny", embed_dim=IN_CHANNELS, depth=4, img_size=64, remat=False)
  return upernet.UperNetConfig(
    backbone=backbone, num_classes=NUM_CLASSES, channels=CHANNELS, aux_channels=AUX_CHANNELS, pool_scales=pool_scales
  )


def abstract_heads(config) -> dict[str, nnx.Module]:
  """Our heads, {our prefix: module}, with ShapeDtypeStruct parameters and state."""
  return {
    "decode_head": nnx.eval_shape(lambda: upernet.UperHead(config, rngs=nnx.Rngs(0))),
    "aux_head": nnx.eval_shape(lambda: upernet.FCNHead(config, rngs=nnx.Rngs(0))),
  }


def our_heads(config, params, model_state) -> dict[str, nnx.Module]:
  """Our heads holding the flat (parameters, model state) named as in a UperNet, each part
  filled strictly (`params.fill`: nothing missing, unused or mis-shaped)."""
  heads = abstract_heads(config)
  for prefix, head in heads.items():
    for selector, flat in ((nnx.Param, params), (nnx.Not(nnx.Param), model_state)):
      part = {name[len(prefix) + 1 :]: v for name, v in flat.items() if name.startswith(prefix + ".")}
      state = nnx.state(head, selector)
      filled = params_lib.fill(nnx.to_pure_dict(state), part, source=prefix)
      nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, filled))
      nnx.update(head, state)
  return heads


def random_levels(sizes, seed: int) -> list[np.ndarray]:
  """Four float64 feature maps (2, IN_CHANNELS, h, w), NCHW as mmseg takes them."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((2, IN_CHANNELS, *size)) for size in sizes]


def assert_same_logits(mmseg_pair, ours, levels):
  """mmseg's `head.forward(inputs)` (float64; no final resize) against our float32 heads."""
  decode_head, aux_head = mmseg_pair
  with torch.no_grad():
    inputs = [torch.from_numpy(x) for x in levels]
    expected = [decode_head.forward(inputs).numpy(), aux_head.forward(inputs).numpy()]
  nhwc = [jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32) for x in levels]
  actual = [ours["decode_head"](nhwc, train=False, key=None), ours["aux_head"](nhwc[3], train=False, key=None)]
  for got, want in zip(actual, expected):
    got = np.asarray(got).transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- heads and their weights --------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LEVEL_SIZES))
def test_mmseg_heads_converted_give_mmseg_logits(layout):
  pair = tuple(randomize(head, seed) for seed, head in enumerate(mmseg_heads()))
  params, model_state = mmseg_weights.heads_from_mmseg(state_dict_of(*pair), pool_scales=POOL_SCALES)
  ours = our_heads(tiny_config(), params, model_state)
  assert_same_logits(pair, ours, random_levels(LEVEL_SIZES[layout], seed=3))


def random_our_weights(config, seed: int) -> tuple[dict, dict]:
  """Random flat (parameters, model state) for our heads; variances positive."""
  rng = np.random.default_rng(seed)
  params, model_state = {}, {}
  for prefix, head in abstract_heads(config).items():
    for flat, selector in ((params, nnx.Param), (model_state, nnx.Not(nnx.Param))):
      for name, leaf in params_lib.flatten(nnx.to_pure_dict(nnx.state(head, selector))).items():
        if name.endswith(".var"):
          value = rng.uniform(0.5, 2.0, leaf.shape)
        elif name.endswith("kernel"):
          value = rng.standard_normal(leaf.shape) * (2.0 / np.prod(leaf.shape[:-1])) ** 0.5
        else:
          value = rng.standard_normal(leaf.shape) * 0.5 + (name.endswith(".scale"))
        flat[f"{prefix}.{name}"] = value.astype(leaf.dtype)
  return params, model_state


def test_our_heads_exported_load_strictly_into_mmseg_and_give_the_same_logits():
  config = tiny_config()
  params, model_state = random_our_weights(config, seed=5)
  state_dict = mmseg_weights.heads_to_mmseg(params, model_state, pool_scales=config.pool_scales)
  assert all(state_dict[n] == 0 and state_dict[n].dtype == np.int64 for n in state_dict if "num_batches" in n)
  pair = load_into_mmseg(state_dict, *mmseg_heads())
  assert_same_logits(pair, our_heads(config, params, model_state), random_levels(LEVEL_SIZES["pyramid"], seed=6))


def test_the_mapping_round_trips_both_ways():
  config = tiny_config()
  params, model_state = random_our_weights(config, seed=7)
  back = mmseg_weights.heads_from_mmseg(mmseg_weights.heads_to_mmseg(params, model_state))
  for original, returned in zip((params, model_state), back):
    assert sorted(returned) == sorted(original)
    for name, value in original.items():
      assert returned[name].dtype == value.dtype
      np.testing.assert_array_equal(returned[name], value)
  state_dict = state_dict_of(*mmseg_heads())
  again = mmseg_weights.heads_to_mmseg(*mmseg_weights.heads_from_mmseg(state_dict))
  assert list(again) == list(state_dict)  # mmseg's own order, num_batches_tracked included.
  for name, value in state_dict.items():
    np.testing.assert_array_equal(again[name], value)


def test_other_pool_scales_follow_their_order():
  """The PSP modules are indexed in pool_scales order, which the bottleneck's input follows."""
  scales = (6, 1, 3)
  pair = tuple(randomize(head, seed) for seed, head in enumerate(mmseg_heads(pool_scales=scales), start=11))
  params, model_state = mmseg_weights.heads_from_mmseg(state_dict_of(*pair), pool_scales=scales)
  assert {"decode_head.pool6.conv.kernel", "decode_head.pool1.conv.kernel"} <= set(params)
  ours = our_heads(tiny_config(scales), params, model_state)
  assert_same_logits(pair, ours, random_levels(LEVEL_SIZES["non_square"], seed=12))


def test_sizes_are_read_from_the_shapes():
  sizes = mmseg_weights.head_sizes(state_dict_of(*mmseg_heads()))
  assert sizes == mmseg_weights.HeadSizes(
    num_classes=NUM_CLASSES,
    in_channels=IN_CHANNELS,
    channels=CHANNELS,
    num_pool_scales=len(POOL_SCALES),
    aux_channels=AUX_CHANNELS,
  )


def test_other_keys_are_the_callers():
  state_dict = state_dict_of(*mmseg_heads())
  backbone = {"backbone.patch_embed.proj.weight": np.zeros((IN_CHANNELS, 3, 16, 16), np.float32)}
  params, model_state = mmseg_weights.heads_from_mmseg({**backbone, **state_dict})
  assert all(name.startswith(("decode_head.", "aux_head.")) for name in [*params, *model_state])
  heads, rest = mmseg_weights.split_heads({**backbone, **state_dict})
  assert list(heads) == list(state_dict) and list(rest) == list(backbone)
  exported = mmseg_weights.heads_to_mmseg({**params, "backbone.patch_embed.kernel": np.zeros(1)}, model_state)
  assert list(exported) == list(state_dict)


def test_another_head_kind_is_an_error_naming_the_key():
  concat_input = state_dict_of(*mmseg_heads(concat_input=True))
  with pytest.raises(ValueError, match=r"auxiliary_head\.conv_cat\.conv\.weight"):
    mmseg_weights.heads_from_mmseg(concat_input)
  with pytest.raises(ValueError, match=r"decode_head\.psp_modules\.3\.1\.conv\.weight"):
    mmseg_weights.heads_from_mmseg(state_dict_of(*mmseg_heads()), pool_scales=(1, 2, 3))
  params, model_state = random_our_weights(tiny_config(), seed=0)
  with pytest.raises(ValueError, match=r"decode_head\.pool6\.conv\.kernel"):
    mmseg_weights.heads_to_mmseg(params, model_state, pool_scales=(1, 2, 3, 4))
  with pytest.raises(ValueError, match=r"norm\.(mean|var): found in the parameters"):
    mmseg_weights.heads_to_mmseg({**params, **model_state}, {})


def test_a_missing_tensor_is_reported_by_its_mmseg_name():
  state_dict = state_dict_of(*mmseg_heads())
  del state_dict["decode_head.fpn_convs.1.bn.weight"]
  params, _ = mmseg_weights.heads_from_mmseg(state_dict)
  head = abstract_heads(tiny_config())["decode_head"]
  part = {name.removeprefix("decode_head."): v for name, v in params.items() if name.startswith("decode_head.")}
  describe = lambda name, shape: mmseg_weights.describe_mmseg("decode_head." + name, shape)
  with pytest.raises(ValueError, match=r"missing from the checkpoint: decode_head\.fpn_convs\.1\.bn\.weight \(16,\)"):
    params_lib.fill(nnx.to_pure_dict(nnx.state(head, nnx.Param)), part, source="mmseg", describe=describe)


# ---- metric --------------------------------------------------------------------------------


def random_segmentations(seed: int):
  """(prediction, label) pairs of different sizes for NUM_CLASSES = 7; ~20% ignored pixels;
  class 3 never occurs and class 5 is only predicted, never labelled."""
  rng = np.random.default_rng(seed)
  pairs = []
  for size in ((9, 11), (5, 7), (12, 4), (16, 16)):
    labels = rng.choice([0, 1, 2, 4, 6], size)
    predictions = np.where(rng.random(size) < 0.6, labels, rng.choice([0, 1, 2, 4, 5, 6], size))
    labels[rng.random(size) < 0.2] = IGNORE_INDEX
    pairs.append((predictions, labels))
  return pairs


def mmseg_iou_metric(pairs, num_classes: int):
  metric = MMSEG.IoUMetric(iou_metrics=["mIoU"], ignore_index=IGNORE_INDEX)
  metric.dataset_meta = dict(classes=[f"class{c}" for c in range(num_classes)])
  for predictions, labels in pairs:
    sample = dict(
      pred_sem_seg=dict(data=torch.from_numpy(predictions)[None]), gt_sem_seg=dict(data=torch.from_numpy(labels)[None])
    )
    metric.process({}, [sample])
  return metric


def our_totals(pairs, num_classes: int) -> dict[str, np.ndarray]:
  """Our per-image areas (batches of one), summed over the images."""
  areas = [
    segmentation.intersect_and_union(jnp.asarray(p[None]), jnp.asarray(label[None]), num_classes) for p, label in pairs
  ]
  return {name: np.sum([np.asarray(a[name], np.int64) for a in areas], axis=0) for name in segmentation.AREAS}


def test_areas_and_metrics_equal_mmseg_iou_metric():
  num_classes = NUM_CLASSES
  pairs = random_segmentations(0)
  metric = mmseg_iou_metric(pairs, num_classes)
  totals = our_totals(pairs, num_classes)
  mmseg_totals = [np.sum([r[i].numpy() for r in metric.results], axis=0) for i in range(4)]
  for name, value in zip(segmentation.AREAS, mmseg_totals):
    np.testing.assert_array_equal(totals[name], value, err_msg=name)
  ours = segmentation.segmentation_metrics(totals)
  # Unrounded: mmseg divides float32 areas.
  theirs = MMSEG.IoUMetric.total_area_to_metrics(*(torch.from_numpy(t.astype(np.float32)) for t in mmseg_totals))
  assert np.isnan(theirs["IoU"][3]) and np.isnan(theirs["Acc"][5]) and not np.isnan(theirs["IoU"][5])
  np.testing.assert_allclose(list(ours["IoU"].values()), theirs["IoU"], rtol=1e-6)
  np.testing.assert_allclose(list(ours["Acc"].values()), theirs["Acc"], rtol=1e-6)
  np.testing.assert_allclose(ours["aAcc"], theirs["aAcc"], rtol=1e-6)
  np.testing.assert_allclose(ours["mIoU"], np.nanmean(theirs["IoU"]), rtol=1e-6)
  np.testing.assert_allclose(ours["mAcc"], np.nanmean(theirs["Acc"]), rtol=1e-6)
  # The summary mmseg logs: percentages to 2 decimals.
  summary = metric.evaluate(len(pairs))
  assert sorted(summary) == ["aAcc", "mAcc", "mIoU"]
  for name, value in summary.items():
    np.testing.assert_allclose(value, round(100 * ours[name], 2), atol=1e-4, err_msg=name)


def test_labels_outside_the_classes_still_count_their_predictions_as_in_mmseg():
  """mmseg masks only `ignore_index`: a pixel labelled outside [0, num_classes) adds its
  prediction to area_pred_label (and the union) but no label area; ours does the same."""
  num_classes = NUM_CLASSES
  pairs = random_segmentations(1)
  for _, labels in pairs:
    labels[labels == 2] = num_classes + 3  # Class 2 relabelled as an unknown class.
  metric = mmseg_iou_metric(pairs, num_classes)
  mmseg_totals = dict(zip(segmentation.AREAS, (np.sum([r[i].numpy() for r in metric.results], 0) for i in range(4))))
  totals = our_totals(pairs, num_classes)
  assert totals["area_label"][2] == 0 and totals["area_pred_label"][2] > 0
  for name in segmentation.AREAS:
    np.testing.assert_array_equal(totals[name], mmseg_totals[name], err_msg=name)


# ---- loss ----------------------------------------------------------------------------------


def mmseg_loss(logits: np.ndarray, labels: np.ndarray, **loss_settings) -> float:
  """mmseg's decode-head loss (`loss_by_feat`): logits (N, K, h, w) resized (bilinear) to the
  labels (N, H, W), then CrossEntropyLoss(use_sigmoid=False, **loss_settings), ignore_index 255."""
  head = MMSEG.FCNHead(
    in_channels=4,
    channels=4,
    num_convs=1,
    concat_input=False,
    num_classes=logits.shape[1],
    norm_cfg=BATCH_NORM,
    align_corners=False,
    loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, **loss_settings),
  )
  samples = [MMSEG.SegDataSample(gt_sem_seg=MMSEG.PixelData(data=torch.from_numpy(label)[None])) for label in labels]
  return head.loss_by_feat(torch.from_numpy(logits), samples)["loss_ce"].item()


def random_logits_and_labels(seed: int, ignored: float):
  """Logits (2, K, 7, 9) and labels (2, 20, 24): upsampled by a ratio that is not an integer."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((2, NUM_CLASSES, 7, 9)).astype(np.float32) * 3
  labels = rng.integers(0, NUM_CLASSES, (2, 20, 24))
  labels[rng.random(labels.shape) < ignored] = IGNORE_INDEX
  return logits, labels


def our_loss(logits, labels, **settings) -> float:
  return float(segmentation.cross_entropy(jnp.asarray(logits.transpose(0, 2, 3, 1)), jnp.asarray(labels), **settings))


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_equals_mmseg_loss_by_feat(avg_non_ignore):
  logits, labels = random_logits_and_labels(4, ignored=0.25)
  expected = mmseg_loss(logits, labels, avg_non_ignore=avg_non_ignore)
  np.testing.assert_allclose(our_loss(logits, labels, avg_non_ignore=avg_non_ignore), expected, rtol=1e-5)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_class_weighted_cross_entropy_divides_by_the_summed_weights_as_mmseg_1x(avg_non_ignore):
  """With class_weight, mmseg 1.x divides the weighted sum by the labels' summed weights
  (PyTorch's weighted mean). Labels without ignored pixels: with any, mmseg 1.2.2 indexes
  class_weight by 255 and raises IndexError (open-mmlab/mmsegmentation#3734); ours then sums the
  counted pixels' weights."""
  class_weight = [0.5, 1.0, 2.0, 0.1, 1.5, 3.0, 0.7]
  logits, labels = random_logits_and_labels(5, ignored=0.0)
  expected = mmseg_loss(logits, labels, class_weight=class_weight, avg_non_ignore=avg_non_ignore)
  ours = our_loss(logits, labels, class_weight=class_weight, avg_non_ignore=avg_non_ignore)
  np.testing.assert_allclose(ours, expected, rtol=1e-5)


# ---- the whole segmenter: reference backbone + mmseg heads, converted checkpoints ----------

SEG_OUT_INDICES, SEG_POS_GRID = (0, 1, 2, 3), (3, 3)  # A 3x3 pretraining table, resized to each grid.


def reference_segmenter_state_dict(seed: int) -> dict[str, np.ndarray]:
  """A random reference segmenter in the official names, float32 as official files are:
  `backbone.*` of Backbone_VideoMamba (LayerNorm, patch tokens only) and mmseg's heads."""
  backbone = variants.model_config(
    "shufflemamba_tiny", embed_dim=IN_CHANNELS, depth=4, d_state=8, img_size=64, norm="layernorm", remat=False
  )
  config = upernet.UperNetConfig(backbone=backbone, num_classes=NUM_CLASSES, pos_embed_size=48)
  model = upernet.UperNet(config, rngs=nnx.Rngs(seed))
  flat = params_lib.flatten(nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param)))
  rng = np.random.default_rng(seed)
  for name in flat:  # Non-trivial norms: LayerNorm scales and biases both matter.
    if name.split(".")[0].startswith("norm") or ".norm." in name:
      flat[name] = flat[name] + rng.normal(scale=0.2, size=flat[name].shape).astype(np.float32)
  state_dict = {f"backbone.{n}": v for n, v in pytorch.export_state_dict(params_lib.unflatten(flat)).items()}
  heads = state_dict_of(*(randomize(head, seed + i) for i, head in enumerate(mmseg_heads())))
  state_dict.update({n: v.astype(np.float32) if v.dtype == np.float64 else v for n, v in heads.items()})
  return state_dict


def reference_encode_decode(state_dict, images: np.ndarray) -> np.ndarray:
  """mmseg's EncoderDecoder.encode_decode of the reference (neck=None), float64: the backbone
  (tests/torch_reference.py), UPerHead, logits resized to the input. NCHW in and out."""
  backbone = {n[len("backbone.") :]: v for n, v in state_dict.items() if n.startswith("backbone.")}
  decode_head, aux_head = load_into_mmseg(
    {n: v.astype(np.float64) if v.dtype == np.float32 else v for n, v in state_dict.items()}, *mmseg_heads()
  )
  with torch.no_grad():
    maps = torch_reference.segmentation_backbone(backbone, images, SEG_OUT_INDICES, SEG_POS_GRID)
    logits = decode_head.forward(maps)
    return torch.nn.functional.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False).numpy()


def reference_slide_inference(state_dict, images: np.ndarray, crop, stride) -> np.ndarray:
  """mmseg 1.2.2's EncoderDecoder.slide_inference, line by line (NCHW, float64)."""
  (h_stride, w_stride), (h_crop, w_crop) = stride, crop
  batch, _, h_img, w_img = images.shape
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = np.zeros((batch, NUM_CLASSES, h_img, w_img))
  count = np.zeros((batch, 1, h_img, w_img))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      preds[:, :, y1:y2, x1:x2] += reference_encode_decode(state_dict, images[:, :, y1:y2, x1:x2])
      count[:, :, y1:y2, x1:x2] += 1
  assert (count > 0).all()
  return preds / count


def convert(*args: str) -> None:
  from shufflemamba_jax import convert as convert_command  # pylint: disable=g-import-not-at-top

  assert convert_command.main(list(args)) == 0


def test_a_converted_reference_segmenter_gives_the_reference_logits_and_converts_back(tmp_path):
  """The official checkpoint layout in (`convert --from-pytorch` of an mmseg .pth), our whole-image
  and sliding-window logits equal to the reference backbone + mmseg heads (windows placed by
  mmseg's loop: clamped to the image, smaller for a side under the crop, sides that are not
  multiples of the patch), and `--to-pytorch` gives the same tensors back."""
  from shufflemamba_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top

  state_dict = reference_segmenter_state_dict(seed=21)
  source = tmp_path / "upernet.pth"
  torch.save({"meta": {}, "state_dict": {n: torch.from_numpy(np.array(v)) for n, v in state_dict.items()}}, source)
  convert("--from-pytorch", str(source), "--out", str(tmp_path / "workdir"), "--set", "img_size=64")
  saved = checkpoint.read_weights(str(tmp_path / "workdir"))
  assert saved.is_segmenter and saved.run_config["seg"]["eval_stride"] == [341, 341]
  config = saved.model_config
  assert (config.backbone.embed_dim, config.backbone.depth, config.backbone.norm) == (IN_CHANNELS, 4, "layernorm")
  assert (config.num_classes, config.channels, config.aux_channels, config.pos_grid) == (
    NUM_CLASSES,
    CHANNELS,
    AUX_CHANNELS,
    SEG_POS_GRID,
  )
  model = saved.model()
  rng = np.random.default_rng(22)
  whole = rng.standard_normal((2, 3, 64, 80))
  ours = jax.jit(lambda x: upernet.segment_logits(model, x))(jnp.asarray(whole.transpose(0, 2, 3, 1), jnp.float32))
  expected = reference_encode_decode(state_dict, whole)
  np.testing.assert_allclose(
    np.asarray(ours).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4 * abs(expected).max()
  )
  crop, stride = (48, 48), (32, 32)
  for size in ((80, 56), (40, 100)):  # 40 rows: one window of 40 (2 patches and 8 floored pixels).
    image = rng.standard_normal((1, 3, *size))
    slid = jax.jit(
      lambda x: upernet.slide_inference(
        lambda crops: upernet.segment_logits(model, crops), x, crop_size=crop, stride=stride, num_classes=NUM_CLASSES
      )
    )(jnp.asarray(image.transpose(0, 2, 3, 1), jnp.float32))
    expected = reference_slide_inference(state_dict, image, crop, stride)
    np.testing.assert_allclose(
      np.asarray(slid).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4 * abs(expected).max(), err_msg=str(size)
    )
  convert("--to-pytorch", str(tmp_path / "workdir"), "--out", str(tmp_path / "back.pth"))
  back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
  assert list(back) == list(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(back[name].numpy(), value, err_msg=name)


def test_a_segmenter_checkpoint_names_what_does_not_fit():
  state_dict = reference_segmenter_state_dict(seed=23)
  with pytest.raises(ValueError, match=r"--set embed_dim=64 contradicts the checkpoint's tensors, which give 32"):
    mmseg_weights.segmenter_config(state_dict, {"embed_dim": 64})
  with pytest.raises(ValueError, match=r"--set colour: not a setting"):
    mmseg_weights.segmenter_config(state_dict, {"colour": 1})
  with pytest.raises(ValueError, match=r"4 pooling branches"):
    mmseg_weights.segmenter_config(state_dict, {"pool_scales": (1, 2)})
  config = mmseg_weights.segmenter_config(state_dict, {"img_size": 64})
  broken = dict(state_dict)
  broken["backbone.layers.2.mixer.x_proj.weight"] = broken["backbone.layers.2.mixer.x_proj.weight"][:, :-1]
  shapes = r"backbone\.layers\.2\.mixer\.x_proj\.weight: \(18, 63\) in the checkpoint, \(18, 64\) in the model"
  with pytest.raises(ValueError, match=shapes):
    mmseg_weights.import_segmenter(broken, config, source="upernet.pth")
  params, _ = mmseg_weights.import_segmenter(state_dict, config, source="upernet.pth")
  with pytest.raises(ValueError, match=r"decode_head\.fpn_bottleneck\.bn\.running_var"):
    mmseg_weights.import_segmenter(
      {n: v for n, v in state_dict.items() if n != "decode_head.fpn_bottleneck.bn.running_var"}, config, source="x"
    )
  assert params_lib.flatten(params)["backbone.pos_embed"].shape == (9, IN_CHANNELS)
