"""Stride-2 (transposed) convolutions with even kernels whose forward and backward passes avoid `lhs_dilation`.

The CPU backend's fallback for the DCGAN's stride-2 layers where oneDNN does not
apply (other dtypes than float32). XLA's CPU backend lowers convolutions with
`lhs_dilation` (what `lax.conv_transpose` emits, and what autodiff emits for the
input gradient of a strided convolution) very slowly. Here the two stride-2 layers
of a DCGAN are a pair of `jax.custom_vjp` functions that are each other's adjoint:

- `conv_transpose_2x` (upsampling, = PyTorch `ConvTranspose2d(k, stride=2,
  padding=k/2 - 1)`, `cxrjax.models.layers.conv_transpose_2x`): forward is the
  sub-pixel form, one stride-1 VALID convolution with `k/2 x k/2` taps that
  produces the four output phases as `4 * features` channels, then a
  depth-to-space interleave; the input gradient is the strided convolution it is
  the adjoint of.
- `conv_2x` (downsampling, = PyTorch `Conv2d(k, stride=2, padding=k/2 - 1)`):
  forward is the strided convolution; its input gradient is the sub-pixel
  transposed convolution above.

Both share `_weight_grad`: XLA's own weight gradient of the strided convolution (a
window-dilated convolution, fast on CPU) when the high-resolution side has many
channels, and one GEMM over k*k strided slices when it has only a few (image
channels). Kernel layouts are those of `cxrjax.models.layers.ConvTranspose2x`
(`[k, k, in, out]`, not flipped) and `nn.Conv` (HWIO).

Reverse mode only: `jax.jvp` does not go through a `custom_vjp` function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ('NHWC', 'HWIO', 'NHWC')
# With this many channels or fewer on the high-resolution side the slice-GEMM weight gradient
# beat XLA's window-dilated one (measured per channel count; BUILD_NOTES.md).
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
