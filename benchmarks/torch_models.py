"""PyTorch twins of cxrjax's models, for the baselines of `python -m benchmarks`.

Each class builds the same network as its Flax counterpart, with the same
parameter count for every setting (tested in tests/test_bench.py):

- `ResNet18` = `cxrjax.models.resnet.ResNet` (torchvision's layout; CIFAR or
  ImageNet stem, width multiplier, any number of input channels).
  `load_resnet_from_flax` copies Flax variables into it, which is how the
  tests prove that both compute the same function.
- `Generator` / `Discriminator` = `cxrjax.models.dcgan` (DCGAN, optionally
  class-conditional with a projection discriminator); stride-2 layers are
  `nn.ConvTranspose2d(4, 2, 1)` / `nn.Conv2d(4, 2, 1)`, the functions that
  `cxrjax.models.layers.ConvTranspose2x` and a stride-2 `nn.Conv` compute.
- `UNet` = `cxrjax.models.unet.UNet` (scale-shift conditioning, GroupNorm
  groups from the same `num_groups`, attention at the same levels).
- `EfficientNetV2` = `cxrjax.models.efficientnet_v2.EfficientNetV2` (the
  same stage tables and rounding are imported from it).

Tensors are NCHW as PyTorch expects (a `channels_last` memory format is a
layout choice of the caller). Only the benchmarks and their tests import this
module: torch is the optional `bench` extra, and cxrjax never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrjax.models import efficientnet_v2 as jax_effnet
from cxrjax.models.dcgan import resolution_plan
from cxrjax.models.unet import num_groups

# ----------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convolutions, a 1x1 projection when the shape changes."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.downsample is not None:
      x = self.downsample(x)
    return F.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 as `cxrjax.models.resnet.resnet18`: (2, 2, 2, 2) basic blocks, widths w, 2w, 4w, 8w.

  Args:
    num_classes: output logits.
    width: channels of the first stage (64 published).
    stem: 'cifar' (3x3 stride 1, no max-pool) or 'imagenet' (7x7 stride 2, 3x3 stride-2 max-pool).
    in_channels: image channels (1 grey, 3 RGB).
  """

  def __init__(self, num_classes: int, width: int = 64, stem: str = 'cifar', in_channels: int = 1):
    super().__init__()
    if stem not in ('cifar', 'imagenet'):
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    self.stem = stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    layers, c = [], width
    for i in range(4):
      out = width * 2**i
      stride = 1 if i == 0 else 2
      layers.append(nn.Sequential(BasicBlock(c, out, stride), BasicBlock(out, out, 1)))
      c = out
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.fc = nn.Linear(c, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = F.max_pool2d(x, 3, 2, 1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def _copy_conv(conv: nn.Conv2d, kernel) -> None:
  conv.weight.copy_(_t(kernel).permute(3, 2, 0, 1))  # HWIO -> OIHW


def _copy_bn(bn: nn.BatchNorm2d, params: dict, stats: dict) -> None:
  bn.weight.copy_(_t(params['scale']))
  bn.bias.copy_(_t(params['bias']))
  bn.running_mean.copy_(_t(stats['mean']))
  bn.running_var.copy_(_t(stats['var']))


@torch.no_grad()
def load_resnet_from_flax(model: ResNet18, variables: dict) -> ResNet18:
  """Copies the variables of a Flax `ResNet` into `model` (same settings), in place.

  Convolution kernels go from HWIO to OIHW, the dense kernel is transposed,
  BatchNorm scale/bias/mean/var become weight/bias/running_mean/running_var.

  Args:
    model: the PyTorch network to fill.
    variables: {'params', 'batch_stats'} of the Flax model.

  Returns:
    `model`.
  """
  p, s = variables['params'], variables['batch_stats']
  _copy_conv(model.conv1, p['stem_conv']['kernel'])
  _copy_bn(model.bn1, p['stem_bn'], s['stem_bn'])
  for i, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
    for j, block in enumerate(layer):
      name = f'stage{i + 1}_block{j + 1}'
      bp, bs = p[name], s[name]
      _copy_conv(block.conv1, bp['Conv_0']['kernel'])
      _copy_bn(block.bn1, bp['BatchNorm_0'], bs['BatchNorm_0'])
      _copy_conv(block.conv2, bp['Conv_1']['kernel'])
      _copy_bn(block.bn2, bp['BatchNorm_1'], bs['BatchNorm_1'])
      if block.downsample is not None:
        _copy_conv(block.downsample[0], bp['proj_conv']['kernel'])
        _copy_bn(block.downsample[1], bp['proj_bn'], bs['proj_bn'])
  model.fc.weight.copy_(_t(p['head']['kernel']).T)
  model.fc.bias.copy_(_t(p['head']['bias']))
  return model


# ----------------------------------------------------------------------------- DCGAN


def dcgan_init_(module: nn.Module) -> None:
  """DCGAN's weights_init: convolutions and embeddings of the discriminator N(0, 0.02), BN scale N(1, 0.02)."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
      nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.normal_(m.weight, 1.0, 0.02)
      nn.init.zeros_(m.bias)


class Generator(nn.Module):
  """DCGAN generator as `cxrjax.models.dcgan.Generator`: z (and label) -> [B, C, H, W] in [-1, 1].

  Args:
    image_size: output size (28, 32, 64, ...; see `resolution_plan`).
    channels: output channels.
    latent_dim: size of z.
    base_width: ngf.
    num_classes: 0 unconditional; else a label embedding of size `latent_dim` is concatenated to z.
    upsample: 'transpose' (`ConvTranspose2d(4, 2, 1)`) or 'resize' (nearest 2x, then a 3x3 convolution).
  """

  def __init__(self, image_size: int = 64, channels: int = 1, latent_dim: int = 100, base_width: int = 64,
               num_classes: int = 0, upsample: str = 'transpose'):  # fmt: skip
    super().__init__()
    if upsample not in ('transpose', 'resize'):
      raise ValueError(f'unknown upsample {upsample!r}')
    start, n = resolution_plan(image_size)
    self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes > 0 else None
    width = base_width * 2 ** (n - 1)
    in_dim = latent_dim * (2 if num_classes > 0 else 1)
    layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, width, start, 1, 0, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]  # fmt: skip
    for i in range(1, n + 1):
      last = i == n
      out = channels if last else width // 2
      if upsample == 'resize':
        layers += [nn.Upsample(scale_factor=2, mode='nearest'), nn.Conv2d(width, out, 3, 1, 1, bias=False)]
      else:
        layers.append(nn.ConvTranspose2d(width, out, 4, 2, 1, bias=False))
      layers += [nn.Tanh()] if last else [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
      width = out
    self.net = nn.Sequential(*layers)
    dcgan_init_(self.net)

  def forward(self, z, labels=None):
    z = z.reshape(z.shape[0], -1)
    if self.label_embed is not None:
      z = torch.cat([z, self.label_embed(labels)], dim=1)
    return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
  """DCGAN discriminator as `cxrjax.models.dcgan.Discriminator`: image -> [B] logits.

  Args:
    image_size: input size.
    channels: input channels.
    base_width: ndf.
    num_classes: 0 unconditional; else a projection discriminator, logit += <embed(y), phi(x)>.
    norm: 'batch' (BatchNorm after every stride-2 convolution but the first) or 'none'.
  """

  def __init__(self, image_size: int = 64, channels: int = 1, base_width: int = 64, num_classes: int = 0,
               norm: str = 'batch'):  # fmt: skip
    super().__init__()
    if norm not in ('batch', 'none'):
      raise ValueError(f'unknown norm {norm!r}')
    start, n = resolution_plan(image_size)
    layers: list[nn.Module] = []
    c = channels
    for i in range(n):
      layers.append(nn.Conv2d(c, base_width * 2**i, 4, 2, 1, bias=False))
      c = base_width * 2**i
      if i > 0 and norm == 'batch':
        layers.append(nn.BatchNorm2d(c))
      layers.append(nn.LeakyReLU(0.2, inplace=True))
    self.features = nn.Sequential(*layers)
    self.head = nn.Conv2d(c, 1, start, 1, 0, bias=False)
    self.label_embed = nn.Embedding(num_classes, c * start * start) if num_classes > 0 else None
    dcgan_init_(self)
    if self.label_embed is not None:
      nn.init.normal_(self.label_embed.weight, 0.0, 0.02)

  def forward(self, x, labels=None):
    h = self.features(x)
    logits = self.head(h).reshape(x.shape[0])
    if self.label_embed is not None:
      logits = logits + (self.label_embed(labels) * h.flatten(1)).sum(dim=1)
    return logits


# ----------------------------------------------------------------------------- latent UNet


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """[B] timesteps -> [B, dim] sinusoidal features, cos then sin (`cxrjax.models.unet.timestep_embedding`)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = F.pad(emb, (0, 1))
  return emb


def _group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, the embedding as a scale and shift after the second GroupNorm."""

  def __init__(self, in_channels: int, channels: int, emb_dim: int, dropout: float = 0.0):
    super().__init__()
    self.norm1 = _group_norm(in_channels)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1)
    self.norm2 = _group_norm(channels)
    self.emb_proj = nn.Linear(emb_dim, 2 * channels)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
    nn.init.zeros_(self.conv2.weight)
    nn.init.zeros_(self.conv2.bias)
    self.skip = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else None

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.norm2(h)
    scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = F.silu(h * (1 + scale) + shift)
    h = self.conv2(self.dropout(h))
    return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nn.Module):
  """Pre-norm multi-head self-attention over H*W positions with a residual (q, k, v, out projections)."""

  def __init__(self, channels: int, num_heads: int = 4):
    super().__init__()
    if channels % num_heads:
      raise ValueError(f'{num_heads} heads do not divide {channels} channels')
    self.num_heads = num_heads
    self.norm = _group_norm(channels)
    self.query = nn.Linear(channels, channels)
    self.key = nn.Linear(channels, channels)
    self.value = nn.Linear(channels, channels)
    self.out = nn.Linear(channels, channels)
    nn.init.zeros_(self.out.weight)
    nn.init.zeros_(self.out.bias)

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # [b, hw, c]

    def heads(t):
      return t.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)

    a = F.scaled_dot_product_attention(heads(self.query(y)), heads(self.key(y)), heads(self.value(y)))
    y = self.out(a.transpose(1, 2).reshape(b, h * w, c))
    return x + y.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
  """Class-conditional latent UNet as `cxrjax.models.unet.UNet` (same arguments, NCHW tensors).

  Args:
    out_channels: latent channels (also the input channels).
    num_classes: real classes; label `num_classes` is the null label.
    base_channels: width of the first level.
    channel_mults: per-level multipliers.
    num_res_blocks: residual blocks per level on the down path (one more on the up path).
    attention_resolutions: levels with attention (negative from the lowest); the middle always has it.
    num_heads: attention heads.
    dropout: dropout in the residual blocks.
  """

  def __init__(self, out_channels: int, num_classes: int, base_channels: int = 64,
               channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
               attention_resolutions: Sequence[int] = (-1,), num_heads: int = 4, dropout: float = 0.0):  # fmt: skip
    super().__init__()
    n = len(channel_mults)
    attn = {level % n for level in attention_resolutions}
    self.num_classes, self.base_channels, self.num_levels = num_classes, base_channels, n
    emb_dim = 4 * base_channels
    self.time_dense1 = nn.Linear(base_channels, emb_dim)
    self.time_dense2 = nn.Linear(emb_dim, emb_dim)
    self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
    self.conv_in = nn.Conv2d(out_channels, base_channels, 3, 1, 1)

    ch, skips = base_channels, [base_channels]
    self.down = nn.ModuleList()
    for level, mult in enumerate(channel_mults):
      stage = nn.ModuleDict()
      for i in range(num_res_blocks):
        stage[f'res{i}'] = ResBlock(ch, base_channels * mult, emb_dim, dropout)
        ch = base_channels * mult
        if level in attn:
          stage[f'attn{i}'] = AttentionBlock(ch, num_heads)
        skips.append(ch)
      if level != n - 1:
        stage['downsample'] = nn.Conv2d(ch, ch, 3, 2, 1)
        skips.append(ch)
      self.down.append(stage)
    self.mid_res0 = ResBlock(ch, ch, emb_dim, dropout)
    self.mid_attn = AttentionBlock(ch, num_heads)
    self.mid_res1 = ResBlock(ch, ch, emb_dim, dropout)
    self.up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mults))):
      stage = nn.ModuleDict()
      for i in range(num_res_blocks + 1):
        stage[f'res{i}'] = ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)
        ch = base_channels * mult
        if level in attn:
          stage[f'attn{i}'] = AttentionBlock(ch, num_heads)
      if level != 0:
        stage['upsample'] = nn.Conv2d(ch, ch, 3, 1, 1)
      self.up.append(stage)
    assert not skips
    self.num_res_blocks = num_res_blocks
    self.norm_out = _group_norm(ch)
    self.conv_out = nn.Conv2d(ch, out_channels, 3, 1, 1)
    nn.init.zeros_(self.conv_out.weight)
    nn.init.zeros_(self.conv_out.bias)

  def forward(self, x, t, labels=None):
    emb = self.time_dense2(F.silu(self.time_dense1(timestep_embedding(t, self.base_channels))))
    if labels is None:
      labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
    emb = emb + self.class_embed(labels)
    h = self.conv_in(x)
    skips = [h]
    for stage in self.down:
      for i in range(self.num_res_blocks):
        h = stage[f'res{i}'](h, emb)
        if f'attn{i}' in stage:
          h = stage[f'attn{i}'](h)
        skips.append(h)
      if 'downsample' in stage:
        h = stage['downsample'](h)
        skips.append(h)
    h = self.mid_res1(self.mid_attn(self.mid_res0(h, emb)), emb)
    for stage in self.up:
      for i in range(self.num_res_blocks + 1):
        h = stage[f'res{i}'](torch.cat([h, skips.pop()], dim=1), emb)
        if f'attn{i}' in stage:
          h = stage[f'attn{i}'](h)
      if 'upsample' in stage:
        h = stage['upsample'](F.interpolate(h, scale_factor=2, mode='nearest'))
    return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- EfficientNetV2


def _bn(channels: int) -> nn.BatchNorm2d:
  # eps 1e-3 as the reference; PyTorch's momentum 0.1 is Flax's/Keras's 0.9.
  return nn.BatchNorm2d(channels, eps=jax_effnet.BN_EPSILON, momentum=1.0 - jax_effnet.BN_MOMENTUM)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`, rescales the rest."""
  if not training or rate <= 0:
    return x
  keep = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(1.0 - rate)
  return x * keep / (1.0 - rate)


class SqueezeExcite(nn.Module):
  def __init__(self, channels: int, reduced: int):
    super().__init__()
    self.reduce = nn.Conv2d(channels, reduced, 1)
    self.expand = nn.Conv2d(reduced, channels, 1)

  def forward(self, x):
    s = F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))
    return x * torch.sigmoid(self.expand(s))


