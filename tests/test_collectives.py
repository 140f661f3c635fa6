"""What crosses devices in the compiled train step: the batch never does.

The step is compiled for 8 simulated CPU devices with everything that touches the batch on
(uint8 input, random erasing, mixup and cutmix in groups of each device's share, SLWS, and on
the data mesh gradient accumulation), and its optimized HLO is read. A global batch of 80 (10
per device, micro-batches of 5) makes any collective that carries a batch axis visible by its
shape: no parameter of the tiny model (7 classes) has a dimension of 5, 10, 40 or 80.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from shufflemamba_jax.data import device
from shufflemamba_jax.models import variants, vim
from shufflemamba_jax.parallel import sharding
from shufflemamba_jax.training import mixup, steps
from shufflemamba_jax.training.tasks import classification

BATCH = 80  # 10 per device, in two micro-batches of 5 where the step accumulates gradients.
COLLECTIVE = re.compile(
  r"= (?P<shape>.+?) (?P<op>all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|"
  r"collective-broadcast|ragged-all-to-all)(-start)?\("
)


def _collectives(mesh_shape, grad_accum_steps: int = 1) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(op, shapes of its result) of every collective in the compiled train step on `mesh_shape`."""
  mesh = sharding.create_mesh(*mesh_shape)
  config = variants.model_config(
    "shufflemamba_tiny",
    img_size=16,
    patch_size=4,
    embed_dim=48,
    depth=4,
    d_state=8,
    num_classes=7,
    slws_max_prob=0.5,
    slws_group_size=1,
    remat=False,
    dtype="float32",
  )
  graphdef, params, rest = steps.split_model(vim.VisionMamba(config, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-3)
  abstract_state = jax.eval_shape(lambda: steps.init_train_state(params, tx, ema_decay=0.99))
  state_shardings = sharding.state_shardings(abstract_state, mesh, min_size=256)
  settings = mixup.MixupSettings(
    mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1, mixup_group_size=10
  )
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = classification.make_train_step(
    graphdef,
    rest,
    tx,
    lambda step: 1e-3,
    num_classes=7,
    seed=0,
    mixup_settings=settings,
    input_transform=device.DeviceTransform(random_erasing_prob=0.5),
    grad_accum_steps=grad_accum_steps,
    ema_decay=0.99,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
  )
  abstract_state = jax.tree.map(
    lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), abstract_state, state_shardings
  )
  batch = {
    "image": jax.ShapeDtypeStruct((BATCH, 16, 16, 3), jnp.uint8, sharding=batch_sharding),
    "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch_sharding),
  }
  with jax.set_mesh(mesh):
    text = train_step.lower(abstract_state, batch).compile().as_text()
  found = []
  for match in COLLECTIVE.finditer(text):
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", match["shape"])]
    found.append((match["op"], shapes))
  assert found, "no collective at all: the step was not partitioned over the mesh"
  return found


def _carries_the_batch(shapes) -> bool:
  return any(size in shape for size in (BATCH, BATCH // 2, BATCH // 8, BATCH // 16) for shape in shapes)


@pytest.mark.slow
def test_data_parallel_step_only_all_reduces_gradients_and_metrics():
  collectives = _collectives((8, 1), grad_accum_steps=2)
  assert {op for op, _ in collectives} == {"all-reduce"}, collectives
  assert not any(_carries_the_batch(shapes) for _, shapes in collectives), collectives


@pytest.mark.slow
def test_fsdp_step_only_gathers_and_reduces_parameters():
  collectives = _collectives((2, 4))
  assert {op for op, _ in collectives} <= {"all-gather", "reduce-scatter", "all-reduce"}, collectives
  assert "all-gather" in {op for op, _ in collectives}  # The FSDP-sharded parameters.
  assert not any(_carries_the_batch(shapes) for _, shapes in collectives), collectives
