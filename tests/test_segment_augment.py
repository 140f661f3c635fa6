"""The segmentation augmentation: sizes, padding, the crop's class cap, and images and labels
moved together."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from shufflemamba_jax.data import IGNORE_INDEX, segment_augment
from shufflemamba_jax.models import SettingError


def banded_pair(height: int, width: int, classes=(3, 7, 9, 12)):
  """A label map of vertical bands and an image whose gray level is 10 x the band's class."""
  bands = np.asarray(classes)[np.arange(width) * len(classes) // width]
  label = np.broadcast_to(bands, (height, width)).astype(np.uint8)
  image = np.repeat((label * 10).astype(np.uint8)[..., None], 3, axis=-1)
  return tf.constant(image), tf.constant(label)


def test_rescale_size_keeps_the_ratio_within_the_scale():
  assert [int(x) for x in segment_augment.rescale_size(512, 683, (2048, 512))] == [512, 683]
  assert [int(x) for x in segment_augment.rescale_size(300, 400, (2048, 512))] == [512, 683]
  assert [int(x) for x in segment_augment.rescale_size(100, 1000, (2048, 512))] == [205, 2048]
  assert [int(x) for x in segment_augment.rescale_size(300, 400, (2048, 512), 0.5)] == [256, 341]


def test_train_pairs_are_crop_sized_aligned_and_padded_with_ignore():
  settings = segment_augment.SegmentationAugmentation(scale=(128, 32), crop_size=48, photometric=False)
  image, label = banded_pair(30, 40)
  flipped = 0
  for index in range(12):
    out_image, out_label = segment_augment.augment_train_pair(image, label, tf.constant([index, 5]), settings)
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_image.shape == (48, 48, 3) and out_image.dtype == np.uint8
    assert out_label.shape == (48, 48) and out_label.dtype == np.uint8
    valid = out_label != IGNORE_INDEX
    assert set(np.unique(out_label[valid])) <= {3, 7, 9, 12}
    # Padding: label 255 and the mean color, only at the bottom and right.
    np.testing.assert_array_equal(out_image[~valid], np.broadcast_to(settings.fill_color, out_image[~valid].shape))
    assert valid[0, 0]
    # Image and label moved together: away from band edges the gray is 10 x the class.
    # (Bilinear and nearest resizes may place a band edge a pixel apart, and the crop edge may
    # cut next to one: compare 2 pixels inside both.)
    padded = np.pad(out_label.astype(int), ((0, 0), (2, 2)), constant_values=-1)
    interior = valid & np.all([padded[:, 2 + d : 2 + d + 48] == out_label for d in (-2, -1, 1, 2)], axis=0)
    np.testing.assert_allclose(out_image[..., 0][interior], out_label[interior] * 10.0, atol=1)
    columns = out_label[0][valid[0]]
    flipped += bool(columns[0] > columns[-1])
  assert 0 < flipped < 12  # Both orientations occur.


def test_crops_respect_the_class_cap_when_they_can():
  """A map that is 90% one class: a random 16x16 crop mostly sees only it; the retries find one
  where the largest class stays under 75%."""
  label = np.zeros((64, 64), np.uint8)
  label[40:56, 40:56] = 1
  label[:8, :8] = IGNORE_INDEX
  image = tf.zeros([64, 64, 3], tf.uint8)
  capped = uncapped = 0
  for index in range(20):
    seed = tf.constant([index, 1])
    _, crop = segment_augment.random_crop(image, tf.constant(label), seed, 16, cat_max_ratio=0.75)
    _, plain = segment_augment.random_crop(image, tf.constant(label), seed, 16, cat_max_ratio=1.0)
    for result, name in ((crop, "capped"), (plain, "uncapped")):
      counts = np.bincount(result.numpy().ravel(), minlength=256)[:255]
      ok = (counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum()
      if name == "capped":
        capped += ok
      else:
        uncapped += ok
  assert capped > uncapped


def test_photometric_distortion_is_seeded_and_keeps_gray_levels_in_range():
  settings = segment_augment.SegmentationAugmentation()
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 16, 3)), tf.uint8)
  first = segment_augment.photometric_distortion(image, tf.constant([1, 2]), settings)
  again = segment_augment.photometric_distortion(image, tf.constant([1, 2]), settings)
  other = segment_augment.photometric_distortion(image, tf.constant([3, 4]), settings)
  assert first.dtype == tf.uint8
  np.testing.assert_array_equal(first.numpy(), again.numpy())
  assert not np.array_equal(first.numpy(), other.numpy())


