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


@pytest.mark.parametrize('k', [1, 3])
def test_module_matches_nn_conv_parameters_output_and_gradients(k):
  x = jnp.asarray(np.random.default_rng(k).normal(size=(2, 7, 7, 3)), jnp.float32)
  ours = strided_conv.StridedConv(5, k)
  theirs = nn.Conv(5, (k, k), 2, padding=((k // 2, k // 2),) * 2, use_bias=False)
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('k', [1, 3])
def test_bfloat16_cotangents_keep_dtype_and_match_autodiff(k):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 4)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4, 3)), jnp.bfloat16)

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (2, 2), ((k // 2, k // 2),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  y, vjp = jax.vjp(strided_conv.strided_conv, x, kernel)
  g = jnp.ones_like(y)
  dx, dk = vjp(g)
  assert (dx.dtype, dx.shape, dk.dtype, dk.shape) == (jnp.bfloat16, x.shape, jnp.bfloat16, kernel.shape)
  # Against float32 autodiff of the same bf16 values: bf16 rounding only (8 bits of mantissa).
  _, vjp32 = jax.vjp(reference, x.astype(jnp.float32), kernel.astype(jnp.float32))
  for got, want in zip((dx, dk), vjp32(g.astype(jnp.float32)), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=5e-2)


def test_even_kernel_refused():
  with pytest.raises(ValueError, match='odd'):
    strided_conv.StridedConv(4, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
