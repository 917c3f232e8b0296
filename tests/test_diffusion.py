"""Diffusion math: schedules, forward/inverse parameterisations, loss, DDIM/DDPM sampling, guidance, img2img.

Keys are 'rbg': on this CPU, XLA compiles each partitionable-threefry draw in
seconds, which would dominate these otherwise tiny programs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import diffusion
from cxrjax.eval import ldm_probe

key = functools.partial(jax.random.key, impl='rbg')


@pytest.fixture(scope='module')
def cosine():
  return diffusion.make_schedule('cosine', 1000)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
@pytest.mark.parametrize('num_steps', [100, 1000])
def test_schedule_properties(kind, num_steps):
  s = diffusion.make_schedule(kind, num_steps)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  assert s.num_steps == num_steps and abar.shape == (num_steps,)
  assert np.all(np.diff(abar) < 0)
  assert np.all((abar > 0) & (abar < 1))
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6)
  assert float(s.alphas_cumprod_prev[0]) == 1.0
  np.testing.assert_allclose(
    np.asarray(s.sqrt_alphas_cumprod) ** 2 + np.asarray(s.sqrt_one_minus_alphas_cumprod) ** 2, 1.0, atol=1e-6
  )
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(s.betas, np.float64)), abar, rtol=1e-4)
  assert abar[0] > 0.99 and abar[-1] < 1e-3
  if kind == 'linear':
    # Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T otherwise.
    assert float(s.betas[0]) == pytest.approx(1e-4 * 1000 / num_steps, rel=1e-5)
    assert float(s.betas[-1]) == pytest.approx(0.02 * 1000 / num_steps, rel=1e-5)
  else:
    assert abar[0] > 0.999 and abar[-1] < 1e-6
    assert float(jnp.max(s.betas)) <= 0.999 + 1e-7


def test_unknown_names_raise(cosine):
  with pytest.raises(ValueError):
    diffusion.make_schedule('quadratic', 10)
  with pytest.raises(ValueError):
    diffusion.predict_x0(cosine, jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32), jnp.zeros((1, 2)), 'x0')


def test_q_sample_then_predict_recovers_x0_and_noise(cosine):
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (8, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((8, 4, 4, 3)), jnp.float32)
  t = jnp.asarray([0, 1, 50, 300, 600, 800, 900, 950], jnp.int32)  # abar >= 1e-2: eps-inversion stays well conditioned
  x_t = diffusion.q_sample(cosine, x0, t, noise)
  for prediction in ['eps', 'v']:
    target = diffusion.training_target(cosine, x0, t, noise, prediction)
    np.testing.assert_allclose(diffusion.predict_x0(cosine, x_t, t, target, prediction), x0, atol=2e-5)
    np.testing.assert_allclose(diffusion.predict_eps(cosine, x_t, t, target, prediction), noise, atol=2e-5)
  # v is well conditioned all the way to t = T - 1, where abar ~ 2e-9.
  t_all = jnp.asarray([0, 200, 400, 600, 800, 990, 998, 999], jnp.int32)
  x_t = diffusion.q_sample(cosine, x0, t_all, noise)
  v = diffusion.v_target(cosine, x0, t_all, noise)
  np.testing.assert_allclose(diffusion.predict_x0(cosine, x_t, t_all, v, 'v'), x0, atol=1e-5)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_x0_error_amplification_eps_vs_v(kind):
  # The failure measured in issue 5: a model-output error e becomes an x0 error of
  # e * sqrt(1 - abar) / sqrt(abar) with eps-prediction (~160x at t = T - 1 for
  # 'linear'), but at most e with v-prediction, at every t. This is why 'v' is the default.
  s = diffusion.make_schedule(kind, 1000)
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  err = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32) * 1e-2
  for t_int in [0, 500, 900, 999]:
    t = jnp.full((4,), t_int, jnp.int32)
    x_t = diffusion.q_sample(s, x0, t, noise)
    ratios = {}
    for prediction in ['eps', 'v']:
      exact = diffusion.training_target(s, x0, t, noise, prediction)
      x0_noisy = diffusion.predict_x0(s, x_t, t, exact + err, prediction)
      x0_err = x0_noisy - diffusion.predict_x0(s, x_t, t, exact, prediction)
      ratios[prediction] = float(jnp.linalg.norm(x0_err) / jnp.linalg.norm(err))
    abar = float(s.alphas_cumprod[t_int])
    assert ratios['v'] <= 1.0 + 1e-3
    np.testing.assert_allclose(ratios['eps'], math.sqrt((1 - abar) / abar), rtol=2e-2)
  assert ratios['eps'] > 100  # t = T - 1


def test_v_target_matches_definition(cosine):
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((3, 5))
  noise = rng.standard_normal((3, 5))
  t = np.array([10, 500, 990])
  abar = np.asarray(cosine.alphas_cumprod, np.float64)[t][:, None]
  expected = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
  got = diffusion.v_target(cosine, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_array_equal(
    diffusion.training_target(cosine, jnp.zeros((3, 5)), jnp.asarray(t), jnp.ones((3, 5)), 'eps'), 1.0
  )


def test_diffusion_loss_zero_for_exact_model_and_label_dropout(cosine):
  # With x0 = 0, x_t = sqrt(1 - abar_t) eps, so a model that knows t can invert it exactly.
  x0 = jnp.zeros((16, 4, 4, 2))
  labels = jnp.arange(16) % 2
  b = cosine.sqrt_one_minus_alphas_cumprod
  a = cosine.sqrt_alphas_cumprod

  def exact(prediction, want_labels):
    def apply_fn(x_t, t, lab):
      eps = x_t / b[t][:, None, None, None]
      out = eps if prediction == 'eps' else a[t][:, None, None, None] * eps
      return out + jnp.any(lab != want_labels).astype(jnp.float32)

    return apply_fn

  for prediction in ['eps', 'v']:
    loss = diffusion.diffusion_loss(cosine, exact(prediction, labels), x0, labels, key(0), prediction)
    assert float(loss) < 1e-8
  dropped = diffusion.diffusion_loss(
    cosine, exact('eps', jnp.full(16, 2)), x0, labels, key(0), 'eps', label_drop_prob=1.0, null_label=2
  )
  assert float(dropped) < 1e-8
  # A zero model scores E[eps^2] = 1.
  zero = diffusion.diffusion_loss(cosine, lambda x, t, lab: jnp.zeros_like(x), x0, labels, key(1), 'eps')
  assert float(zero) == pytest.approx(1.0, abs=0.1)


def test_ddim_timesteps():
  ts = diffusion.ddim_timesteps(1000, 50)
  assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
  assert list(diffusion.ddim_timesteps(10, 10)) == list(range(9, -1, -1))
  part = diffusion.ddim_timesteps(1000, 50, t_start=300)
  assert part[0] == 299 and part[-1] == 0 and len(part) == 15
  assert list(diffusion.ddim_timesteps(1000, 50, t_start=1)) == [0]
  assert diffusion.strength_to_t_start(1000, 0.3) == 300
  assert diffusion.strength_to_t_start(1000, 0.0004) == 0
  with pytest.raises(ValueError):
    diffusion.ddim_timesteps(10, 11)
  with pytest.raises(ValueError):
    diffusion.strength_to_t_start(10, 1.5)


def _oracle(schedule, x0, prediction):
  """The exact model output for data that is always x0."""
  a = schedule.sqrt_alphas_cumprod
  b = schedule.sqrt_one_minus_alphas_cumprod

  def apply_fn(x_t, t, labels):
    at, bt = a[t][:, None, None, None], b[t][:, None, None, None]
    eps = (x_t - at * x0) / bt
    return eps if prediction == 'eps' else at * eps - bt * x0

  return apply_fn


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_ddim_with_oracle_denoiser_recovers_x0(cosine, prediction):
  x0 = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 4, 4, 2)), jnp.float32)
  sample = jax.jit(
    lambda rng, eta: diffusion.ddim_sample(
      _oracle(cosine, x0, prediction), cosine, x0.shape, None, rng, 20, eta, prediction=prediction
    )
  )
  for eta in [0.0, 0.7]:
    np.testing.assert_allclose(sample(key(3), eta), x0, atol=1e-4)


def test_ddim_eta0_deterministic_eta1_stochastic(cosine):
  def apply_fn(x, t, labels):
    return 0.5 * x  # any fixed map will do

  x_T = jax.random.normal(key(0), (2, 4, 4, 1))
  run = jax.jit(lambda rng, eta: diffusion.ddim_sample(apply_fn, cosine, x_T, None, rng, 10, eta))
  np.testing.assert_array_equal(run(key(1), 0.0), run(key(2), 0.0))
  a, b = run(key(1), 1.0), run(key(2), 1.0)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-2
  np.testing.assert_array_equal(a, run(key(1), 1.0))


def test_ddpm_step_is_the_posterior(cosine):
  rng = np.random.default_rng(4)
  x_t = rng.standard_normal((2, 3))
  eps = rng.standard_normal((2, 3))
  z = rng.standard_normal((2, 3))
  t = 400
  abar = np.asarray(cosine.alphas_cumprod, np.float64)
  beta = np.asarray(cosine.betas, np.float64)[t]
  x0 = (x_t - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  mean = beta * np.sqrt(abar[t - 1]) / (1 - abar[t]) * x0 + (1 - abar[t - 1]) * np.sqrt(1 - beta) / (1 - abar[t]) * x_t
  var = beta * (1 - abar[t - 1]) / (1 - abar[t])
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  got = diffusion.ddim_step(cosine, f32(x_t), t, t - 1, f32(eps), 'eps', 1.0, f32(z))
  np.testing.assert_allclose(got, mean + np.sqrt(var) * z, atol=1e-5)


def test_classifier_free_guidance_endpoints(cosine):
  # Conditional and unconditional outputs differ: the output depends on the label.
  def apply_fn(x, t, labels):
    return 0.3 * x + 0.2 * labels[:, None, None, None].astype(jnp.float32)

  null = 3
  labels = jnp.asarray([0, 1, 2])
  x_T = jax.random.normal(key(0), (3, 4, 4, 1))

  def run(lab, scale):
    return diffusion.ddim_sample(apply_fn, cosine, x_T, lab, key(1), 8, 0.0, scale, null_label=null)

  run = jax.jit(run)
  cond = run(labels, 1.0)  # plain conditional model, no unconditional pass
  uncond = run(jnp.full(3, null), 1.0)
  assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-2
  # An array scale is traced, so these go through the batched cond + uncond path.
  np.testing.assert_allclose(run(labels, jnp.float32(1.0)), cond, atol=1e-5)
  np.testing.assert_allclose(run(labels, jnp.float32(0.0)), uncond, atol=1e-5)
  c, u = jnp.ones(3), jnp.zeros(3)
  np.testing.assert_allclose(diffusion.guided_output(c, u, 3.0), 3.0)
  with pytest.raises(ValueError):
    diffusion.ddim_sample(apply_fn, cosine, x_T, labels, key(1), 8, 0.0, 2.0)  # guidance needs null_label


def test_sampler_traces_the_model_once(cosine):
  calls = []

  def apply_fn(x, t, labels):
    calls.append(x.shape[0])
    return 0.1 * x

  labels = jnp.zeros(2, jnp.int32)
  jax.jit(lambda rng: diffusion.ddim_sample(apply_fn, cosine, (2, 4, 4, 1), labels, rng, 25, 0.5, 2.0, null_label=1))(
    key(0)
  )
  assert calls == [4]  # one trace, conditional and null labels batched together


def test_img2img_starts_at_t_start_and_small_strength_keeps_input(cosine):
  seen = []

  def apply_fn(x, t, labels):
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
    return jnp.zeros_like(x)

  x0 = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  t_start = diffusion.strength_to_t_start(1000, 0.3)
  out = diffusion.ddim_sample(apply_fn, cosine, None, None, key(0), 50, t_start=t_start, x_start=x0)
  jax.effects_barrier()
  assert (
    seen == list(diffusion.ddim_timesteps(1000, 50, t_start)) and seen[0] == 299 and len(seen) == math.ceil(50 * 0.3)
  )
  assert out.shape == x0.shape
  # strength -> 0: no forward steps, the input comes back unchanged.
  assert diffusion.strength_to_t_start(1000, 1e-4) == 0
  np.testing.assert_array_equal(
    diffusion.ddim_sample(apply_fn, cosine, None, None, key(0), 50, t_start=0, x_start=x0), x0
  )
  # One forward step (abar ~ 1 - 4e-5): even a zero model returns almost the input.
  one = diffusion.ddim_sample(apply_fn, cosine, None, None, key(0), 50, t_start=1, x_start=x0)
  assert float(jnp.max(jnp.abs(one - x0))) < 0.05
  # With the true noise given, the oracle recovers x0 from any strength.
  noise = jax.random.normal(key(6), x0.shape)
  back = diffusion.ddim_sample(
    _oracle(cosine, x0, 'v'), cosine, noise, None, key(0), 50, prediction='v', t_start=700, x_start=x0
  )
  np.testing.assert_allclose(back, x0, atol=1e-4)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_ldm_probe_with_oracle_and_with_a_biased_model(cosine, prediction):
  # Data that is one point c: the exact model output is known in closed form at every t.
  c = 0.7
  z0 = jnp.full((4, 2, 2, 3), c, jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)

  def exact(x_t, t, y, bias=0.0):
    a = diffusion._coef(cosine.sqrt_alphas_cumprod, t, x_t.ndim)
    b = diffusion._coef(cosine.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    eps = (x_t - a * c) / b
    out = eps if prediction == 'eps' else a * eps - b * c
    return out + bias

  ts = [999, 500, 0]
  rows = ldm_probe.x0_error_by_t(exact, cosine, z0, labels, ts, prediction, key(0))
  assert [r['t'] for r in rows] == ts
  for r in rows:
    assert r['output_mse'] < 1e-8 and r['trivial_x0_mse'] == 0.0
  assert max(r['x0_mse'] for r in rows) < (1e-2 if prediction == 'eps' else 1e-8)  # eps: float32 / sqrt(2e-9)
  final, traj = ldm_probe.ddim_trajectory(exact, cosine, jax.random.normal(key(1), z0.shape), labels, 10, prediction)
  np.testing.assert_allclose(final, c, atol=1e-3)
  assert len(traj) == 11 and [r['t'] for r in traj[-2:]] == [0, -1] and traj[-1]['x_std'] < 1e-3
  np.testing.assert_allclose(traj[0]['x_std'], float(jnp.std(jax.random.normal(key(1), z0.shape))), rtol=1e-6)

  # A constant output error of 0.01 becomes an x0 error of 0.01 * sqrt((1 - abar) / abar) with eps.
  biased = functools.partial(exact, bias=0.01)
  rows = ldm_probe.x0_error_by_t(biased, cosine, z0, labels, [500], prediction, key(0))
  abar = float(cosine.alphas_cumprod[500])
  gain = (1 - abar) / abar if prediction == 'eps' else 1 - abar
  np.testing.assert_allclose(rows[0]['x0_mse'], 1e-4 * gain, rtol=1e-2)
  assert 'x0 MSE' in ldm_probe.format_probe(
    dict(generator_dir='g', prediction=prediction, schedule='cosine', encoded_latent_std=1.0, by_timestep=rows,
         trajectory=traj)
  )  # fmt: skip


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_ldm_probe_trajectory_matches_the_sampler_with_guidance(prediction):
  # A label- and t-dependent (and wrong) model: the probe's step-by-step loop must
  # reproduce ddim_sample exactly, guidance and timestep sequence included. (The linear
  # schedule: with cosine an eps-model's x0 is amplified 2e4x at t = 999, and jitted
  # and eager float32 rounding would differ visibly.)
  linear = diffusion.make_schedule('linear', 1000)

  def model(x_t, t, y):
    scale = 0.5 + t.astype(jnp.float32)[:, None, None, None] / 2000.0
    return jnp.tanh(x_t) * scale + 0.3 * y.astype(jnp.float32)[:, None, None, None]

  labels = jnp.asarray([0, 1, 1, 0], jnp.int32)
  x_T = jax.random.normal(key(2), (4, 3, 3, 2))
  final, traj = ldm_probe.ddim_trajectory(model, linear, x_T, labels, 7, prediction, 2.0, null_label=2)
  ref = diffusion.ddim_sample(
    model, linear, x_T, labels, key(3), num_steps=7, guidance_scale=2.0, prediction=prediction, null_label=2
  )
  np.testing.assert_allclose(final, ref, rtol=1e-5, atol=1e-5)  # float32 rounding, jitted scan vs eager
  assert [r['t'] for r in traj] == [*diffusion.ddim_timesteps(1000, 7).tolist(), -1]
  unguided, _ = ldm_probe.ddim_trajectory(model, linear, x_T, labels, 7, prediction)
  assert float(jnp.max(jnp.abs(unguided - final))) > 1e-3  # the guidance really entered
  with pytest.raises(ValueError, match='null_label'):
    ldm_probe.ddim_trajectory(model, linear, x_T, labels, 7, prediction, 2.0)