def test_eval_resize_fits_the_scale():
  image = tf.zeros([300, 400, 3], tf.uint8)
  assert segment_augment.eval_resize(image, (2048, 512)).shape == (512, 683, 3)


@pytest.mark.parametrize(
  "settings, name",
  [
    (dict(scale=(512,)), "config.seg_aug.scale"),
    (dict(ratio_range=(2.0, 0.5)), "config.seg_aug.ratio_range"),
    (dict(cat_max_ratio=1.5), "config.seg_aug.cat_max_ratio"),
    (dict(crop_size=0), "config.seg_aug.crop_size"),
    (dict(hue_delta=18.5), "config.seg_aug.hue_delta"),
  ],
)
def test_bad_settings_name_themselves(settings, name):
  with pytest.raises(SettingError) as error:
    segment_augment.SegmentationAugmentation(**settings)
  assert error.value.setting == name


# Bit-exactness against mmcv / OpenCV (the training augmentation of mmseg 1.2.2 with mmcv 2.x).


def all_colors(count: int, seed: int = 0) -> np.ndarray:
  """`count` distinct uint8 triples in random order (all 2^24 when count is 2^24)."""
  codes = np.random.default_rng(seed).permutation(1 << 24)[:count].astype(np.uint32)
  return np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8)


def planes_of(image: np.ndarray):
  return [tf.constant(image[..., c].astype(np.int32)) for c in range(3)]


@pytest.mark.parametrize("width", [2048, 16, 45])
def test_hsv_conversions_equal_opencv(width):
  """uint8 RGB -> HSV and HSV -> RGB as cv2.cvtColor: 2^20 distinct triples per layout, rows as
  wide as OpenCV's SIMD blocks (2048), all in its scalar tail (16) or mixed (45 = 32 + 13)."""
  cv2 = pytest.importorskip("cv2")
  colors = all_colors(1 << 20, seed=width)
  image = colors[: len(colors) // width * width].reshape(-1, width, 3)
  hsv = np.stack([x.numpy() for x in segment_augment.rgb_to_hsv_cv(*planes_of(image))], axis=-1)
  np.testing.assert_array_equal(hsv, cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
  np.testing.assert_array_equal(
    cv2.cvtColor(image, cv2.COLOR_RGB2HSV), cv2.cvtColor(image[..., ::-1], cv2.COLOR_BGR2HSV)
  )
  # Every uint8 triple as HSV (hue 180..255 too, which OpenCV wraps).
  rgb = np.stack([x.numpy() for x in segment_augment.hsv_to_rgb_cv(*planes_of(image))], axis=-1)
  np.testing.assert_array_equal(rgb, cv2.cvtColor(image, cv2.COLOR_HSV2RGB))
  np.testing.assert_array_equal(rgb, cv2.cvtColor(image, cv2.COLOR_HSV2BGR)[..., ::-1])


class ScriptedRandom:
  """numpy.random's randint and uniform answering given values in the order they are asked."""

  def script(self, coins, values, hue_shift):
    self.coins, self.values, self.hue_shift = iter(coins), iter(values), hue_shift

  def randint(self, low, high=None):
    return int(next(self.coins)) if high is None else self.hue_shift

  def uniform(self, low, high):
    return next(self.values)

  def done(self):
    return next(self.coins, None) is None and next(self.values, None) is None


def mmseg_photometric_distortion():
  """mmseg 1.2.2's PhotoMetricDistortion class, compiled from the installed source with a scripted
  `random` (mmseg itself cannot be imported beside mmcv-lite: no mmcv.ops), or a skip."""
  import ast
  import importlib.util
  import pathlib

  mmcv = pytest.importorskip("mmcv")
  spec = importlib.util.find_spec("mmseg")
  if spec is None:
    pytest.skip("mmsegmentation is not installed")
  path = pathlib.Path(spec.submodule_search_locations[0], "datasets", "transforms", "transforms.py")
  (node,) = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) == "PhotoMetricDistortion"]
  node.decorator_list = []
  node.bases = []
  random = ScriptedRandom()
  namespace = {"mmcv": mmcv, "np": np, "random": random, "Sequence": tuple}
  exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
  return namespace["PhotoMetricDistortion"](), random


