"""The segmentation datasets: the ADE20K builder run on a zip in the real layout, and the embedded
digits canvases."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from shufflemamba_jax.data import ade20k, digits_seg

from data_fixtures import write_ade20k_zip


def test_reduce_zero_label():
  label = np.array([[0, 1, 150], [75, 0, 2]], np.uint8)
  np.testing.assert_array_equal(ade20k.reduce_zero_label(label), [[255, 0, 149], [74, 255, 1]])


def test_ade20k_builder_reduces_labels_and_keeps_images_aligned(tmp_path):
  from shufflemamba_jax.data import pipeline

  labels = write_ade20k_zip(str(tmp_path / "manual"))
  builder = pipeline.prepare(
    "ade20k", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"), compute_stats=False
  )
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {"train": 3, "validation": 2}
  info = pipeline.get_dataset_info("ade20k", str(tmp_path / "tfds"))
  assert info.num_classes == 150 and pipeline.class_names("ade20k")[:3] == ("wall", "building", "sky")
  seen = set()
  for split, folder in ade20k.SPLITS.items():
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      stem = example["file_name"].decode()[: -len(".jpg")]
      original = labels[f"{folder}/{stem}"]
      image, label = example["image"], example["label"][..., 0]
      assert image.shape[:2] == label.shape == original.shape
      np.testing.assert_array_equal(label, ade20k.reduce_zero_label(original))
      assert (label == 255).any() == (original == 0).any()
      # The image shows its own label map (gray = 1.5 x class), so the two are aligned: each
      # label region's median gray (JPEG rings at the band edges) is its class's.
      for value in np.unique(original):
        assert abs(np.median(image[..., 0][original == value]) - round(value * 1.5)) <= 2
      seen.add(f"{folder}/{stem}")
  assert seen == set(labels)


def test_ade20k_names_the_missing_archive(tmp_path):
  from shufflemamba_jax.data import pipeline

  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip"):
    pipeline.prepare("ade20k", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="--manual_dir is required"):
    pipeline.prepare("ade20k", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="--dataset=ade20k .*ADECHALLENGEDATA2016"):
    pipeline.get_builder("ade20k", str(tmp_path / "tfds"))


def test_digits_canvases_label_grown_strokes_with_their_digit():
  gray, classes = digits_seg.load_gray_digits()
  pool = np.arange(100)
  rng = np.random.default_rng(0)
  for _ in range(20):
    image, label = digits_seg.canvas(rng, gray, classes, pool)
    assert image.shape == (digits_seg.CANVAS, digits_seg.CANVAS, 3) and image.dtype == np.uint8
    assert label.shape == image.shape[:2] and label.dtype == np.uint8
    present = set(np.unique(label)) - {digits_seg.BACKGROUND}
    assert 1 <= len(present) <= digits_seg.MAX_DIGITS and present <= set(classes[pool])
    # Every bright pixel is labelled; a labelled pixel is bright or within one source pixel (2
    # canvas pixels) of a bright one.
    stroke_gray = np.round(digits_seg.STROKE_LEVEL * 255 / 16)
    bright = image[..., 0] >= stroke_gray
    assert (label[bright] != digits_seg.BACKGROUND).all()
    near = np.zeros_like(bright)
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        near |= np.roll(np.roll(bright, dy, 0), dx, 1)
    assert (near[label != digits_seg.BACKGROUND]).all()
    assert (label != digits_seg.BACKGROUND).sum() > bright.sum()


def test_digits_are_placed_together_without_overlap():
  """Every drawn digit gets a spot (none crowded out by where the first landed), inside the
  canvas and apart from the others; both side-by-side and stacked layouts occur."""
  size = 8 * digits_seg.SCALE
  rng = np.random.default_rng(0)
  layouts = set()
  for _ in range(200):
    corners = digits_seg.place(rng, digits_seg.MAX_DIGITS, size)
    assert corners.shape == (digits_seg.MAX_DIGITS, 2)
    assert (corners >= 0).all() and (corners + size <= digits_seg.CANVAS).all()
    gap = np.abs(corners[0] - corners[1])
    assert (gap >= size).any()
    layouts.add(tuple(gap >= size))
  assert {(True, False), (False, True)} <= layouts


@pytest.mark.slow  # Two builds of 2,400 canvases.
def test_digits_seg_builds_the_same_dataset_every_time(tmp_path):
  """Prepared twice: identical examples."""
  from shufflemamba_jax.data import pipeline

  examples = []
  for attempt in range(2):
    builder = pipeline.prepare("digits_seg", data_dir=str(tmp_path / str(attempt)), compute_stats=False)
    examples.append(list(tfds.as_numpy(builder.as_dataset(split="validation").take(5))))
  assert builder.info.splits["train"].num_examples == digits_seg.NUM_CANVASES["train"]
  for first, second in zip(*examples):
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(first["label"], second["label"])
    assert set(np.unique(first["label"])) <= set(range(digits_seg.NUM_CLASSES))


SEG_AUG = dict(scale=(128, 64), crop_size=48, eval_scale=(64, 64))


def test_segmentation_train_stream_is_uint8_crops_and_resumes_exactly(digits_seg_data_dir):
  from shufflemamba_jax.data import pipeline

  kwargs = dict(dataset="digits_seg", data_dir=digits_seg_data_dir, shuffle_buffer=256, seg_aug=SEG_AUG)
  stream = pipeline.create_train_dataset(global_batch_size=4, **kwargs).take(3)
  batches = list(stream.as_numpy_iterator())
  for batch in batches:
    assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4, 48, 48) and batch["label"].dtype == np.uint8
    assert set(np.unique(batch["label"])) <= set(range(digits_seg.NUM_CLASSES)) | {255}
  resumed = next(pipeline.create_train_dataset(global_batch_size=4, start_step=2, **kwargs).as_numpy_iterator())
  for name in ("image", "label", "example_id"):
    np.testing.assert_array_equal(resumed[name], batches[2][name])


def test_segmentation_eval_stream_is_one_unpadded_example_at_a_time(digits_seg_data_dir):
  from shufflemamba_jax.data import pipeline

  dataset = pipeline.create_segmentation_eval_dataset(
    dataset="digits_seg", data_dir=digits_seg_data_dir, seg_aug=SEG_AUG, process_index=0, process_count=3
  )
  examples = list(dataset.as_numpy_iterator())
  assert len(examples) == 134  # The first of three shares of 400: ceil(400 / 3).
  for example in examples[:5]:
    (view,) = example["views"]
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8  # The 32x32 canvas at eval_scale.
    assert example["label"].shape == (32, 32) and example["mask"] == 1.0  # The original label map.
    assert set(np.unique(example["label"])) <= set(range(digits_seg.NUM_CLASSES))
