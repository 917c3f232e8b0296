r"""Diagnose a trained latent diffusion model: x0 error by noise level and the DDIM trajectory.

When LDM samples decode to noise while image-to-image looks right, the question
is where the trajectory leaves the data. This prints, for encoded training
images of one class, the model-output and x0-estimate errors at a range of
timesteps (against the trivial estimate: the class's mean latent), and, for a
DDIM run from pure noise, the standard deviation of the sample and of its x0
estimate at every few steps (against that of encoded images).

  python -m cxrjax.eval.ldm_probe --config=configs/ldm.py:cpu \
      --generator_dir=runs/ldm-cpu/generator [--out=probe.json]

The config must be the one the generator was trained with (its hash is
checked); an untrained generator is an error, never trained here.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from cxrjax import config_lib, diffusion, entry, fileio, seeding
from cxrjax import main as cli
from cxrjax import mesh as mesh_lib
from cxrjax.backends.base import Backend
from cxrjax.errors import UserError
from cxrjax.trainers import common, generative, ldm

PROBE_TIMESTEPS = (999, 950, 900, 800, 600, 400, 200, 50, 0)


def x0_error_by_t(apply_fn, schedule, z0, labels, timesteps, prediction: str, key) -> list[dict]:
  """Per timestep: MSE of the model output against its target and of the implied x0 against z0.

  Args:
    apply_fn: `apply_fn(x_t, t, labels) -> model output`.
    schedule: the training schedule.
    z0: [B, ...] clean (scaled) latents.
    labels: [B] labels the model is conditioned on.
    timesteps: indices to probe (each < T).
    prediction: 'eps' or 'v'.
    key: PRNG key for the noise.

  Returns:
    One dict per timestep: t, output_mse, x0_mse, x0_hat_std, and trivial_x0_mse
    (the error of predicting the batch-mean latent, which any useful model beats).
  """
  z0 = jnp.asarray(z0, jnp.float32)
  trivial = float(jnp.mean((z0 - z0.mean(0)) ** 2))
  rows = []
  for i, t_int in enumerate(timesteps):
    noise = jax.random.normal(jax.random.fold_in(key, i), z0.shape, jnp.float32)
    t = jnp.full((z0.shape[0],), t_int, jnp.int32)
    x_t = diffusion.q_sample(schedule, z0, t, noise)
    out = apply_fn(x_t, t, labels)
    target = diffusion.training_target(schedule, z0, t, noise, prediction)
    x0_hat = diffusion.predict_x0(schedule, x_t, t, out, prediction)
    rows.append(
      dict(
        t=int(t_int),
        output_mse=float(jnp.mean((out - target) ** 2)),
        x0_mse=float(jnp.mean((x0_hat - z0) ** 2)),
        x0_hat_std=float(jnp.std(x0_hat)),
        trivial_x0_mse=trivial,
      )
    )
  return rows


def ddim_trajectory(
  apply_fn, schedule, x_T, labels, num_steps: int, prediction: str, guidance_scale: float = 1.0, null_label=None
) -> tuple[jax.Array, list[dict]]:
  """Deterministic DDIM from x_T (eta = 0), step by step, recording the spread of x_t and of x0_hat.

  Same updates as `diffusion.ddim_sample` with eta = 0 (a Python loop, so every
  step can be inspected).

  Returns:
    (final sample, one dict per step: step, t, x_std (of the x_t the model
    sees at t), x0_hat_std (of its x0 estimate there), then a last row with
    t = -1 for the finished sample).
  """
  ts = diffusion.ddim_timesteps(schedule.num_steps, num_steps)
  x = jnp.asarray(x_T, jnp.float32)
  rows = []
  for i, t_int in enumerate(ts):
    t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
    t = jnp.full((x.shape[0],), t_int, jnp.int32)
    out = diffusion.model_output(apply_fn, x, t, labels, guidance_scale, null_label)
    x0_hat = diffusion.predict_x0(schedule, x, t, out, prediction)
    rows.append(dict(step=i, t=int(t_int), x_std=float(jnp.std(x)), x0_hat_std=float(jnp.std(x0_hat))))
    x = diffusion.ddim_step(schedule, x, int(t_int), t_prev, out, prediction)
  rows.append(dict(step=len(ts), t=-1, x_std=float(jnp.std(x)), x0_hat_std=float(jnp.std(x))))
  return x, rows


# --config (the LDM config the generator was trained with) is cxrjax.main's flag, parsed the same way.
_GEN_DIR = flags.DEFINE_string('generator_dir', None, 'The generator folder (autoencoder/ and diffusion/).')
_OUT = flags.DEFINE_string('out', None, 'Also write the probe as JSON here.')
_NUM = flags.DEFINE_integer('num_images', 128, 'Encoded training images (and samples) probed.')


def probe(config, gen_dir: str, num_images: int, backend=None) -> dict:
  """Loads a trained LDM (never trains one) and runs both probes on the minority class."""
  # Both stages must be finished with this very config, so `ldm.train` below only restores.
  want = ldm.pretrain_hash(config)  # the shared stages' hash (the same as the generator's without per-class fine-tunes)
  for stage, steps in (('autoencoder', config.ldm.ae.steps), ('diffusion', config.ldm.unet.steps)):
    path = os.path.join(gen_dir, stage, 'done.json')
    if not os.path.isfile(path):
      raise UserError(f'--generator_dir={gen_dir}: no trained LDM there (expected {stage}/done.json)')
    done = fileio.read_json(path)
    if done.get('config_hash') != want or int(done.get('step', -1)) < steps:
      raise UserError(
        f'{path}: trained with another config (hash {done.get("config_hash")}, step {done.get("step")}; this'
        f' config: hash {want}, {steps} steps); pass the config and overrides the generator was trained with'
      )
  if config.ldm.eta != 0:
    raise UserError(f'config.ldm.eta={config.ldm.eta!r}: the probe follows deterministic DDIM; expected 0')
  data = common.prepare_data(generative._base_config(config))
  backend = backend or Backend()
  _, handle = ldm.train(config, gen_dir, data, mesh_lib.make_mesh(config.mesh), {}, backend)
  ae, unet, scale = handle['ae_model'], handle['unet'], handle['scale']
  schedule = diffusion.make_schedule(config.ldm.schedule, config.ldm.num_timesteps)
  cls = config.imbalance.minority_class
  images = data.train.images[data.train.labels == cls][:num_images]
  encode = jax.jit(lambda p, x: ae.apply({'params': p}, ldm.to_unit(x), method='encode')[0])
  z0 = encode(handle['ae_params'], images) * scale
  labels = jnp.full((len(images),), cls, jnp.int32)
  apply = jax.jit(lambda x, t, y: unet.apply({'params': handle['unet_ema']}, x, t, y))
  key = seeding.jax_key(config.seed, 'ldm_probe')
  steps = [t for t in PROBE_TIMESTEPS if t < schedule.num_steps]
  by_t = x0_error_by_t(apply, schedule, z0, labels, steps, config.ldm.prediction, key)
  x_T = jax.random.normal(jax.random.fold_in(key, 10**6), z0.shape, jnp.float32)
  _, traj = ddim_trajectory(
    apply, schedule, x_T, labels, config.ldm.sample_steps, config.ldm.prediction,
    config.ldm.guidance_scale, data.num_classes,
  )  # fmt: skip
  return dict(
    generator_dir=gen_dir, prediction=config.ldm.prediction, schedule=config.ldm.schedule,
    encoded_latent_std=float(jnp.std(z0)), by_timestep=by_t, trajectory=traj,
  )  # fmt: skip


def format_probe(result: dict) -> str:
  lines = [
    f'LDM probe of {result["generator_dir"]} ({result["prediction"]}-prediction, {result["schedule"]} schedule);'
    f' encoded latent std {result["encoded_latent_std"]:.3f}',
    '| t | output MSE | x0 MSE | x0_hat std | trivial x0 MSE |',
    '|---:|---:|---:|---:|---:|',
  ]
  for r in result['by_timestep']:
    lines.append(
      f'| {r["t"]} | {r["output_mse"]:.4f} | {r["x0_mse"]:.3f} | {r["x0_hat_std"]:.3f} | {r["trivial_x0_mse"]:.3f} |'
    )
  lines += ['', '| DDIM step | t (-1: final sample) | x_t std | x0_hat std |', '|---:|---:|---:|---:|']
  traj = result['trajectory']
  for r in traj:
    if r['step'] % 5 == 0 or r['t'] in (0, -1):
      lines.append(f'| {r["step"]} | {r["t"]} | {r["x_std"]:.3f} | {r["x0_hat_std"]:.3f} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  try:
    config = flags.FLAGS['config'].value
    if config is None or not _GEN_DIR.value:
      raise UserError('give --config (the LDM config) and --generator_dir')
    config = config_lib.finalize(config)
    backend = entry.start(config, compilation_cache=cli.compilation_cache())  # before any JAX work
    result = probe(config, _GEN_DIR.value, _NUM.value, backend)
    if _OUT.value:
      fileio.atomic_write_json(_OUT.value, result)
  except UserError as e:
    cli.fail(str(e))
  print(format_probe(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags, argv=sys.argv)
