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
