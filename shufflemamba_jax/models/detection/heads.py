"""The Mask R-CNN's networks: FPN neck, RPN head, Shared2FC box head and FCN mask head.

mmdet 3.3.0's modules with the shufflemamba adapter configs' settings (`neck.norm_cfg` SyncBN):
layouts are NHWC, parameter names mirror mmdet's state dict (`neck.lateral_convs.0.conv`,
`rpn_head.rpn_cls`, `roi_head.bbox_head.shared_fcs.1`, `roi_head.mask_head.convs.3.conv`, ...),
and each layer starts as mmdet initializes it (noted per module). The heads compute in the
config's dtype; their logits and box deltas come out float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shufflemamba_jax.models.adapter import UpConv

# mmcv's kaiming_init(mode="fan_out", nonlinearity="relu", distribution="normal"), untruncated.
_KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_XAVIER = nnx.initializers.xavier_uniform()


def _conv(cin, cout, kernel, *, bias, init, dtype, param_dtype, rngs):
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(kernel, kernel),
    padding=((kernel // 2, kernel // 2),) * 2,
    use_bias=bias,
    kernel_init=init,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class ConvModule(nnx.Module):
  """mmcv's ConvModule: conv (no bias when normalized) -> [BatchNorm `bn`] -> [ReLU]."""

  def __init__(self, cin, cout, kernel, *, norm: bool, relu: bool, init, dtype, param_dtype, rngs, norm_eps=1e-5):
    self.conv = _conv(cin, cout, kernel, bias=not norm, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm:
      self.bn = nnx.BatchNorm(
        cout, momentum=0.9, epsilon=norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
      )
    self.relu = relu

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.conv(x)
    if hasattr(self, "bn"):
      y = self.bn(y, use_running_average=not train).astype(self.conv.dtype)
    return jax.nn.relu(y) if self.relu else y


class FPN(nnx.Module):
  """mmdet's FPN (num_outs 5, no extra convs): 1x1 laterals, top-down nearest upsampling to each
  finer map's size, 3x3 outputs, and P6 as a stride-2 1x1 max pool of P5.

  Convolutions init Xavier uniform (its init_cfg), with BatchNorm (the adapter configs' SyncBN)
  and so no bias; `norm=False` is plain mmdet's (biased convolutions).
  """

  def __init__(self, in_channels, out_channels=256, *, norm=True, dtype, param_dtype, rngs):
    kwargs = dict(norm=norm, relu=False, init=_XAVIER, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lateral_convs = nnx.Dict({str(i): ConvModule(c, out_channels, 1, **kwargs) for i, c in enumerate(in_channels)})
    self.fpn_convs = nnx.Dict(
      {str(i): ConvModule(out_channels, out_channels, 3, **kwargs) for i in range(len(in_channels))}
    )

  def __call__(self, maps: list[jax.Array], train: bool) -> list[jax.Array]:
    """maps (B, H_i, W_i, C_i) at strides 4..32 -> five (B, h, w, 256) maps at strides 4..64."""
    laterals = [self.lateral_convs[str(i)](x, train) for i, x in enumerate(maps)]
    for i in range(len(laterals) - 1, 0, -1):
      finer = laterals[i - 1]
      up = jax.image.resize(laterals[i], (*laterals[i].shape[:1], *finer.shape[1:3], laterals[i].shape[-1]), "nearest")
      laterals[i - 1] = finer + up.astype(finer.dtype)
    outs = [self.fpn_convs[str(i)](x, train) for i, x in enumerate(laterals)]
    # F.max_pool2d(x, 1, stride=2): every other pixel, from the first.
    outs.append(outs[-1][:, ::2, ::2])
    return outs


class RPNHead(nnx.Module):
  """A shared 3x3 conv + ReLU, then per anchor one objectness logit (sigmoid) and 4 deltas;
  every layer normal(0, 0.01), zero bias (mmdet's RPNHead init_cfg)."""

  def __init__(self, channels=256, num_anchors=3, *, dtype, param_dtype, rngs):
    init = nnx.initializers.normal(0.01)
    kwargs = dict(bias=True, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rpn_conv = _conv(channels, channels, 3, **kwargs)
    self.rpn_cls = _conv(channels, num_anchors, 1, **kwargs)
    self.rpn_reg = _conv(channels, 4 * num_anchors, 1, **kwargs)
    self.num_anchors = num_anchors

  def __call__(self, levels: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Five FPN maps -> (objectness logits (B, A_total), deltas (B, A_total, 4)) float32, anchors
    ordered level by level, then row, column and anchor (mmdet's flattening)."""
    logits, deltas = [], []
    for x in levels:
      h = jax.nn.relu(self.rpn_conv(x))
      b = x.shape[0]
      logits.append(self.rpn_cls(h).astype(jnp.float32).reshape(b, -1))
      deltas.append(self.rpn_reg(h).astype(jnp.float32).reshape(b, -1, 4))
    return jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1)


class Shared2FCBBoxHead(nnx.Module):
  """Flattened 7x7 RoI features -> two shared 1024-wide FCs with ReLU -> class logits
  (num_classes + 1, background last) and class-specific deltas (num_classes x 4).

  Init as mmdet's ConvFCBBoxHead: the shared FCs Xavier uniform, fc_cls normal(0.01), fc_reg
  normal(0.001), zero biases.
  """

  def __init__(self, num_classes, in_channels=256, roi_size=7, fc_channels=1024, *, dtype, param_dtype, rngs):
    linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    flat = in_channels * roi_size * roi_size
    self.shared_fcs = nnx.Dict(
      {
        "0": nnx.Linear(flat, fc_channels, kernel_init=_XAVIER, **linear),
        "1": nnx.Linear(fc_channels, fc_channels, kernel_init=_XAVIER, **linear),
      }
    )
    self.fc_cls = nnx.Linear(fc_channels, num_classes + 1, kernel_init=nnx.initializers.normal(0.01), **linear)
    self.fc_reg = nnx.Linear(fc_channels, 4 * num_classes, kernel_init=nnx.initializers.normal(0.001), **linear)
    self.num_classes = num_classes

  def __call__(self, roi_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., 7, 7, C) -> (class logits (..., num_classes + 1), deltas (..., num_classes, 4)), float32.

    Flattened channel-major (C, 7, 7) as PyTorch's `x.flatten(1)` of NCHW, so that the first
    FC's weights are the official ones up to a transpose.
    """
    lead = roi_features.shape[:-3]
    x = jnp.moveaxis(roi_features, -1, -3).reshape(*lead, -1)
    for i in range(2):
      x = jax.nn.relu(self.shared_fcs[str(i)](x))
    logits = self.fc_cls(x).astype(jnp.float32)
    deltas = self.fc_reg(x).astype(jnp.float32).reshape(*lead, self.num_classes, 4)
    return logits, deltas


class FCNMaskHead(nnx.Module):
  """Four 3x3 conv + ReLU (256), a 2x transposed conv + ReLU, a 1x1 conv to one mask logit per
  class: 14x14 RoI features -> 28x28 logits. Kaiming (fan out) init, zero biases (mmcv's
  ConvModule and FCNMaskHead.init_weights)."""

  def __init__(self, num_classes, in_channels=256, channels=256, num_convs=4, *, dtype, param_dtype, rngs):
    kwargs = dict(norm=False, relu=True, init=_KAIMING_FAN_OUT, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.Dict(
      {str(i): ConvModule(in_channels if i == 0 else channels, channels, 3, **kwargs) for i in range(num_convs)}
    )
    self.upsample = UpConv(channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # mmdet: kaiming_normal_(fan_out, relu) for the upsample too; UpConv's own init is the
    # adapter's normal(sqrt(2 / (4 * out))), the same distribution.
    self.conv_logits = _conv(
      channels, num_classes, 1, bias=True, init=_KAIMING_FAN_OUT, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, roi_features: jax.Array) -> jax.Array:
    """(R, 14, 14, C) -> (R, 28, 28, num_classes) float32 logits."""
    x = roi_features
    for i in range(len(self.convs)):
      x = self.convs[str(i)](x, False)
    x = jax.nn.relu(self.upsample(x))
    return self.conv_logits(x).astype(jnp.float32)
