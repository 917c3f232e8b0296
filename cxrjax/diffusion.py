"""Gaussian diffusion as pure functions: noise schedules, the training loss, DDIM/DDPM sampling.

Conventions (shared by the trainer, the samplers and the tests):

* Timesteps are integer indices `t` in `[0, T)`, as in Ho et al. (2020) and
  diffusers: `x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps`, so `t = 0` is
  already one step of noise and `t = T - 1` is (almost) pure noise.
* A model is called as `apply_fn(x_t, t, labels) -> model_out` with `t` a
  `[B]` int32 array; `model_out` is either the noise (`prediction='eps'`) or
  the velocity `v = sqrt(abar) eps - sqrt(1 - abar) x0` (`prediction='v'`,
  Salimans & Ho 2022).
* Classifier-free guidance (Ho & Salimans 2022) combines the conditional and
  unconditional outputs as `uncond + s * (cond - uncond)`: `s = 1` is the
  conditional model, `s = 0` the unconditional one, `s > 1` extrapolates away
  from the unconditional output. The unconditional output is the model called
  with the null label (`null_label`, by convention `num_classes`: the extra
  row of the UNet's class embedding).

Nothing here is a Flax module and nothing here is jitted: the caller jits a
closure over its parameters (sampling is a `lax.scan`, so the model is traced
once whatever the number of steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ('eps', 'v')

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule of T steps (all fields are float32 [T] arrays).

  Attributes:
    betas: per-step noise variances beta_t.
    alphas_cumprod: abar_t = prod_{s <= t} (1 - beta_s), strictly decreasing in (0, 1).
    alphas_cumprod_prev: abar_{t-1}, with abar_{-1} = 1 (clean data).
    sqrt_alphas_cumprod: sqrt(abar_t), the signal coefficient of x_t.
    sqrt_one_minus_alphas_cumprod: sqrt(1 - abar_t), the noise coefficient of x_t.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])


def make_schedule(kind: str, num_steps: int) -> Schedule:
  """The 'linear' or 'cosine' schedule of `num_steps` steps.

  'linear' is Ho et al.'s beta_t = linspace(1e-4, 0.02) for T = 1000, with both
  ends scaled by 1000 / T as in Nichol & Dhariwal's improved-diffusion, so a
  shorter schedule reaches the same final noise level (abar_{T-1} ~ 4e-5) instead
  of stopping at a partly noised image. (It is linear in beta, not LDM's
  linspace-of-sqrt.) Below T = 50 the end beta exceeds 0.999 and is clipped there.

  'cosine' is Nichol & Dhariwal's abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) /
  (1 + s) * pi/2), s = 0.008, with betas clipped at 0.999 to avoid the
  singularity at t = T; abar is then recomputed from the clipped betas so the
  two stay consistent.

  Coefficients are computed in float64 and stored as float32.

  Args:
    kind: 'linear' or 'cosine'.
    num_steps: T, the number of diffusion steps.

  Returns:
    The schedule.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be positive, got {num_steps}')
  if kind == 'linear':
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  elif kind == 'cosine':
    s = 0.008
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    abar = f / f[0]
    betas = 1.0 - abar[1:] / abar[:-1]
  else:
    raise ValueError(f"unknown schedule {kind!r} (expected 'linear' or 'cosine')")
  betas = np.clip(betas, 0.0, 0.999)
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])

  def f32(a):
    return jnp.asarray(a, dtype=jnp.float32)

  return Schedule(
    betas=f32(betas),
    alphas_cumprod=f32(alphas_cumprod),
    alphas_cumprod_prev=f32(alphas_cumprod_prev),
    sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
    sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
  )


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f'unknown prediction {prediction!r} (expected one of {PREDICTIONS})')


