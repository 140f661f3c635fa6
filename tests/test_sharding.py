"""Mesh construction, FSDP rules and batch sharding."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import shufflemamba_jax as smj
from shufflemamba_jax.models import slws
from shufflemamba_jax.parallel import sharding

TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=48, depth=4)


def test_eight_simulated_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("sizes,expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)), ((1, 8), (1, 8)), ((1, -1), (1, 8))])
def test_mesh_shape_takes_the_rest_with_minus_one(sizes, expected):
  assert sharding.mesh_shape(*sizes, num_devices=8) == expected


@pytest.mark.parametrize(
  "sizes,match",
  [((3, -1), "do not divide"), ((4, 4), "needs 16 devices"), ((-1, -1), "only one"), ((0, 1), "mesh.data")],
)
def test_bad_mesh_is_named(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(*sizes, num_devices=8)


def test_an_explicit_smaller_mesh_uses_the_first_devices():
  mesh = sharding.create_mesh(1, 1)
  assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]


def test_fsdp_shards_the_largest_divisible_dimension_above_the_threshold():
  assert sharding.fsdp_spec((4, 48, 192), 4, min_size=1) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((4, 96, 35), 8, min_size=1) == P(None, "fsdp", None)
  assert sharding.fsdp_spec((35, 3), 8, min_size=1) == P()  # nothing divides
  assert sharding.fsdp_spec((4, 48, 192), 4, min_size=10**6) == P()  # small: replicated
  assert sharding.fsdp_spec((4, 48, 192), 1, min_size=1) == P()  # no fsdp axis


def test_state_shardings_follow_the_rules_on_a_real_model():
  mesh = sharding.create_mesh(2, 4)
  abstract = nnx.eval_shape(lambda: smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), **TINY))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  shardings = sharding.state_shardings(params, mesh, min_size=1024)
  assert shardings["layers"]["mixer"]["in_proj"]["kernel"].spec == P(None, None, "fsdp")
  assert shardings["head"]["bias"].spec == P()
  assert shardings["norm_f"]["scale"].spec == P()


def test_batch_must_divide_by_the_batch_shards():
  mesh = sharding.create_mesh(2, 4)
  sharding.check_batch_divisible(16, mesh)
  with pytest.raises(ValueError, match="batch_size=12 does not divide by the 8 batch shards"):
    sharding.check_batch_divisible(12, mesh)


def test_global_batch_is_sharded_over_data_and_fsdp():
  mesh = sharding.create_mesh(2, 4)
  batch = sharding.global_batch({"image": np.zeros((16, 4, 4, 3), np.float32)}, mesh)
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["image"].addressable_shards) == 8


def test_prefetch_keeps_two_global_batches_in_flight():
  mesh = sharding.create_mesh(8, 1)
  read = []

  def local_batches():
    for index in range(5):
      read.append(index)
      yield {"image": np.full((8, 2, 2, 3), index, np.uint8), "label": np.arange(8, dtype=np.int32)}

  stream = sharding.prefetch_to_mesh(local_batches(), mesh)
  first = next(stream)
  assert read == [0, 1, 2]  # The one handed out and two more already sent to the devices.
  rest = list(stream)
  assert [int(batch["image"][0, 0, 0, 0]) for batch in [first, *rest]] == [0, 1, 2, 3, 4]
  assert first["image"].dtype == np.uint8 and first["image"].sharding == sharding.batch_sharding(mesh)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_model_output_does_not_depend_on_the_mesh(shape):
  model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), slws_max_prob=0.5, slws_group_size=2, **TINY)
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x, key: nnx.merge(graphdef, state)(x, train=True, key=key))
  expected = forward(state, images, jax.random.key(1))
  mesh = sharding.create_mesh(*shape)
  with jax.set_mesh(mesh):
    sharded_state = jax.device_put(state, sharding.state_shardings(state, mesh, min_size=1024))
    sharded_images = jax.device_put(images, sharding.batch_sharding(mesh))
    got = forward(sharded_state, sharded_images, jax.random.key(1))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_slws_permutations_do_not_depend_on_the_mesh(shape):
  """The draws are a function of (key = f(seed, step, layer), group): sharding the batch over
  any mesh gives every sample the permutation it gets on one device."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 7), 3)  # step 7, layer 3
  expected = np.asarray(slws.sample_token_permutations(key, 16, 17, 0.5, 2))
  mesh = sharding.create_mesh(*shape)
  sample = jax.jit(
    lambda k: slws.sample_token_permutations(k, 16, 17, 0.5, 2), out_shardings=sharding.batch_sharding(mesh)
  )
  with jax.set_mesh(mesh):
    got = sample(key)
  assert len(got.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(got), expected)
