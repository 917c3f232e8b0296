"""A small KL-regularised convolutional autoencoder (the first stage of Rombach et al.'s latent diffusion).

The encoder maps an image in [-1, 1] to the mean and log-variance of a
diagonal Gaussian over a latent `downsampling_factor` times smaller per side;
the decoder maps a latent back to an image (no output squashing, as in LDM).
Residual blocks are the UNet's (without the embedding; their branches start
at zero); downsampling is a stride-2 3x3 convolution with explicit padding and
upsampling is nearest-neighbour + 3x3 convolution, as in `cxrjax.models.unet`.

Rescaling latents to unit variance (LDM's `scale_factor`) is left to the
trainer, which can measure it on data.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.unet import AttentionBlock, ResBlock, conv3x3, group_norm, upsample_nearest

# LDM's DiagonalGaussianDistribution clamps log-variances to this range so exp() stays finite.
LOGVAR_RANGE = (-30.0, 20.0)


class Encoder(nn.Module):
  """Image [B, H, W, C] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""

  latent_channels: int
  base_channels: int
  channel_mults: Sequence[int]
  num_res_blocks: int
  mid_attention: bool
  num_heads: int
  dtype: jnp.dtype
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x):
    h = conv3x3(self.base_channels, self.dtype, name='conv_in', layers=self.layers)(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mults):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.base_channels * mult, dtype=self.dtype, layers=self.layers, name=f'down{level}_res{i}')(h)
      if level != len(self.channel_mults) - 1:
        h = conv3x3(h.shape[-1], self.dtype, strides=2, name=f'down{level}_downsample', layers=self.layers)(h)
    h = ResBlock(h.shape[-1], dtype=self.dtype, layers=self.layers, name='mid_res0')(h)
    if self.mid_attention:
      h = AttentionBlock(self.num_heads, self.dtype, self.layers, name='mid_attn')(h)
      h = ResBlock(h.shape[-1], dtype=self.dtype, layers=self.layers, name='mid_res1')(h)
    h = nn.silu(group_norm(h.shape[-1], self.dtype, name='norm_out', layers=self.layers)(h))
    h = conv3x3(2 * self.latent_channels, self.dtype, name='conv_out', layers=self.layers)(h).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
  """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

  out_channels: int
  base_channels: int
  channel_mults: Sequence[int]
  num_res_blocks: int
  mid_attention: bool
  num_heads: int
  dtype: jnp.dtype
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, z):
    h = conv3x3(self.base_channels * self.channel_mults[-1], self.dtype, name='conv_in', layers=self.layers)(
      z.astype(self.dtype)
    )
    h = ResBlock(h.shape[-1], dtype=self.dtype, layers=self.layers, name='mid_res0')(h)
    if self.mid_attention:
      h = AttentionBlock(self.num_heads, self.dtype, self.layers, name='mid_attn')(h)
      h = ResBlock(h.shape[-1], dtype=self.dtype, layers=self.layers, name='mid_res1')(h)
    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for i in range(self.num_res_blocks + 1):
        h = ResBlock(self.base_channels * mult, dtype=self.dtype, layers=self.layers, name=f'up{level}_res{i}')(h)
      if level != 0:
        h = conv3x3(h.shape[-1], self.dtype, name=f'up{level}_upsample', layers=self.layers)(upsample_nearest(h))
    h = nn.silu(group_norm(h.shape[-1], self.dtype, name='norm_out', layers=self.layers)(h))
    return conv3x3(self.out_channels, self.dtype, name='conv_out', layers=self.layers)(h).astype(jnp.float32)


class KLAutoencoder(nn.Module):
  """KL-regularised autoencoder: `encode`, `decode`, and `__call__` for training.

  `__call__` samples the posterior with the reparameterisation trick using the
  'sample' rng collection, e.g. `model.apply(variables, x, rngs={'sample': key})`;
  `model.apply(variables, x, method='encode')` and `method='decode'` use one half.

  Attributes:
    in_channels: image channels (also the decoder's output channels).
    latent_channels: latent channels.
    base_channels: channels of the first level.
    channel_mults: per-level width multipliers; the downsampling factor is
      2**(len - 1), and image sides must be divisible by it.
    num_res_blocks: residual blocks per encoder level (the decoder has one more).
    mid_attention: self-attention in the middle blocks, as in LDM. Off by default:
      at f = 4 a 256 px image gives 4096 latent positions, a 4096^2 attention
      matrix per head and example, which is too slow on CPU.
    num_heads: heads of the middle attention.
    dtype: compute dtype (parameters stay float32, outputs are float32).
    layers: the convolution and GroupNorm constructors.
  """

  in_channels: int
  latent_channels: int = 4
  base_channels: int = 64
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  mid_attention: bool = False
  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.channel_mults) - 1)

  def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
    """The latent shape for an image shape (H, W, C) or (B, H, W, C); leading dims are kept."""
    *lead, height, width, _ = image_shape
    f = self.downsampling_factor
    if height % f or width % f:
      raise ValueError(f'image size {height}x{width} is not divisible by the downsampling factor {f}')
    return (*lead, height // f, width // f, self.latent_channels)

  def setup(self):
    common = dict(
      base_channels=self.base_channels,
      channel_mults=tuple(self.channel_mults),
      num_res_blocks=self.num_res_blocks,
      mid_attention=self.mid_attention,
      num_heads=self.num_heads,
      dtype=self.dtype,
      layers=self.layers,
    )
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.in_channels, **common)

  def encode(self, x):
    """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) of the posterior, float32."""
    self.latent_shape(x.shape)  # validates the size
    return self.encoder(x)

  def decode(self, z):
    """Latents [B, h, w, latent_channels] -> images (float32, nominally in [-1, 1])."""
    return self.decoder(z)

  def __call__(self, x, sample_posterior: bool = True):
    """(x_hat, mean, logvar); decodes a posterior sample (rng 'sample') or, if not `sample_posterior`, the mean."""
    mean, logvar = self.encode(x)
    z = mean
    if sample_posterior:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng('sample'), mean.shape, jnp.float32)
    return self.decode(z), mean, logvar


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dimensions and averaged over the batch.

  This is LDM's normalisation (`sum(kl) / batch`), which `ae_loss` matches for
  the reconstruction term so LDM's `kl_weight` (1e-6) carries over.
  """
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  per_elem = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(jnp.sum(per_elem.reshape(per_elem.shape[0], -1), axis=-1))


