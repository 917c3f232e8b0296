"""ResNet-18: the published parameter count, shapes for both stems, width multiplier."""

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models import resnet

from conftest import init_variables


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_imagenet_resnet18_parameter_count():
  model = resnet.resnet18(1000, width=64, stem='imagenet')
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert count(shapes['params']) == 11_689_512  # torchvision.models.resnet18()


def test_cifar_stem_keeps_resolution_and_width_scales():
  full = resnet.resnet18(2, width=64, stem='cifar')
  v = jax.eval_shape(lambda: full.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
  # 3x3 single-channel stem instead of 7x7x3 and a 2-class head: 11,168,706 parameters.
  assert count(v['params']) == 11_168_706
  narrow = resnet.resnet18(2, width=16, stem='cifar')
  v16 = jax.eval_shape(lambda: narrow.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))
  assert 0.05 < count(v16['params']) / count(v['params']) < 0.07  # ~1/16: convs scale with width^2


def test_forward_shapes_and_cam_features():
  model = resnet.resnet18(3, width=8, stem='cifar')
  x = jnp.ones((2, 32, 32, 1))
  variables = init_variables(model, jax.random.key(0), x, train=False)
  logits, inter = model.apply(variables, x, train=False, mutable=['intermediates'])
  assert logits.shape == (2, 3)
  (fmap,) = inter['intermediates']['cam_features']
  assert fmap.shape == (2, 4, 4, 64)  # 32 / 8 spatial, 8 * 8 channels
