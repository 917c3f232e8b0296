"""A class-conditional UNet denoiser for latent diffusion (after Ho et al. 2020 and Rombach et al. 2022).

The layout follows LDM's `openaimodel.UNetModel` at small scale: residual
blocks (GroupNorm, SiLU, 3x3 convolution) conditioned on the time + class
embedding (as a scale and shift after GroupNorm, see `ResBlock`), self-attention at the lowest resolutions and in the
middle, skip connections from every down-path block to the up path, strided
3x3 convolutions to downsample and nearest-neighbour upsampling + convolution
to upsample (no transposed convolutions, as in LDM). Convolutions and GroupNorms
come from `layers` (`cxrjax.models.layers`).

The class embedding has `num_classes + 1` rows; the last (index `num_classes`)
is the null label of classifier-free guidance (see `cxrjax.diffusion`).

The final convolution and the last convolution of every residual and attention
branch start at zero (as in LDM), so at initialisation each block is the
identity and the network outputs zeros.

The building blocks are shared with `cxrjax.models.autoencoder`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cxrjax.models.layers import STOCK, Layers

# PyTorch's default Conv2d / Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which LDM uses.
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
zeros_init = nn.initializers.zeros_init()


def num_groups(channels: int, max_groups: int = 32) -> int:
  """min(32, channels) groups, lowered until it divides `channels` (so narrow test models work)."""
  groups = min(max_groups, channels)
  while channels % groups:
    groups -= 1
  return groups


def group_norm(channels: int, dtype, name: str | None = None, layers: Layers = STOCK) -> nn.Module:
  return layers.group_norm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype, name=name)


def conv3x3(features: int, dtype, strides: int = 1, kernel_init=torch_init, name: str | None = None,
            layers: Layers = STOCK) -> nn.Module:  # fmt: skip
  # Explicit symmetric padding, as PyTorch's padding=1: 'SAME' pads asymmetrically for stride 2.
  return layers.conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), kernel_init=kernel_init,
                     dtype=dtype, name=name)  # fmt: skip


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """[B] (int or float) timesteps -> [B, dim] sinusoidal features (cos then sin, as in LDM)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice with a 1x1 skip projection on width change, conditioned on an embedding.

  The embedding enters as a scale and shift after the second GroupNorm (ADM's
  `use_scale_shift_norm`, Dhariwal & Nichol 2021) rather than as LDM's sum
  before it: a per-channel constant added before GroupNorm is subtracted again
  by the normalisation when groups hold one channel (narrow widths, or 32
  channels in 32 groups), which would silently remove the time and class
  conditioning.

  Attributes:
    features: output channels.
    dropout: dropout rate before the second convolution.
    dtype: compute dtype.
    layers: the convolution and GroupNorm constructors.
  """

  features: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x, emb=None, train: bool = False):
    h = nn.silu(group_norm(x.shape[-1], self.dtype, name='norm1', layers=self.layers)(x))
    h = conv3x3(self.features, self.dtype, name='conv1', layers=self.layers)(h)
    h = group_norm(self.features, self.dtype, name='norm2', layers=self.layers)(h)
    if emb is not None:
      e = nn.Dense(2 * self.features, kernel_init=torch_init, dtype=self.dtype, name='emb_proj')(nn.silu(emb))
      scale, shift = jnp.split(e[:, None, None, :], 2, axis=-1)
      h = h * (1 + scale) + shift
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(self.features, self.dtype, kernel_init=zeros_init, name='conv2', layers=self.layers)(h)
    if x.shape[-1] != self.features:
      x = self.layers.conv(self.features, (1, 1), kernel_init=torch_init, dtype=self.dtype, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Pre-norm multi-head self-attention over the H*W positions, with a residual connection.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    dtype: compute dtype.
    layers: the GroupNorm constructor.
  """

  num_heads: int = 4
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'{self.num_heads} heads do not divide {c} channels')
    y = group_norm(c, self.dtype, name='norm', layers=self.layers)(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=c,
      out_features=c,
      kernel_init=torch_init,
      out_kernel_init=zeros_init,
      dtype=self.dtype,
      name='attn',
    )(y)
    return x + y.reshape(b, h, w, c)


