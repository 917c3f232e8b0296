"""The input path of a classifier: channel replication and the normalisation its weights expect.

Pretrained weights were fitted to inputs prepared one particular way, so the
preparation belongs to the model (and to its exported copy), not to the data
pipeline: an export used for Grad-CAM or fine-tuning sees exactly what training saw.
Images arrive as the classifier trainer feeds them: in [-1, 1] (`u = (x + 1) / 2` is
the [0, 1] image torchvision's presets start from), `[N, H, W, C]`.

- `'none'`: unchanged (from-scratch training).
- `'imagenet'`: `(u - mean) / std` per channel with ImageNet's statistics, as
  torchvision's `ImageClassification` preset does for ResNet and EfficientNetV2.
- `'inception'`: `2u - 1`, i.e. the [-1, 1] input itself. torchvision's Inception-V3
  weights are Google's, which expect [-1, 1]; torchvision reaches that from
  ImageNet-normalised input with `transform_input=True`
  (`(u_norm * std + mean - 0.5) / 0.5` is `2u - 1`).
"""

from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ('none', 'imagenet', 'inception')


def prepare_input(x, norm: str = 'none', rgb: bool = False, dtype=jnp.float32):
  """Replicates grayscale to three channels when `rgb`, then applies `norm` (see the module docstring).

  Args:
    x: images in [-1, 1], `[N, H, W, C]`.
    norm: one of `INPUT_NORMS`.
    rgb: the network takes three channels (pretrained weights do): a one-channel
      image is repeated; other channel counts are an error.
    dtype: the dtype of the result.
  """
  x = jnp.asarray(x, jnp.float32)
  if rgb and x.shape[-1] != 3:
    if x.shape[-1] != 1:
      raise ValueError(f'an RGB network takes 1 or 3 input channels, got shape {x.shape}')
    x = jnp.repeat(x, 3, axis=-1)
  if norm == 'imagenet':
    if x.shape[-1] != 3:
      raise ValueError(f"input_norm 'imagenet' needs three channels (set rgb), got shape {x.shape}")
    x = ((x + 1.0) / 2.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  elif norm not in ('none', 'inception'):  # 'inception': [-1, 1] already
    raise ValueError(f'input_norm must be one of {INPUT_NORMS}, got {norm!r}')
  return x.astype(dtype)