class MBConv(nn.Module):
  """MBConv / FusedMBConv as `cxrjax.models.efficientnet_v2.MBConv`."""

  def __init__(self, in_filters: int, out_filters: int, kernel: int, stride: int, expand: int,
               se_ratio: float | None, fused: bool, drop_path_rate: float = 0.0):  # fmt: skip
    super().__init__()
    mid, pad = in_filters * expand, kernel // 2
    self.fused, self.expand_ratio, self.drop_path_rate = fused, expand, drop_path_rate
    self.residual = stride == 1 and in_filters == out_filters
    self.expand_conv = self.expand_bn = self.depthwise_conv = self.depthwise_bn = self.se = None
    if fused:
      if expand != 1:
        self.expand_conv = nn.Conv2d(in_filters, mid, kernel, stride, pad, bias=False)
        self.expand_bn = _bn(mid)
    else:
      if expand != 1:
        self.expand_conv = nn.Conv2d(in_filters, mid, 1, bias=False)
        self.expand_bn = _bn(mid)
      self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, pad, groups=mid, bias=False)
      self.depthwise_bn = _bn(mid)
    if se_ratio:
      self.se = SqueezeExcite(mid, max(1, int(in_filters * se_ratio)))
    self.project_act = fused and expand == 1
    if self.project_act:
      self.project_conv = nn.Conv2d(mid, out_filters, kernel, stride, pad, bias=False)
    else:
      self.project_conv = nn.Conv2d(mid, out_filters, 1, bias=False)
    self.project_bn = _bn(out_filters)

  def forward(self, x):
    inputs = x
    if self.expand_conv is not None:
      x = F.silu(self.expand_bn(self.expand_conv(x)))
    if self.depthwise_conv is not None:
      x = F.silu(self.depthwise_bn(self.depthwise_conv(x)))
    if self.se is not None:
      x = self.se(x)
    x = self.project_bn(self.project_conv(x))
    if self.project_act:
      x = F.silu(x)
    if self.residual:
      x = drop_path(x, self.drop_path_rate, self.training) + inputs
    return x


