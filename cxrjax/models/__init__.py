"""Model constructors, looked up by `config.model.name` in a plain dict."""

from __future__ import annotations

import jax.numpy as jnp

from cxrjax.models import resnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _resnet18(model_config, num_classes: int, image_shape):
  stem = model_config.stem
  if stem == 'auto':
    stem = 'imagenet' if image_shape[0] >= 128 else 'cifar'
  return resnet.resnet18(num_classes, model_config.width, stem, DTYPES[model_config.dtype])


CLASSIFIERS = {'resnet18': _resnet18}


def build_classifier(model_config, num_classes: int, image_shape):
  """The classifier named by `model_config.name` (a Flax linen module)."""
  return CLASSIFIERS[model_config.name](model_config, num_classes, image_shape)
