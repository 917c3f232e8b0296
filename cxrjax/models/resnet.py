"""ResNet-18 (He et al. 2016) in Flax linen, laid out as torchvision's.

With width 64, 1000 classes, 3 input channels and the ImageNet stem it has
torchvision's 11,689,512 parameters (tested). The CIFAR stem (3x3 stride-1
convolution, no max-pool) keeps resolution for 28-64 px images. Padding is
explicit and symmetric, as in PyTorch, so shapes and numerics match the
PyTorch baseline in `benchmarks/`. Every convolution and BatchNorm comes from
`layers` (`cxrjax.models.layers`; a backend may pass its own).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.preprocess import prepare_input

# torchvision's initialisers: Kaiming-normal (fan_out) convolutions, and
# PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (projection when shapes change)."""

  filters: int
  strides: int
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(self.layers.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    norm = functools.partial(self.layers.batch_norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)  # fmt: skip
    s = (self.strides, self.strides)
    # Explicit names: the checkpoint layout of the first releases.
    y = conv(self.filters, (3, 3), s, padding=_pad(3), name='Conv_0')(x)
    y = norm(relu=True)(y)
    y = conv(self.filters, (3, 3), padding=_pad(3), name='Conv_1')(y)
    y = norm()(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      # PyTorch's 1x1 stride-2 projection (padding 0) keeps every other pixel, as 'VALID' does.
      x = conv(self.filters, (1, 1), s, padding='VALID', name='proj_conv')(x)
      x = norm(name='proj_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with basic blocks; `stage_sizes=(2, 2, 2, 2)` is ResNet-18.

  Attributes:
    num_classes: output logits.
    width: channels of the first stage (64 in the published network).
    stem: 'cifar' (3x3/1, no pool) or 'imagenet' (7x7/2 and 3x3/2 max-pool).
    stage_sizes: blocks per stage.
    dtype: compute dtype (parameters stay float32).
    layers: the convolution and BatchNorm constructors (same parameters and
      checkpoints whichever a backend passes).
    input_norm, rgb_input: the input path (`cxrjax.models.preprocess.prepare_input`).
    frozen_batch_norm: every BatchNorm normalises with its running statistics and never
      updates them, in training too (fine-tuning with imported statistics).
  """

  num_classes: int
  width: int = 64
  stem: str = 'cifar'
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK
  input_norm: str = 'none'
  rgb_input: bool = False
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = prepare_input(x, self.input_norm, self.rgb_input, self.dtype)
    train = train and not self.frozen_batch_norm  # `train` only switches BatchNorm here
    conv = functools.partial(self.layers.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    norm = functools.partial(self.layers.batch_norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)  # fmt: skip
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = norm(relu=True, name='stem_bn')(x)
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.width, (3, 3), padding=_pad(3), name='stem_conv')(x)
      x = norm(relu=True, name='stem_bn')(x)
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        block = BasicBlock(self.width * 2**i, strides, self.dtype, self.layers, name=f'stage{i + 1}_block{j + 1}')
        x = block(x, train)
    # Grad-CAM reads the last feature map and its gradient from here.
    x = self.perturb('cam_features', x)
    self.sow('intermediates', 'cam_features', x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def resnet18(
  num_classes: int, width: int = 64, stem: str = 'cifar', dtype=jnp.float32, layers: Layers = STOCK, **input_path
) -> ResNet:
  """A ResNet-18; `input_path`: `input_norm`, `rgb_input`, `frozen_batch_norm` (see `ResNet`)."""
  return ResNet(num_classes=num_classes, width=width, stem=stem, dtype=dtype, layers=layers, **input_path)
