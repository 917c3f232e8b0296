"""Inception-V3 as used for FID (Heusel et al. 2017) in Flax linen, laid out as pytorch-fid's.

This is the network behind the published FID numbers: TensorFlow's
2015-12-05 Inception graph as ported by pytorch-fid (`FIDInceptionA/C/E`),
which differs from torchvision's Inception-V3 in three places, all kept here:

- the average pool in the pool branch of the A, C and first E blocks leaves the
  zero padding out of the mean (TensorFlow's `SAME` average pool);
- the last E block (`Mixed_7c`) max-pools in its pool branch;
- batch norm uses eps 1e-3.

Inputs are images in [0, 1], [N, H, W, 1|3]; grayscale is repeated to three
channels, the image is resized to 299x299 (bilinear, half-pixel centres, no
antialiasing: torch's `F.interpolate(..., align_corners=False)`) and scaled to
[-1, 1], as pytorch-fid's `resize_input` and `normalize_input` do. The output is
the 2048-d pool3 feature (global average after `Mixed_7c`); the auxiliary head
and the 1008-way classifier are left out. Eval mode only: batch norm always uses
the stored statistics. Module names match the PyTorch state_dict keys, so
`cxrjax.eval.inception_features` converts the weights name for name.

With these layers the model has 21,785,568 parameters (batch-norm statistics
not counted), as pytorch-fid's network without `fc` (tested).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.errors import UserError

INPUT_SIZE = 299
FEATURE_DIM = 2048


def resize_bilinear(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[N, H, W, C] -> [N, size, size, C] as torch's bilinear `F.interpolate(align_corners=False)`.

  `jax.image.resize` antialiases when shrinking unless told not to; torch does
  not, and FID numbers are only comparable with the same resampling.
  """
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  return jax.image.resize(x, (n, size, size, c), method='linear', antialias=False)


def _avg_pool_same(x):
  # TensorFlow's SAME average pool divides by the number of real pixels in the window.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
  return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding='VALID')


class BasicConv(nn.Module):
  """Convolution (no bias), batch norm with the stored statistics (eps 1e-3) and ReLU.

  Attributes:
    features: output channels.
    kernel: (height, width) of the kernel.
    strides: the same in both directions.
    padding: (rows, columns) of zeros on each side, as PyTorch's `padding`.
  """

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, (self.strides, self.strides), padding=((ph, ph), (pw, pw)),
                use_bias=False, name='conv')(x)  # fmt: skip
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches (Mixed_5b-d)."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, **row, name='branch7x7_2')(b7)
    b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 branches (Mixed_7b with 'avg' pooling, Mixed_7c with 'max')."""

  pool: str = 'avg'

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3a = BasicConv(384, **row, name='branch3x3_2a')(b3)
    b3b = BasicConv(384, **col, name='branch3x3_2b')(b3)
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bda = BasicConv(384, **row, name='branch3x3dbl_3a')(bd)
    bdb = BasicConv(384, **col, name='branch3x3dbl_3b')(bd)
    # The FID graph max-pools in the last block (pytorch-fid keeps this quirk of
    # the TensorFlow graph); the published FID numbers depend on it.
    pooled = _max_pool_same(x) if self.pool == 'max' else _avg_pool_same(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-V3 up to pool3: images in [0, 1] [N, H, W, 1|3] -> features [N, 2048].

  Attributes:
    resize_input: resize to 299x299 first, as pytorch-fid does by default.
  """

  resize_input: bool = True

  @nn.compact
  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise UserError(f'Inception-V3: expected images [N, H, W, 1|3], got shape {x.shape}')
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the range of the TensorFlow graph
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_down(x)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_down(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))
