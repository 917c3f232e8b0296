"""The layers a model is built from, as one small object that a backend may replace.

Models never choose their kernels: they take a `Layers` (the flax examples'
`conv: ModuleDef = nn.Conv` pattern, for the four kinds of layer whose kernels a
platform may want to swap) and build every convolution and normalization through it.
The defaults here are plain Flax on `jax.lax`, which is what runs on GPU and TPU; a
backend (`cxrjax.backends`) hands models a `Layers` whose constructors create the
same variables (names, shapes, initialisers) and compute the same function with
other kernels, so parameter trees and checkpoints do not depend on the backend.

- `conv`: `nn.Conv`'s signature (strided, grouped and depthwise convolutions too).
- `conv_transpose_2x`: a stride-2 transposed convolution with PyTorch's semantics
  (`ConvTranspose2x` below).
- `batch_norm`: `nn.BatchNorm`'s signature plus `relu` (a ReLU applied after it, which
  a backend may fuse into the normalization).
- `group_norm`: `nn.GroupNorm`'s signature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

ModuleDef = Any

_DN = ('NHWC', 'HWIO', 'NHWC')

# DCGAN's initialiser (Radford et al. 2016): N(0, 0.02) for every convolution.
dcgan_init = nn.initializers.normal(0.02)


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm`, then a ReLU when `relu` is set.

  The class keeps flax's name, so instances are named `BatchNorm_0`, ... and create
  flax's variables (params `scale`, `bias`; batch_stats `mean`, `var`).

  Attributes:
    relu: apply a ReLU to the output.
  """

  relu: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    y = super().__call__(x, use_running_average, mask=mask)
    return nn.relu(y) if self.relu else y


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `ConvTranspose2d(k, stride=2, padding=k/2 - 1)` for even `k`: `[b, h, w, in]` -> `[b, 2h, 2w, out]`.

  Args:
    x: NHWC input.
    kernel: `[k, k, in, out]`, PyTorch's `ConvTranspose2d.weight` (`[in, out, kh, kw]`) as
      `weight.transpose(2, 3, 0, 1)`: not flipped.

  Returns:
    The NHWC output: the adjoint of the stride-2 convolution with padding `k/2 - 1`, i.e. a
    convolution of the 2x zero-interleaved input with the spatially flipped kernel.
  """
  k = kernel.shape[0]
  if k < 2 or k % 2:
    raise ValueError(f'kernel size must be even and >= 2 for a stride-2 transposed convolution, got {k}')
  pad = k - 1 - (k // 2 - 1)
  return lax.conv_general_dilated(
    x, kernel[::-1, ::-1], (1, 1), ((pad, pad), (pad, pad)), lhs_dilation=(2, 2), dimension_numbers=_DN
  )


class ConvTranspose2x(nn.Module):
  """Stride-2 transposed convolution, equal to PyTorch's `ConvTranspose2d(k, 2, k/2 - 1)`: doubles height and width.

  Parameter `kernel` is `[k, k, in_features, features]` (PyTorch weight
  `.transpose(2, 3, 0, 1)`; `nn.ConvTranspose` would hold it flipped spatially).

  Attributes:
    features: output channels.
    kernel_size: even kernel size (4 in DCGAN).
    use_bias: add a bias (DCGAN layers followed by BatchNorm have none).
    dtype: compute dtype (parameters stay float32).
    kernel_init: initialiser of the kernel (DCGAN's N(0, 0.02) by default).
    conv_transpose: the function `(x, kernel) -> y` that computes it (`conv_transpose_2x`
      above; a backend may pass another with the same result).
  """

  features: int
  kernel_size: int = 4
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = dcgan_init
  conv_transpose: Callable[[jax.Array, jax.Array], jax.Array] = conv_transpose_2x

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    if k < 2 or k % 2:  # checked before any parameter is created
      raise ValueError(f'kernel_size must be even and >= 2 for a stride-2 transposed convolution, got {k}')
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = self.conv_transpose(x, kernel)
    return y if bias is None else y + bias


@dataclasses.dataclass(frozen=True)
class Layers:
  """Layer constructors for the models; the defaults are plain Flax (see the module docstring).

  Frozen and compared by identity of its constructors: a backend builds its `Layers`
  once, so models built from it compare (and hash) equal.
  """

  conv: ModuleDef = nn.Conv
  conv_transpose_2x: ModuleDef = ConvTranspose2x
  batch_norm: ModuleDef = BatchNorm
  group_norm: ModuleDef = nn.GroupNorm


STOCK = Layers()
