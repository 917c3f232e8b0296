"""The custom-VJP stride-2 convolution against XLA's own autodiff of the same convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import strided_conv


@pytest.mark.parametrize(
  ('k', 'h', 'w'),
  [(3, 8, 8), (3, 7, 7), (3, 6, 5), (1, 8, 8), (1, 7, 6), (5, 9, 8)],
)
def test_value_and_gradients_match_autodiff(k, h, w):
  rng = np.random.default_rng(k * 100 + h * 10 + w)
  x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 3, 4)), jnp.float32)
  pad = ((k // 2, k // 2),) * 2

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  y_ref, vjp_ref = jax.vjp(reference, x, kernel)
  y, vjp = jax.vjp(strided_conv.strided_conv, x, kernel)
  assert y.shape == (2, -(-h // 2), -(-w // 2), 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for got, want in zip(vjp(g), vjp_ref(g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_module_matches_nn_conv_parameters_and_output():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 3)), jnp.float32)
  ours = strided_conv.StridedConv(5, 3)
  theirs = nn.Conv(5, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False)
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)


def test_even_kernel_refused():
  with pytest.raises(ValueError, match='odd'):
    strided_conv.StridedConv(4, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
