"""The Pallas selective scan through the real device compilers, on this CPU host.

test_pallas_scan.py checks the kernels' numerics in interpret mode and their lowering through jax.export;
neither runs the compilers that reject a kernel on the chip: Mosaic (block tiling, VMEM) for TPU v4, v5e,
v5p and v6e, and XLA GPU with Triton and ptxas (shared memory, registers) for the H100 and A100. Here the
kernels, their gradients and a sharded model step are compiled for those chips' topology devices
(`shufflemamba_jax.parallel.targets`), and the compiled programs are read: the kernels are in them, nothing
(batch, length, channels, state)-sized is, and the batch stays on its devices. Kernels that break a chip's
limits fail to compile, which shows that the compilers really run.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from test_collectives import COLLECTIVE

from shufflemamba_jax.models import variants, vim
from shufflemamba_jax.models.ssm import selective_scan
from shufflemamba_jax.parallel import sharding, targets

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _target(name: str, platform: str, test_id: str):
  reason = targets.missing(platform)
  return pytest.param(name, platform, id=test_id, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


# Single-host slices; each scan test compiles for one device of its slice.
TARGETS = [
  _target("v4:2x2x1", "tpu", "v4"),
  _target("v5e:2x2", "tpu", "v5e"),
  _target("v5p:2x2x1", "tpu", "v5p"),
  _target("v6e:2x2", "tpu", "v6e"),
  _target("h100", "cuda", "h100"),
  _target("a100", "cuda", "a100"),
]
# The scan of ShuffleMamba-Ti and -B at 224 px: 197 tokens, channels expand (2) x embed_dim, state 16.
SIZES = {"ti": 2 * 192, "b": 2 * 768}
BATCH, LENGTH, STATE = 2, 197, 16


def _compile(target: targets.Target, fn, args, mesh=None):
  """fn compiled by the target's compiler for args (ShapeDtypeStructs carrying their shardings)."""
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile(target.compiler_options or None)


def _kernel_calls(text: str, platform: str) -> list[str]:
  """The scan kernels ("forward" / "backward") that the compiled program calls, in program order."""
  calls = []
  for line in text.splitlines():
    if f'custom_call_target="{KERNEL_CALL[platform]}"' in line:
      name = re.search(r"selective_scan_(forward|backward)", line)
      calls.append(name[1] if name else line[:200])
  return calls


def _shapes(text: str) -> set[tuple[int, ...]]:
  return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", text)}


def _scan_args(mesh, channels: int):
  """The scan's arguments as a bfloat16 model passes them: u, delta, z and B, C (from x_proj) in bfloat16;
  A (-exp(A_log) in float32), D and delta_bias (parameters) in float32."""
  where = jax.sharding.NamedSharding(mesh, jax.P())
  S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  seq, bc = S((BATCH, LENGTH, channels), jnp.bfloat16), S((BATCH, LENGTH, STATE), jnp.bfloat16)
  vec = S((channels,), jnp.float32)
  return [seq, seq, S((channels, STATE), jnp.float32), bc, bc, vec, seq, vec]


def _compile_scan(target: targets.Target, method: str, channels: int, *, reverse: bool, grad: bool):
  """The scan with every option (or its gradient, of a sum of squares), compiled for one device of the target."""
  mesh = jax.sharding.Mesh(np.array(target.devices[:1]), ("d",))

  def scan(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z, bias, True, reverse=reverse, method=method)

  fn = scan
  if grad:
    fn = jax.grad(lambda *a: jnp.sum(scan(*a).astype(jnp.float32) ** 2), argnums=tuple(range(8)))
  return _compile(target, fn, _scan_args(mesh, channels))


def _states_bytes(channels: int) -> int:
  return BATCH * LENGTH * channels * STATE * 4


def _states_shapes(text: str, channels: int) -> list[tuple[int, ...]]:
  """The shapes in a compiled program's text that hold the length, channel and state axes."""
  return [shape for shape in _shapes(text) if {LENGTH, channels, STATE} <= set(shape)]


