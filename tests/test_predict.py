"""Using a trained model: load_model and the predict command, on converted and trained checkpoints."""

import json
import pathlib
import shutil
import tarfile

import jax
import numpy as np
import pytest
from flax import nnx

import shufflemamba_jax as smj
from shufflemamba_jax import predict
from shufflemamba_jax.data import device
from shufflemamba_jax.training.tasks import classification
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


def test_predict_sees_exactly_what_evaluation_sees(imagenet_data, tmp_path):
  """On JPEGs of odd sizes, predict's input is bit for bit the evaluation pipeline's batch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  data_dir, _ = imagenet_data
  with tarfile.open(pathlib.Path(data_dir).parent / "manual" / "ILSVRC2012_img_val.tar") as tar:
    tar.extractall(tmp_path, filter="data")
  paths = sorted(str(path) for path in tmp_path.glob("*.JPEG"))
  sizes = [Image.open(path).size for path in paths]
  assert any(width % 2 or height % 2 for width, height in sizes), sizes
  for image_size, crop_ratio in ((24, 0.875), (27, 1.0)):
    dataset = pipeline.create_eval_dataset(
      global_batch_size=8, dataset="imagenet2012", data_dir=data_dir, image_size=image_size, eval_crop_ratio=crop_ratio
    )
    batch = next(dataset.as_numpy_iterator())
    evaluated = {int(i): image for i, image, m in zip(batch["example_id"], batch["image"], batch["mask"]) if m}
    images, ok = next(classification.image_batches(paths, image_size, crop_ratio, batch_size=8))
    assert images.shape == (6, image_size, image_size, 3) and ok.all()
    for path, image in zip(paths, images):
      example_id = int(tf.strings.to_hash_bucket_fast(pathlib.Path(path).name, 2**63 - 1))
      np.testing.assert_array_equal(image, evaluated[example_id])


def test_the_predictor_compiles_once_per_input_shape(converted_dir):
  directory, original = converted_dir
  predictor = classification.Predictor(smj.load_model(directory), top_k=3)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
  for batch in batches:
    probs, indices = predictor(batch)
    assert probs.shape == indices.shape == (4, 3)
  assert predictor.function._cache_size() == 1  # pylint: disable=protected-access
  predictor(batches[0][:2])
  assert predictor.function._cache_size() == 2  # pylint: disable=protected-access
  # The loaded weights, fed normalized pixels.
  logits = original(device.normalize(batches[0]))
  np.testing.assert_array_equal(predictor(batches[0])[1][:, 0], np.argmax(logits, axis=-1))


def test_predict_takes_a_folder_in_batches_with_a_progress_bar(converted_dir, image_files, tmp_path, capsys):
  directory, _ = converted_dir
  paths, _ = image_files
  for index in range(10):
    shutil.copy(paths[index % 2], tmp_path / f"copy{index:02d}.png")
  (tmp_path / "notes.txt").write_text("not an image: left out")
  assert predict.main(["--checkpoint", directory, "--json", "--batch-size", "4", str(tmp_path)]) == 0
  captured = capsys.readouterr()
  lines = [json.loads(line) for line in captured.out.splitlines()]
  assert [pathlib.Path(line["image"]).name for line in lines] == [f"copy{index:02d}.png" for index in range(10)]
  assert lines[0]["top"] == lines[2]["top"]  # The same image, in another batch position.
  assert "10/10" in captured.err  # The progress bar, on stderr.
  assert predict.main(["--checkpoint", directory, str(tmp_path / "nowhere")]) == 1
  assert "nowhere" in capsys.readouterr().err


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
