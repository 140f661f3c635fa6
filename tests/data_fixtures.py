"""Test data for the input pipeline: tiny ILSVRC2012-format tars (`data.synthetic`) and prepared TFDS datasets.

A pytest plugin of conftest.py. Preparing a dataset costs seconds, so each is built once per
session, when a test first asks for it.
"""

import contextlib
import socket

import pytest

# One training JPEG with a valid start and garbage after: the pipeline must skip it, naming it.
CORRUPT_TRAIN_IMAGE = "n01443537_2.JPEG"


@contextlib.contextmanager
def _no_network():
  """Makes any socket connection fail, proving that a build works offline."""

  def refuse(*args, **kwargs):
    raise OSError(f"network access attempted during an offline build: {args}")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket.socket, "connect_ex", refuse)
    yield


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with `digits` prepared (offline)."""
  from shufflemamba_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("digits")
  with _no_network():
    pipeline.prepare("digits", data_dir=str(root), compute_stats=False)
  return str(root)


@pytest.fixture(scope="session")
def imagenet_data(tmp_path_factory):
  """(data_dir, {file_name: synset}): TFDS's real imagenet2012 builder run on tiny tars."""
  from shufflemamba_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("imagenet2012")
  # 3 classes x 4 training images and 6 validation images of 40-89 pixels a side.
  labels = synthetic.write_imagenet_tars(str(root / "manual"), corrupt=(CORRUPT_TRAIN_IMAGE,))
  pipeline.prepare("imagenet2012", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"), compute_stats=False)
  return str(root / "tfds"), labels