def test_photometric_distortion_equals_mmseg_for_given_choices():
  """Every on/off combination of the four steps in both contrast positions, on BGR images as
  mmseg gets them: the TF result on the RGB image is mmseg's, channel-reversed, bit for bit."""
  transform, random = mmseg_photometric_distortion()
  rng = np.random.default_rng(0)
  signature = [tf.TensorSpec([None, None, 3], tf.uint8), {}]
  keys = ("brightness", "contrast_first", "contrast", "saturation", "hue")
  signature[1] = {k: tf.TensorSpec([], tf.bool) for k in keys}
  signature[1].update(
    beta=tf.TensorSpec([], tf.float32),
    contrast_alpha=tf.TensorSpec([], tf.float32),
    saturation_alpha=tf.TensorSpec([], tf.float32),
    hue_shift=tf.TensorSpec([], tf.int32),
  )
  apply = tf.function(segment_augment.apply_photometric, input_signature=signature)
  cases = 0
  for shape in ((40, 45), (64, 96), (9, 512 + 17)):
    for combination in range(32):
      on = dict(zip(keys, ((combination >> bit) & 1 == 1 for bit in range(5))))
      params = dict(
        on,
        beta=float(rng.choice([-32.0, 31.999, rng.uniform(-32, 32)])),
        contrast_alpha=float(rng.uniform(0.5, 1.5)),
        saturation_alpha=float(rng.choice([0.5, 1.4999, rng.uniform(0.5, 1.5)])),
        hue_shift=int(rng.choice([-18, 17, rng.integers(-18, 18)])),
      )
      # mmseg's calls, in its order: randint(2) for each step and the mode, uniform / randint
      # for each value it uses.
      coins = [on["brightness"], on["contrast_first"]]
      coins += [on["contrast"]] if on["contrast_first"] else []
      coins += [on["saturation"], on["hue"]] + ([] if on["contrast_first"] else [on["contrast"]])
      values = [params["beta"]] if on["brightness"] else []
      values += [params["contrast_alpha"]] if on["contrast"] and on["contrast_first"] else []
      values += [params["saturation_alpha"]] if on["saturation"] else []
      values += [params["contrast_alpha"]] if on["contrast"] and not on["contrast_first"] else []
      random.script(coins, values, params["hue_shift"])
      image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
      expected = transform.transform({"img": image[..., ::-1].copy()})["img"][..., ::-1]
      assert random.done()
      tensors = {k: tf.constant(v, tf.int32 if k == "hue_shift" else None) for k, v in params.items()}
      ours = apply(tf.constant(image), tensors).numpy()
      np.testing.assert_array_equal(ours, expected, err_msg=str(params))
      cases += 1
  assert cases == 96


def test_photometric_choices_have_mmseg_distributions():
  settings = segment_augment.SegmentationAugmentation()
  seeds = tf.stack([tf.range(4000), tf.fill([4000], 7)], axis=1)
  flags = ("brightness", "contrast_first", "contrast", "saturation", "hue")
  signature = {k: tf.bool for k in flags}
  signature.update(beta=tf.float32, contrast_alpha=tf.float32, saturation_alpha=tf.float32, hue_shift=tf.int32)
  draw = tf.function(
    lambda s: tf.map_fn(lambda x: segment_augment.photometric_parameters(x, settings), s, fn_output_signature=signature)
  )
  params = {k: v.numpy() for k, v in draw(seeds).items()}
  for key in flags:
    assert 0.46 < params[key].mean() < 0.54, key  # numpy's randint(2): 0 or 1 with probability 0.5.
  for key, (low, high) in (("beta", (-32, 32)), ("contrast_alpha", (0.5, 1.5)), ("saturation_alpha", (0.5, 1.5))):
    assert (
      low <= params[key].min()
      and params[key].max() < high
      and abs(params[key].mean() - (low + high) / 2) < 0.05 * (high - low)
    ), key
  # numpy's randint(-18, 18) excludes 18: every integer in [-18, 17], about equally often.
  counts = np.bincount(params["hue_shift"] + 18)
  assert len(counts) == 36 and counts.min() > 4000 / 36 / 2
  assert params["hue_shift"].dtype == np.int32
  # Different seeds, independent choices; one seed, one result.
  again = {k: v.numpy() for k, v in draw(seeds).items()}
  for key in params:
    np.testing.assert_array_equal(params[key], again[key])
  assert abs(np.corrcoef(params["brightness"], params["hue"])[0, 1]) < 0.1


