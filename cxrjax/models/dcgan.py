"""DCGAN (Radford et al. 2016) and its class-conditional variant, in Flax linen.

The generator projects a latent vector to a 4x4 map (7x7 for 28-px images)
and doubles the resolution with stride-2 blocks (BatchNorm + ReLU, the last
one tanh); the discriminator mirrors it with stride-2 4x4 convolutions and
LeakyReLU(0.2). With 64-px 3-channel images, `latent_dim=100` and widths 64,
the unconditional generator and discriminator have exactly the 3,576,704 and
2,765,568 parameters of the PyTorch DCGAN tutorial (tested), in the same
layouts up to the transpositions documented in `cxrjax.models.layers.ConvTranspose2x` and `Project`.

Conditioning (`num_classes > 0`): the generator concatenates a learned label
embedding (size `latent_dim`) to z; the discriminator is a projection
discriminator (Miyato & Koyama 2018), logit = <w + V[y], phi(x)> with phi(x)
the flattened last feature map that the unconditional head reads.

Convolutions, transposed convolutions and BatchNorms come from `layers`
(`cxrjax.models.layers`); the stride-2 layers have PyTorch's semantics and kernel
layouts as documented in `cxrjax.models.layers.ConvTranspose2x` and `Project`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from cxrjax.models.layers import STOCK, Layers, dcgan_init

UPSAMPLE_MODES = ('transpose', 'resize')
NORMS = ('batch', 'none')


def _bn_scale_init(key, shape, dtype=jnp.float32):
  # DCGAN's weights_init: BatchNorm scale ~ N(1, 0.02), bias 0.
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def resolution_plan(image_size: int) -> tuple[int, int]:
  """(start size, number of stride-2 stages) for an image size.

  28 -> (7, 2); 32 -> (4, 3); 64 -> (4, 4); 128 -> (4, 5). Any `4 * 2**n` or
  `7 * 2**n` with n >= 1 works.

  Raises:
    ValueError: for other sizes.
  """
  for start in (4, 7):
    n, size = 0, image_size
    while size > start and size % 2 == 0:
      size, n = size // 2, n + 1
    if size == start and n >= 1:
      return start, n
  raise ValueError(f'image_size must be 4 * 2**n or 7 * 2**n (28, 32, 64, 128, ...), got {image_size}')


def _norm(layers: Layers, train: bool, dtype, name: str, relu: bool = False):
  return layers.batch_norm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_bn_scale_init, dtype=dtype, name=name,
    relu=relu,
  )  # fmt: skip


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


def _check_labels(num_classes: int, labels, batch: int):
  if num_classes > 0:
    if labels is None:
      raise ValueError(f'a conditional model (num_classes={num_classes}) needs labels')
    if labels.shape != (batch,):
      raise ValueError(f'labels must have shape ({batch},), got {labels.shape}')
  elif labels is not None:
    raise ValueError('labels given to an unconditional model (num_classes=0)')


class Generator(nn.Module):
  """DCGAN generator: z (and label) -> image in [-1, 1].

  Channels: `base_width * 2**(n-1)` at the start map, halved by each of the n
  stride-2 blocks, the last of which outputs `channels` (64 px: 8w, 4w, 2w,
  w, channels; 28 px: 2w at 7x7, w at 14x14, channels at 28x28).

  Attributes:
    image_size: output height and width (28, 32, 64, 128; see `resolution_plan`).
    channels: output channels (1 grey, 3 RGB).
    latent_dim: size of z.
    base_width: channels before the last block (ngf).
    num_classes: 0 for an unconditional generator; otherwise a label embedding
      of size `latent_dim` is concatenated to z.
    upsample: 'transpose' (4x4 stride-2 transposed convolutions, as in DCGAN)
      or 'resize' (nearest 2x then 3x3 convolution: no checkerboard artefacts,
      9/16 of the parameters per block).
    dtype: compute dtype (parameters stay float32; images come out float32).
    layers: the convolution, transposed convolution and BatchNorm constructors.
  """

  image_size: int = 64
  channels: int = 1
  latent_dim: int = 100
  base_width: int = 64
  num_classes: int = 0
  upsample: str = 'transpose'
  dtype: Any = jnp.float32
  layers: Layers = STOCK

  def _up_layer(self, features: int, name: str):
    if self.upsample == 'transpose':
      return self.layers.conv_transpose_2x(features, dtype=self.dtype, name=name)
    conv = self.layers.conv(
      features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=dcgan_init, dtype=self.dtype, name=name
    )

    def resize_conv(x):
      b, h, w, c = x.shape
      x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
      return conv(x)

    return resize_conv

  @nn.compact
  def __call__(self, z, labels=None, train: bool = True):
    if self.upsample not in UPSAMPLE_MODES:
      raise ValueError(f'upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}')
    start, n = resolution_plan(self.image_size)
    z = z.reshape(z.shape[0], -1).astype(self.dtype)
    _check_labels(self.num_classes, labels, z.shape[0])
    if self.num_classes > 0:
      embed = nn.Embed(self.num_classes, self.latent_dim, dtype=self.dtype, name='label_embed')
      z = jnp.concatenate([z, embed(labels)], axis=-1)
    width = self.base_width * 2 ** (n - 1)
    x = Project(width, start, dtype=self.dtype, name='project')(z)
    x = _norm(self.layers, train, self.dtype, 'project_bn', relu=True)(x)
    for i in range(1, n + 1):
      last = i == n
      width //= 2
      x = self._up_layer(self.channels if last else width, f'up{i}')(x)
      if not last:
        x = _norm(self.layers, train, self.dtype, f'up{i}_bn', relu=True)(x)
    return jnp.tanh(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """DCGAN discriminator (projection discriminator when conditional): image -> [B] logits.

  Stride-2 4x4 convolutions (padding 1) with `base_width * 2**i` channels down
  to the 4x4 (or 7x7) map, LeakyReLU(0.2), no normalisation after the first;
  then one `start x start` VALID convolution to a logit.

  With `norm='batch'` every logit depends on the whole batch through the
  batch statistics (in training mode), so an R1 gradient penalty computed on
  such a batch penalises the gradient of the batch, not of each sample, and
  differentiates through the statistics; use `norm='none'` with R1 (as
  StyleGAN does), or keep BatchNorm without R1 (as DCGAN does). Feed real
  and fake batches in separate calls, as DCGAN does, so each has its own
  statistics.

  Attributes:
    image_size: input height and width.
    channels: input channels.
    base_width: channels of the first convolution (ndf).
    num_classes: 0 unconditional; otherwise logit += <embed(y), phi(x)>.
    norm: 'batch' (DCGAN) or 'none'.
    dtype: compute dtype (parameters stay float32; logits come out float32).
    layers: the convolution and BatchNorm constructors.
  """

  image_size: int = 64
  channels: int = 1
  base_width: int = 64
  num_classes: int = 0
  norm: str = 'batch'
  dtype: Any = jnp.float32
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x, labels=None, train: bool = True):
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}')
    start, n = resolution_plan(self.image_size)
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'expected {self.image_size}x{self.image_size} images, got {x.shape}')
    _check_labels(self.num_classes, labels, x.shape[0])
    x = x.astype(self.dtype)
    # PyTorch's Conv2d(4, stride=2, padding=1).
    down = functools.partial(
      self.layers.conv, kernel_size=(4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
      kernel_init=dcgan_init, dtype=self.dtype,
    )  # fmt: skip
    for i in range(n):
      x = down(self.base_width * 2**i, name=f'down{i}')(x)
      if i > 0 and self.norm == 'batch':
        x = _norm(self.layers, train, self.dtype, f'down{i}_bn')(x)
      x = nn.leaky_relu(x, 0.2)
    head = self.layers.conv(
      1, (start, start), padding=((0, 0), (0, 0)), use_bias=False, kernel_init=dcgan_init, dtype=self.dtype,
      name='head',
    )  # fmt: skip
    logits = head(x).reshape(x.shape[0])
    if self.num_classes > 0:
      phi = x.reshape(x.shape[0], -1)
      embed = nn.Embed(self.num_classes, phi.shape[-1], embedding_init=dcgan_init, dtype=self.dtype, name='label_embed')
      logits = logits + jnp.sum(embed(labels) * phi, axis=-1)
    return logits.astype(jnp.float32)
