"""Model constructors, looked up by `config.model.name` in a plain dict.

Every model takes its layers (`cxrjax.models.layers.Layers`; plain Flax by default)
and imports no backend.
"""

from __future__ import annotations

import jax.numpy as jnp

from cxrjax.models import efficientnet_v2, inception, resnet
from cxrjax.models.layers import STOCK, Layers

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def input_path(model_config) -> dict:
  """The input-path fields every classifier takes (see `cxrjax.models.preprocess`).

  Pretrained-style inputs (`input_norm` other than 'none') are RGB: grayscale is
  replicated. 'auto' without pretrained weights, and exports written before these fields
  existed, read as 'none'.
  """
  norm = model_config.get('input_norm', 'none')
  if norm == 'auto':
    if model_config.get('pretrained'):  # what the weights expect: cxrjax.trainers.finetune.model_config
      raise ValueError("model.input_norm 'auto' with pretrained weights is resolved by cxrjax.trainers.finetune")
    norm = 'none'  # from scratch
  return dict(
    input_norm=norm, rgb_input=norm != 'none', frozen_batch_norm=model_config.get('batch_norm', 'train') == 'frozen'
  )


def _resnet18(model_config, num_classes: int, image_shape, layers: Layers):
  stem = model_config.stem
  if stem == 'auto':
    stem = 'imagenet' if image_shape[0] >= 128 else 'cifar'
  return resnet.resnet18(
    num_classes, model_config.width, stem, DTYPES[model_config.dtype], layers, **input_path(model_config)
  )


def _efficientnet_v2(variant: str):
  def build(model_config, num_classes: int, image_shape, layers: Layers):
    stem = model_config.stem
    if stem == 'auto':
      stem = 'imagenet' if image_shape[0] > 64 else 'cifar'
    return efficientnet_v2.efficientnet_v2(
      num_classes,
      variant=variant,
      width=model_config.width_mult,
      depth=model_config.depth_mult,
      stem_stride=2 if stem == 'imagenet' else 1,  # keep resolution for small images
      dtype=DTYPES[model_config.dtype],
      drop_path_rate=model_config.drop_path_rate,
      layers=layers,
      **input_path(model_config),
    )

  return build


def _inception_v3(model_config, num_classes: int, image_shape, layers: Layers):
  # torchvision's layout; inputs smaller than 75x75 (299x299 with aux_logits) are refused at init.
  return inception.inception_v3(
    num_classes,
    aux_logits=model_config.get('aux_logits', False),
    dropout_rate=model_config.get('dropout_rate', 0.5),
    dtype=DTYPES[model_config.dtype],
    layers=layers,
    **input_path(model_config),
  )


CLASSIFIERS = {
  'resnet18': _resnet18,
  'efficientnet_v2_b0': _efficientnet_v2('b0'),
  'efficientnet_v2_s': _efficientnet_v2('s'),
  'inception_v3': _inception_v3,
}


# The classification head(s) of each classifier: module paths under `params`, re-initialised
# for the task's classes when starting from pretrained weights, and the `head` group of the
# fine-tuning optimizer (cxrjax.trainers.finetune).
HEADS = {
  'resnet18': (('head',),),
  'efficientnet_v2_b0': (('head',),),
  'efficientnet_v2_s': (('head',),),
  'inception_v3': (('head',), ('AuxLogits', 'fc')),
}


def build_classifier(model_config, num_classes: int, image_shape, layers: Layers = STOCK):
  """The classifier named by `model_config.name` (a Flax linen module).

  Args:
    model_config: `config.model`.
    num_classes: output logits.
    image_shape: (h, w, c) of the inputs.
    layers: the layer constructors (a backend's `layers`; plain Flax by default).
  """
  return CLASSIFIERS[model_config.name](model_config, num_classes, image_shape, layers)
