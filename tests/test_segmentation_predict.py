"""The predict command on a segmentation checkpoint: a colour-coded label map per image, at the
image's size, equal to evaluation's prediction (`ImageSegmenter` on the image at eval_scale)."""

import numpy as np
import pytest
from flax import nnx

from shufflemamba_jax import predict
from shufflemamba_jax.data import device
from shufflemamba_jax.models import upernet, variants
from shufflemamba_jax.training.tasks import segmentation
from shufflemamba_jax.weights import checkpoint, params

pytest.importorskip("tensorflow")

NUM_CLASSES = 11
RUN_CONFIG = {
  "dataset": "digits_seg",
  "seg": {"eval_crop": [32, 32], "eval_stride": [16, 16]},
  # A run saved before seg_aug.eval_canvas was removed names it: predict ignores it.
  "seg_aug": {"eval_scale": [64, 64], "eval_canvas": [64, 64]},
}


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
  backbone = variants.model_config("shufflemamba_tiny", img_size=32, patch_size=4, embed_dim=16, depth=4, d_state=4)
  config = upernet.UperNetConfig(backbone=backbone, num_classes=NUM_CLASSES, channels=8, aux_channels=4)
  model = upernet.create_segmenter(config, rngs=nnx.Rngs(0))
  state = {"params": params.param_tree(model), "model_state": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))}
  directory = str(tmp_path_factory.mktemp("segmenter"))
  with checkpoint.Checkpointer(checkpoint.checkpoint_directory(directory), async_save=False) as saver:
    saver.save(0, state, model=config, config=RUN_CONFIG, force=True)
  return directory, model


def _write_png(path, array):
  from PIL import Image

  Image.fromarray(array).save(path)


def test_predict_writes_colour_label_maps(segmenter_dir, tmp_path, capsys):
  from PIL import Image

  directory, model = segmenter_dir
  rng = np.random.default_rng(0)
  at_scale = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
  other = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
  _write_png(tmp_path / "at_scale.png", at_scale)
  _write_png(tmp_path / "other.png", other)
  out = tmp_path / "labels"
  paths = [str(tmp_path / "at_scale.png"), str(tmp_path / "other.png")]
  assert predict.main(["--checkpoint", directory, "--output-dir", str(out), *paths]) == 0
  assert "at_scale.png ->" in capsys.readouterr().out

  written = np.asarray(Image.open(out / "at_scale.png"))
  window_fn = lambda windows: upernet.segment_logits(model, device.IMAGENET(windows))
  evaluation = segmentation.ImageSegmenter(window_fn, NUM_CLASSES, crop_size=(32, 32), stride=(16, 16))
  expected = segmentation.colorize(np.asarray(evaluation.scores([at_scale[None]], (64, 64)).argmax(-1))[0], NUM_CLASSES)
  np.testing.assert_array_equal(written, expected)

  resized = np.asarray(Image.open(out / "other.png"))
  assert resized.shape == (40, 30, 3)
  palette = {tuple(color) for color in segmentation.label_colors(NUM_CLASSES)}
  assert {tuple(color) for color in resized.reshape(-1, 3)} <= palette


def test_a_segmenter_needs_an_output_dir(segmenter_dir, tmp_path, capsys):
  _write_png(tmp_path / "image.png", np.zeros((8, 8, 3), np.uint8))
  assert predict.main(["--checkpoint", segmenter_dir[0], str(tmp_path / "image.png")]) == 1
  assert "--output-dir" in capsys.readouterr().err
