"""Device mesh and shardings: data parallelism and FSDP over named mesh axes.

The mesh has the axes ("data", "fsdp"). The batch is split over data x fsdp; each
parameter (and its optimizer state) is split along its largest dimension that divides by the
fsdp size, once it holds at least `fsdp_min_size` elements, and replicated otherwise. Moving
from pure data parallelism to FSDP is therefore one config line (`mesh.fsdp`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES


def mesh_shape(data: int, fsdp: int, num_devices: int | None = None) -> tuple[int, int]:
  """Resolves the sizes of (data, fsdp); one size may be -1 ("the rest of the devices")."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": data, "fsdp": fsdp}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name} must be a positive size or -1 (the rest), got {size}")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes (product {known}) of mesh {sizes}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} "
      f"needs {math.prod(sizes.values())} devices, but there are {num_devices}"
    )
  return sizes["data"], sizes["fsdp"]


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """Builds the ("data", "fsdp") mesh over all (or the given, or the first N) devices."""
  devices = jax.devices() if devices is None else list(devices)
  if -1 not in (data, fsdp) and 0 < data * fsdp < len(devices):
    devices = devices[: data * fsdp]  # An explicit smaller mesh uses the first devices.
  shape = mesh_shape(data, fsdp, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """The PartitionSpec of one parameter: its largest fsdp-divisible dimension on "fsdp"."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2**16) -> Any:
  """NamedShardings for a pytree of arrays (parameters, optimizer state, EMA) under FSDP rules."""
  fsdp_size = mesh.shape["fsdp"]

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, abstract_state)


# Short names of the chips by the device_kind JAX reports (fields of config.max_device_batch).
_TPU_CHIPS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}
CHIPS = ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200")


def chip_name(device_kind: str) -> str | None:
  """The short name (one of CHIPS) of a device kind, e.g. "TPU v5 lite" -> "v5e", "NVIDIA H100 80GB
  HBM3" -> "h100"; None for any other device (the CPU)."""
  if device_kind in _TPU_CHIPS:
    return _TPU_CHIPS[device_kind]
  gpu = device_kind.lower().removeprefix("nvidia ").split("-")[0].split(" ")[0]
  return gpu if gpu in CHIPS else None


def micro_batches(global_batch: int, mesh: Mesh, max_device_batch: int | None, at_least: int = 1) -> int:
  """The fewest micro-batches (>= `at_least`) that split `global_batch` evenly over the mesh's
  batch shards with at most `max_device_batch` examples per device in each (None: no limit)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per_device = global_batch // shards
  steps = max(at_least, 1 if max_device_batch is None else -(-per_device // max_device_batch))
  while per_device % steps:
    steps += 1
  return steps


def abstract(tree: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct leaves of `tree` (arrays or ShapeDtypeStructs) carrying `shardings` (a tree
  like `tree`, or one sharding for every leaf): what restoring or compiling ahead of time is given."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays whose leading axis is the global batch."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Fails fast, naming the setting, when the global batch does not split over the batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ValueError(
      f"{name}={global_batch} does not divide by the {shards} batch shards "
      f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}, "
      f"{jax.device_count()} devices)"
    )
  if global_batch % jax.process_count():
    raise ValueError(f"{name}={global_batch} does not divide by the {jax.process_count()} processes")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  # The one intended host-to-device copy of a step (which the training loop's transfer guard
  # would refuse on several processes, where the copy is not a plain device_put).
  with jax.transfer_guard_host_to_device("allow"):
    return {
      name: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for name, value in local_batch.items()
    }


def prefetch_to_mesh(local_batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int = 2):
  """Yields `global_batch(b, mesh)` of each local batch, keeping `size` more already sent.

  Host-to-device copies are asynchronous, so the next batches cross while the current step runs
  (flax's `prefetch_to_device`, big_vision's `start_global`).
  """
  queue = collections.deque()
  for batch in local_batches:
    queue.append(global_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def batch_mesh(batch_size: int | None = None):
  """The active abstract mesh if it has the batch axes (and they split `batch_size` evenly, if given), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return None
  return None if batch_size is not None and batch_size % math.prod(mesh.shape[a] for a in BATCH_AXES) else mesh


def _constrain(tree, spec: P):
  return tree if batch_mesh() is None else jax.lax.with_sharding_constraint(tree, spec)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis to the batch mesh axes when a mesh is active."""
  return _constrain(x, P(BATCH_AXES))


def replicate(tree: Any) -> Any:
  """Pins small arrays (random draws, per-group settings) to every device when a mesh is active.

  Each device then computes them whole, instead of sharding the work and synchronizing on it
  (a while loop over sharded draws all-reduces its condition on every iteration).
  """
  return _constrain(tree, P())
