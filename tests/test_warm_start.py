"""config.init_from: parameters from a checkpoint for fine-tuning and multi-stage training.

Parameters are random values of the right shapes (from `nnx.eval_shape`): no model is
initialised and nothing is trained, so every case takes a moment.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import shufflemamba_jax as smj
from shufflemamba_jax.models import tokens
from shufflemamba_jax.training.tasks import classification
from shufflemamba_jax.weights import checkpoint as checkpoint_lib
from shufflemamba_jax.weights import params as params_lib

# The digits config's tiny model (configs/digits.py): 16x16 images, patch 4, width 48, depth 4.
DIGITS = dict(img_size=16, num_classes=10, patch_size=4, embed_dim=48, depth=4, d_state=8)


def model_config(variant="shufflemamba_tiny", **overrides):
  return smj.model_config(variant, **{**DIGITS, **overrides})


def random_params(config, seed=0):
  """A parameter tree of `config` (a nested dict of float32 numpy arrays) with random values."""
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: smj.VisionMamba(config, rngs=nnx.Rngs(0))), nnx.Param))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), shapes)


def save_run(directory, params, config, step=1):
  """Writes `params` the way a training run checkpoints its state."""
  with checkpoint_lib.Checkpointer(str(directory), async_save=False) as checkpointer:
    checkpointer.save(step, {"params": params, "ema": None}, model=config, meta={"process_count": 1}, force=True)


def init_from(path, params, config):
  return classification.init_params_from(str(path), params, config)


def assert_same(got, expected):
  got, expected = (dict(jax.tree_util.tree_flatten_with_path(tree)[0]) for tree in (got, expected))
  assert got.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["vim_tiny", "shufflemamba_tiny", "shufflemamba_reg_tiny"])
def test_init_from_resizes_position_embeddings(tmp_path, variant):
  """Multi-stage recipes: parameters from a 16px run initialise a 32px model (pos_embed resized)."""
  small, large = model_config(variant), model_config(variant, img_size=32)
  source = random_params(small)
  save_run(tmp_path / "checkpoints", source, small)
  target = random_params(large, seed=1)

  params = init_from(tmp_path, target, large)  # the workdir

  assert jax.tree.structure(params) == jax.tree.structure(target)
  assert all(
    a.dtype == b.dtype and a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target))
  )
  assert params["pos_embed"].shape == target["pos_embed"].shape != source["pos_embed"].shape
  assert_same(params, source | {"pos_embed": params["pos_embed"]})
  if variant != "shufflemamba_reg_tiny":  # The class-token slot is carried over, not resized.
    layout = large.token_layout
    new_slot = tokens.extra_token_indices(large.num_patches, layout)[0]
    old_slot = tokens.extra_token_indices(small.num_patches, layout)[0]
    np.testing.assert_array_equal(params["pos_embed"][new_slot], source["pos_embed"][old_slot])


def test_a_step_folder_selects_that_step(tmp_path):
  config = model_config()
  first, second = random_params(config, seed=1), random_params(config, seed=2)
  save_run(tmp_path / "checkpoints", first, config, step=1)
  save_run(tmp_path / "checkpoints", second, config, step=2)
  assert_same(init_from(tmp_path / "checkpoints" / "1", second, config), first)
  assert_same(init_from(tmp_path / "checkpoints", first, config), second)  # the latest


def test_other_num_classes_reinitializes_only_the_head(tmp_path, caplog):
  source = random_params(model_config(num_classes=10))
  save_run(tmp_path / "checkpoints", source, model_config(num_classes=10))
  config = model_config(num_classes=7)
  target = random_params(config, seed=1)  # stands for the run's fresh initialisation

  with caplog.at_level("WARNING", logger=params_lib.__name__):
    params = init_from(tmp_path, target, config)

  np.testing.assert_array_equal(params["head"]["kernel"], target["head"]["kernel"])
  np.testing.assert_array_equal(params["head"]["bias"], target["head"]["bias"])
  assert_same(params, source | {"head": target["head"]})
  assert "re-initialized for 7 classes" in caplog.text


@pytest.mark.parametrize(
  "change,fragments",
  [
    (dict(depth=6), ["layers.mixer.in_proj.kernel: (4, 48, 192) in the checkpoint, (6, 48, 192) in the model"]),
    # 23 mis-shaped parameters: the first 20 are listed.
    (
      dict(embed_dim=64),
      [
        "23 with another shape",
        "cls_token: (1, 48) in the checkpoint, (1, 64) in the model",
        "layers.mixer.in_proj.kernel: (4, 48, 192) in the checkpoint, (4, 64, 256) in the model",
        "... and 3 more",
      ],
    ),
    (
      dict(variant="shufflemamba_reg_tiny"),
      ["pos_embed: (17, 48) in the checkpoint, (16, 48)", "missing from the checkpoint: pos_embed_cls (12, 48)"],
    ),
  ],
)
def test_another_architecture_is_one_error_naming_each_difference(tmp_path, change, fragments):
  save_run(tmp_path / "checkpoints", random_params(model_config()), model_config())
  config = model_config(**change)
  with pytest.raises(ValueError) as error:
    init_from(tmp_path, random_params(config), config)
  message = str(error.value)
  assert message.startswith(f"config.init_from={tmp_path} does not fit the model"), message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  assert len(message.splitlines()) <= 1 + params_lib.MAX_LISTED + 1


def test_unused_checkpoint_parameters_are_listed(tmp_path):
  config = model_config()
  source = random_params(config)
  source["extra"] = {"kernel": np.zeros((2, 3), np.float32)}
  save_run(tmp_path / "checkpoints", source, config)
  with pytest.raises(ValueError, match=r"1 not in the model.*\n  not in the model: extra.kernel \(2, 3\)"):
    init_from(tmp_path, random_params(config), config)


def test_a_converted_weights_directory_works_too(tmp_path):
  small = model_config("vim_tiny")
  source = random_params(small)
  directory = str(tmp_path / "converted")
  # What `python -m shufflemamba_jax.convert` writes: step 0 of a workdir, parameters only.
  with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(directory), async_save=False) as saver:
    saver.save(0, {"params": source}, model=small, force=True)
  large = model_config("vim_tiny", img_size=32, num_classes=7)
  target = random_params(large, seed=1)

  params = init_from(directory, target, large)

  assert params["pos_embed"].shape == (8 * 8 + 1, 48)
  assert_same(params, source | {"pos_embed": params["pos_embed"], "head": target["head"]})
