"""The GAN trainer's pieces: alpha's label distribution, DiffAugment, the joint D/G step, the guards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from cxrjax import config_lib
from cxrjax.trainers import gan

from conftest import init_variables, run_cli


@pytest.mark.parametrize('alpha,k', [(0.25, 2), (0.5, 2), (0.75, 2), (0.4, 3)])
def test_alpha_is_the_probability_of_a_healthy_label(alpha, k):
  n = 40_000
  labels = np.asarray(gan.sample_labels(jax.random.key(0), n, alpha, k))
  counts = np.bincount(labels, minlength=k)
  expected = np.array([alpha] + [(1 - alpha) / (k - 1)] * (k - 1)) * n
  # Chi-square goodness of fit: a wrong distribution (e.g. alpha read as P(pneumonia))
  # gives p ~ 0 at this sample size; the right one fails 1 time in 10^4.
  assert stats.chisquare(counts, expected).pvalue > 1e-4
  assert abs(counts[0] / n - alpha) < 0.01


def test_diffaugment_shapes_identity_and_gradients():
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1)
  assert gan.diffaugment(x, jax.random.key(0), '') is x
  y = gan.diffaugment(x, jax.random.key(0), 'color,translation,cutout')
  assert y.shape == x.shape and not np.allclose(y, x)
  g = jax.grad(lambda v: gan.diffaugment(v, jax.random.key(0), 'translation,cutout').sum())(x)
  assert np.isfinite(np.asarray(g)).all() and 0 < float(jnp.abs(g).sum()) <= x.size


def _tiny_cfg(conditional):
  c = config_lib.with_profile(config_lib.base_config(), 'smoke')
  c.trainer = 'gan'
  c.gan.conditional = conditional
  return config_lib.finalize(c)


@pytest.mark.parametrize('conditional', [False, True])
def test_gan_step_lowers_d_loss_on_fixed_batch_with_frozen_g(npz_path, conditional):
  cfg = _tiny_cfg(conditional)
  with np.load(npz_path) as z:
    batch = {'image': z['train_images'][:32, :, :, None], 'label': z['train_labels'][:32, 0].astype(np.int32)}
  gen, disc = gan.build(cfg, 1, 2)
  g_tx = optax.sgd(0.0)  # G frozen: only D learns, so its loss must fall
  d_tx = optax.adam(2e-4, b1=0.5)
  k = 2 if conditional else 0
  y = jnp.zeros((2,), jnp.int32) if k else None
  gv = init_variables(gen, jax.random.key(0), jnp.zeros((2, 100)), y, train=False)
  dv = init_variables(disc, jax.random.key(1), jnp.zeros((2, 28, 28, 1)), y, train=False)
  state = gan.GANState(
    step=jnp.zeros((), jnp.int32), g_params=gv['params'], g_stats=gv['batch_stats'], d_params=dv['params'],
    d_stats=dv.get('batch_stats', {}), g_opt=g_tx.init(gv['params']), d_opt=d_tx.init(dv['params']),
    g_ema={'params': gv['params'], 'batch_stats': gv['batch_stats']},
  )  # fmt: skip
  step = jax.jit(gan.make_gan_step(gen, disc, g_tx, d_tx, cfg, 2))
  losses = []
  for _ in range(8):
    state, m = step(state, batch, jax.random.key(3))
    losses.append(float(m['d_loss']))
  assert losses[-1] < losses[0] - 0.05, losses
  for key in ('g_loss', 'd_real', 'd_fake', 'r1'):
    assert np.isfinite(float(m[key]))


def test_discriminator_win_guard_stops_with_evidence(tmp_path):
  wd = tmp_path / 'gan'
  r = run_cli(['--config=configs/dcgan.py:smoke', f'--workdir={wd}', '--config.gan.collapse_margin=0.9',
               '--config.gan.collapse_patience=1'])  # fmt: skip
  assert r.returncode == 2, r.stderr[-2000:]
  line = [x for x in r.stderr.splitlines() if x.startswith('cxrjax: error:')][0]
  assert 'discriminator won completely' in line and 'D(real)=' in line and 'last good checkpoint' in line
