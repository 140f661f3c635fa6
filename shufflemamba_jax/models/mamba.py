"""The bidirectional Mamba mixer of Vision Mamba ("v2"): one selective SSM per direction.

Both directions share `in_proj` and `out_proj`; each has its own depthwise conv, `x_proj`,
`dt_proj`, `A_log` and `D`. The backward direction runs the scan from the last token to the first
(and its conv looks ahead instead of back), which equals Vim's flip-scan-flip without the copies.
Parameter names mirror the reference PyTorch module so that weights map one to one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from shufflemamba_jax.models import ssm


def uniform_init(bound: float):
  """U(-bound, bound); with bound 1/sqrt(fan_in) it is PyTorch's default Linear/Conv init."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dt_bias_init(dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
  """Mamba's dt init: softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max]."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


class CausalDepthwiseConv1d(nnx.Module):
  """Depthwise 1-D convolution over the sequence that sees only past tokens (or only future ones).

  kernel is (kernel_size, channels): kernel[k, e] is PyTorch's `conv1d.weight[e, 0, k]`.
  """

  def __init__(self, channels: int, kernel_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(kernel_size)  # PyTorch default for a depthwise conv: fan_in = kernel_size
    self.kernel = nnx.Param(uniform_init(bound)(rngs.params(), (kernel_size, channels), param_dtype))
    self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (channels,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, reverse: bool = False) -> jax.Array:
    """x: (batch, length, channels) -> same shape; `reverse` looks at positions >= l instead of <= l."""
    kernel_size, _ = self.kernel.shape
    length = x.shape[1]
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    pad = ((0, 0), (0, kernel_size - 1), (0, 0)) if reverse else ((0, 0), (kernel_size - 1, 0), (0, 0))
    padded = jnp.pad(x, pad)
    out = self.bias[...].astype(self.dtype)
    for k in range(kernel_size):
      start = kernel_size - 1 - k if reverse else k
      out = out + kernel[k] * padded[:, start : start + length]
    return out


class BiMamba(nnx.Module):
  """Bidirectional selective-SSM token mixer, (batch, length, dim) -> (batch, length, dim)."""

  def __init__(
    self,
    dim: int,
    *,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    dt_rank: int | None = None,
    num_layers: int = 1,
    scan_method: str = ssm.DEFAULT_SCAN_METHOD,
    chunk_size: int = ssm.DEFAULT_CHUNK_SIZE,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    inner = expand * dim
    self.dt_rank = dt_rank or math.ceil(dim / 16)
    self.d_state = d_state
    self.scan_method = scan_method
    self.chunk_size = chunk_size
    self.dtype = dtype
    linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj = nnx.Linear(dim, 2 * inner, kernel_init=uniform_init(1 / math.sqrt(dim)), **linear)
    # Mamba rescales the residual-branch output projection by 1/sqrt(depth) (GPT-2 style).
    self.out_proj = nnx.Linear(
      inner, dim, kernel_init=uniform_init(1 / math.sqrt(inner) / math.sqrt(num_layers)), **linear
    )

    def direction_params():
      conv = CausalDepthwiseConv1d(inner, d_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      x_proj = nnx.Linear(inner, self.dt_rank + 2 * d_state, kernel_init=uniform_init(1 / math.sqrt(inner)), **linear)
      dt_proj = nnx.Linear(
        self.dt_rank,
        inner,
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=uniform_init(self.dt_rank**-0.5),
        bias_init=_dt_bias_init(),
        rngs=rngs,
      )
      a_log = nnx.Param(
        jnp.broadcast_to(jnp.log(jnp.arange(1, d_state + 1, dtype=jnp.float32)), (inner, d_state)).astype(param_dtype)
      )
      skip = nnx.Param(jnp.ones((inner,), param_dtype))
      return conv, x_proj, dt_proj, a_log, skip

    self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = direction_params()
    self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = direction_params()

  def _direction(self, x, z, conv, x_proj, dt_proj, a_log, skip, reverse):
    x = jax.nn.silu(conv(x, reverse=reverse))
    dt, B, C = jnp.split(x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    # dt_proj's bias enters the scan as delta_bias (inside the softplus), as in the reference.
    delta = dt @ dt_proj.kernel[...].astype(self.dtype)
    return ssm.selective_scan(
      x,
      delta,
      -jnp.exp(a_log[...].astype(jnp.float32)),
      B,
      C,
      skip[...],
      z=z,
      delta_bias=dt_proj.bias[...],
      delta_softplus=True,
      reverse=reverse,
      method=self.scan_method,
      chunk_size=self.chunk_size,
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    x, z = jnp.split(self.in_proj(hidden), 2, axis=-1)
    forward = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, False)
    backward = self._direction(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, True)
    return self.out_proj((forward + backward) / 2)
