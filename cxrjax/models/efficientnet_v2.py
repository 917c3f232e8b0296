"""EfficientNetV2 (Tan & Le, 2021) in Flax linen, laid out as the official TF model.

Follows google/automl `efficientnetv2/effnetv2_model.py` and `effnetv2_configs.py`
(which timm's `tf_efficientnetv2_*` ports reproduce): a 3x3 stride-2 stem, stages
of FusedMBConv blocks (a full kxk expansion convolution, no squeeze-excitation)
followed by MBConv blocks (1x1 expansion, kxk depthwise convolution,
squeeze-excitation sized from the block's input channels, 1x1 projection), a 1x1
head convolution to 1280 channels, global average pooling, dropout and a dense
classifier. Activations are SiLU. Residual blocks use stochastic depth whose rate
grows linearly with the block index, `drop_path_rate * index / num_blocks`, as in
the reference.

With 1000 classes and 3 input channels the parameter counts equal the published
ones (tested): B0 7,139,704 (timm `tf_efficientnetv2_b0`), S 21,458,488, M
54,139,356 and L 118,515,272 (torchvision `efficientnet_v2_{s,m,l}`, same as timm's
`tf_efficientnetv2_{s,m,l}`).

Deviations from the reference, all deliberate:
  * Padding is explicit and symmetric (k // 2 each side), as in `resnet.py` and
    torchvision, not TF 'SAME' (which pads the extra row/column only at the
    bottom/right for stride 2). Output shapes are identical; TF-trained weights
    would need TF padding to reproduce their activations exactly.
  * `stem_stride` may be 1 for small (<= 64 px) images; the reference always uses 2.
  * `width` and `depth` are extra multipliers on top of the variant's coefficients,
    applied through the reference's `round_filters` (multiples of 8, at least 8,
    the 1280-channel head included) and `round_repeats` (rounded up per stage);
    1.0 gives the reference network. Small values make cheap test models.
  * The head dropout defaults to the variant's published rate, and stochastic depth
    is a rate (`drop_path_rate`, 0.2) rather than the reference's survival
    probability (0.8); the per-block schedule is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.preprocess import prepare_input

# The reference's initialisers (effnetv2_model.py): untruncated normal convolutions
# with stddev sqrt(2 / fan_out), fan_out = kh * kw * out_filters, and a dense kernel
# U(-1/sqrt(num_classes), 1/sqrt(num_classes)).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# TF's depthwise kernel is (kh, kw, channels, 1), so its fan_out is kh * kw. Flax's is
# (kh, kw, 1, channels), where the same number is the 'fan_in' (in-axis size 1).
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')

# hparams.base_config of the reference: bn_momentum 0.9 (Keras convention, the same as
# Flax's: running = 0.9 * running + 0.1 * batch; PyTorch's 0.1) and bn_epsilon 1e-3.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3
DEPTH_DIVISOR = 8
HEAD_FEATURES = 1280


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One row of the reference's block strings, e.g. 'r2_k3_s1_e1_i24_o24_c1'.

  Attributes:
    repeats: blocks in the stage (before the depth coefficient).
    kernel: spatial kernel size.
    stride: stride of the first block.
    expand: expansion ratio.
    in_filters: input channels of the first block (before width rounding).
    out_filters: output channels of every block.
    se_ratio: squeeze-excitation ratio relative to the block input channels, or None.
    fused: FusedMBConv (c1) instead of MBConv (c0).
  """

  repeats: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  se_ratio: float | None
  fused: bool


def _fused(r, k, s, e, i, o):
  return StageConfig(r, k, s, e, i, o, None, True)


def _mbconv(r, k, s, e, i, o):
  return StageConfig(r, k, s, e, i, o, 0.25, False)


# effnetv2_configs.py: v2_base_block (B0-B3), v2_s_block, v2_m_block, v2_l_block.
_BASE_STAGES = (
  _fused(1, 3, 1, 1, 32, 16),
  _fused(2, 3, 2, 4, 16, 32),
  _fused(2, 3, 2, 4, 32, 48),
  _mbconv(3, 3, 2, 4, 48, 96),
  _mbconv(5, 3, 1, 6, 96, 112),
  _mbconv(8, 3, 2, 6, 112, 192),
)
_S_STAGES = (
  _fused(2, 3, 1, 1, 24, 24),
  _fused(4, 3, 2, 4, 24, 48),
  _fused(4, 3, 2, 4, 48, 64),
  _mbconv(6, 3, 2, 4, 64, 128),
  _mbconv(9, 3, 1, 6, 128, 160),
  _mbconv(15, 3, 2, 6, 160, 256),
)
_M_STAGES = (
  _fused(3, 3, 1, 1, 24, 24),
  _fused(5, 3, 2, 4, 24, 48),
  _fused(5, 3, 2, 4, 48, 80),
  _mbconv(7, 3, 2, 4, 80, 160),
  _mbconv(14, 3, 1, 6, 160, 176),
  _mbconv(18, 3, 2, 6, 176, 304),
  _mbconv(5, 3, 1, 6, 304, 512),
)
_L_STAGES = (
  _fused(4, 3, 1, 1, 32, 32),
  _fused(7, 3, 2, 4, 32, 64),
  _fused(7, 3, 2, 4, 64, 96),
  _mbconv(10, 3, 2, 4, 96, 192),
  _mbconv(19, 3, 1, 6, 192, 224),
  _mbconv(25, 3, 2, 6, 224, 384),
  _mbconv(7, 3, 1, 6, 384, 640),
)

# variant -> (stages, width coefficient, depth coefficient, head dropout), from
# efficientnetv2_params in effnetv2_configs.py.
VARIANTS = {
  'b0': (_BASE_STAGES, 1.0, 1.0, 0.2),
  'b1': (_BASE_STAGES, 1.0, 1.1, 0.2),
  'b2': (_BASE_STAGES, 1.1, 1.2, 0.3),
  'b3': (_BASE_STAGES, 1.2, 1.4, 0.3),
  's': (_S_STAGES, 1.0, 1.0, 0.2),
  'm': (_M_STAGES, 1.0, 1.0, 0.3),
  'l': (_L_STAGES, 1.0, 1.0, 0.4),
}


def round_filters(filters: int, multiplier: float, divisor: int = DEPTH_DIVISOR) -> int:
  """Scales a channel count and rounds it to the nearest multiple of `divisor`, at least `divisor`.

  The V2 reference's rounding: unlike EfficientNet-V1's, it does not add a divisor back
  when rounding loses more than 10% (timm's `round_limit=0.` for V2).
  """
  return max(divisor, int(filters * multiplier + divisor / 2) // divisor * divisor)


def round_repeats(repeats: int, multiplier: float) -> int:
  """Scales a stage's block count by the depth coefficient, rounding up."""
  return int(math.ceil(multiplier * repeats))


def _norm(layers: Layers, train: bool, dtype):
  return functools.partial(layers.batch_norm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                           dtype=dtype)  # fmt: skip


class MBConv(nn.Module):
  """MBConv or FusedMBConv block with optional squeeze-excitation and stochastic depth.

  Attributes:
    in_filters: input channels (the squeeze-excitation width is computed from them).
    out_filters: output channels.
    kernel: spatial kernel of the depthwise (MBConv) or expansion (fused) convolution.
    stride: spatial stride.
    expand: expansion ratio.
    se_ratio: squeeze-excitation ratio, or None for none.
    fused: FusedMBConv instead of MBConv.
    drop_path_rate: probability of dropping the residual branch per sample in training.
    dtype: compute dtype.
    layers: the convolution and BatchNorm constructors (see `EfficientNetV2`).
    frozen_batch_norm: BatchNorm always normalises with its running statistics (see `EfficientNetV2`).
  """

  in_filters: int
  out_filters: int
  kernel: int
  stride: int
  expand: int
  se_ratio: float | None
  fused: bool
  drop_path_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(self.layers.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    norm = _norm(self.layers, train and not self.frozen_batch_norm, self.dtype)
    k, s = (self.kernel, self.kernel), (self.stride, self.stride)
    pad = ((self.kernel // 2,) * 2,) * 2
    mid = self.in_filters * self.expand
    inputs = x
    if self.fused:
      if self.expand != 1:
        x = nn.silu(norm(name='expand_bn')(conv(mid, k, s, padding=pad, name='expand_conv')(x)))
    else:
      if self.expand != 1:
        x = nn.silu(norm(name='expand_bn')(conv(mid, (1, 1), name='expand_conv')(x)))
      depthwise = conv(x.shape[-1], k, s, padding=pad, feature_group_count=x.shape[-1], kernel_init=depthwise_init,
                       name='depthwise_conv')  # fmt: skip
      x = depthwise(x)
      x = nn.silu(norm(name='depthwise_bn')(x))
    if self.se_ratio:
      x = SqueezeExcite(max(1, int(self.in_filters * self.se_ratio)), self.dtype, name='se')(x)
    if self.fused and self.expand == 1:
      # No expansion: the single kxk convolution is the projection, and keeps its activation.
      x = nn.silu(norm(name='project_bn')(conv(self.out_filters, k, s, padding=pad, name='project_conv')(x)))
    else:
      x = norm(name='project_bn')(conv(self.out_filters, (1, 1), name='project_conv')(x))
    if self.stride == 1 and self.in_filters == self.out_filters:
      # Stochastic depth: drop the whole residual branch per sample (broadcast over H, W, C),
      # rescaling the survivors by 1 / (1 - rate), as the reference's drop_connect.
      if self.drop_path_rate > 0:
        x = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name='drop_path')(x, deterministic=not train)
      x = x + inputs
    return x


class SqueezeExcite(nn.Module):
  """Channel gating: global average pool, 1x1 reduce + SiLU, 1x1 expand + sigmoid.

  Attributes:
    reduced: channels of the bottleneck.
    dtype: compute dtype.
  """

  reduced: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_init, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(conv(self.reduced, name='reduce')(s))
    s = conv(x.shape[-1], name='expand')(s)
    return x * nn.sigmoid(s)


class EfficientNetV2(nn.Module):
  """EfficientNetV2 classifier.

  Attributes:
    num_classes: output logits.
    variant: 'b0', 'b1', 'b2', 'b3', 's', 'm' or 'l' (the reference's configurations).
    width: extra channel multiplier on top of the variant's (1.0 is the published
      network; e.g. 0.25 for tiny test models).
    depth: extra block-count multiplier on top of the variant's, rounded up per stage
      (1.0 is the published network; small values give shallow test models that
      compile quickly).
    stem_stride: stride of the stem convolution; 2 as published, 1 keeps resolution
      for small (<= 64 px) images.
    drop_path_rate: stochastic-depth scale; block i (from 0) of n drops its residual
      branch with probability `drop_path_rate * i / n`, as the reference does with
      survival_prob 0.8. Blocks without a residual connection are never dropped.
    dropout_rate: dropout before the classifier; None takes the variant's published
      rate (0.2 for B0, B1 and S, 0.3 for B2, B3 and M, 0.4 for L).
    dtype: compute dtype (parameters stay float32).
    layers: the constructors of the convolutions (stem, expansions, depthwise,
      projections, head) and BatchNorms. Same parameters whichever a backend passes.
      The squeeze-excitation's 1x1 convolutions on 1x1 maps, dense layers in
      convolution form, are always `nn.Conv`.
    input_norm, rgb_input: the input path (`cxrjax.models.preprocess.prepare_input`).
    frozen_batch_norm: every BatchNorm normalises with its running statistics and never
      updates them, in training too (fine-tuning with imported statistics).
  """

  num_classes: int
  variant: str = 's'
  width: float = 1.0
  depth: float = 1.0
  stem_stride: int = 2
  drop_path_rate: float = 0.2
  dropout_rate: float | None = None
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK
  input_norm: str = 'none'
  rgb_input: bool = False
  frozen_batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in VARIANTS:
      raise ValueError(f'unknown EfficientNetV2 variant {self.variant!r}; expected one of {sorted(VARIANTS)}')
    stages, width_coefficient, depth_coefficient, variant_dropout = VARIANTS[self.variant]
    multiplier = width_coefficient * self.width
    dropout_rate = variant_dropout if self.dropout_rate is None else self.dropout_rate
    norm = _norm(self.layers, train and not self.frozen_batch_norm, self.dtype)
    conv = functools.partial(self.layers.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)

    x = prepare_input(x, self.input_norm, self.rgb_input, self.dtype)
    s = (self.stem_stride, self.stem_stride)
    x = conv(round_filters(stages[0].in_filters, multiplier), (3, 3), s, padding=((1, 1), (1, 1)), name='stem_conv')(x)
    x = nn.silu(norm(name='stem_bn')(x))

    repeats = [round_repeats(stage.repeats, depth_coefficient * self.depth) for stage in stages]
    num_blocks, index = sum(repeats), 0
    for i, (stage, n) in enumerate(zip(stages, repeats)):
      for j in range(n):
        x = MBConv(
          in_filters=x.shape[-1],
          out_filters=round_filters(stage.out_filters, multiplier),
          kernel=stage.kernel,
          stride=stage.stride if j == 0 else 1,
          expand=stage.expand,
          se_ratio=stage.se_ratio,
          fused=stage.fused,
          drop_path_rate=self.drop_path_rate * index / num_blocks,
          dtype=self.dtype,
          layers=self.layers,
          frozen_batch_norm=self.frozen_batch_norm,
          name=f'stage{i + 1}_block{j + 1}',
        )(x, train)
        index += 1

    x = conv(round_filters(HEAD_FEATURES, multiplier), (1, 1), name='head_conv')(x)
    x = nn.silu(norm(name='head_bn')(x))
    # Grad-CAM reads the last feature map and its gradient from here.
    x = self.perturb('cam_features', x)
    self.sow('intermediates', 'cam_features', x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(dropout_rate)(x, deterministic=not train)
    x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def efficientnet_v2(
  num_classes: int,
  variant: str = 's',
  width: float = 1.0,
  stem_stride: int = 2,
  dtype=jnp.float32,
  drop_path_rate: float = 0.2,
  dropout_rate: float | None = None,
  depth: float = 1.0,
  layers: Layers = STOCK,
  input_norm: str = 'none',
  rgb_input: bool = False,
  frozen_batch_norm: bool = False,
) -> EfficientNetV2:
  """An EfficientNetV2 classifier; see `EfficientNetV2` for the arguments."""
  return EfficientNetV2(
    num_classes=num_classes,
    variant=variant,
    width=width,
    depth=depth,
    stem_stride=stem_stride,
    drop_path_rate=drop_path_rate,
    dropout_rate=dropout_rate,
    dtype=dtype,
    layers=layers,
    input_norm=input_norm,
    rgb_input=rgb_input,
    frozen_batch_norm=frozen_batch_norm,
  )
