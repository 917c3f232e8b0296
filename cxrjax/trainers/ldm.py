"""Latent diffusion as a generator backend: autoencoder, then a class-conditional latent UNet.

Stage a trains a KL autoencoder on all (imbalanced) training images; stage b
trains a UNet denoiser on its latents, scaled to unit variance (Rombach et al.'s
scale factor), with classifier-free guidance (labels dropped to a null label
with probability `ldm.label_dropout`) and an EMA of the weights. Synthesis is
either DDIM sampling from noise under the minority label (`ldm.mode='sample'`)
or, as in the latent-diffusion study, image-to-image (`'img2img'`): encode a
majority-class image, noise it to `ldm.strength`, and denoise it under the
minority label, so the anatomy stays and the disease pattern is added.

With `ldm.per_class_finetune` (the study's "individual" models), a copy of the
pretrained UNet is then fine-tuned on each class that needs images, on that
class's images alone, and makes that class's images. Every stage (autoencoder,
diffusion, each class's fine-tune) has its own folder under the generator
directory and resumes or is skipped on its own.
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
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import report
from cxrjax.models import DTYPES
from cxrjax.models.autoencoder import KLAutoencoder, ae_loss
from cxrjax.models.layers import STOCK, Layers
from cxrjax.models.unet import UNet
from cxrjax.trainers import common, loop
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
  cfg, num_classes: int, latent_shape, encode_fn, scale: float, backend: Backend, key: jax.Array, start=None
) -> Program:
  """The latent denoiser's training program (`cfg.ldm.unet`) on `backend`'s layers.

  With `start` (`() -> UNet params`, host arrays) it is a per-class fine-tune: the state begins at
  those weights (params and EMA both), with a fresh optimizer at `finetune_lr`, constant.

  Args:
    cfg: the experiment config.
    num_classes: real classes (the label `num_classes` is the null label of guidance).
    latent_shape: (h, w, c) of the latents.
    encode_fn: (images in [-1, 1], rng) -> latents (a posterior sample of the autoencoder).
    scale: the latents' scale factor (to unit variance).
    backend: the platform backend.
    key: the initialization key.
    start: `() -> params` to fine-tune from, or None (pretraining from `key`).
  """
  unet = build_unet(cfg, num_classes, backend.layers)
  u = cfg.ldm.unet
  tx = (
    _tx(backend, finetune_lr(cfg), finetune_steps(cfg))
    if start is not None
    else _tx(backend, u.lr, u.steps, u.warmup_steps)
  )
  schedule = diffusion.make_schedule(cfg.ldm.schedule, cfg.ldm.num_timesteps)

  def init_fn(params=None):
    if params is None:
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
    start=start,
  )


def finetune_steps(cfg) -> int:
  """Steps of each class's fine-tune: `ldm.finetune_steps`, or a quarter of the pretraining's."""
  return cfg.ldm.finetune_steps or max(cfg.ldm.unet.steps // 4, 1)


def finetune_lr(cfg) -> float:
  return cfg.ldm.finetune_lr or cfg.ldm.unet.lr


def pretrain_hash(cfg) -> str:
  """The generator hash of the shared stages (autoencoder, diffusion): the per-class keys left out,
  so a run with and one without per-class fine-tuning share one pretrained model."""
  base = cfg.copy_and_resolve_references()
  base.unlock()
  base.ldm.per_class_finetune, base.ldm.finetune_steps, base.ldm.finetune_lr = False, 0, 0.0
  return config_lib.generator_hash(base)


def _load_ae(cfg, gen_dir: str, data, mesh, backend: Backend):
  """Trains (or restores) the autoencoder; returns (model, params, latent scale, result, batch size)."""
  image_shape = data.dataset.image_shape
  a = cfg.ldm.ae
  gseed = config_lib.generator_seed(cfg)
  prog = autoencoder_program(cfg, image_shape, backend, seeding.jax_key(gseed, 'ldm/ae/init'))
  model = prog.modules['autoencoder']
  workdir = os.path.join(gen_dir, 'autoencoder')
  batch = common.fit_batch(a.batch_size, len(data.train), mesh, '[ldm] autoencoder:', 'ldm.ae.batch_size')
  result = loop.run(
    prog,
    name='autoencoder',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      data.train,
      global_batch=batch,
      total_steps=a.steps,
      seed=seeding.int_seed(gseed, 'ldm/ae/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=a.steps,
    rng=seeding.jax_key(gseed, 'ldm/ae/step'),
    log_every=cfg.ldm.log_every,
    checkpoint_every=cfg.ldm.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=pretrain_hash(cfg),
    batch_size=batch,
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
  return model, params, scale, result, batch


def train(cfg, gen_dir: str, data, mesh, needed: dict[int, int], backend: Backend) -> tuple[dict, dict]:
  """Trains (or restores) the autoencoder and the latent diffusion model, then (with
  `ldm.per_class_finetune`) one fine-tuned copy of the UNet per class in `needed` that needs images.

  Returns:
    (JSON-able generator record, handle for `synthesize`).
  """
  k = data.num_classes
  names = data.dataset.class_names
  ae_model, ae_params, scale, ae_result, ae_batch = _load_ae(cfg, gen_dir, data, mesh, backend)
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

  def sample_grid(folder: str, steps: int, labels: np.ndarray, title: str):
    def save_samples(step, state, metrics):
      del metrics
      if cfg.ldm.sample_every and (step % cfg.ldm.sample_every == 0 or step == steps) and jax.process_index() == 0:
        imgs = sample_fn(state.ema, ae_params, jnp.asarray(labels), seeding.jax_key(gseed, 'ldm/grid'))
        report.save_image_grid(
          np.asarray(imgs), os.path.join(folder, 'samples', f'step_{step:06d}.png'), nrow=8,
          title=f'{title}, step {step}',
        )  # fmt: skip

    return save_samples

  grid_labels = np.array([c for c in range(k) for _ in range(8)], np.int32)
  batch = common.fit_batch(u.batch_size, len(data.train), mesh, '[ldm] diffusion:', 'ldm.unet.batch_size')
  result = loop.run(
    prog,
    name='diffusion',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      data.train,
      global_batch=batch,
      total_steps=u.steps,
      seed=seeding.int_seed(gseed, 'ldm/unet/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=u.steps,
    rng=seeding.jax_key(gseed, 'ldm/unet/step'),
    log_every=cfg.ldm.log_every,
    checkpoint_every=cfg.ldm.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=pretrain_hash(cfg),
    callbacks=[
      sample_grid(workdir, u.steps, grid_labels, f'LDM samples (EMA): rows by class {", ".join(names)}')
    ],  # fmt: skip
    batch_size=batch,
  )
  samples_png = os.path.join('generator', 'diffusion', 'samples', f'step_{u.steps:06d}.png')
  by_class, finetunes = {}, {}
  if cfg.ldm.per_class_finetune:
    pretrained = jax.device_get(result.state.ema)
    for c in sorted(c for c, n in needed.items() if n > 0):
      ft, ft_record = _finetune_class(
        cfg, gen_dir, data, mesh, c, pretrained, result.step, encode_fn, scale, latent, backend, sample_grid
      )  # fmt: skip
      by_class[c] = ft.state.ema
      finetunes[names[c]] = ft_record
    if finetunes:
      first = min(by_class)
      samples_png = os.path.join(
        'generator', 'finetune', f'class_{first}', 'samples', f'step_{finetune_steps(cfg):06d}.png'
      )
  handle = dict(unet_ema=result.state.ema, ae_params=ae_params, scale=scale, ae_model=ae_model, unet=unet,
                unet_ema_by_class=by_class)  # fmt: skip
  details = dict(
    mode=cfg.ldm.mode,
    strength=cfg.ldm.strength if cfg.ldm.mode == 'img2img' else None,
    guidance_scale=cfg.ldm.guidance_scale,
    sample_steps=cfg.ldm.sample_steps,
    eta=cfg.ldm.eta,
    autoencoder_steps=ae_result.step,
    final_ae_loss=ae_result.history[-1] if ae_result.history else None,
    final_diffusion_loss=result.history[-1] if result.history else None,
  )
  if ae_batch != cfg.ldm.ae.batch_size or batch != u.batch_size:  # recorded only when the data forced it
    details['batch_sizes'] = dict(autoencoder=ae_batch, diffusion=batch, note='fewer training images than a batch')
  if cfg.ldm.per_class_finetune:
    details['per_class_finetune'] = finetunes
    # Which weights make which class's images: a fine-tuned copy, else the class-conditional pretrained model.
    details['weights_by_class'] = {
      names[c]: f'finetune/class_{c}' if c in by_class else f'diffusion (class-conditional, step {result.step})'
      for c in range(k)
    }
  description = (
    f'latent diffusion ({cfg.ldm.mode}'
    + (f', strength {cfg.ldm.strength}' if cfg.ldm.mode == 'img2img' else '')
    + f', {cfg.ldm.sample_steps} DDIM steps, guidance {cfg.ldm.guidance_scale})'
  )
  if cfg.ldm.per_class_finetune:
    description += (f'; pretrained on all classes, then one copy fine-tuned per class'
                    f' ({", ".join(finetunes) or "none needed"}, {finetune_steps(cfg)} steps each)')  # fmt: skip
  info = dict(
    kind='ldm',
    description=description,
    step=result.step,
    wall_time_s=ae_result.wall_time_s + result.wall_time_s + sum(f['wall_time_s'] for f in finetunes.values()),
    config_hash=config_lib.generator_hash(cfg),
    latent_scale=scale,
    latent_shape=list(latent),
    details=details,
    samples_png=samples_png if cfg.ldm.sample_every else '',
  )
  return info, handle


def _finetune_class(cfg, gen_dir, data, mesh, c, pretrained, pretrained_step, encode_fn, scale, latent, backend,
                    sample_grid):  # fmt: skip
  """Fine-tunes a copy of the pretrained UNet (its EMA weights) on class `c`'s training images alone.

  Returns:
    (the loop's result, a JSON-able record of the fine-tune).
  """
  k = data.num_classes
  name = data.dataset.class_names[c]
  gseed = config_lib.generator_seed(cfg)
  steps = finetune_steps(cfg)
  sub = data.train.take(np.flatnonzero(data.train.labels == c))
  if len(sub) == 0:
    raise UserError(f'ldm.per_class_finetune: class {name} has no training images to fine-tune on')
  prog = diffusion_program(
    cfg, k, latent, encode_fn, scale, backend, seeding.jax_key(gseed, f'ldm/finetune/{c}/init'),
    start=lambda: pretrained,
  )  # fmt: skip
  workdir = os.path.join(gen_dir, 'finetune', f'class_{c}')
  batch = common.fit_batch(
    cfg.ldm.unet.batch_size, len(sub), mesh, f'[ldm] fine-tune of class {name}:', 'ldm.unet.batch_size'
  )
  progress.log(f'[ldm] fine-tuning the pretrained UNet on class {name} ({len(sub)} images, {steps} steps)')
  result = loop.run(
    prog,
    name=f'finetune:{name}',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      sub,
      global_batch=batch,
      total_steps=steps,
      seed=seeding.int_seed(gseed, f'ldm/finetune/{c}/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=steps,
    rng=seeding.jax_key(gseed, f'ldm/finetune/{c}/step'),
    log_every=cfg.ldm.log_every,
    checkpoint_every=cfg.ldm.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=config_lib.generator_hash(cfg),
    callbacks=[sample_grid(workdir, steps, np.full(16, c, np.int32), f'LDM fine-tuned on {name} (EMA)')],
    batch_size=batch,
  )
  record = dict(
    dir=os.path.join('finetune', f'class_{c}'),
    started_from=f'diffusion EMA weights at step {pretrained_step}',
    trained_on=int(len(sub)),
    steps=result.step,
    batch_size=batch,
    lr=finetune_lr(cfg),
    wall_time_s=result.wall_time_s,
    final_loss=result.history[-1] if result.history else None,
  )
  return result, record


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


def _stream(split: str) -> str:
  """The random stream of a split's synthetic set (training keeps the original name)."""
  return 'ldm/synthesize' if split == 'train' else f'ldm/synthesize/{split}'


def img2img_sources(cfg, data, n: int, split: str = 'train') -> tuple[Split, np.ndarray]:
  """(the split img2img draws from, the rows of it that `n` images start from), seeded.

  The sources are images of `ldm.source_class` (-1: the largest training class) from `split`'s
  own images: a validation set is made from validation images only, never from training
  images (validation images that duplicate a training image's pixels are left out too).
  """
  if split == 'test':
    raise ValueError('synthetic images are never made for the test split')
  k = data.num_classes
  source = data.train if split == 'train' else data.dataset.splits[split]
  source_class = cfg.ldm.source_class if cfg.ldm.source_class >= 0 else int(np.argmax(data.train.class_counts(k)))
  pool = np.flatnonzero(source.labels == source_class)
  if split != 'train':
    seen = set(data.train.content_hashes())
    pool = pool[[h not in seen for h in source.take(pool).content_hashes()]] if len(pool) else pool
  if len(pool) == 0:
    raise UserError(
      f'ldm img2img: the {split} split has no images of the source class {data.dataset.class_names[source_class]}'
      ' (ldm.source_class) to start from'
    )
  rng = seeding.numpy_rng(cfg.seed, _stream(split))
  return source, rng.choice(pool, size=n, replace=n > len(pool))


def derived_from(cfg, data, labels: np.ndarray, split: str = 'train') -> np.ndarray | None:
  """The name of the real image each synthesized image starts from (img2img), or None (from noise)."""
  if cfg.ldm.mode != 'img2img':
    return None
  source, pick = img2img_sources(cfg, data, len(labels), split)
  return source.names[pick].astype(str)


def synthesize(cfg, handle: dict, data, labels: np.ndarray, split: str = 'train') -> np.ndarray:
  """Generates images for `labels` (uint8 [N,H,W,C]), from noise or by image-to-image.

  Class c's images come from its fine-tuned UNet when there is one (`ldm.per_class_finetune`),
  else from the class-conditional model. `split` names the set being made ('train', 'val'): each
  has its own random stream, and img2img starts from that split's images (`img2img_sources`).
  """
  if split == 'test':
    raise ValueError('synthetic images are never made for the test split')
  k = data.num_classes
  schedule = diffusion.make_schedule(cfg.ldm.schedule, cfg.ldm.num_timesteps)
  img2img = cfg.ldm.mode == 'img2img'
  sampler = make_sampler(
    cfg, handle['ae_model'], handle['unet'], schedule, handle['scale'], k, data.dataset.image_shape, img2img=img2img
  )
  sources_all = None
  if img2img:
    source, pick = img2img_sources(cfg, data, len(labels), split)
    sources_all = source.images[pick]
  # Rows grouped by the weights that make them (one group without per-class fine-tunes).
  by_class = handle.get('unet_ema_by_class') or {}
  weights = np.array([c if c in by_class else -1 for c in labels.tolist()], np.int64)
  out = np.zeros((len(labels), *data.dataset.image_shape), np.uint8)
  bs = cfg.ldm.sample_batch
  i, done = 0, 0
  for w in sorted(set(weights.tolist())):
    idx = np.flatnonzero(weights == w)
    params = by_class[w] if w >= 0 else handle['unet_ema']
    for start in range(0, len(idx), bs):
      rows = idx[start : start + bs]
      lab = labels[rows]
      n = len(lab)
      pad = bs - n
      lab_p = np.concatenate([lab, np.repeat(lab[-1:], pad)]) if pad else lab
      key = seeding.jax_key(cfg.seed, f'{_stream(split)}/{i}')
      if img2img:
        src = sources_all[rows]
        src_p = np.concatenate([src, np.repeat(src[-1:], pad, 0)]) if pad else src
        imgs = sampler(params, handle['ae_params'], jnp.asarray(lab_p), key, jnp.asarray(src_p))
      else:
        imgs = sampler(params, handle['ae_params'], jnp.asarray(lab_p), key)
      out[rows] = np.asarray(imgs)[:n]
      i, done = i + 1, done + n
      progress.log(f'[ldm] synthesized {done}/{len(labels)}' + (f' ({split})' if split != 'train' else ''))
  return out