def upsample_nearest(x):
  """2x nearest-neighbour upsampling of [B, H, W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """Class-conditional UNet that predicts the noise (or velocity) of a latent.

  Attributes:
    out_channels: output channels (the latent channels).
    num_classes: real classes; labels may also be `num_classes`, the null label.
    base_channels: channels of the first level.
    channel_mults: per-level width multipliers; level i runs at 1 / 2**i of the
      input resolution, so H and W must be divisible by 2**(len - 1).
    num_res_blocks: residual blocks per level on the down path (the up path has
      one more, as in LDM, to consume the downsampling skip).
    attention_resolutions: downsampling levels (indices into `channel_mults`,
      negative counting from the lowest resolution, so -1 is the lowest) whose
      residual blocks are followed by self-attention. The middle block always
      has attention.
    num_heads: attention heads (must divide the width of attended levels).
    dropout: dropout rate in residual blocks (active with `train=True`, rng 'dropout').
    dtype: compute dtype (parameters stay float32, the output is float32).
    layers: the convolution and GroupNorm constructors (same parameters whichever a backend passes).
  """

  out_channels: int
  num_classes: int
  base_channels: int = 64
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (-1,)
  num_heads: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  def _attention_levels(self) -> set[int]:
    n = len(self.channel_mults)
    levels = set()
    for level in self.attention_resolutions:
      if not -n <= level < n:
        raise ValueError(f'attention level {level} out of range for {n} levels')
      levels.add(level % n)
    return levels

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False):
    """Model output for latents x [B, H, W, C] at timesteps t [B] with labels [B] (None: null label)."""
    batch, height, width, _ = x.shape
    factor = 2 ** (len(self.channel_mults) - 1)
    if height % factor or width % factor:
      raise ValueError(f'latent size {height}x{width} is not divisible by the downsampling factor {factor}')
    attn_levels = self._attention_levels()
    res = functools.partial(ResBlock, dropout=self.dropout, dtype=self.dtype, layers=self.layers)
    conv = functools.partial(conv3x3, layers=self.layers)

    emb_dim = 4 * self.base_channels
    emb = timestep_embedding(t, self.base_channels)
    emb = nn.Dense(emb_dim, kernel_init=torch_init, dtype=self.dtype, name='time_dense1')(emb)
    emb = nn.Dense(emb_dim, kernel_init=torch_init, dtype=self.dtype, name='time_dense2')(nn.silu(emb))
    if labels is None:
      labels = jnp.full((batch,), self.num_classes, jnp.int32)
    # Row num_classes is the null label; nn.Embed's default init is N(0, 1), as torch.nn.Embedding.
    label_emb = nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype, name='class_embed')
    emb = emb + label_emb(jnp.asarray(labels, jnp.int32))

    h = conv(self.base_channels, self.dtype, name='conv_in')(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mults):
      for i in range(self.num_res_blocks):
        h = res(self.base_channels * mult, name=f'down{level}_res{i}')(h, emb, train)
        if level in attn_levels:
          h = AttentionBlock(self.num_heads, self.dtype, self.layers, name=f'down{level}_attn{i}')(h)
        skips.append(h)
      if level != len(self.channel_mults) - 1:
        h = conv(h.shape[-1], self.dtype, strides=2, name=f'down{level}_downsample')(h)
        skips.append(h)

    h = res(h.shape[-1], name='mid_res0')(h, emb, train)
    h = AttentionBlock(self.num_heads, self.dtype, self.layers, name='mid_attn')(h)
    h = res(h.shape[-1], name='mid_res1')(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.base_channels * mult, name=f'up{level}_res{i}')(h, emb, train)
        if level in attn_levels:
          h = AttentionBlock(self.num_heads, self.dtype, self.layers, name=f'up{level}_attn{i}')(h)
      if level != 0:
        h = conv(h.shape[-1], self.dtype, name=f'up{level}_upsample')(upsample_nearest(h))
    assert not skips

    h = nn.silu(group_norm(h.shape[-1], self.dtype, name='norm_out', layers=self.layers)(h))
    h = conv(self.out_channels, self.dtype, kernel_init=zeros_init, name='conv_out')(h)
    return h.astype(jnp.float32)
