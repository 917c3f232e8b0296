"""DCGAN models and the stride-2 (transposed) convolutions they are built from.

The stock layers (`cxrjax.models.layers`: `ConvTranspose2x`, `conv_transpose_2x`, `nn.Conv`)
and the CPU backend's sub-pixel forms (`cxrjax.backends.cpu.subpixel_conv`: custom VJPs that
avoid lhs-dilated convolutions). Anchors: the PyTorch DCGAN tutorial's parameter counts,
`lax.conv_transpose` / `lax.conv_general_dilated` and their autodiff gradients, and (when
torch is installed) PyTorch's `ConvTranspose2d` / `Conv2d` on the same weights.

Tolerances (float32, relative to the largest magnitude): values 1e-5, the same products
summed in another order (at most k*k*in = a few hundred per output); gradients 5e-5, whose
weight gradients sum over every batch element and pixel (a few thousand products).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from cxrjax.backends.cpu import layers as cpu_layers
from cxrjax.backends.cpu import subpixel_conv
from cxrjax.models import dcgan, layers

DN = ('NHWC', 'HWIO', 'NHWC')


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def ref_conv_transpose(x, kernel):
  """PyTorch's ConvTranspose2d(k, 2, k/2 - 1) through XLA's lhs-dilated convolution (the slow, trusted path)."""
  k = kernel.shape[0]
  pad = k - 1 - (k // 2 - 1)
  return lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), ((pad, pad), (pad, pad)), dimension_numbers=DN)


def ref_conv(y, kernel):
  p = kernel.shape[0] // 2 - 1
  return lax.conv_general_dilated(y, kernel, (2, 2), ((p, p), (p, p)), dimension_numbers=DN)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def normal(seed, shape, scale=1.0):
  # numpy, not jax.random: every new jax.random shape is a threefry compile, about a second on a busy CPU.
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def np_variables(model, *args, seed=0, **kwargs):
  """DCGAN-like variables without running `init` (its RNG programs are slow to compile; shapes come from eval_shape)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, np.float32)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


LAYERS = {'stock': layers.STOCK, 'cpu': cpu_layers.LAYERS}


def test_parameter_counts_match_pytorch_dcgan_tutorial():
  # torch: the tutorial's netG / netD (nz=100, ngf=ndf=64, nc=3) have 3,576,704 and 2,765,568 parameters,
  # whichever backend's layers build them.
  for name, ly in LAYERS.items():
    g = dcgan.Generator(64, 3, latent_dim=100, base_width=64, layers=ly)
    v = jax.eval_shape(lambda g=g: g.init(jax.random.key(0), jnp.zeros((1, 100)), train=False))
    assert count(v['params']) == 3_576_704, name
    d = dcgan.Discriminator(64, 3, base_width=64, layers=ly)
    v = jax.eval_shape(lambda d=d: d.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    assert count(v['params']) == 2_765_568, name
  g = dcgan.Generator(64, 3, upsample='resize')
  v = jax.eval_shape(lambda: g.init(jax.random.key(0), jnp.zeros((1, 100)), train=False))
  assert count(v['params']) == 3_576_704 - (16 - 9) * (512 * 256 + 256 * 128 + 128 * 64 + 64 * 3)  # 3x3 vs 4x4


def test_shapes_every_size_conditional_and_not_both_upsamplings():
  # Shapes only (jax.eval_shape traces, computes nothing); values are checked in the tests below.
  z = jnp.zeros((2, 8))
  labels = jnp.array([0, 2])
  for size in (28, 32, 64, 128):
    x = jnp.zeros((2, size, size, 3))
    for num_classes in (0, 3):
      y = labels if num_classes else None
      for up in ('transpose', 'resize'):
        g = dcgan.Generator(size, 3, latent_dim=8, base_width=4, num_classes=num_classes, upsample=up)
        images, _ = jax.eval_shape(lambda g=g, y=y: g.init_with_output(jax.random.key(1), z, y))
        assert (images.shape, images.dtype) == ((2, size, size, 3), jnp.float32), (size, num_classes, up)
      d = dcgan.Discriminator(size, 3, base_width=4, num_classes=num_classes)
      logits, _ = jax.eval_shape(lambda d=d, x=x, y=y: d.init_with_output(jax.random.key(2), x, y))
      assert (logits.shape, logits.dtype) == ((2,), jnp.float32), (size, num_classes)
    start, n = dcgan.resolution_plan(size)
    assert start * 2**n == size and start == (7 if size == 28 else 4)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='image_size'):
    dcgan.resolution_plan(48)
  g = dcgan.Generator(32, 1, latent_dim=4, base_width=4, num_classes=2)
  with pytest.raises(ValueError, match='needs labels'):
    g.init(jax.random.key(0), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='even'):
    layers.ConvTranspose2x(4, kernel_size=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='upsample'):
    dcgan.Generator(32, 1, latent_dim=4, base_width=4, upsample='transpose_xla').init(
      jax.random.key(0), jnp.zeros((2, 4))
    )
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 4))
  for f in (layers.conv_transpose_2x, subpixel_conv.conv_transpose_2x):
    with pytest.raises(ValueError, match='even'):
      f(x, w)


