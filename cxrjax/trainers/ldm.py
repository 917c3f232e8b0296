"""Latent diffusion as a generator backend: autoencoder, then a class-conditional latent UNet.

Stage a trains a KL autoencoder on all (imbalanced) training images; stage b
trains a UNet denoiser on its latents, scaled to unit variance (Rombach et al.'s
scale factor), with classifier-free guidance (labels dropped to a null label
with probability `ldm.label_dropout`) and an EMA of the weights. Synthesis is
either DDIM sampling from noise under the minority label (`ldm.mode='sample'`)
or, as in the latent-diffusion study, image-to-image (`'img2img'`): encode a
majority-class image, noise it to `ldm.strength`, and denoise it under the
minority label, so the anatomy stays and the disease pattern is added.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax import config_lib, diffusion, progress, seeding
from cxrjax.backends.base import Backend
from cxrjax.data import pipeline
from cxrjax.eval import report
from cxrjax.models import DTYPES
from cxrjax.models.autoencoder import KLAutoencoder, ae_loss
from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.unet import UNet
from cxrjax.trainers import loop
from cxrjax.trainers.program import Program


@flax.struct.dataclass
class AEState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class DiffusionState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any


def build_autoencoder(cfg, channels: int, layers: Layers = STOCK) -> KLAutoencoder:
  a = cfg.ldm.ae
  return KLAutoencoder(
    in_channels=channels,
    latent_channels=a.latent_channels,
    base_channels=a.base_channels,
    channel_mults=tuple(a.channel_mults),
    num_res_blocks=a.num_res_blocks,
    dtype=DTYPES[cfg.model.dtype],
    layers=layers,
  )


def build_unet(cfg, num_classes: int, layers: Layers = STOCK) -> UNet:
  u = cfg.ldm.unet
  return UNet(
    out_channels=cfg.ldm.ae.latent_channels,
    num_classes=num_classes,
    base_channels=u.base_channels,
    channel_mults=tuple(u.channel_mults),
    num_res_blocks=u.num_res_blocks,
    attention_resolutions=tuple(u.attention_levels),
    num_heads=u.num_heads,
    dropout=u.dropout,
    dtype=DTYPES[cfg.model.dtype],
    layers=layers,
  )


def to_unit(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_ae_step(model: KLAutoencoder, tx, kl_weight: float):
  def step(state: AEState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    x = to_unit(batch['image'])

    def loss_fn(params):
      x_hat, mean, logvar = model.apply({'params': params}, x, rngs={'sample': rng})
      return ae_loss(x, x_hat, mean, logvar, kl_weight)

    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), m

  return step


def make_diffusion_step(unet: UNet, encode_fn, tx, schedule, cfg, scale: float, null_label: int):
  ema_decay = cfg.ldm.unet.ema_decay

  def step(state: DiffusionState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    enc_rng, loss_rng, drop_rng = jax.random.split(rng, 3)
    z = encode_fn(to_unit(batch['image']), enc_rng) * scale

    def loss_fn(params):
      apply = lambda x_t, t, y: unet.apply({'params': params}, x_t, t, y, train=True, rngs={'dropout': drop_rng})  # noqa: E731
      return diffusion.diffusion_loss(
        schedule, apply, z, batch['label'], loss_rng, cfg.ldm.prediction,
        label_drop_prob=cfg.ldm.label_dropout, null_label=null_label,
      )  # fmt: skip

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new, {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  return step


def _tx(backend: Backend, lr: float, steps: int, warmup: int = 0):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1)) if warmup else lr
  return backend.adam(schedule)


def autoencoder_program(cfg, image_shape, backend: Backend, key: jax.Array) -> Program:
  """The KL autoencoder's training program (`cfg.ldm.ae`) on `backend`'s layers."""
  model = build_autoencoder(cfg, image_shape[-1], backend.layers)
  a = cfg.ldm.ae
  tx = _tx(backend, a.lr, a.steps)

  def init_fn():
    params = model.init({'params': key, 'sample': key}, jnp.zeros((1, *image_shape)))['params']
    return AEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return Program(
    name='autoencoder',
    init=init_fn,
    step=make_ae_step(model, tx, a.kl_weight),
    init_options=backend.compile_options('init'),
    step_options=backend.compile_options('autoencoder'),
    modules={'autoencoder': model},
  )


def diffusion_program(
  cfg, num_classes: int, latent_shape, encode_fn, scale: float, backend: Backend, key: jax.Array
) -> Program:
  """The latent denoiser's training program (`cfg.ldm.unet`) on `backend`'s layers.

  Args:
    cfg: the experiment config.
    num_classes: real classes (the label `num_classes` is the null label of guidance).
    latent_shape: (h, w, c) of the latents.
    encode_fn: (images in [-1, 1], rng) -> latents (a posterior sample of the autoencoder).
    scale: the latents' scale factor (to unit variance).
    backend: the platform backend.
    key: the initialization key.
  """
  unet = build_unet(cfg, num_classes, backend.layers)
  u = cfg.ldm.unet
  tx = _tx(backend, u.lr, u.steps, u.warmup_steps)
  schedule = diffusion.make_schedule(cfg.ldm.schedule, cfg.ldm.num_timesteps)

  def init_fn():
    z, t = jnp.zeros((1, *latent_shape)), jnp.zeros((1,), jnp.int32)
    params = unet.init(key, z, t, t)['params']
    return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)

  return Program(
    name='unet',
    init=init_fn,
    step=make_diffusion_step(unet, encode_fn, tx, schedule, cfg, scale, num_classes),
    init_options=backend.compile_options('init'),
    step_options=backend.compile_options('unet'),
    modules={'unet': unet},
  )


def _load_ae(cfg, gen_dir: str, data, mesh, backend: Backend):
  """Trains (or restores) the autoencoder; returns (model, params, latent scale, result)."""
  image_shape = data.dataset.image_shape
  a = cfg.ldm.ae
  gseed = config_lib.generator_seed(cfg)
  prog = autoencoder_program(cfg, image_shape, backend, seeding.jax_key(gseed, 'ldm/ae/init'))
  model = prog.modules['autoencoder']
  workdir = os.path.join(gen_dir, 'autoencoder')
  result = loop.run(
    prog,
    name='autoencoder',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      data.train,
      global_batch=a.batch_size,
      total_steps=a.steps,
      seed=seeding.int_seed(gseed, 'ldm/ae/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=a.steps,
    rng=seeding.jax_key(gseed, 'ldm/ae/step'),
    log_every=cfg.ldm.log_every,
    checkpoint_every=cfg.ldm.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=config_lib.generator_hash(cfg),
    batch_size=a.batch_size,
  )
  params = result.state.params
  # Latent scale factor: 1 / std of the posterior means over (up to) 512 training
  # images, so the diffusion model sees unit-variance latents.
  encode = jax.jit(lambda p, x: model.apply({'params': p}, to_unit(x), method='encode')[0])
  sample_imgs = data.train.images[: min(512, len(data.train))]
  z = np.asarray(encode(params, sample_imgs))
  scale = float(1.0 / max(z.std(), 1e-6))
  # Reconstruction grid: originals (top rows) and reconstructions.
  if jax.process_index() == 0:
    recon = jax.jit(lambda p, x: to_uint8(model.apply({'params': p}, to_unit(x), sample_posterior=False)[0]))
    originals = sample_imgs[:16]
    report.save_image_grid(
      np.concatenate([originals, np.asarray(recon(params, originals))]),
      os.path.join(workdir, 'reconstructions.png'), nrow=8, title='autoencoder: originals (top) and reconstructions',
    )  # fmt: skip
  return model, params, scale, result


def train(cfg, gen_dir: str, data, mesh, needed: dict[int, int], backend: Backend) -> tuple[dict, dict]:
  """Trains (or restores) the autoencoder and the latent diffusion model.

  Returns:
    (JSON-able generator record, handle for `synthesize`).
  """
  del needed
  k = data.num_classes
  ae_model, ae_params, scale, ae_result = _load_ae(cfg, gen_dir, data, mesh, backend)
  u = cfg.ldm.unet
  schedule = diffusion.make_schedule(cfg.ldm.schedule, cfg.ldm.num_timesteps)
  latent = ae_model.latent_shape(data.dataset.image_shape)
  gseed = config_lib.generator_seed(cfg)

  def encode_fn(x, rng):
    mean, logvar = ae_model.apply({'params': ae_params}, x, method='encode')
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)

  prog = diffusion_program(cfg, k, latent, encode_fn, scale, backend, seeding.jax_key(gseed, 'ldm/unet/init'))
  unet = prog.modules['unet']

  workdir = os.path.join(gen_dir, 'diffusion')
  sample_fn = make_sampler(cfg, ae_model, unet, schedule, scale, k, data.dataset.image_shape)
  grid_labels = np.array([c for c in range(k) for _ in range(8)], np.int32)

  def save_samples(step, state, metrics):
    del metrics
    if cfg.ldm.sample_every and (step % cfg.ldm.sample_every == 0 or step == u.steps) and jax.process_index() == 0:
      imgs = sample_fn(state.ema, ae_params, grid_labels, seeding.jax_key(gseed, 'ldm/grid'))
      report.save_image_grid(
        np.asarray(imgs), os.path.join(workdir, 'samples', f'step_{step:06d}.png'), nrow=8,
        title=f'LDM samples (EMA), step {step}: rows by class {", ".join(data.dataset.class_names)}',
      )  # fmt: skip

  result = loop.run(
    prog,
    name='diffusion',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      data.train,
      global_batch=u.batch_size,
      total_steps=u.steps,
      seed=seeding.int_seed(gseed, 'ldm/unet/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=u.steps,
    rng=seeding.jax_key(gseed, 'ldm/unet/step'),
    log_every=cfg.ldm.log_every,
    checkpoint_every=cfg.ldm.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=config_lib.generator_hash(cfg),
    callbacks=[save_samples],
    batch_size=u.batch_size,
  )
  samples_png = os.path.join('generator', 'diffusion', 'samples', f'step_{u.steps:06d}.png')
  handle = dict(unet_ema=result.state.ema, ae_params=ae_params, scale=scale, ae_model=ae_model, unet=unet)
  info = dict(
    kind='ldm',
    description=f'latent diffusion ({cfg.ldm.mode}'
    + (f', strength {cfg.ldm.strength}' if cfg.ldm.mode == 'img2img' else '')
    + f', {cfg.ldm.sample_steps} DDIM steps, guidance {cfg.ldm.guidance_scale})',
    step=result.step,
    wall_time_s=ae_result.wall_time_s + result.wall_time_s,
    config_hash=config_lib.generator_hash(cfg),
    latent_scale=scale,
    latent_shape=list(latent),
    details=dict(
      mode=cfg.ldm.mode,
      strength=cfg.ldm.strength if cfg.ldm.mode == 'img2img' else None,
      guidance_scale=cfg.ldm.guidance_scale,
      sample_steps=cfg.ldm.sample_steps,
      eta=cfg.ldm.eta,
      autoencoder_steps=ae_result.step,
      final_ae_loss=ae_result.history[-1] if ae_result.history else None,
      final_diffusion_loss=result.history[-1] if result.history else None,
    ),
    samples_png=samples_png if cfg.ldm.sample_every else '',
  )
  return info, handle


def make_sampler(cfg, ae_model, unet, schedule, scale: float, num_classes: int, image_shape, img2img: bool = False):
  """A jitted (unet_params, ae_params, labels, rng[, source images]) -> uint8 images."""
  t_start = diffusion.strength_to_t_start(cfg.ldm.num_timesteps, cfg.ldm.strength) if img2img else None
  latent = ae_model.latent_shape(image_shape)

  @jax.jit
  def sample(unet_params, ae_params, labels, rng, sources=None):
    apply = lambda x_t, t, y: unet.apply({'params': unet_params}, x_t, t, y)  # noqa: E731
    if sources is None:
      shape = (labels.shape[0], *latent)
      z = diffusion.ddim_sample(
        apply, schedule, shape, labels, rng, num_steps=cfg.ldm.sample_steps, eta=cfg.ldm.eta,
        guidance_scale=cfg.ldm.guidance_scale, prediction=cfg.ldm.prediction, null_label=num_classes,
      )  # fmt: skip
    else:
      z0 = ae_model.apply({'params': ae_params}, to_unit(sources), method='encode')[0] * scale
      z = diffusion.ddim_sample(
        apply, schedule, None, labels, rng, num_steps=cfg.ldm.sample_steps, eta=cfg.ldm.eta,
        guidance_scale=cfg.ldm.guidance_scale, prediction=cfg.ldm.prediction, null_label=num_classes,
        t_start=t_start, x_start=z0,
      )  # fmt: skip
    return to_uint8(ae_model.apply({'params': ae_params}, z / scale, method='decode'))

  return sample


def synthesize(cfg, handle: dict, data, labels: np.ndarray) -> np.ndarray:
  """Generates images for `labels` (uint8 [N,H,W,C]), from noise or by image-to-image."""
  k = data.num_classes
  schedule = diffusion.make_schedule(cfg.ldm.schedule, cfg.ldm.num_timesteps)
  img2img = cfg.ldm.mode == 'img2img'
  sampler = make_sampler(
    cfg, handle['ae_model'], handle['unet'], schedule, handle['scale'], k, data.dataset.image_shape, img2img=img2img
  )
  rng = seeding.numpy_rng(cfg.seed, 'ldm/synthesize')
  sources_all = None
  if img2img:
    source_class = cfg.ldm.source_class if cfg.ldm.source_class >= 0 else int(np.argmax(data.train.class_counts(k)))
    pool = np.flatnonzero(data.train.labels == source_class)
    pick = rng.choice(pool, size=len(labels), replace=len(labels) > len(pool))
    sources_all = data.train.images[pick]
  out = []
  bs = cfg.ldm.sample_batch
  for i, start in enumerate(range(0, len(labels), bs)):
    lab = labels[start : start + bs]
    n = len(lab)
    pad = bs - n
    lab_p = np.concatenate([lab, np.repeat(lab[-1:], pad)]) if pad else lab
    key = seeding.jax_key(cfg.seed, f'ldm/synthesize/{i}')
    if img2img:
      src = sources_all[start : start + bs]
      src_p = np.concatenate([src, np.repeat(src[-1:], pad, 0)]) if pad else src
      imgs = sampler(handle['unet_ema'], handle['ae_params'], jnp.asarray(lab_p), key, jnp.asarray(src_p))
    else:
      imgs = sampler(handle['unet_ema'], handle['ae_params'], jnp.asarray(lab_p), key)
    out.append(np.asarray(imgs)[:n])
    progress.log(f'[ldm] synthesized {min(start + bs, len(labels))}/{len(labels)}')
  return np.concatenate(out) if out else np.zeros((0, *data.dataset.image_shape), np.uint8)