@pytest.mark.parametrize("program", ["y", "grad"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name,platform", TARGETS)
def test_scan_kernels_compile(name, platform, size, reverse, program):
  """The scan with every option (D, z, delta_bias, softplus) in either direction, or its gradient, compiles
  for the chip, calls the kernels and keeps no states in memory."""
  target = targets.resolve(name)
  channels = SIZES[size]
  compiled = _compile_scan(target, "pallas", channels, reverse=reverse, grad=program == "grad")
  text = compiled.as_text()

  # The gradient runs the forward kernel for its residuals, then the backward kernel.
  assert _kernel_calls(text, platform) == (["forward"] if program == "y" else ["forward", "backward"])
  # The kernels carry the states on chip: never a (batch, length, channels, state) float32 array in memory.
  memory = compiled.memory_analysis()
  assert 0 <= memory.temp_size_in_bytes < _states_bytes(channels), memory
  assert not _states_shapes(text, channels)


@pytest.mark.skipif(targets.missing("cuda") is not None, reason=targets.missing("cuda") or "")
def test_the_memory_checks_see_the_states_where_they_exist():
  """The associative scan's gradient keeps every position's states: the checks above would fail on it."""
  compiled = _compile_scan(targets.resolve("h100"), "associative", SIZES["ti"], reverse=False, grad=True)
  assert compiled.memory_analysis().temp_size_in_bytes > _states_bytes(SIZES["ti"])
  assert _states_shapes(compiled.as_text(), SIZES["ti"])


def _square(x_ref, o_ref):
  o_ref[...] = jnp.dot(x_ref[...], x_ref[...])


@pytest.mark.skipif(targets.missing("cuda") is not None, reason=targets.missing("cuda") or "")
@pytest.mark.parametrize("name,available", [("h100", 232448), ("a100", 166912)])
def test_triton_rejects_a_kernel_beyond_shared_memory(name, available):
  """Triton stages a dot's operands in shared memory: a (256, 256) float32 one needs more than the GPU has
  per block, a (128, 128) one fits."""
  target = targets.resolve(name)
  where = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(target.devices[:1]), ("d",)), jax.P())

  def compile_dot(n):
    kernel = lambda x: pl.pallas_call(
      _square, out_shape=jax.ShapeDtypeStruct((n, n), jnp.float32), compiler_params=pltriton.CompilerParams(num_warps=4)
    )(x)
    return _compile(target, kernel, [jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=where)])

  assert KERNEL_CALL["cuda"] in compile_dot(128).as_text()
  with pytest.raises(Exception, match=rf"Shared memory size limit exceeded: requested \d+, available: {available}"):
    compile_dot(256)


def _row_sum(x_ref, o_ref):
  o_ref[...] = jnp.sum(x_ref[...], axis=0, keepdims=True)


@pytest.mark.skipif(targets.missing("tpu") is not None, reason=targets.missing("tpu") or "")
def test_mosaic_rejects_a_block_beyond_scoped_vmem():
  """A v5e kernel may use 16 MiB of VMEM unless it asks for more: a whole (2048, 2048) float32 block
  (16 MiB) does not fit, a (1024, 1024) one does."""
  target = targets.resolve("v5e:2x2")
  where = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(target.devices[:1]), ("d",)), jax.P())

  def compile_row_sum(n):
    kernel = lambda x: pl.pallas_call(_row_sum, out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32))(x)
    return _compile(target, kernel, [jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=where)])

  assert "tpu_custom_call" in compile_row_sum(1024).as_text()
  with pytest.raises(Exception, match=r"Ran out of memory in memory space vmem"):
    compile_row_sum(2048)


# A batch of 20 over 4 devices: no dimension of the tiny model's parameters is 20 or 5, so a collective
# that carries the batch shows in its shape.
MODEL_BATCH, MODEL_DEVICES = 20, 4


@pytest.mark.parametrize("name,platform", [_target("v5e:2x2", "tpu", "v5e"), _target("h100:4", "cuda", "h100")])
def test_sharded_model_step_compiles_with_kernels_per_device(name, platform):
  """Loss and gradient of a tiny bfloat16 model with the Pallas scan, the batch over 4 devices: each device
  runs the kernels on its own part of the batch (shard_map), and no collective carries the batch."""
  target = targets.resolve(name)
  mesh = sharding.create_mesh(data=-1, fsdp=1, devices=target.devices[:MODEL_DEVICES])
  config = variants.model_config(
    "shufflemamba_tiny",
    num_classes=10,
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    scan_method="pallas",
    dtype="bfloat16",
  )
  graphdef, params = nnx.split(nnx.eval_shape(lambda: vim.VisionMamba(config, rngs=nnx.Rngs(0))), nnx.Param)
  params = sharding.abstract(params, sharding.replicated(mesh))
  batch = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((MODEL_BATCH, 32, 32, 3), jnp.float32, sharding=batch)
  labels = jax.ShapeDtypeStruct((MODEL_BATCH,), jnp.int32, sharding=batch)

  def loss_fn(params, images, labels):
    logits = nnx.merge(graphdef, params)(images, train=True, key=jax.random.key(1))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

  compiled = _compile(target, jax.value_and_grad(loss_fn), [params, images, labels], mesh=mesh)
  text = compiled.as_text()

  # The blocks run under lax.scan: one call of each kernel per direction of the mixer in the loops' bodies
  # (the backward loop's remat recomputes the forward kernels).
  calls = _kernel_calls(text, platform)
  assert calls.count("backward") == 2 and calls.count("forward") >= 2, calls
  per_device = MODEL_BATCH // MODEL_DEVICES
  for line in text.splitlines():
    if f'custom_call_target="{KERNEL_CALL[platform]}"' in line:
      result = line.split("custom-call(")[0]
      assert re.search(rf"\[{per_device},", result) and not re.search(rf"\[{MODEL_BATCH},", result), result[:300]
  collectives = list(COLLECTIVE.finditer(text))
  assert collectives, "no collective at all: the step was not partitioned over the devices"
  for match in collectives:
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", match["shape"])]
    assert not [s for s in shapes if MODEL_BATCH in s or per_device in s], match[0]