@pytest.mark.parametrize('conv_transpose', [subpixel_conv.conv_transpose_2x, layers.conv_transpose_2x],
                         ids=['subpixel', 'stock'])  # fmt: skip
@pytest.mark.parametrize('k,ci,co,h', [(4, 5, 3, 4), (4, 6, 7, 5), (2, 3, 5, 3), (6, 4, 2, 3)])
def test_conv_transpose_2x_forward_and_gradients(k, ci, co, h, conv_transpose):
  # co <= 4 and co > 4 take the sub-pixel form's two weight-gradient paths.
  x, w = normal(1, (3, h, h, ci)), normal(2, (k, k, ci, co))
  y = jax.jit(conv_transpose)(x, w)
  y_ref = ref_conv_transpose(x, w)
  assert y.shape == (3, 2 * h, 2 * h, co)
  assert rel_err(y, y_ref) < 1e-5
  g = normal(3, y.shape)
  grads = jax.jit(lambda x, w, g: jax.vjp(conv_transpose, x, w)[1](g))(x, w, g)
  grads_ref = jax.jit(lambda x, w, g: jax.vjp(ref_conv_transpose, x, w)[1](g))(x, w, g)
  for a, b in zip(grads, grads_ref):
    assert rel_err(a, b) < 5e-5


@pytest.mark.parametrize('ci,co', [(3, 8), (8, 5)])
def test_conv_2x_forward_and_gradients(ci, co):
  y, w = normal(1, (2, 10, 10, ci)), normal(2, (4, 4, ci, co))
  out = jax.jit(subpixel_conv.conv_2x)(y, w)
  assert out.shape == (2, 5, 5, co)
  assert rel_err(out, ref_conv(y, w)) < 1e-5
  g = normal(3, out.shape)
  grads = jax.jit(lambda y, w, g: jax.vjp(subpixel_conv.conv_2x, y, w)[1](g))(y, w, g)
  grads_ref = jax.jit(lambda y, w, g: jax.vjp(ref_conv, y, w)[1](g))(y, w, g)
  for a, b in zip(grads, grads_ref):
    assert rel_err(a, b) < 5e-5


def test_gradient_of_gradient_through_custom_vjp():
  # R1-style double backprop: d/dw ||d<f(x, w), 1>/dx||^2 against the reference.
  x, w = normal(1, (2, 8, 8, 3)), normal(2, (4, 4, 3, 6))

  def penalty(f, w):
    return jnp.sum(jax.grad(lambda x: jnp.sum(jnp.tanh(f(x, w))))(x) ** 2)

  a = jax.jit(jax.grad(functools.partial(penalty, subpixel_conv.conv_2x)))(w)
  b = jax.jit(jax.grad(functools.partial(penalty, ref_conv)))(w)
  assert rel_err(a, b) < 5e-5