def _coef(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] for a [B] (or scalar) t, shaped to broadcast against a rank-`ndim` batch."""
  out = values[jnp.asarray(t).astype(jnp.int32)]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for [B] timesteps t."""
  x0 = x0.astype(jnp.float32)
  a = _coef(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  b = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * x0 + b * noise.astype(jnp.float32)


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
  a = _coef(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  b = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * noise.astype(jnp.float32) - b * x0.astype(jnp.float32)


def training_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
  """What the model regresses onto: the noise ('eps') or the velocity ('v')."""
  _check_prediction(prediction)
  if prediction == 'eps':
    return noise.astype(jnp.float32)
  return v_target(schedule, x0, t, noise)


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array, prediction: str) -> jax.Array:
  """The clean sample implied by a model output at timestep t.

  With 'eps' this divides by sqrt(abar_t), which amplifies errors at the noisiest
  steps (abar_{T-1} is ~1e-9 for the cosine schedule); 'v' is well conditioned
  at every t because sqrt(abar)^2 + sqrt(1 - abar)^2 = 1.
  """
  _check_prediction(prediction)
  x_t = x_t.astype(jnp.float32)
  model_out = model_out.astype(jnp.float32)
  a = _coef(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  b = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  if prediction == 'eps':
    return (x_t - b * model_out) / a
  return a * x_t - b * model_out


def predict_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array, prediction: str) -> jax.Array:
  """The noise implied by a model output at timestep t."""
  _check_prediction(prediction)
  model_out = model_out.astype(jnp.float32)
  if prediction == 'eps':
    return model_out
  x_t = x_t.astype(jnp.float32)
  a = _coef(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  b = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  return b * x_t + a * model_out


def diffusion_loss(
  schedule: Schedule,
  apply_fn: ApplyFn,
  x0: jax.Array,
  labels: jax.Array | None,
  rng: jax.Array,
  prediction: str = 'eps',
  *,
  label_drop_prob: float = 0.0,
  null_label: int | None = None,
) -> jax.Array:
  """The simple (unweighted) denoising loss of Ho et al.: MSE between model output and target.

  Samples t uniformly in [0, T) and standard normal noise per example, noises x0
  with `q_sample`, and averages the squared error over all elements. For
  classifier-free guidance training, each label is replaced by `null_label` with
  probability `label_drop_prob`, so one network learns both the conditional and
  the unconditional model.

  Args:
    schedule: the noise schedule.
    apply_fn: `apply_fn(x_t, t, labels) -> model_out`; a closure over parameters
      (and over a dropout rng, if the model uses dropout).
    x0: [B, ...] clean samples (latents).
    labels: [B] integer labels, or None for an unconditional model.
    rng: a PRNG key for t, the noise and the label dropout.
    prediction: 'eps' or 'v'.
    label_drop_prob: probability of replacing a label with the null label.
    null_label: the null label; required when `label_drop_prob > 0`.

  Returns:
    A float32 scalar.
  """
  _check_prediction(prediction)
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  batch = x0.shape[0]
  t = jax.random.randint(t_rng, (batch,), 0, schedule.num_steps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  if label_drop_prob > 0:
    if labels is None or null_label is None:
      raise ValueError('label dropout needs labels and a null_label')
    drop = jax.random.bernoulli(drop_rng, label_drop_prob, (batch,))
    labels = jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)
  out = apply_fn(x_t, t, labels).astype(jnp.float32)
  target = training_target(schedule, x0, t, noise, prediction)
  return jnp.mean((out - target) ** 2)


def guided_output(cond_out: jax.Array, uncond_out: jax.Array, guidance_scale) -> jax.Array:
  """Classifier-free guidance: uncond + s * (cond - uncond).

  s = 1 gives the conditional output and s = 0 the unconditional one; s > 1
  strengthens the class signal. Being affine with weights summing to one, it
  gives the same result whether applied to eps or to v predictions.
  """
  return uncond_out + guidance_scale * (cond_out - uncond_out)


def _is_static(value, constant: float) -> bool:
  """True if `value` is a Python number equal to `constant` (so a branch can be skipped at trace time)."""
  return isinstance(value, int | float) and value == constant


def model_output(apply_fn: ApplyFn, x, t, labels, guidance_scale, null_label):
  """The model output, guided when the scale is not statically 1 (one batched call for cond + uncond)."""
  if _is_static(guidance_scale, 1.0):
    return apply_fn(x, t, labels).astype(jnp.float32)
  if labels is None or null_label is None:
    raise ValueError('classifier-free guidance needs labels and a null_label')
  batch = x.shape[0]
  labels = jnp.asarray(labels)
  null = jnp.full_like(labels, null_label)
  out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])).astype(jnp.float32)
  return guided_output(out[:batch], out[batch:], guidance_scale)


def strength_to_t_start(num_train_steps: int, strength: float) -> int:
  """The number of forward steps for an image-to-image strength in [0, 1]: round(strength * T).

  Rounds halves up (not to even) so the mapping is monotone.
  """
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f'strength must be in [0, 1], got {strength}')
  return int(math.floor(strength * num_train_steps + 0.5))


