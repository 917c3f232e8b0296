"""Latent-diffusion networks: UNet and KL autoencoder shapes, parameter counts, that they train, and the KL term.

Keys are 'rbg': on this CPU, XLA compiles each partitionable-threefry draw in
seconds, and a network's initialiser makes one per parameter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from cxrjax import diffusion
from cxrjax.models import autoencoder
from cxrjax.models.autoencoder import KLAutoencoder
from cxrjax.models.unet import UNet

key = functools.partial(jax.random.key, impl='rbg')


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def tiny_unet(**kw):
  return UNet(
    **{'out_channels': 4, 'num_classes': 3, 'base_channels': 8, 'channel_mults': (1, 2), 'num_res_blocks': 1, **kw}
  )


@pytest.fixture(scope='module')
def unet_and_params():
  """The tiny UNet and its initial parameters, shared because initialisation compiles slowly on CPU."""
  model = tiny_unet(attention_resolutions=())  # the middle block still attends; fewer ops compile faster
  x = jnp.zeros((8, 8, 8, 4))
  params = jax.jit(model.init)(key(0), x, jnp.zeros(8), jnp.zeros(8, jnp.int32))['params']
  return model, params


def test_unet_shapes_labels_and_zero_output(unet_and_params):
  model, params = unet_and_params
  apply = jax.jit(model.apply)
  x4 = jax.random.normal(key(1), (4, 8, 8, 4))
  # Rows: example 0 under every label (3 == num_classes is the null label), at another t, and examples 1-3.
  x = x4[jnp.asarray([0, 0, 0, 0, 0, 1, 2, 3])]
  t = jnp.asarray([10.0, 10.0, 10.0, 10.0, 900.0, 10.0, 10.5, 999.0])  # float timesteps are fine too
  labels = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
  out = apply({'params': params}, x, t, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output convolution
  assert params['class_embed']['embedding'].shape == (4, 32)  # num_classes + 1 rows, 4 * base wide
  # Every residual branch also starts at zero, so perturb all weights before asking what the output depends on.
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
  out = apply({'params': params}, x, t, labels)
  for i in range(1, 5):
    assert float(jnp.max(jnp.abs(out[0] - out[i]))) > 1e-4  # labels 1, 2, null, and t = 900 all change it
  # Examples do not see each other (the batch reversed gives the same rows), and labels=None is the null label.
  shuffled = apply({'params': params}, x[::-1], t[::-1], labels[::-1])
  np.testing.assert_allclose(shuffled[::-1], out, atol=1e-5)
  np.testing.assert_allclose(apply({'params': params}, x, t, None)[3], out[3], atol=1e-6)  # None == null label


def test_unet_rejects_sizes_not_divisible_by_the_downsampling():
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(tiny_unet(channel_mults=(1, 2, 2)).init, key(0), jnp.zeros((1, 6, 6, 4)), jnp.zeros(1), None)


def _single_level_count(b, c_in, c_out, k):
  """Parameters of UNet(channel_mults=(1,), num_res_blocks=1) with attention at its one level, by hand."""
  norm = 2 * b
  emb = b * 4 * b + 4 * b + 16 * b * b + 4 * b + (k + 1) * 4 * b
  conv_in = 9 * c_in * b + b
  res_same = norm + 9 * b * b + b + 4 * b * 2 * b + 2 * b + norm + 9 * b * b + b  # emb -> scale and shift
  res_concat = 2 * norm + 9 * 2 * b * b + b + 4 * b * 2 * b + 2 * b + norm + 9 * b * b + b + 2 * b * b + b  # + 1x1 skip
  attn = norm + 4 * (b * b + b)  # q, k, v, out projections
  down = res_same + attn
  mid = 2 * res_same + attn
  up = 2 * (res_concat + attn)
  out = norm + 9 * b * c_out + c_out
  return emb + conv_in + down + mid + up + out


def test_unet_parameter_count():
  def n_params(model, k=0):
    shapes = jax.eval_shape(model.init, key(k), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    return count(shapes['params'])

  single = tiny_unet(channel_mults=(1,), base_channels=16)
  assert n_params(single) == n_params(single, k=1) == _single_level_count(16, 4, 4, 3)
  n8, n16 = n_params(tiny_unet()), n_params(tiny_unet(base_channels=16))
  assert n8 == n_params(tiny_unet(), k=5)
  assert 3.5 < n16 / n8 < 4.0  # convolutions grow with width^2, biases and norms linearly


def test_unet_learns_with_diffusion_loss(unet_and_params):
  model, params = unet_and_params
  schedule = diffusion.make_schedule('cosine', 100)
  rng = np.random.default_rng(0)
  # A fixed batch of structured "latents": smooth per-class patterns.
  grid = np.linspace(-1, 1, 8)
  base = np.stack([np.sin(np.pi * grid)[:, None] * np.cos(np.pi * grid)[None, :]] * 4, -1)
  labels = jnp.asarray(np.arange(8) % 3)
  x0 = jnp.asarray(
    (base[None] * (1 + np.arange(8) % 3)[:, None, None, None] / 3 + 0.05 * rng.standard_normal((8, 8, 8, 4))),
    jnp.float32,
  )
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p, rng):
    apply_fn = functools.partial(model.apply, {'params': p})
    return diffusion.diffusion_loss(schedule, apply_fn, x0, labels, rng, 'v', label_drop_prob=0.2, null_label=3)

  @jax.jit
  def step(p, s, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  # The loss step() reports is that of the parameters it was given: with one fixed evaluation key (the same t,
  # noise and dropped labels) before and after training, the comparison is paired and needs no second compile.
  before = float(step(params, opt_state, key(99))[2])
  for i in range(15):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key(1), i))
  after = float(step(params, opt_state, key(99))[2])
  assert after < 0.8 * before, (before, after)


def test_autoencoder_shapes_and_latent_shape():
  model = KLAutoencoder(in_channels=1, latent_channels=3, base_channels=8, channel_mults=(1, 2, 2))
  assert model.downsampling_factor == 4
  assert model.latent_shape((16, 16, 1)) == (4, 4, 3)
  assert model.latent_shape((5, 32, 16, 1)) == (5, 8, 4, 3)
  with pytest.raises(ValueError):
    model.latent_shape((18, 16, 1))
  x = jnp.zeros((2, 16, 16, 1))
  shapes = jax.eval_shape(lambda: model.init({'params': key(0), 'sample': key(1)}, x))
  out = jax.eval_shape(lambda v: model.apply(v, x, rngs={'sample': key(2)}), shapes)
  assert [o.shape for o in out] == [(2, 16, 16, 1), (2, 4, 4, 3), (2, 4, 4, 3)]
  z = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 4, 4, 3)), method='decode'), shapes)
  assert z.shape == (2, 16, 16, 1)


def test_autoencoder_learns_to_reconstruct():
  model = KLAutoencoder(in_channels=1, latent_channels=4, base_channels=8, channel_mults=(1, 2))
  grid = np.linspace(-1, 1, 16)
  imgs = [
    np.sin(np.pi * f * grid)[:, None] * np.cos(np.pi * g * grid)[None, :]
    for f, g in [(1, 1), (2, 1), (1, 2), (0.5, 1.5)]
  ]
  x = jnp.asarray(np.stack(imgs)[..., None], jnp.float32)
  params = jax.jit(model.init)({'params': key(0), 'sample': key(1)}, x)['params']
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  def loss_fn(p, rng):
    x_hat, mean, logvar = model.apply({'params': p}, x, rngs={'sample': rng})
    return autoencoder.ae_loss(x, x_hat, mean, logvar, kl_weight=1e-6)

  @jax.jit
  def step(p, s, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, rng)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, metrics

  before = step(params, opt_state, key(7))[2]  # metrics of the parameters passed in (see the UNet test)
  for i in range(10):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key(3), i))
  after = step(params, opt_state, key(7))[2]
  assert float(after['rec']) < 0.7 * float(before['rec']), (before, after)
  assert float(after['rec_pixel']) == pytest.approx(float(after['rec']) / (16 * 16), rel=1e-5)
  assert np.isfinite(float(after['kl']))


def test_kl_divergence_closed_form():
  zeros = jnp.zeros((3, 4, 4, 2))
  assert float(autoencoder.kl_divergence(zeros, zeros)) == 0.0
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3, 3, 2))
  logvar = rng.normal(scale=0.5, size=(2, 3, 3, 2))
  sigma = np.exp(0.5 * logvar)
  # KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2 per dimension; summed per example, mean over batch.
  per_dim = -np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5
  expected = per_dim.reshape(2, -1).sum(1).mean()
  got = autoencoder.kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # ... and that formula is the KL integral itself, checked numerically for one dimension.
  p = stats.norm(mean.flat[0], sigma.flat[0])
  numeric, _ = integrate.quad(lambda v: p.pdf(v) * (p.logpdf(v) - stats.norm.logpdf(v)), -20, 20)
  assert numeric == pytest.approx(per_dim.flat[0], rel=1e-6)


def test_ae_loss_normalisation():
  x = jnp.zeros((2, 4, 4, 1))
  x_hat = jnp.full((2, 4, 4, 1), 0.5)
  mean, logvar = jnp.ones((2, 2, 2, 1)), jnp.zeros((2, 2, 2, 1))
  loss, metrics = autoencoder.ae_loss(x, x_hat, mean, logvar, kl_weight=0.1)
  assert float(metrics['rec']) == pytest.approx(0.5 * 16)  # summed over pixels, averaged over the batch
  assert float(metrics['kl']) == pytest.approx(0.5 * 4)
  assert float(loss) == pytest.approx(8 + 0.1 * 2)
  _, l2 = autoencoder.ae_loss(x, x_hat, mean, logvar, kl_weight=0.1, rec_loss='l2')
  assert float(l2['rec_pixel']) == pytest.approx(0.25)