def test_layers_match_pytorch_on_the_same_weights():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional

  def torch_nhwc(f, x, weight, **kwargs):
    """PyTorch's `f` on NCHW views of the NHWC input and the given weight layout; the result in NHWC."""
    y = f(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(weight.copy()), **kwargs)
    return y.numpy().transpose(0, 2, 3, 1)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 5, 6)).astype(np.float32)
  w = rng.standard_normal((4, 4, 6, 3)).astype(np.float32)  # ours: [k, k, in, out]
  want = torch_nhwc(F.conv_transpose2d, x, w.transpose(2, 3, 0, 1), stride=2, padding=1)
  # The generator's layer (the stock module), and the sub-pixel form on the same kernel.
  np.testing.assert_allclose(np.asarray(layers.ConvTranspose2x(3).apply({'params': {'kernel': w}}, x)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(subpixel_conv.conv_transpose_2x(x, w)), want, atol=1e-5)
  img = rng.standard_normal((2, 10, 10, 3)).astype(np.float32)
  v = rng.standard_normal((4, 4, 3, 6)).astype(np.float32)  # HWIO, as nn.Conv's
  want = torch_nhwc(F.conv2d, img, v.transpose(3, 2, 0, 1), stride=2, padding=1)
  # The discriminator's layer (nn.Conv with its arguments), and the sub-pixel form's strided convolution.
  down = nn.Conv(6, (4, 4), (2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  np.testing.assert_allclose(np.asarray(down.apply({'params': {'kernel': v}}, img)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(subpixel_conv.conv_2x(img, v)), want, atol=1e-5)
  z = rng.standard_normal((2, 5)).astype(np.float32)
  p = rng.standard_normal((5, 7, 7, 4)).astype(np.float32)  # 7x7 start of 28-px generators
  proj = dcgan.Project(4, 7).apply({'params': {'kernel': p}}, z)
  want = torch_nhwc(F.conv_transpose2d, z[:, None, None, :], p.transpose(0, 3, 1, 2), stride=1, padding=0)
  np.testing.assert_allclose(np.asarray(proj), want, atol=1e-5)


def test_conditional_generator_depends_on_the_label():
  g = dcgan.Generator(28, 1, latent_dim=16, base_width=8, num_classes=2)
  z = np.repeat(normal(0, (1, 16)), 2, axis=0)
  # The one real `init` of this file (its RNG programs take seconds to compile here): DCGAN's initialisers.
  v = jax.jit(functools.partial(g.init, train=False))(jax.random.key(1), z, jnp.array([0, 1]))
  kernel, bn_scale = v['params']['up1']['kernel'], v['params']['project_bn']['scale']
  assert abs(float(jnp.std(kernel)) - 0.02) < 0.002 and abs(float(jnp.mean(bn_scale)) - 1) < 0.01
  sample = jax.jit(lambda z, y: g.apply(v, z, y, train=False))
  images, same = sample(z, jnp.array([0, 1])), sample(z, jnp.array([1, 1]))
  assert images.shape == (2, 28, 28, 1) and float(jnp.max(jnp.abs(images))) <= 1.0
  # At DCGAN's N(0, 0.02) init the eval-mode images are tiny, so compare relative to their size.
  assert float(jnp.mean(jnp.abs(images[0] - images[1]))) > 0.2 * float(jnp.mean(jnp.abs(images)))
  # Same z and label, same image (eval mode: no batch statistics), to float32 rounding: XLA's
  # convolutions need not compute identical batch elements bit for bit alike (an element's
  # pixels may fall in differently vectorised blocks), a few roundings of 6e-8 apart.
  tol = 1e-5 * float(jnp.max(jnp.abs(images)))
  np.testing.assert_allclose(same[0], same[1], rtol=0, atol=tol)
  np.testing.assert_allclose(same[1], images[1], rtol=0, atol=tol)


@pytest.mark.parametrize('name', LAYERS)
def test_bfloat16_generator_trains_with_finite_gradients(name):
  # The CPU layers' transposed convolutions in bfloat16 are the sub-pixel form.
  g = dcgan.Generator(32, 1, latent_dim=8, base_width=4, dtype=jnp.bfloat16, layers=LAYERS[name])
  z = normal(0, (2, 8))
  v = np_variables(g, z)

  def loss(p):
    images, _ = g.apply({**v, 'params': p}, z, mutable=['batch_stats'])
    return jnp.mean(images**2)

  grads = jax.jit(jax.grad(loss))(v['params'])
  assert all(x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['up1']['kernel']).sum()) > 0


def _structured_images(n, size, rng):
  """Smooth blobs on a dark background: what a discriminator can tell from noise."""
  yy, xx = np.mgrid[:size, :size] / size
  cy, cx, r = rng.uniform(0.3, 0.7, n), rng.uniform(0.3, 0.7, n), rng.uniform(0.1, 0.3, n)
  d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
  return (2 * np.exp(-d2 / (2 * r[:, None, None] ** 2)) - 1).astype(np.float32)[..., None]


@pytest.mark.parametrize('num_classes', [0, 2])
def test_discriminator_step_lowers_its_loss(num_classes):
  rng = np.random.default_rng(0)
  real = jnp.asarray(_structured_images(16, 32, rng))
  g = dcgan.Generator(32, 1, latent_dim=8, base_width=4, num_classes=num_classes)
  d = dcgan.Discriminator(32, 1, base_width=8, num_classes=num_classes)
  labels = jnp.arange(16) % 2 if num_classes else None
  z = normal(0, (16, 8))
  fake, _ = jax.jit(lambda v: g.apply(v, z, labels, mutable=['batch_stats']))(np_variables(g, z, labels))
  dv = np_variables(d, real, labels, seed=1)
  tx = optax.adam(2e-4 * 10, b1=0.5)

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(params):
      lr, upd = d.apply({'params': params, 'batch_stats': stats}, real, labels, mutable=['batch_stats'])
      lf, upd = d.apply({'params': params, 'batch_stats': upd['batch_stats']}, fake, labels, mutable=['batch_stats'])
      return jnp.mean(jax.nn.softplus(-lr)) + jnp.mean(jax.nn.softplus(lf)), upd['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  params, stats, opt = dv['params'], dv['batch_stats'], tx.init(dv['params'])
  losses = []
  for _ in range(6):
    params, stats, opt, loss = step(params, stats, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses
