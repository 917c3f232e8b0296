"""Inception-V3 (Szegedy et al. 2016) in Flax linen: the FID feature network and torchvision's classifier.

One set of blocks serves two published networks, chosen by `variant`:

- `'fid'` (the default): the network behind the published FID numbers
  (Heusel et al. 2017), TensorFlow's 2015-12-05 Inception graph as ported by
  pytorch-fid (`FIDInceptionA/C/E`). Inputs are images in [0, 1],
  [N, H, W, 1|3]; grayscale is repeated to three channels, the image is resized
  to 299x299 (bilinear, half-pixel centres, no antialiasing: torch's
  `F.interpolate(..., align_corners=False)`) and scaled to [-1, 1], as
  pytorch-fid's `resize_input` and `normalize_input` do. The output is the 2048-d
  pool3 feature (global average after `Mixed_7c`); the auxiliary head and the
  1008-way classifier are left out. Eval mode only: batch norm always uses the
  stored statistics. `cxrjax.eval.inception_features` loads pytorch-fid's
  weights. With these layers the model has 21,785,568 parameters (batch-norm
  statistics not counted), as pytorch-fid's network without `fc` (tested).
- `'torchvision'`: `torchvision.models.inception_v3`, a classifier trained like
  the others. Inputs come as the classifier trainer feeds them, in [-1, 1]
  [N, H, W, C], through `cxrjax.models.preprocess.prepare_input` (`input_norm`,
  `rgb_input`); the output is `num_classes` float32 logits (or, with
  `num_classes=None`, the 2048-d pooled features). `train` switches batch norm to
  batch statistics (running averages updated with flax momentum 0.9, PyTorch's
  0.1) and turns on the dropout before `head` (rng stream `'dropout'`). With
  `aux_logits` the auxiliary head of torchvision's `InceptionAux` reads `Mixed_6e`
  in training and its logits are sown as `intermediates/aux_logits` (the trainer
  adds its loss); like torchvision it is not computed in evaluation. With 1000
  classes, three input channels and the auxiliary head the model has
  torchvision's 27,161,264 parameters (tested). `cxrjax.pretrained.inception_v3`
  converts torchvision's weights.

The two differ only in the pool branches, and both use batch-norm eps 1e-3:

- the 3x3 average pool in the pool branch of the A, C and E blocks leaves the
  zero padding out of the mean in the FID network (TensorFlow's `SAME` average
  pool) and counts it in torchvision's (`F.avg_pool2d`'s default);
- the last E block (`Mixed_7c`) max-pools in its pool branch in the FID network
  (pytorch-fid keeps this quirk of the TensorFlow graph; the published FID numbers
  depend on it) and average-pools in torchvision's.

Module names are the PyTorch state_dict names (`Conv2d_1a_3x3`,
`Mixed_5b/branch1x1/conv`, `.../bn`, `AuxLogits/conv0`, ...), except the final
classifier, which is `head` as in the other cxrjax classifiers (torchvision's
`fc`; the auxiliary head's stays `AuxLogits/fc`), so weights convert name for
name. Every convolution and batch norm comes from `layers`
(`cxrjax.models.layers`), and the variables are the same whichever a backend
passes.

Minimum input size. The spatial size s shrinks only in the VALID layers: the
3x3 convolutions `Conv2d_1a_3x3` (stride 2), `Conv2d_2a_3x3` and `Conv2d_4a_3x3`
(s -> s - 2), the two 3x3 stride-2 max pools of the stem and the stride-2
reductions `Mixed_6a` and `Mixed_7a` (each a 3x3 window at stride 2:
s -> (s - 3) // 2 + 1, which is >= m exactly when s >= 2m + 1). At 299 that gives
149, 147, 73, 71, 35 (`Mixed_5*`), 17 (`Mixed_6*`) and 8 (`Mixed_7*`). Working
back from one pixel after `Mixed_7a`: `Mixed_6*` >= 3, `Mixed_5*` >= 7, the second
max pool's input >= 15, `Conv2d_3b_1x1` >= 17, the first max pool's input >= 35,
`Conv2d_2a_3x3`'s input >= 37 and so an input of at least 2 * 37 + 1 = 75 pixels
(torchvision's `min_size` (75, 75)). The auxiliary head average-pools `Mixed_6e`
with a 5x5 window at stride 3, then applies a VALID 5x5 convolution, so it needs
a 5x5 pool output, i.e. (5 - 1) * 3 + 5 = 17 pixels at `Mixed_6e`; working back
the same way (35, 71, 73, 147, 149) that is an input of at least 299 pixels, the
native size. Each side is checked separately, on static shapes, before any
parameter is created; the auxiliary head's minimum only where it runs.

Training differs from PyTorch in one detail that does not touch the outputs: the
running variance is updated with the biased batch variance (flax) rather than
the unbiased one (PyTorch), a factor n / (n - 1) for n values per channel.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.errors import UserError
from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.preprocess import prepare_input

INPUT_SIZE = 299
FEATURE_DIM = 2048
MIN_INPUT_SIZE = 75
AUX_MIN_INPUT_SIZE = 299
VARIANTS = ('fid', 'torchvision')
BN_MOMENTUM = 0.9  # flax's convention: running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)
BN_EPSILON = 1e-3

# torchvision's initialisers (`init_weights`): N(0, 0.1) for every convolution and the
# classifier, 0.01 for the auxiliary head's 5x5 convolution and 0.001 for its
# classifier. torchvision truncates at +-2 in absolute value, i.e. at 20 standard
# deviations or more, which no draw reaches, so these are plain normals. Biases are zero.
conv_init = nn.initializers.normal(0.1)
dense_init = nn.initializers.normal(0.1)
aux_conv_init = nn.initializers.normal(0.01)
aux_dense_init = nn.initializers.normal(0.001)


def resize_bilinear(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[N, H, W, C] -> [N, size, size, C] as torch's bilinear `F.interpolate(align_corners=False)`.

  `jax.image.resize` antialiases when shrinking unless told not to; torch does
  not, and FID numbers are only comparable with the same resampling.
  """
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  return jax.image.resize(x, (n, size, size, c), method='linear', antialias=False)


def check_input_size(shape, aux: bool = False) -> None:
  """Raises UserError when images of `shape` [N, H, W, C] are too small (see the module docstring).

  Args:
    shape: the network's input shape (after any resize).
    aux: check the auxiliary head's minimum (299) instead of the network's (75).
  """
  h, w = shape[1], shape[2]
  if not aux and min(h, w) < MIN_INPUT_SIZE:
    raise UserError(
      f'Inception-V3 needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {h}x{w}; '
      f'set data.image_size >= {MIN_INPUT_SIZE} (its native size is {INPUT_SIZE})'
    )
  if aux and min(h, w) < AUX_MIN_INPUT_SIZE:
    raise UserError(
      f"Inception-V3's auxiliary head (aux_logits) needs images of at least {AUX_MIN_INPUT_SIZE}x{AUX_MIN_INPUT_SIZE}"
      f' pixels, got {h}x{w}; set data.image_size >= {AUX_MIN_INPUT_SIZE} (the native size) or turn aux_logits off'
    )


def _avg_pool_3x3(x, count_include_pad: bool):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=count_include_pad)


def _max_pool_3x3(x):
  return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding='VALID')


class BasicConv(nn.Module):
  """Convolution (no bias), batch norm (eps 1e-3) and ReLU: torchvision's `BasicConv2d`.

  Attributes:
    features: output channels.
    kernel: (height, width) of the kernel.
    strides: the same in both directions.
    padding: (rows, columns) of zeros on each side, as PyTorch's `padding`.
    train: batch statistics (and running-average updates) instead of the stored ones.
    kernel_init: initialiser of the convolution.
    dtype: compute dtype (parameters stay float32).
    layers: the convolution and batch-norm constructors.
  """

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  train: bool = False
  kernel_init: nn.initializers.Initializer = conv_init
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = self.layers.conv(self.features, self.kernel, (self.strides, self.strides), padding=((ph, ph), (pw, pw)),
                         use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype, name='conv')(x)  # fmt: skip
    return self.layers.batch_norm(use_running_average=not self.train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                  dtype=self.dtype, relu=True, name='bn')(x)  # fmt: skip