def ddim_timesteps(num_train_steps: int, num_steps: int, t_start: int | None = None) -> np.ndarray:
  """The descending DDIM sub-sequence of timestep indices.

  A full run uses `num_steps` evenly spaced indices from T - 1 down to 0, both
  included, so sampling starts at the noisiest trained step and its last step
  lands on clean data. An image-to-image run from `t_start` forward steps
  (x_start noised to index t_start - 1) covers t_start - 1 .. 0 with the
  proportional share ceil(num_steps * t_start / T) of the steps, as diffusers'
  img2img runs `strength * num_steps` steps.

  Args:
    num_train_steps: T.
    num_steps: steps of a full-length run (at most T).
    t_start: forward steps already applied, in [1, T]; None means T.

  Returns:
    A strictly decreasing int32 numpy array.
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f'num_steps must be in [1, {num_train_steps}], got {num_steps}')
  t_start = num_train_steps if t_start is None else t_start
  if not 1 <= t_start <= num_train_steps:
    raise ValueError(f't_start must be in [1, {num_train_steps}], got {t_start}')
  n = min(t_start, max(1, math.ceil(num_steps * t_start / num_train_steps)))
  # floor(x + 0.5), not np.round: round-half-to-even can map two points one apart to the same integer.
  ts = np.floor(np.linspace(t_start - 1, 0, n) + 0.5).astype(np.int32)
  assert n == 1 or np.all(np.diff(ts) < 0), ts
  return ts


def ddim_step(
  schedule: Schedule,
  x_t: jax.Array,
  t: jax.Array,
  t_prev: jax.Array,
  model_out: jax.Array,
  prediction: str,
  eta=0.0,
  noise: jax.Array | None = None,
  clip_x0: float | None = None,
) -> jax.Array:
  """One DDIM update (Song et al. 2021, eq. 12) from index t to t_prev < t (t_prev = -1: clean data).

  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
  sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).
  eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is DDPM's ancestral step
  with the posterior variance beta_tilde_t.

  Args:
    schedule: the noise schedule.
    x_t: [B, ...] current sample.
    t: scalar or [B] current timestep index.
    t_prev: scalar or [B] next timestep index, or -1.
    model_out: the model output at (x_t, t).
    prediction: 'eps' or 'v'.
    eta: stochasticity, 0 (DDIM) .. 1 (DDPM-like).
    noise: standard normal like x_t; needed unless eta is statically 0.
    clip_x0: if given, x0_hat is clipped to [-clip_x0, clip_x0] (pixel-space
      models); eps_hat is then recomputed so the update stays consistent.

  Returns:
    x_{t_prev}.
  """
  x_t = x_t.astype(jnp.float32)
  x0 = predict_x0(schedule, x_t, t, model_out, prediction)
  eps = predict_eps(schedule, x_t, t, model_out, prediction)
  a_t = _coef(schedule.alphas_cumprod, t, x_t.ndim)
  t_prev = jnp.asarray(t_prev)
  a_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
  a_prev = a_prev.reshape(a_prev.shape + (1,) * (x_t.ndim - a_prev.ndim))
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
  out = jnp.sqrt(a_prev) * x0
  if _is_static(eta, 0.0):
    return out + jnp.sqrt(1.0 - a_prev) * eps
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
  if noise is None:
    raise ValueError('ddim_step with eta != 0 needs noise')
  # max(., 0) guards eta > 1, where sigma^2 can exceed 1 - abar_prev.
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
  return out + direction + sigma * noise.astype(jnp.float32)


def ddim_sample(
  apply_fn: ApplyFn,
  schedule: Schedule,
  shape_or_xT: Sequence[int] | jax.Array | None,
  labels: jax.Array | None,
  rng: jax.Array,
  num_steps: int = 50,
  eta=0.0,
  guidance_scale=1.0,
  prediction: str = 'eps',
  t_start: int | None = None,
  x_start: jax.Array | None = None,
  *,
  null_label: int | None = None,
  clip_x0: float | None = None,
) -> jax.Array:
  """DDIM sampling over an evenly spaced sub-sequence of timesteps, optionally guided or image-to-image.

  The steps run in one `lax.scan`, so under `jax.jit` the model is traced once.
  Jit a closure over the parameters, with `num_steps`, `t_start`, `prediction`
  and `null_label` static (they fix the scanned sequence); `eta` and
  `guidance_scale` may be traced, but a Python 0 / 1 skips the noise draws /
  the unconditional pass.

  Image-to-image (SDEdit, Meng et al. 2022): given a clean `x_start` and
  `t_start = strength_to_t_start(T, strength)`, x_start is noised with
  `q_sample` to index t_start - 1 and DDIM runs from there over the remaining
  steps (see `ddim_timesteps`). t_start = 0 returns x_start unchanged.

  Args:
    apply_fn: `apply_fn(x_t, t, labels) -> model_out`, t an int32 [B] array.
    schedule: the noise schedule the model was trained with.
    shape_or_xT: the sample shape (x_T is drawn from `rng`) or x_T itself; in
      image-to-image mode, the shape or the noise used to corrupt x_start
      (None: drawn from `rng` with x_start's shape).
    labels: [B] integer labels, or None for an unconditional model.
    rng: PRNG key for x_T (or the img2img noise) and, if eta > 0, the step noise.
    num_steps: DDIM steps of a full-length run.
    eta: 0 deterministic DDIM, 1 DDPM-like.
    guidance_scale: classifier-free guidance scale s (see `guided_output`).
    prediction: what the model predicts, 'eps' or 'v'.
    t_start: image-to-image forward steps in [0, T]; needs x_start.
    x_start: [B, ...] clean sample to start from (image-to-image).
    null_label: the label of the unconditional model (num_classes for `UNet`);
      required when guidance_scale is not 1.
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] at every step (for
      pixel-space models; leave None for latents).

  Returns:
    The float32 sample, shaped like x_T.
  """
  _check_prediction(prediction)
  num_train = schedule.num_steps
  init_rng, step_rng = jax.random.split(rng)

  def given_or_drawn(shape_like):
    if shape_or_xT is None:
      return jax.random.normal(init_rng, shape_like, jnp.float32)
    if isinstance(shape_or_xT, tuple | list):
      if x_start is not None and tuple(shape_or_xT) != tuple(x_start.shape):
        raise ValueError(f'shape {tuple(shape_or_xT)} does not match x_start {x_start.shape}')
      return jax.random.normal(init_rng, tuple(shape_or_xT), jnp.float32)
    return jnp.asarray(shape_or_xT, jnp.float32)

  if x_start is None:
    if t_start is not None:
      raise ValueError('t_start needs x_start (image-to-image)')
    if shape_or_xT is None:
      raise ValueError('give the sample shape or x_T')
    x = given_or_drawn(None)
  else:
    t_start = num_train if t_start is None else int(t_start)
    if t_start == 0:
      return jnp.asarray(x_start, jnp.float32)
    noise = given_or_drawn(x_start.shape)
    if noise.shape != x_start.shape:
      raise ValueError(f'noise {noise.shape} does not match x_start {x_start.shape}')
    first = jnp.full((x_start.shape[0],), t_start - 1, jnp.int32)
    x = q_sample(schedule, x_start, first, noise)

  ts = ddim_timesteps(num_train, num_steps, t_start)
  ts_prev = np.append(ts[1:], -1).astype(np.int32)
  keys = jax.random.split(step_rng, len(ts))
  batch = x.shape[0]
  stochastic = not _is_static(eta, 0.0)

  def body(x, step):
    t, t_prev, key = step
    t_batch = jnp.full((batch,), t, jnp.int32)
    out = model_output(apply_fn, x, t_batch, labels, guidance_scale, null_label)
    noise = jax.random.normal(key, x.shape, jnp.float32) if stochastic else None
    return ddim_step(schedule, x, t, t_prev, out, prediction, eta, noise, clip_x0), None

  x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(ts_prev), keys))
  return x


def ddpm_sample(
  apply_fn: ApplyFn,
  schedule: Schedule,
  shape_or_xT: Sequence[int] | jax.Array,
  labels: jax.Array | None,
  rng: jax.Array,
  guidance_scale=1.0,
  prediction: str = 'eps',
  *,
  null_label: int | None = None,
  clip_x0: float | None = None,
) -> jax.Array:
  """Ancestral DDPM sampling over all T steps (Ho et al. 2020, variance beta_tilde).

  This is DDIM with eta = 1 and every timestep: with t_prev = t - 1 the DDIM
  update is exactly the DDPM posterior mean plus sqrt(beta_tilde_t) noise.
  """
  return ddim_sample(
    apply_fn,
    schedule,
    shape_or_xT,
    labels,
    rng,
    num_steps=schedule.num_steps,
    eta=1.0,
    guidance_scale=guidance_scale,
    prediction=prediction,
    null_label=null_label,
    clip_x0=clip_x0,
  )