class EfficientNetV2(nn.Module):
  """EfficientNetV2 as `cxrjax.models.efficientnet_v2.EfficientNetV2` (same arguments plus `in_channels`)."""

  def __init__(self, num_classes: int, variant: str = 's', width: float = 1.0, depth: float = 1.0,
               stem_stride: int = 2, drop_path_rate: float = 0.2, dropout_rate: float | None = None,
               in_channels: int = 1):  # fmt: skip
    super().__init__()
    if variant not in jax_effnet.VARIANTS:
      raise ValueError(f'unknown EfficientNetV2 variant {variant!r}')
    stages, width_coefficient, depth_coefficient, variant_dropout = jax_effnet.VARIANTS[variant]
    multiplier = width_coefficient * width
    c = jax_effnet.round_filters(stages[0].in_filters, multiplier)
    self.stem_conv = nn.Conv2d(in_channels, c, 3, stem_stride, 1, bias=False)
    self.stem_bn = _bn(c)
    repeats = [jax_effnet.round_repeats(s.repeats, depth_coefficient * depth) for s in stages]
    num_blocks, index, blocks = sum(repeats), 0, []
    for stage, n in zip(stages, repeats):
      out = jax_effnet.round_filters(stage.out_filters, multiplier)
      for j in range(n):
        blocks.append(MBConv(c, out, stage.kernel, stage.stride if j == 0 else 1, stage.expand, stage.se_ratio,
                             stage.fused, drop_path_rate * index / num_blocks))  # fmt: skip
        c, index = out, index + 1
    self.blocks = nn.Sequential(*blocks)
    head = jax_effnet.round_filters(jax_effnet.HEAD_FEATURES, multiplier)
    self.head_conv = nn.Conv2d(c, head, 1, bias=False)
    self.head_bn = _bn(head)
    self.dropout = nn.Dropout(variant_dropout if dropout_rate is None else dropout_rate)
    self.head = nn.Linear(head, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out')
    bound = 1.0 / math.sqrt(num_classes)
    nn.init.uniform_(self.head.weight, -bound, bound)
    nn.init.zeros_(self.head.bias)

  def forward(self, x):
    x = F.silu(self.stem_bn(self.stem_conv(x)))
    x = self.blocks(x)
    x = F.silu(self.head_bn(self.head_conv(x)))
    return self.head(self.dropout(x.mean(dim=(2, 3))))


def count_params(model: nn.Module) -> int:
  """Trainable parameters (what `parameters()` yields; BatchNorm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters())