class _Block(nn.Module):
  """What every block shares: how to build its `BasicConv`s."""

  train: bool = False
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK

  def _conv(self, *args, **kwargs):
    return BasicConv(*args, **kwargs, train=self.train, dtype=self.dtype, layers=self.layers)


class InceptionA(_Block):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches (Mixed_5b-d)."""

  pool_features: int = 32
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    conv = self._conv
    b1 = conv(64, name='branch1x1')(x)
    b5 = conv(48, name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x, self.count_include_pad))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    conv = self._conv
    b3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = conv(64, name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

  channels_7x7: int = 128
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    conv, c7 = self._conv, self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name='branch1x1')(x)
    b7 = conv(c7, name='branch7x7_1')(x)
    b7 = conv(c7, **row, name='branch7x7_2')(b7)
    b7 = conv(192, **col, name='branch7x7_3')(b7)
    bd = conv(c7, name='branch7x7dbl_1')(x)
    bd = conv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = conv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = conv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = conv(192, **row, name='branch7x7dbl_5')(bd)
    bp = conv(192, name='branch_pool')(_avg_pool_3x3(x, self.count_include_pad))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    conv = self._conv
    b3 = conv(192, name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block with split 1x3/3x1 branches (Mixed_7b-c); `pool` is the pool branch's 'avg' or 'max'."""

  pool: str = 'avg'
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    conv = self._conv
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name='branch1x1')(x)
    b3 = conv(384, name='branch3x3_1')(x)
    b3a = conv(384, **row, name='branch3x3_2a')(b3)
    b3b = conv(384, **col, name='branch3x3_2b')(b3)
    bd = conv(448, name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bda = conv(384, **row, name='branch3x3dbl_3a')(bd)
    bdb = conv(384, **col, name='branch3x3dbl_3b')(bd)
    pooled = _max_pool_3x3(x) if self.pool == 'max' else _avg_pool_3x3(x, self.count_include_pad)
    bp = conv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionAux(_Block):
  """torchvision's auxiliary classifier on Mixed_6e: 5x5/3 average pool, 1x1 -> 128, 5x5 -> 768, mean, dense."""

  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(x, (5, 5), (3, 3), padding='VALID')
    x = self._conv(128, name='conv0')(x)
    x = self._conv(768, (5, 5), kernel_init=aux_conv_init, name='conv1')(x)
    x = jnp.mean(x, axis=(1, 2))  # torchvision's adaptive average pool to 1x1
    x = nn.Dense(self.num_classes, kernel_init=aux_dense_init, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


class InceptionV3(nn.Module):
  """Inception-V3, pytorch-fid's FID network or torchvision's classifier (see the module docstring).

  `InceptionV3()` is the FID network: images in [0, 1] [N, H, W, 1|3] -> pool3
  features [N, 2048].

  Attributes:
    num_classes: logits of the classifier `head`; None for the 2048-d pooled
      features (the only choice for 'fid').
    variant: 'fid' (pytorch-fid's network and input path) or 'torchvision'
      (torchvision's classifier; the input path of `prepare_input`).
    aux_logits: 'torchvision' only: the auxiliary head `AuxLogits` on Mixed_6e,
      run in training (and at init, which creates its variables) and sown as
      `intermediates/aux_logits`; there it needs inputs of at least 299x299.
    dropout_rate: 'torchvision' only: dropout on the pooled features before
      `head` in training (torchvision's 0.5).
    dtype: compute dtype (parameters stay float32).
    layers: the convolution and batch-norm constructors (same variables
      whichever a backend passes).
    input_norm: 'torchvision' only: `prepare_input`'s normalisation ('none',
      'imagenet' or 'inception'; torchvision's ImageNet weights want 'inception').
    rgb_input: 'torchvision' only: repeat a grayscale input to the three channels
      pretrained weights take.
    resize_input: 'fid' only: resize to 299x299 first, as pytorch-fid does by
      default.
    frozen_batch_norm: 'torchvision' only: batch norm normalises with its running
      statistics and never updates them, in training too (fine-tuning).
  """

  num_classes: int | None = None
  variant: str = 'fid'
  aux_logits: bool = False
  dropout_rate: float = 0.5
  dtype: jnp.dtype = jnp.float32
  layers: Layers = STOCK
  input_norm: str = 'none'
  rgb_input: bool = False
  resize_input: bool = True
  frozen_batch_norm: bool = False

  def _check_options(self, train: bool) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f'unknown Inception-V3 variant {self.variant!r}; expected one of {VARIANTS}')
    if self.variant == 'fid':
      extra = dict(num_classes=self.num_classes, aux_logits=self.aux_logits, train=train,
                   input_norm=self.input_norm != 'none', rgb_input=self.rgb_input)  # fmt: skip
      given = [k for k, v in extra.items() if v not in (None, False)]
      if given:
        raise ValueError(
          f"the FID Inception-V3 is a fixed eval-mode feature network; {given} need variant='torchvision'"
        )
    elif self.aux_logits and self.num_classes is None:
      raise ValueError('aux_logits needs num_classes')

  def _fid_input(self, x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise UserError(f'Inception-V3: expected images [N, H, W, 1|3], got shape {x.shape}')
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    return 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the range of the TensorFlow graph

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check_options(train)
    fid = self.variant == 'fid'
    x = self._fid_input(x) if fid else prepare_input(x, self.input_norm, self.rgb_input, self.dtype)
    run_aux = self.aux_logits and (train or self.is_initializing())
    check_input_size(x.shape)
    if run_aux:
      check_input_size(x.shape, aux=True)
    x = x.astype(self.dtype)
    block = dict(train=train and not self.frozen_batch_norm, dtype=self.dtype, layers=self.layers)
    conv = functools.partial(BasicConv, **block)
    pad = dict(count_include_pad=not fid)  # TensorFlow's SAME average pool leaves the padding out

    x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_down(x)
    x = conv(80, name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_down(x)
    x = InceptionA(**block, pool_features=32, **pad, name='Mixed_5b')(x)
    x = InceptionA(**block, pool_features=64, **pad, name='Mixed_5c')(x)
    x = InceptionA(**block, pool_features=64, **pad, name='Mixed_5d')(x)
    x = InceptionB(**block, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(**block, channels_7x7=c7, **pad, name=name)(x)
    if run_aux:
      aux = InceptionAux(**block, num_classes=self.num_classes, name='AuxLogits')(x)
      if train:
        self.sow('intermediates', 'aux_logits', aux)
    x = InceptionD(**block, name='Mixed_7a')(x)
    x = InceptionE(**block, pool='avg', **pad, name='Mixed_7b')(x)
    x = InceptionE(**block, pool='max' if fid else 'avg', **pad, name='Mixed_7c')(x)
    if not fid:
      # Grad-CAM reads the last feature map and its gradient from here.
      x = self.perturb('cam_features', x)
      self.sow('intermediates', 'cam_features', x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes is None:
      return x.astype(jnp.float32)
    x = nn.Dropout(self.dropout_rate, name='dropout')(x, deterministic=not train)
    x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def inception_v3(
  num_classes: int,
  aux_logits: bool = False,
  dropout_rate: float = 0.5,
  dtype=jnp.float32,
  input_norm: str = 'none',
  rgb_input: bool = False,
  layers: Layers = STOCK,
  frozen_batch_norm: bool = False,
) -> InceptionV3:
  """torchvision's Inception-V3 classifier; see `InceptionV3` for the arguments."""
  return InceptionV3(num_classes=num_classes, variant='torchvision', aux_logits=aux_logits, dropout_rate=dropout_rate,
                     dtype=dtype, layers=layers, input_norm=input_norm, rgb_input=rgb_input,
                     frozen_batch_norm=frozen_batch_norm)  # fmt: skip
