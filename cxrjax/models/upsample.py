"""Stride-2 (transposed) convolutions whose forward and backward passes avoid `lhs_dilation`.

XLA's CPU backend lowers convolutions with `lhs_dilation` (which is what
`lax.conv_transpose` and `nn.ConvTranspose` emit, and what autodiff emits for
the weight gradient of a transposed convolution) very slowly: on a 2-core x86
CPU, forward plus backward pass of one DCGAN generator layer (256 -> 128
channels, 8 -> 16 px, batch 128) took 3.9 s (8.5 s with the cores shared),
of which the forward pass was 69 ms. Here it takes 0.14 s (forward 52 ms).
This module writes the two stride-2 layers of a DCGAN as a pair of
`jax.custom_vjp` functions that are each other's adjoint:

- `conv_transpose_2x` (upsampling, = PyTorch `ConvTranspose2d(k, stride=2,
  padding=k/2 - 1)`): forward is the sub-pixel form, one stride-1 VALID
  convolution with `k/2 x k/2` taps that produces the four output phases as
  `4 * features` channels, then a depth-to-space interleave; the input
  gradient is the strided convolution it is the adjoint of.
- `conv_2x` (downsampling, = PyTorch `Conv2d(k, stride=2, padding=k/2 - 1)`):
  forward is the strided convolution; its input gradient is the sub-pixel
  transposed convolution above.

Both share `_weight_grad`: XLA's own weight gradient of the strided
convolution (a window-dilated convolution, fast on CPU) when the
high-resolution side has many channels, and one GEMM over k*k strided slices
when it has only a few (image channels), where that GEMM was 5-10x faster.
Per generator layer of the 64-px DCGAN (batch 128): forward 0.7-0.95x the
time of XLA's dilated forward pass for the wide layers (2.7x, 15 vs 5 ms, for
the last, 1-channel one), forward plus backward 25-35x faster (0.14-0.17 s
vs 3.5-5.1 s). Whole training steps: `python -m cxrjax.bench.dcgan_upsampling`.

Kernel layouts (spatial axes first, as everywhere in Flax):

- `ConvTranspose2x` / `conv_transpose_2x`: `[k, k, in_features, features]`,
  not flipped; PyTorch's `ConvTranspose2d.weight` (`[in, out, kh, kw]`) is
  `kernel.transpose(2, 3, 0, 1)`. `nn.ConvTranspose` (with
  `padding=((k - 1 - p,) * 2)`, `transpose_kernel=False`) computes the same
  with this kernel flipped spatially, `kernel[::-1, ::-1]`.
- `Conv2x` / `conv_2x`: `[k, k, in_features, features]` (HWIO) exactly as
  `nn.Conv`; PyTorch's `Conv2d.weight` (`[out, in, kh, kw]`) is
  `kernel.transpose(3, 2, 0, 1)`.
- `Project`: `[in_features, size, size, features]`; PyTorch's
  `ConvTranspose2d(in, features, size, stride=1, padding=0).weight` applied
  to a 1x1 input (`[in, out, kh, kw]`) is `kernel.transpose(0, 3, 1, 2)`.

Forward-mode autodiff (`jax.jvp`) is not available through `custom_vjp`
functions; reverse mode, including gradients of gradients, is.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from cxrjax.ops import onednn

# DCGAN's initialiser (Radford et al. 2016): N(0, 0.02) for every convolution.
dcgan_init = nn.initializers.normal(0.02)

_DN = ('NHWC', 'HWIO', 'NHWC')
# With this many channels or fewer on the high-resolution side the slice-GEMM weight
# gradient beat XLA's (1 channel: 3 ms vs 21 ms; 3: 7-15 ms vs 32 ms; 8: 82 ms vs 54 ms).
_GEMM_WEIGHT_GRAD_MAX_CHANNELS = 4


@functools.cache
def _phase_plan(k: int):
  """Static index plan of the sub-pixel form for kernel size `k` (even).

  Output row `2m + r` of the transposed convolution (padding `p = k/2 - 1`)
  sums input rows `m + lo[r] + d`, `d < k/2`, times kernel rows `taps[r][d]`.
  One VALID convolution over the input padded by `pad` yields both phases;
  phase `r` starts at output position `lo[r] - min(lo)`.

  Returns:
    (taps [2, k/2], starts [2], pad (low, high)).
  """
  if k < 2 or k % 2:
    raise ValueError(f'kernel_size must be even and >= 2 for a stride-2 transposed convolution, got {k}')
  p, t = k // 2 - 1, k // 2
  taps, lo = [], []
  for r in range(2):
    kh_min = (r + p) % 2
    lo.append((r + p - kh_min) // 2 - t + 1)
    taps.append([kh_min + 2 * (t - 1 - d) for d in range(t)])
  lo_min = min(lo)
  starts = tuple(v - lo_min for v in lo)
  return np.asarray(taps), starts, (-lo_min, max(lo) + t - 1)


# Jitted so that eager calls compile one program per shape rather than a dozen small
# ops per layer; inside an outer jit they are inlined.
@jax.jit
def _up(x, w):
  """Sub-pixel stride-2 transposed convolution; `w` is `[k, k, low, high]`."""
  b, h, wd, _ = x.shape
  k, hi = w.shape[0], w.shape[-1]
  taps, starts, pad = _phase_plan(k)
  t = k // 2
  # [rh, dh, rw, dw, low, high] -> [dh, dw, low, rh, rw, high]: every phase is a set of output channels.
  w2 = w[taps][:, :, taps].transpose(1, 3, 4, 0, 2, 5).reshape(t, t, w.shape[2], 4 * hi)
  xp = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))
  z = lax.conv_general_dilated(xp, w2, (1, 1), 'VALID', dimension_numbers=_DN)
  z = z.reshape(*z.shape[:3], 2, 2, hi)
  rows = []
  for rh in range(2):
    cols = [z[:, starts[rh] : starts[rh] + h, starts[rw] : starts[rw] + wd, rh, rw] for rw in range(2)]
    rows.append(jnp.stack(cols, axis=3))  # [b, h, w, rw, c]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * wd, hi)  # [b, h, rh, w, rw, c] -> interleaved


@jax.jit
def _down(y, w):
  """Strided convolution (stride 2, padding k/2 - 1); `w` is `[k, k, low, high]`."""
  p = w.shape[0] // 2 - 1
  return lax.conv_general_dilated(y, w.swapaxes(2, 3), (2, 2), ((p, p), (p, p)), dimension_numbers=_DN)


@functools.partial(jax.jit, static_argnames='k')
def _weight_grad(x, y, k: int):
  """d<_up(x, w), y>/dw = d<x, _down(y, w)>/dw for low-res `x`, high-res `y`: `[k, k, low, high]`."""
  b, h, wd, _ = x.shape
  p = k // 2 - 1
  if y.shape[-1] <= _GEMM_WEIGHT_GRAD_MAX_CHANNELS:
    # dw[a, c] = sum_{b,i,j} x[b, i, j] (x) y[b, 2i - p + a, 2j - p + c]: k*k strided slices of y, one GEMM.
    yp = jnp.pad(y, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = [[yp[:, a : a + 2 * h : 2, c : c + 2 * wd : 2] for c in range(k)] for a in range(k)]
    patches = jnp.stack([jnp.stack(row, axis=3) for row in cols], axis=3)  # [b, h, w, k, k, high]
    return jnp.einsum('bhwi,bhwxyo->xyio', x, patches)
  # XLA's weight gradient of the strided convolution uses window (rhs) dilation, which is fast.
  _, vjp = jax.vjp(lambda w: _down(y, w), jnp.zeros((k, k, x.shape[-1], y.shape[-1]), x.dtype))
  return vjp(x)[0]


@jax.custom_vjp
def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `ConvTranspose2d(k, stride=2, padding=k/2 - 1)`: `[b, h, w, in]` -> `[b, 2h, 2w, out]`.

  Args:
    x: NHWC input.
    kernel: `[k, k, in, out]` with even `k` (layout in the module docstring).

  Returns:
    NHWC output of twice the spatial size.
  """
  return _up(x, kernel)


