"""The CPU backend's layers: `cxrjax.models.layers.Layers` on oneDNN and CPU-friendly XLA formulations.

Every constructor creates the same variables as its stock counterpart (names,
shapes, initialisers), so parameter trees and checkpoints do not depend on the
backend, and computes the same function:

- convolutions (`conv_general_dilated`, given to `nn.Conv`): oneDNN for float32
  NHWC/HWIO convolutions; for other dtypes, formulations whose passes avoid the
  `lhs_dilation` convolutions that XLA's CPU backend runs slowly (`strided_conv`,
  `subpixel_conv`, depthwise convolutions as k*k shifted multiply-adds); XLA's
  `lax.conv_general_dilated` for anything else.
- stride-2 transposed convolutions (`conv_transpose_2x`): oneDNN's input gradient of
  the strided convolution, or the sub-pixel form.
- `BatchNorm`: oneDNN's batch normalization (statistics in one pass, normalisation
  and the optional ReLU in another) in training.
- `GroupNorm`: statistics reduced over the spatial axes first (channels stay the
  minor axis), then over each group's channels.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cxrjax.backends.cpu import onednn, strided_conv, subpixel_conv
from cxrjax.models import layers

_DN = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  return lhs.ndim == 4 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == (
    lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
  )


def _depthwise_taps(x, w, strides, padding):
  """A depthwise convolution as k*k shifted multiply-adds, which XLA fuses (its grouped convolution is slow on CPU)."""
  (pt, pb), (pl, pr) = padding
  kh, kw = w.shape[:2]
  oh = (x.shape[1] + pt + pb - kh) // strides[0] + 1
  ow = (x.shape[2] + pl + pr - kw) // strides[1] + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      rows = slice(i, i + strides[0] * (oh - 1) + 1, strides[0])
      cols = slice(j, j + strides[1] * (ow - 1) + 1, strides[1])
      tap = xp[:, rows, cols, :] * w[i, j, 0]
      out = tap if out is None else out + tap
  return out


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):  # fmt: skip
  """`lax.conv_general_dilated` on the CPU backend's kernels (see the module docstring); give it to `nn.Conv`."""
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)  # fmt: skip
  if lhs.dtype == jnp.float32:
    return onednn.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  plain = (
    _is_nhwc(lhs, rhs, dimension_numbers)
    and batch_group_count == 1
    and preferred_element_type is None
    and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  )
  if plain and isinstance(padding, str):  # 'SAME' / 'VALID' (flax's default) as explicit pairs
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if plain:
    k, strides, pads = rhs.shape[0], tuple(window_strides), tuple(tuple(p) for p in padding)
    square = rhs.shape[0] == rhs.shape[1]
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1:
      return _depthwise_taps(lhs, rhs.astype(lhs.dtype), strides, pads)
    if feature_group_count == 1 and square and strides == (2, 2):
      if k % 2 and pads == ((k // 2, k // 2),) * 2:
        return strided_conv.strided_conv(lhs, rhs)
      if k % 2 == 0 and pads == ((k // 2 - 1, k // 2 - 1),) * 2 and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0:
        return subpixel_conv.conv_2x(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`cxrjax.models.layers.conv_transpose_2x` on oneDNN (float32) or in the sub-pixel form."""
  if x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
    b, h, w, _ = x.shape
    k = kernel.shape[0]
    p = k // 2 - 1
    return onednn.transposed_conv(x, kernel.swapaxes(2, 3), (b, 2 * h, 2 * w, kernel.shape[3]), (2, 2), ((p, p),) * 2)
  return subpixel_conv.conv_transpose_2x(x, kernel)


class BatchNorm(layers.BatchNorm):
  """`cxrjax.models.layers.BatchNorm` (flax's, with an optional ReLU), on oneDNN in training.

  oneDNN takes training-mode calls on float32 inputs over the last axis; every other
  call (evaluation with running averages, initialisation, other dtypes, `axis_name`,
  masks) is flax's own. oneDNN computes the batch variance in two passes, flax (by
  default) as E[x^2] - E[x]^2 clamped at 0; the two agree to rounding unless a
  channel's mean is large against its spread, where oneDNN's is the more accurate.
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    on_onednn = (
      not use_running_average
      and not self.is_initializing()
      and mask is None
      and self.axis in (-1, x.ndim - 1)
      and self.axis_name is None
      and x.ndim >= 2
      and x.size > 0
      and x.dtype == jnp.float32
      and (self.dtype is None or jnp.dtype(self.dtype) == jnp.float32)
      and jnp.dtype(self.param_dtype) == jnp.float32
      and self.epsilon > 0
      and self.use_scale
      and self.use_bias
    )
    if not on_onednn:
      return super().__call__(x, None if self.use_running_average is not None else use_running_average, mask=mask)
    c = x.shape[-1]
    # Created in flax's order and with flax's initialisers: the same variable tree.
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
    y, mean, var = onednn.batch_norm_train(x, scale, bias, self.epsilon, self.relu)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


class GroupNorm(nn.GroupNorm):
  """flax's GroupNorm, in a formulation XLA's CPU backend runs faster.

  Same variables (`scale`, `bias`) and the same function: per sample and group, the
  mean and variance (E[x^2] - E[x]^2, clamped at 0, as flax's default) over the
  spatial axes and the group's channels. The fast path sums x and x^2 over the
  spatial axes into [n, c] (a reduction XLA vectorises along the channels), then over
  each group's channels, and normalises with one multiply-add per element; autodiff
  differentiates it to any order. Everything else (`group_size`, `reduction_axes`,
  `axis_name`, masks, non-float32) is flax's code.
  """

  @nn.compact
  def __call__(self, x, *, mask=None):
    fast = (
      mask is None
      and self.num_groups is not None
      and self.group_size is None
      and self.reduction_axes is None
      and self.axis_name is None
      and x.ndim >= 2
      and x.size > 0
      and x.shape[-1] % self.num_groups == 0
      and x.dtype == jnp.float32
      and (self.dtype is None or jnp.dtype(self.dtype) == jnp.float32)
      and jnp.dtype(self.param_dtype) == jnp.float32
      and self.use_fast_variance
    )
    if not fast:
      return super().__call__(x, mask=mask)
    n, c, g = x.shape[0], x.shape[-1], self.num_groups
    m = x.size // (n * g)
    axes = tuple(range(1, x.ndim - 1))
    mean = x.sum(axes).reshape(n, g, -1).sum(-1) / m
    mean_sq = (x * x).sum(axes).reshape(n, g, -1).sum(-1) / m
    rstd = lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
    # Created in flax's order and with its initialisers: the same variable tree.
    a = jnp.repeat(rstd, c // g, axis=1)
    if self.use_scale:
      a = a * self.param('scale', self.scale_init, (c,), self.param_dtype)
    b = -jnp.repeat(mean, c // g, axis=1) * a
    if self.use_bias:
      b = b + self.param('bias', self.bias_init, (c,), self.param_dtype)
    per_sample = (n,) + (1,) * (x.ndim - 2) + (c,)
    return x * a.reshape(per_sample) + b.reshape(per_sample)


LAYERS = layers.Layers(
  conv=functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated),
  conv_transpose_2x=functools.partial(layers.ConvTranspose2x, conv_transpose=conv_transpose_2x),
  batch_norm=BatchNorm,
  group_norm=GroupNorm,
)
