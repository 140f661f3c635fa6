"""The Pallas selective scan: interpret-mode numerics against the float64 reference and the other
methods, lowering for TPU and CUDA through jax.export, and what its backward pass keeps alive."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_ssm import ALL_OPTIONS, ARG_NAMES, _reference_loss_jax, call, random_inputs, reference_scan

import shufflemamba_jax as smj
from shufflemamba_jax.models import pallas_scan, vim
from shufflemamba_jax.models.ssm import selective_scan
from shufflemamba_jax.parallel import sharding

# The kernels run interpreted on CPU: the TPU kernels through selective_scan's platform dispatch
# (backend None), the GPU kernels named explicitly.
BACKENDS = [None, "gpu"]


def run_pallas(inputs, *, options, backend, reverse=False, chunk_size=16):
  """Like test_ssm.call, through pallas_selective_scan with a chosen backend."""
  use_d, use_z, use_bias, softplus = options
  kwargs = dict(
    D=inputs["D"] if use_d else None,
    z=inputs["z"] if use_z else None,
    delta_bias=inputs["delta_bias"] if use_bias else None,
    delta_softplus=softplus,
  )
  if not softplus:
    inputs = dict(inputs, delta=np.abs(inputs["delta"]))
  args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
  out = pallas_scan.pallas_selective_scan(*args, **kwargs, reverse=reverse, chunk_size=chunk_size, backend=backend)
  return args, kwargs, out


def test_forward_matches_float64_reference():
  # 37 positions are three chunks of 16, the last one partial; 6 channels pad to a tile.
  inputs = random_inputs(0, length=37)
  for reverse in (False, True):
    args, kwargs, out = call(inputs, options=ALL_OPTIONS[-1], method="pallas", chunk_size=16, reverse=reverse)
    expected = reference_scan(*args, **kwargs, reverse=reverse)
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _loss(y):
  return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))


def _check_gradients_against_float64(backend, reverse, length):
  inputs = random_inputs(3, length=length)
  args = [inputs[k] for k in ARG_NAMES]
  with jax.enable_x64(True):
    expected = jax.grad(_reference_loss_jax, argnums=tuple(range(8)))(
      *[np.asarray(a, np.float64) for a in args], reverse
    )

  def loss(u, delta, A, B, C, D, z, delta_bias):
    return _loss(
      pallas_scan.pallas_selective_scan(u, delta, A, B, C, D, z, delta_bias, True, reverse=reverse, backend=backend)
    )

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*args)
  for name, got, want in zip(ARG_NAMES, grads, expected):
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max(), err_msg=f"d{name}")


def test_the_model_accepts_the_method():
  assert vim.VisionMambaConfig(scan_method="pallas").scan_method == "pallas"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_every_option_combination_matches_float64_reference(backend, reverse):
  # Small sizes: each combination is its own kernel, compiled once.
  inputs = random_inputs(1, batch=1, length=19, channels=3, state=2)
  option_sets = ALL_OPTIONS if backend is None else [ALL_OPTIONS[0], ALL_OPTIONS[-1]]
  for options in option_sets:
    args, kwargs, out = run_pallas(inputs, options=options, backend=backend, reverse=reverse)
    expected = reference_scan(*args, **kwargs, reverse=reverse)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=str(options))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 3, 197, 208])
def test_odd_lengths_and_channels(backend, length):
  # 130 channels: one whole TPU tile of 128 and one of 2 (three GPU tiles of 64, the last of 2);
  # 197 positions end in a partial chunk, 208 in a whole one; state 5 pads to 8 on GPU.
  inputs = random_inputs(2, batch=1, length=length, channels=130, state=5)
  for reverse in (False, True):
    args, kwargs, out = run_pallas(inputs, options=ALL_OPTIONS[-1], backend=backend, reverse=reverse)
    expected = reference_scan(*args, **kwargs, reverse=reverse)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=str(reverse))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_of_both_kernels_match_float64_reference(backend, reverse):
  _check_gradients_against_float64(backend, reverse, length=40)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_without_options_match_the_associative_method(backend):
  """The backward kernels without D, z, delta_bias or softplus (their other branches)."""
  inputs = random_inputs(4, length=21, channels=5, state=3)
  inputs["delta"] = np.abs(inputs["delta"])
  args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
  for reverse in (False, True):
    pallas = lambda *a, r=reverse: _loss(pallas_scan.pallas_selective_scan(*a, reverse=r, backend=backend))
    assoc = lambda *a, r=reverse: _loss(selective_scan(*a, reverse=r, method="associative"))
    got = jax.grad(pallas, argnums=tuple(range(5)))(*args)
    want = jax.grad(assoc, argnums=tuple(range(5)))(*args)
    for name, g, w in zip("u delta A B C".split(), got, want):
      np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * np.abs(w).max(), err_msg=f"d{name} {reverse}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_upstream_tolerance(backend):
  inputs = random_inputs(5, length=37)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  args, kwargs, out = run_pallas(bf16, options=ALL_OPTIONS[-1], backend=backend)
  assert out.dtype == jnp.bfloat16
  f32 = {k: v if v is None or isinstance(v, bool) else np.asarray(v, np.float32) for k, v in kwargs.items()}
  expected = reference_scan(*[np.asarray(a, np.float32) for a in args], **f32)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=3e-2, atol=5e-2)

  # The gradients come back in the inputs' dtypes.
  def loss(u, z):
    return _loss(pallas_scan.pallas_selective_scan(u, *args[1:], z=z, backend=backend).astype(jnp.float32))

  grads = jax.grad(loss, argnums=(0, 1))(args[0], bf16["z"])
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


TINY = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=16, depth=2)


@pytest.mark.slow
def test_model_training_step_matches_chunked():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  labels = jnp.array([3, 7])

  def loss_and_grads(method):
    model = smj.create_model("shufflemamba_tiny", rngs=nnx.Rngs(0), scan_method=method, **TINY)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, train=True, key=jax.random.key(1))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)

  loss_p, grads_p = loss_and_grads("pallas")
  loss_c, grads_c = loss_and_grads("chunked")
  np.testing.assert_allclose(loss_p, loss_c, rtol=1e-5)
  for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(g, c, rtol=1e-3, atol=1e-3 * float(np.abs(c).max()) + 1e-7, err_msg=str(path))


# ShuffleMamba-Ti and -B at 224 px: 197 tokens, d_inner 384 and 1536, d_state 16.
SHAPES = {"ti": (384, 16), "b": (1536, 16)}
TRITON = "__gpu$xla.gpu.triton"


def _abstract_args(batch, length, channels, state, dtype=jnp.bfloat16):
  S = jax.ShapeDtypeStruct
  seq, bc, vec = S((batch, length, channels), dtype), S((batch, length, state), dtype), S((channels,), jnp.float32)
  return [seq, seq, S((channels, state), jnp.float32), bc, bc, vec, seq, vec]


def _scan(reverse):
  return lambda u, delta, A, B, C, D, z, bias: selective_scan(
    u, delta, A, B, C, D, z, bias, True, reverse=reverse, method="pallas"
  )


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("size", sorted(SHAPES))
def test_exports_for_accelerators(platform, size):
  """jax.export runs the real Mosaic / Triton lowering of the kernels, which rejects bad blocks or ops."""
  channels, state = SHAPES[size]
  args = _abstract_args(2, 197, channels, state)
  target = {"tpu": "tpu_custom_call", "cuda": TRITON}[platform]
  for reverse in (False, True):
    forward = _scan(reverse)
    backward = jax.grad(lambda *a, f=forward: jnp.sum(f(*a).astype(jnp.float32) ** 2), argnums=tuple(range(8)))
    for name, fn in (("forward", forward), ("backward", backward)):
      exported = jax.export.export(
        jax.jit(fn), platforms=[platform], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)]
      )(*args)
      module = exported.mlir_module()
      # The gradient runs the forward kernel (for the residuals), then the backward kernel.
      assert module.count(f"@{target}(") == (1 if name == "forward" else 2), (name, reverse)


def test_residuals_hold_no_length_by_state_array():
  """What the backward pass keeps: the inputs and the chunk-start states, nothing (length, state)-sized."""
  batch, length, channels, state = 3, 40, 6, 4
  args = _abstract_args(batch, length, channels, state, jnp.float32)
  num_chunks = 3

  def residual_shapes(fn):
    vjp = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return [x.shape for x in jax.tree.leaves(vjp)]

  def big(shape):  # holds a length axis, a channel axis and a state axis
    return length in shape and channels in shape and state in shape

  shapes = residual_shapes(_scan(False))
  assert (batch, num_chunks, state, channels) in shapes
  assert not [s for s in shapes if big(s)]
  # Of the arrays with a channel and a state axis, only A and the states.
  assert {s for s in shapes if state in s and channels in s} == {
    (batch, num_chunks, state, channels),
    (channels, state),
  }
  # The check sees such arrays where they exist: the associative scan saves them.
  associative = lambda u, delta, A, B, C, D, z, bias: selective_scan(
    u, delta, A, B, C, D, z, bias, True, method="associative"
  )
  assert [s for s in residual_shapes(associative) if big(s)]


@pytest.mark.slow
def test_batch_sharded_scan_runs_per_device_and_matches():
  """Under a mesh each device scans its own part of the batch (a custom call cannot be partitioned)."""
  inputs = random_inputs(6, batch=8, length=20)
  args = [inputs[k] for k in ARG_NAMES]

  def loss(*a):
    return _loss(_scan(True)(*a))

  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))
  expected = step(*args)
  with jax.set_mesh(sharding.create_mesh(4, 2)):
    assert "sdy.manual_computation" in step.lower(*args).as_text()
    got = step(*args)
  for name, g, w in zip(("loss",) + ARG_NAMES, jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=name)
