"""Using a trained model: load_model and the predict command, on converted and trained checkpoints."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import shufflemamba_jax as smj
from shufflemamba_jax import predict
from shufflemamba_jax.weights import checkpoint, params

TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=48, depth=2)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(3), **TINY)
  directory = str(tmp_path_factory.mktemp("weights") / "tiny")
  # What `python -m shufflemamba_jax.convert` writes: step 0 of a workdir, parameters only.
  with checkpoint.Checkpointer(checkpoint.checkpoint_directory(directory), async_save=False) as saver:
    saver.save(0, {"params": params.param_tree(model)}, model=model.config, force=True)
  return directory, model


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  from PIL import Image

  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for index, size in enumerate([(20, 30), (16, 16)]):
    path = str(folder / f"image{index}.png")
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path)
    paths.append(path)
  broken = str(folder / "broken.jpg")
  with open(broken, "wb") as f:
    f.write(b"not an image")
  return paths, broken


def test_load_model_returns_the_saved_weights(converted_dir):
  directory, original = converted_dir
  loaded = smj.load_model(directory)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  np.testing.assert_allclose(
    nnx.jit(lambda m, x: m(x))(loaded, images), nnx.jit(lambda m, x: m(x))(original, images), rtol=1e-6, atol=1e-6
  )


def test_preprocess_gives_a_normalized_center_crop(image_files):
  paths, _ = image_files
  array = predict.preprocess(paths[0], 16)
  assert array.shape == (16, 16, 3) and array.dtype == np.float32
  assert -2.2 < array.min() and array.max() < 2.7


def test_predict_prints_top5_with_probabilities(converted_dir, image_files, capsys):
  directory, _ = converted_dir
  paths, _ = image_files
  assert predict.main(["--checkpoint", directory, "--json", *paths]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line["image"] for line in lines] == paths
  for line in lines:
    probs = [entry["probability"] for entry in line["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_bad_inputs_are_named(converted_dir, image_files, capsys, tmp_path):
  directory, _ = converted_dir
  _, broken = image_files
  assert predict.main(["--checkpoint", directory, broken]) == 1
  assert "broken.jpg" in capsys.readouterr().err
  assert predict.main(["--checkpoint", str(tmp_path / "missing"), broken]) == 1
  assert "missing" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_rejected(converted_dir):
  directory, _ = converted_dir
  saved = checkpoint.read_weights(directory)
  other = smj.model_config("shufflemamba_tiny", **{**TINY, "embed_dim": 32})
  with pytest.raises(ValueError, match=f"{directory} does not fit the model"):
    params.model_with_params(other, saved.params, source=directory)