# The tiny Mask R-CNN of test_det_mask_rcnn.py (a conv backbone, 2 classes, 64x64 images, 2 images on one
# chip) with fewer RoIs and proposals: the TPU compiler's time grows with the RoI count of the RoIAlign's
# batched products (this halves the test's compile time, to about 45 s of CPU).
import dataclasses

import test_det_mask_rcnn as tiny_det

from shufflemamba_jax.models.detection import mask_rcnn

DET_BATCH = 2
DET_CONFIG = dataclasses.replace(
  tiny_det.CONFIG,
  rpn_num=16,
  rpn_nms_pre=32,
  rpn_max_proposals=32,
  rcnn_num=16,
  max_mask_rois=4,
  test_nms_pre=32,
  test_max_proposals=32,
  test_max_detections=4,
  test_pre_nms_top_k=64,
)


def _nbytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,platform", [_target("v5e:1x1", "tpu", "v5e"), _target("h100", "cuda", "h100")])
def test_tiny_mask_rcnn_train_step_and_predict_compile(name, platform):
  """The detector's training step (loss, gradients, AdamW; the state donated) and its predict compile for
  one chip, and the step's memory is within its budget.

  The budget: the train state (parameters, AdamW's two moments, batch statistics: 2.4 MB) three times, as
  the TPU pads small arrays to (8, 128) tiles (its arguments measured 2.8 times the H100's); plus 20 of the
  step's largest activations, the mask head's float32 (2 images x 4 RoIs, 28, 28, 32) maps (0.77 MiB; no
  buffer of the H100's program is larger than 0.82 MiB): 22.3 MiB. Measured: 11.5 MiB on the H100
  (temporaries 9.0), 6.5 MiB on v5e, whose compiler keeps all of this step's temporaries in the 128 MiB of
  on-chip VMEM (its memory analysis counts only HBM: temporaries 0)."""
  del platform
  target = targets.resolve(name)
  mesh = sharding.create_mesh(data=1, fsdp=1, devices=target.devices[:1])
  state = lambda tree: sharding.abstract(tree, sharding.replicated(mesh))
  batch = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
  config = DET_CONFIG
  build = lambda: mask_rcnn.MaskRCNN(config, rngs=nnx.Rngs(0), backbone=tiny_det.TinyBackbone(16, nnx.Rngs(1)))
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = jax.eval_shape(tx.init, params)
  images, sizes = batch((DET_BATCH, tiny_det.SIZE, tiny_det.SIZE, 3)), batch((DET_BATCH, 2), jnp.int32)
  gts, crop = config.max_gt, config.mask_crop_size
  det_targets = mask_rcnn.Targets(
    batch((DET_BATCH, gts, 4)),
    batch((DET_BATCH, gts), jnp.int32),
    batch((DET_BATCH, gts), jnp.bool_),
    batch((DET_BATCH, gts, crop, crop)),
    sizes,
  )
  key = state(jax.eval_shape(lambda: jax.random.key(0)))
  step = jax.jit(tiny_det.train_step_fn(graphdef, tx), donate_argnums=(0, 1, 2))
  with jax.set_mesh(mesh):
    traced = step.trace(state(params), state(rest), state(opt_state), images, det_targets, key)
    compiled = traced.lower().compile(target.compiler_options or None)
  memory = compiled.memory_analysis()
  state_bytes = _nbytes((params, rest, opt_state))
  # The state is on the chip and donated: the updated one takes its place.
  assert memory.argument_size_in_bytes >= state_bytes and memory.alias_size_in_bytes >= _nbytes((params, opt_state))
  total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
  total -= memory.alias_size_in_bytes
  mask_map = DET_BATCH * config.max_mask_rois * config.mask_size**2 * config.mask_channels * 4
  assert 0 < total <= 3 * state_bytes + 20 * mask_map, memory

  def predict(params, rest, images, sizes):
    return nnx.merge(graphdef, params, rest).predict(images, sizes)

  compiled = _compile(target, predict, [state(params), state(rest), images, sizes], mesh=mesh)
  detections = config.test_max_detections
  assert [leaf.shape for leaf in jax.tree.leaves(compiled.out_info)] == [
    (DET_BATCH, detections, 4),
    (DET_BATCH, detections),
    (DET_BATCH, detections),
    (DET_BATCH, detections),
    (DET_BATCH, detections, config.mask_size, config.mask_size),
  ]