def ae_loss(x, x_hat, mean, logvar, kl_weight: float, rec_loss: str = 'l1') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + kl_weight * KL, both summed per example and averaged over the batch.

  LDM's first stage adds LPIPS and a patch discriminator to the reconstruction
  term; those belong to the trainer. Here the reconstruction is the pixel L1
  (LDM's choice) or squared error.

  Args:
    x: [B, H, W, C] images in [-1, 1].
    x_hat: reconstructions, same shape.
    mean: posterior means.
    logvar: posterior log-variances.
    kl_weight: weight of the KL term (LDM: 1e-6).
    rec_loss: 'l1' or 'l2'.

  Returns:
    (loss, metrics) with metrics 'loss', 'rec' and 'kl' on the loss's scale, and
    'rec_pixel', the reconstruction error per pixel (comparable across image sizes).
  """
  diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  if rec_loss == 'l1':
    err = jnp.abs(diff)
  elif rec_loss == 'l2':
    err = diff**2
  else:
    raise ValueError(f"unknown rec_loss {rec_loss!r} (expected 'l1' or 'l2')")
  rec = jnp.mean(jnp.sum(err.reshape(err.shape[0], -1), axis=-1))
  kl = kl_divergence(mean, logvar)
  loss = rec + kl_weight * kl
  return loss, {'loss': loss, 'rec': rec, 'kl': kl, 'rec_pixel': jnp.mean(err)}