def nearest_rounding_cases():
  """(source, target) lengths where floor(x * (1 / (target / source))), OpenCV's float64 index,
  differs from the exact floor(x * source / target) somewhere."""
  target = np.arange(1, 300)
  x = np.arange(300)[:, None]
  found = []
  for source in range(1, 300):
    differs = (np.floor(x * (1.0 / (target / source))) != x * source // target) & (x < target)
    found += [(source, int(t)) for t in target[differs.any(axis=0)]]
  return found


def test_label_resize_equals_cv2_nearest():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(0)
  rounding = nearest_rounding_cases()
  assert len(rounding) > 1000
  resize = tf.function(
    segment_augment.resize_nearest,
    input_signature=[tf.TensorSpec([None, None], tf.uint8), tf.TensorSpec([2], tf.int32)],
  )
  sizes = [rounding[i] + rounding[j] for i, j in rng.integers(0, len(rounding), (150, 2))]
  for _ in range(150):
    source = rng.integers(1, 700, 2)
    target = source * rng.uniform(0.25, 4.0) + 0.5 if rng.random() < 0.7 else rng.integers(1, 1400, 2)
    sizes.append((source[0], int(max(target[0], 1)), source[1], int(max(target[1], 1))))
  for source_h, target_h, source_w, target_w in sizes:
    label = rng.integers(0, 256, (source_h, source_w), dtype=np.uint8)
    expected = cv2.resize(label, (int(target_w), int(target_h)), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(
      resize(tf.constant(label), tf.constant([target_h, target_w], tf.int32)).numpy(), expected
    )


def test_random_resize_size_equals_mmcv():
  """mmcv's RandomResize(scale=(2048, 512), ratio_range, keep_ratio=True): int(scale * ratio)
  per side, then rescale_size; for given ratios (mmcv's own sampling set to them)."""
  mmcv = pytest.importorskip("mmcv")
  from mmcv.transforms import RandomResize

  rng = np.random.default_rng(0)
  heights, widths = rng.integers(16, 2600, 4000), rng.integers(16, 2600, 4000)
  ratios = rng.uniform(0.5, 2.0, 4000)
  ratios[:1000] = rng.integers(1024, 4097, 1000) / 2048  # 2048 * ratio an integer, or just below one.
  ratios[1000:2000] = np.nextafter(rng.integers(256, 1025, 1000) / 512, 0)
  expected = []
  for height, width, ratio in zip(heights, widths, ratios):
    scale = RandomResize._random_sample_ratio((2048, 512), (ratio, ratio))
    new_w, new_h = mmcv.rescale_size((int(width), int(height)), scale)
    expected.append((new_h, new_w))
  ours = segment_augment.rescale_size(tf.constant(heights), tf.constant(widths), (2048, 512), tf.constant(ratios))
  np.testing.assert_array_equal(np.stack([x.numpy() for x in ours], axis=1), expected)


def test_train_resize_of_labels_equals_mmcv_random_resize():
  """The label map after mmcv's RandomResize (the real transform, ratio_range (r, r)) is ours."""
  pytest.importorskip("mmcv")
  from mmcv.transforms import RandomResize

  rng = np.random.default_rng(1)
  for _ in range(40):
    height, width = (int(x) for x in rng.integers(20, 700, 2))
    ratio = float(rng.uniform(0.5, 2.0))
    label = rng.integers(0, 256, (height, width), dtype=np.uint8)
    results = RandomResize((2048, 512), ratio_range=(ratio, ratio), keep_ratio=True).transform(
      {"img": np.zeros((height, width, 3), np.uint8), "gt_seg_map": label}
    )
    size = segment_augment.rescale_size(height, width, (2048, 512), ratio)
    _, ours = segment_augment.resize_pair(tf.zeros([height, width, 3], tf.uint8), tf.constant(label), size)
    assert results["img_shape"] == tuple(int(x) for x in size)
    np.testing.assert_array_equal(ours.numpy(), results["gt_seg_map"])
