"""The CPU backend's stride-2 convolution for odd kernels (cxrjax/backends/cpu/strided_conv.py).

Against XLA's own autodiff of the same convolution, and as the CPU layers' convolution
takes it (off oneDNN, i.e. for bfloat16) in place of `nn.Conv`'s.

Tolerances: float32 values differ by summation order only (a few dozen products per
output: 1e-5); gradients sum more products (every output pixel a kernel tap reaches):
1e-4. bfloat16 (unit roundoff 2^-8 = 0.004): against float32 arithmetic on the same
bfloat16 values, results and cotangents rounded to bfloat16 a few times over, so 2e-2
relative with a 5e-2 floor for the O(1) values here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.backends.cpu import layers as cpu_layers
from cxrjax.backends.cpu import strided_conv

DN = ('NHWC', 'HWIO', 'NHWC')


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
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), pad, dimension_numbers=DN)

  y_ref, vjp_ref = jax.vjp(reference, x, kernel)
  y, vjp = jax.vjp(strided_conv.strided_conv, x, kernel)
  assert y.shape == (2, -(-h // 2), -(-w // 2), 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for got, want in zip(vjp(g), vjp_ref(g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k', [1, 3])
def test_cpu_layers_conv_takes_it_off_float32_with_nn_conv_parameters(k):
  # ResNet's downsampling convolutions in bfloat16 with the CPU layers: nn.Conv's parameters,
  # its output bit for bit (the forward pass is XLA's convolution), its gradients to rounding.
  x = jnp.asarray(np.random.default_rng(k).normal(size=(2, 7, 7, 3)), jnp.bfloat16)
  conv = dict(features=5, kernel_size=(k, k), strides=2, padding=((k // 2, k // 2),) * 2, use_bias=False)
  ours, theirs = cpu_layers.LAYERS.conv(**conv, dtype=jnp.bfloat16), nn.Conv(**conv, dtype=jnp.bfloat16)
  params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  assert 'custom_vjp_call' in str(jax.make_jaxpr(ours.apply)(params, x))  # strided_conv's
  np.testing.assert_array_equal(ours.apply(params, x), theirs.apply(params, x))

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

  got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype  # float32 parameters' gradients, bfloat16 inputs' cotangents
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize('k', [1, 3])
def test_bfloat16_cotangents_keep_dtype_and_match_autodiff(k):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 4)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4, 3)), jnp.bfloat16)

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((k // 2, k // 2),) * 2, dimension_numbers=DN)

  y, vjp = jax.vjp(strided_conv.strided_conv, x, kernel)
  g = jnp.ones_like(y)
  dx, dk = vjp(g)
  assert (dx.dtype, dx.shape, dk.dtype, dk.shape) == (jnp.bfloat16, x.shape, jnp.bfloat16, kernel.shape)
  # Against float32 autodiff of the same bf16 values: bf16 rounding only (8 bits of mantissa).
  _, vjp32 = jax.vjp(reference, x.astype(jnp.float32), kernel.astype(jnp.float32))
  for got, want in zip((dx, dk), vjp32(g.astype(jnp.float32)), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=5e-2)


def test_even_kernel_refused_and_never_routed_here():
  x = jnp.zeros((1, 8, 8, 1), jnp.bfloat16)
  w = jnp.zeros((4, 4, 1, 4), jnp.bfloat16)
  with pytest.raises(ValueError, match='odd'):
    jax.grad(lambda w: jnp.sum(strided_conv.strided_conv(x, w).astype(jnp.float32)))(w)
  # An even kernel with odd-kernel padding (k // 2) is no case for strided_conv, nor for the
  # sub-pixel conv_2x (padding k/2 - 1): the CPU layers give it to XLA.
  pad = ((2, 2), (2, 2))
  jaxpr = str(
    jax.make_jaxpr(lambda x, w: cpu_layers.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=DN))(x, w)
  )
  assert 'custom_vjp_call' not in jaxpr and jaxpr.count('conv_general_dilated') == 1
