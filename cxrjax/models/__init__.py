"""Model constructors, looked up by `config.model.name` in a plain dict."""

from __future__ import annotations

import jax.numpy as jnp

from cxrjax import _xla_env
from cxrjax.models import efficientnet_v2, resnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _resnet18(model_config, num_classes: int, image_shape, conv_impl: str):
  stem = model_config.stem
  if stem == 'auto':
    stem = 'imagenet' if image_shape[0] >= 128 else 'cifar'
  return resnet.resnet18(num_classes, model_config.width, stem, DTYPES[model_config.dtype], conv_impl)


def _efficientnet_v2(variant: str):
  def build(model_config, num_classes: int, image_shape, conv_impl: str):
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
      conv_impl=conv_impl,
    )

  return build


CLASSIFIERS = {
  'resnet18': _resnet18,
  'efficientnet_v2_b0': _efficientnet_v2('b0'),
  'efficientnet_v2_s': _efficientnet_v2('s'),
}


# Classifiers whose training step runs faster with YNN's elementwise fusion: ResNet-18's
# elementwise work is a few large ReLU / residual maps around oneDNN's kernels. EfficientNetV2's
# many small SiLU, squeeze-excitation and residual maps run faster as XLA's own loop fusions
# (measured, BUILD_NOTES.md issue 8), so its step compiles without it, as the generator steps do.
FUSE_ELEMENTWISE = frozenset({'resnet18'})


def classifier_step_options(model_name: str) -> dict[str, str] | None:
  """XLA options for the training step of classifier `model_name` (`_xla_env.compiler_options`)."""
  return _xla_env.compiler_options(fuse_elementwise=model_name in FUSE_ELEMENTWISE)


# Experiments whose training ran faster with XLA's CPU work on one pool thread
# (`_xla_env.use_one_pool_thread`): steps that are nearly all oneDNN calls. Measured (BUILD_NOTES.md,
# issue 8): the DCGAN step about 6%, EfficientNetV2-B0's about 12% and ResNet-18's 2-3% faster
# (no XLA fusion then runs beside a convolution); the UNet and EfficientNetV2-S, with more XLA
# work of their own, slower, so they keep one pool thread per core.
ONE_POOL_THREAD = frozenset({'dcgan', 'efficientnet_v2_b0', 'resnet18'})


def one_pool_thread(config) -> bool:
  """Whether the experiment `config` runs with one XLA pool thread (the 'gan' trainer's generators are DCGANs)."""
  program = {'gan': 'dcgan', 'classifier': config.model.name}.get(config.trainer, config.trainer)
  return program in ONE_POOL_THREAD


def build_classifier(model_config, num_classes: int, image_shape, conv_impl: str = 'xla'):
  """The classifier named by `model_config.name` (a Flax linen module).

  Args:
    model_config: `config.model`.
    num_classes: output logits.
    image_shape: (h, w, c) of the inputs.
    conv_impl: 'xla' or 'onednn', as resolved by `cxrjax.ops.onednn.resolve(config.convolution)`.
  """
  return CLASSIFIERS[model_config.name](model_config, num_classes, image_shape, conv_impl)
