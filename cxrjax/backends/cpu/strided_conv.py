"""Stride-2 convolutions with odd kernels (ResNet's downsampling) whose input gradient avoids `lhs_dilation`.

The CPU backend's fallback for convolutions oneDNN does not take (other dtypes
than float32). Autodiff's input gradient of a strided convolution is an
`lhs_dilation` (zero-interleaved) convolution, which XLA's CPU backend runs
slowly. For odd kernels the input gradient is written exactly, phase by phase:
output pixel `(2m + rh, 2n + rw)` of the gradient only meets the kernel taps `t`
with `t = rh + p (mod 2)`, so each of the four phases is a small stride-1 VALID
convolution over the output gradient (for a 3x3 kernel: 1x1, 1x2, 2x1 and 2x2
taps, nine in all, as many multiply-adds as the forward pass), and the phases are
interleaved. The forward pass stays XLA's, and so does the weight gradient of 3x3
kernels (a window-dilated convolution, which is fast); for 1x1 kernels the weight
gradient is one GEMM over every other pixel.

Reverse mode only: `jax.jvp` does not go through a `custom_vjp` function, which is
one reason the stock backend never uses this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ('NHWC', 'HWIO', 'NHWC')


@functools.cache
def _phase_taps(k: int) -> tuple[tuple[tuple[int, ...], int, int], ...]:
  """For each output phase r in (0, 1): (kernel taps in order, low pad, high pad) of its VALID convolution.

  With padding p = k // 2, input row 2m + r receives g[m + d] * w[t] for every
  tap t with d = (r + p - t) / 2 an integer; ordering the taps by d makes the
  phase a correlation of g (padded by -min(d) below, max(d) above) with them.
  """
  if k < 1 or k % 2 == 0:
    raise ValueError(f'kernel size must be odd for strided_conv, got {k}')
  p = k // 2
  out = []
  for r in range(2):
    by_offset = sorted(((r + p - t) // 2, t) for t in range(k) if (r + p - t) % 2 == 0)
    taps = tuple(t for _, t in by_offset)
    ds = [d for d, _ in by_offset]
    out.append((taps, -min(ds), max(ds)) if taps else ((), 0, 0))
  return tuple(out)


def _conv(x, kernel):
  k = kernel.shape[0]
  return lax.conv_general_dilated(x, kernel, (2, 2), ((k // 2, k // 2),) * 2, dimension_numbers=_DN)


def _input_grad(g, kernel, in_hw):
  """The input gradient of `_conv` by four stride-1 phase convolutions; `in_hw` is the input's (H, W)."""
  b, ho, wo, _ = g.shape
  wt = kernel.swapaxes(2, 3)  # [k, k, out, in]: the adjoint maps output channels to input channels
  cin = wt.shape[-1]
  plan = _phase_taps(kernel.shape[0])
  rows = []
  for taps_h, lo_h, hi_h in plan:
    cols = []
    for taps_w, lo_w, hi_w in plan:
      if not taps_h or not taps_w:  # no tap reaches this phase (1x1 kernels): its gradient is zero
        cols.append(jnp.zeros((b, ho, wo, cin), g.dtype))
        continue
      w = wt[np.asarray(taps_h)][:, np.asarray(taps_w)]
      gp = jnp.pad(g, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
      cols.append(lax.conv_general_dilated(gp, w, (1, 1), 'VALID', dimension_numbers=_DN))
    rows.append(jnp.stack(cols, axis=3))  # [b, ho, wo, rw, c]
  dx = jnp.stack(rows, axis=2).reshape(b, 2 * ho, 2 * wo, cin)  # [b, ho, rh, wo, rw, c] -> interleaved
  return dx[:, : in_hw[0], : in_hw[1]]


@jax.custom_vjp
def strided_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `Conv2d(k, stride=2, padding=k // 2)` for odd `k`: `[b, h, w, in]` -> `[b, ceil(h/2), ceil(w/2), out]`.

  Args:
    x: NHWC input.
    kernel: `[k, k, in, out]` (HWIO, as `nn.Conv`) with odd `k`.

  Returns:
    The NHWC output, as `lax.conv_general_dilated` with stride 2 and padding k // 2.
  """
  _phase_taps(kernel.shape[0])  # refuses even kernels before any work
  return _conv(x, kernel)


def _strided_conv_fwd(x, kernel):
  _phase_taps(kernel.shape[0])
  return _conv(x, kernel), (x, kernel)


def _weight_grad(x, kernel, g):
  if kernel.shape[0] == 1:
    # A 1x1 kernel sees every other pixel: one GEMM over them, faster than XLA's window-dilated convolution.
    return jnp.einsum('nhwc,nhwo->co', x[:, ::2, ::2], g)[None, None].astype(kernel.dtype)
  _, weight_vjp = jax.vjp(lambda w: _conv(x, w), kernel)
  return weight_vjp(g)[0]


def _strided_conv_bwd(res, g):
  x, kernel = res
  return _input_grad(g, kernel, x.shape[1:3]).astype(x.dtype), _weight_grad(x, kernel, g)


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)