def _conv_transpose_2x_fwd(x, kernel):
  return _up(x, kernel), (x, kernel)


def _conv_transpose_2x_bwd(res, g):
  x, kernel = res
  return _down(g, kernel), _weight_grad(x, g, kernel.shape[0])


conv_transpose_2x.defvjp(_conv_transpose_2x_fwd, _conv_transpose_2x_bwd)


@jax.custom_vjp
def conv_2x(y: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `Conv2d(k, stride=2, padding=k/2 - 1)`: `[b, 2h, 2w, in]` -> `[b, h, w, out]`.

  Args:
    y: NHWC input with even height and width.
    kernel: `[k, k, in, out]` (HWIO, as `nn.Conv`) with even `k`.

  Returns:
    NHWC output of half the spatial size.
  """
  return _down(y, kernel.swapaxes(2, 3))


def _conv_2x_fwd(y, kernel):
  return conv_2x(y, kernel), (y, kernel)


def _conv_2x_bwd(res, g):
  y, kernel = res
  w = kernel.swapaxes(2, 3)
  return _up(g, w), _weight_grad(g, y, kernel.shape[0]).swapaxes(2, 3)


conv_2x.defvjp(_conv_2x_fwd, _conv_2x_bwd)


class ConvTranspose2x(nn.Module):
  """Stride-2 transposed convolution, equal to PyTorch's `ConvTranspose2d(k, 2, k/2 - 1)`.

  Doubles height and width. Parameter `kernel` is `[k, k, in_features,
  features]` (PyTorch weight `.transpose(2, 3, 0, 1)`).

  Attributes:
    features: output channels.
    kernel_size: even kernel size (4 in DCGAN).
    use_bias: add a bias (DCGAN layers followed by BatchNorm have none).
    dtype: compute dtype (parameters stay float32).
    kernel_init: initialiser of the kernel (DCGAN's N(0, 0.02) by default).
    conv_impl: 'xla' (the custom VJPs above) or 'onednn' (float32: oneDNN's input
      gradient of the strided convolution, which is this transposed convolution).
  """

  features: int
  kernel_size: int = 4
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = dcgan_init
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    _phase_plan(k)  # validates k before any parameter is created
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.conv_impl == 'onednn' and x.dtype == jnp.float32:
      b, h, w, _ = x.shape
      p = k // 2 - 1
      y = onednn.transposed_conv(x, kernel.swapaxes(2, 3), (b, 2 * h, 2 * w, self.features), (2, 2), ((p, p), (p, p)))
    else:
      y = conv_transpose_2x(x, kernel)
    return y if bias is None else y + bias


class Conv2x(nn.Module):
  """Stride-2 convolution, equal to PyTorch's `Conv2d(k, 2, k/2 - 1)`, with a fast backward pass.

  Computes what `nn.Conv(features, (k, k), 2, padding=((k/2 - 1,) * 2))`
  computes, with the same parameter layout, but its input gradient is the
  sub-pixel transposed convolution instead of XLA's `lhs_dilation` one.

  Attributes:
    features: output channels.
    kernel_size: even kernel size (4 in DCGAN).
    use_bias: add a bias.
    dtype: compute dtype (parameters stay float32).
    kernel_init: initialiser of the kernel (DCGAN's N(0, 0.02) by default).
    conv_impl: 'xla' (the custom VJPs above) or 'onednn' (float32).
  """

  features: int
  kernel_size: int = 4
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = dcgan_init
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    _phase_plan(k)
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.conv_impl == 'onednn' and x.dtype == jnp.float32:
      p = k // 2 - 1
      y = onednn.conv(x, kernel, (2, 2), ((p, p), (p, p)))
    else:
      y = conv_2x(x, kernel)
    return y if bias is None else y + bias


class Project(nn.Module):
  """A vector to a `size x size` map: PyTorch's `ConvTranspose2d(in, features, size, 1, 0)` on a 1x1 input.

  A dense layer with its kernel kept as `[in, size, size, features]`
  (PyTorch weight `.transpose(0, 2, 3, 1)`), so parameter counts and layouts
  match DCGAN's first layer. Used for the 4x4 start and the 7x7 start of
  28-px generators.

  Attributes:
    features: channels of the output map.
    size: height and width of the output map.
    use_bias: add a per-channel bias.
    dtype: compute dtype (parameters stay float32).
    kernel_init: initialiser of the kernel (DCGAN's N(0, 0.02) by default).
  """

  features: int
  size: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = dcgan_init

  @nn.compact
  def __call__(self, z):
    z = z.reshape(z.shape[0], -1)
    shape = (z.shape[-1], self.size, self.size, self.features)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    z, kernel, bias = promote_dtype(z, kernel, bias, dtype=self.dtype)
    y = jnp.einsum('bi,ihwo->bhwo', z, kernel)
    return y if bias is None else y + bias
