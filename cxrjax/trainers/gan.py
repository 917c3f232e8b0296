"""DCGAN and conditional DCGAN as generator backends of the generative pipeline.

`gan.conditional=False` (the poster's DCGAN): one unconditional generator per
class that needs synthetic images, trained on that class's training images
only. `gan.conditional=True` (the poster's cDCGAN): one generator over all
classes; during training each generated image's label is drawn at random with
P(label = 0, "healthy") = `gan.alpha` (the other classes share the rest
equally), so alpha = 0.5 is uniform for two classes.

One jitted step updates D and then G on a single state pytree, with the
non-saturating loss, Adam(2e-4, b1=0.5), an EMA of the generator, and the
options DiffAugment (Zhao et al. 2020) and an R1 penalty (Mescheder et al.
2018) for small data. Training stops with a clear message when the loss turns
NaN/Inf or when the discriminator wins completely for `gan.collapse_patience`
reports in a row (evidence in the message and the log); the last good
checkpoint is kept. A generator with fewer training images than
`gan.batch_size` (a minority of a dozen images) trains on batches of all of
them (`common.fit_batch`, as the LDM's stages do; recorded per generator as `batch_size`). The sample
grids' titles give the diversity within each class (pixels, against real
images of that class), since a grid mixing classes hides a collapse.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax import config_lib, progress, seeding
from cxrjax.backends.base import Backend
from cxrjax.data import pipeline
from cxrjax.eval import genquality, report
from cxrjax.models import DTYPES
from cxrjax.models.dcgan import Discriminator, Generator
from cxrjax.models.layers import STOCK, Layers
from cxrjax.trainers import common, loop
from cxrjax.trainers.program import Program


@flax.struct.dataclass
class GANState:
  step: jax.Array
  g_params: Any
  g_stats: Any
  d_params: Any
  d_stats: Any
  g_opt: Any
  d_opt: Any
  g_ema: Any  # {'params', 'batch_stats'}: what samples and synthesis use


def build(cfg, channels: int, num_classes: int, layers: Layers = STOCK) -> tuple[Generator, Discriminator]:
  g = cfg.gan
  k = num_classes if g.conditional else 0
  dtype = DTYPES[cfg.model.dtype]
  gen = Generator(
    image_size=cfg.data.image_size, channels=channels, latent_dim=g.latent_dim, base_width=g.g_width,
    num_classes=k, upsample=g.upsample, dtype=dtype, layers=layers,
  )  # fmt: skip
  disc = Discriminator(
    image_size=cfg.data.image_size, channels=channels, base_width=g.d_width, num_classes=k, norm=g.d_norm,
    dtype=dtype, layers=layers,
  )  # fmt: skip
  return gen, disc


def sample_labels(rng: jax.Array, batch: int, alpha: float, num_classes: int) -> jax.Array:
  """Generator labels: P(0) = alpha, the other classes share 1 - alpha equally."""
  probs = jnp.full((num_classes,), (1.0 - alpha) / (num_classes - 1)).at[0].set(alpha)
  return jax.random.choice(rng, num_classes, (batch,), p=probs).astype(jnp.int32)


# ----------------------------------------------------------------------------- DiffAugment


def _translate(x, rng, ratio: float = 0.125):
  """Random integer shift by up to ratio * size, zero-filled (differentiable in x)."""
  b, h, w, _ = x.shape
  sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(rng)
  dy = jax.random.randint(ky, (b,), -sy, sy + 1)
  dx = jax.random.randint(kx, (b,), -sx, sx + 1)
  padded = jnp.pad(x, ((0, 0), (sy, sy), (sx, sx), (0, 0)))

  def one(img, oy, ox):
    return jax.lax.dynamic_slice(img, (sy - oy, sx - ox, 0), (h, w, img.shape[-1]))

  return jax.vmap(one)(padded, dy, dx)


def _cutout(x, rng, ratio: float = 0.5):
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (b, 1, 1), 0, h + (1 - ch % 2))
  cx = jax.random.randint(kx, (b, 1, 1), 0, w + (1 - cw % 2))
  yy = jnp.arange(h)[None, :, None]
  xx = jnp.arange(w)[None, None, :]
  inside = (jnp.abs(yy - cy) < ch / 2) & (jnp.abs(xx - cx) < cw / 2)
  return x * (~inside)[..., None]


def _color(x, rng):
  kb, kc = jax.random.split(rng)
  b = x.shape[0]
  x = x + (jax.random.uniform(kb, (b, 1, 1, 1)) - 0.5)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (jax.random.uniform(kc, (b, 1, 1, 1)) + 0.5) + mean


def diffaugment(x: jax.Array, rng: jax.Array, policy: str) -> jax.Array:
  """Differentiable augmentation applied to real and fake images alike (Zhao et al. 2020)."""
  ops = {'color': _color, 'translation': _translate, 'cutout': _cutout}
  for i, name in enumerate(p for p in policy.split(',') if p):
    x = ops[name](x, jax.random.fold_in(rng, i))
  return x


# ----------------------------------------------------------------------------- step


def to_unit(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_gan_step(gen: Generator, disc: Discriminator, g_tx, d_tx, cfg, num_classes: int):
  g = cfg.gan
  conditional = bool(g.conditional)

  def step(state: GANState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    z_rng, lab_rng, aug_real, aug_fake, aug_g = jax.random.split(rng, 5)
    real = to_unit(batch['image'])
    bsz = real.shape[0]
    real_labels = batch['label'] if conditional else None
    fake_labels = sample_labels(lab_rng, bsz, g.alpha, num_classes) if conditional else None
    z = jax.random.normal(z_rng, (bsz, g.latent_dim), jnp.float32)
    aug = (lambda x, r: diffaugment(x, r, g.diffaugment)) if g.diffaugment else (lambda x, r: x)

    fake, g_mut = gen.apply(
      {'params': state.g_params, 'batch_stats': state.g_stats}, z, fake_labels, train=True, mutable=['batch_stats']
    )
    fake = jax.lax.stop_gradient(fake)

    def d_loss_fn(d_params):
      x_real = aug(real, aug_real)

      def d_real(x):
        out, mut = disc.apply({'params': d_params, 'batch_stats': state.d_stats}, x, real_labels, train=True,
                              mutable=['batch_stats'])  # fmt: skip
        return out.sum(), (out, mut)

      if g.r1_gamma > 0:
        (_, (logits_real, mut)), grad_x = jax.value_and_grad(d_real, has_aux=True)(x_real)
        r1 = jnp.mean(jnp.sum(grad_x.reshape(bsz, -1) ** 2, axis=-1))
      else:
        _, (logits_real, mut) = d_real(x_real)
        r1 = jnp.zeros(())
      logits_fake, mut = disc.apply({'params': d_params, 'batch_stats': mut['batch_stats']}, aug(fake, aug_fake),
                                    fake_labels, train=True, mutable=['batch_stats'])  # fmt: skip
      loss = jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake))
      total = loss + 0.5 * g.r1_gamma * r1
      aux = dict(d_loss=loss, r1=r1, d_real=jnp.mean(jax.nn.sigmoid(logits_real)),
                 d_fake=jnp.mean(jax.nn.sigmoid(logits_fake)))  # fmt: skip
      return total, (aux, mut['batch_stats'])

    (_, (d_aux, d_stats)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params)
    d_updates, d_opt = d_tx.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    def g_loss_fn(g_params):
      fake, mut = gen.apply({'params': g_params, 'batch_stats': state.g_stats}, z, fake_labels, train=True,
                            mutable=['batch_stats'])  # fmt: skip
      logits, _ = disc.apply({'params': d_params, 'batch_stats': d_stats}, aug(fake, aug_g), fake_labels, train=True,
                             mutable=['batch_stats'])  # fmt: skip
      return jnp.mean(jax.nn.softplus(-logits)), mut['batch_stats']  # non-saturating

    (g_loss, g_stats), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
    g_updates, g_opt = g_tx.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    del g_mut
    d = jnp.minimum(g.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    g_ema = jax.tree.map(lambda e, x: d * e + (1 - d) * x, state.g_ema, {'params': g_params, 'batch_stats': g_stats})
    new = state.replace(step=state.step + 1, g_params=g_params, g_stats=g_stats, d_params=d_params, d_stats=d_stats,
                        g_opt=g_opt, d_opt=d_opt, g_ema=g_ema)  # fmt: skip
    return new, dict(g_loss=g_loss, **d_aux)

  return step


# ----------------------------------------------------------------------------- training


def program(cfg, channels: int, num_classes: int, backend: Backend, key: jax.Array) -> Program:
  """The (c)DCGAN training program: G and D on `backend`'s layers, Adam, one jitted D-then-G step.

  Args:
    cfg: the experiment config (`cfg.gan`, `cfg.data.image_size`, `cfg.model.dtype`).
    channels: image channels.
    num_classes: classes of the data (the generator is conditional on them when `gan.conditional`).
    backend: the platform backend.
    key: the initialization key.
  """
  g = cfg.gan
  gen, disc = build(cfg, channels, num_classes, backend.layers)
  g_tx = backend.adam(g.lr_g, b1=g.b1, b2=g.b2)
  d_tx = backend.adam(g.lr_d, b1=g.b1, b2=g.b2)
  size = cfg.data.image_size
  k = num_classes if g.conditional else 0

  def init_fn():
    kg, kd = jax.random.split(key)
    z = jnp.zeros((2, g.latent_dim))
    y = jnp.zeros((2,), jnp.int32) if k else None
    gv = gen.init(kg, z, y, train=False)
    dv = disc.init(kd, jnp.zeros((2, size, size, channels)), y, train=False)
    return GANState(
      step=jnp.zeros((), jnp.int32), g_params=gv['params'], g_stats=gv.get('batch_stats', {}), d_params=dv['params'],
      d_stats=dv.get('batch_stats', {}), g_opt=g_tx.init(gv['params']), d_opt=d_tx.init(dv['params']),
      g_ema={'params': gv['params'], 'batch_stats': gv.get('batch_stats', {})},
    )  # fmt: skip

  return Program(
    name='dcgan',
    init=init_fn,
    step=make_gan_step(gen, disc, g_tx, d_tx, cfg, max(num_classes, 2)),
    init_options=backend.compile_options('init'),
    step_options=backend.compile_options('dcgan'),
    modules={'generator': gen, 'discriminator': disc},
  )


def _train_one(cfg, workdir: str, images_split, mesh, num_classes: int, channels: int, name: str, class_names,
               backend: Backend):  # fmt: skip
  """Trains one generator (conditional over all classes, or on one class's images)."""
  g = cfg.gan
  gseed = config_lib.generator_seed(cfg)
  prog = program(cfg, channels, num_classes, backend, seeding.jax_key(gseed, f'gan/{name}/init'))
  gen = prog.modules['generator']
  k = num_classes if g.conditional else 0

  batch = common.fit_batch(g.batch_size, len(images_split), mesh, f'[gan:{name}]', 'gan.batch_size')
  sample = make_sampler(gen, k)
  fixed_z = jax.random.normal(seeding.jax_key(gseed, 'gan/grid'), (64, g.latent_dim))
  # Grid rows of 8 cycle through the classes: row r shows class r % k.
  grid_y = (np.arange(64) // 8) % max(k, 1)
  fixed_y = jnp.asarray(grid_y, jnp.int32) if k else None
  # Diversity is judged within each class the grid shows (a mixed-class grid hides a collapse):
  # the grid's images of a class against up to 64 real training images of that class.
  shown = {c: class_names[c] for c in sorted(set(grid_y.tolist()))} if k else {None: name}
  real_div = {}
  for c in shown:
    real = images_split.images if c is None else images_split.images[images_split.labels == c]
    real_div[c] = genquality.mean_pairwise_distance(genquality.pixel_rows(real[:64])) if len(real) else 0.0
  streak: list[dict] = []

  def watch(step, state, m):
    # The discriminator "wins completely": it sees through every fake while
    # recognising every real image, and G's gradient vanishes.
    if m['d_real'] > 1 - g.collapse_margin and m['d_fake'] < g.collapse_margin:
      streak.append(dict(step=step, **{key: round(v, 4) for key, v in m.items()}))
    else:
      streak.clear()
    if len(streak) >= g.collapse_patience:
      raise loop.TrainingDiverged(
        f'[gan:{name}] discriminator won completely for {len(streak)} reports (steps {streak[0]["step"]}-{step}):'
        f' D(real)={m["d_real"]:.4f} D(fake)={m["d_fake"]:.4f} G loss {m["g_loss"]:.2f}; stopped, last good'
        f' checkpoint in {workdir}/ckpt (try gan.diffaugment=color,translation,cutout or gan.r1_gamma=10)'
      )
    if (step % g.sample_every == 0 or step == g.steps) and jax.process_index() == 0:
      imgs = np.asarray(sample(state.g_ema, fixed_z, fixed_y))
      ratios = {}
      for c, cname in shown.items():
        own = imgs if c is None else imgs[grid_y == c]
        if real_div[c] > 0:
          ratios[cname] = genquality.mean_pairwise_distance(genquality.pixel_rows(own)) / real_div[c]
      worst = min(ratios, key=ratios.get) if ratios else None
      if worst is not None:
        m['diversity_ratio'] = ratios[worst]  # the lowest class's
      if not k:
        div = f'diversity {ratios[worst]:.2f} x real' if worst else 'diversity: no real reference'
        title = f'DCGAN samples (EMA), step {step}, class {name}; {div} (pixels)'
      else:
        each = ', '.join(f'{n} {v:.2f}' for n, v in ratios.items()) if len(ratios) <= 4 else ''
        div = (f'lowest {worst} {ratios[worst]:.2f}' + (f' ({each})' if each else '')) if worst else 'none'
        title = (f'cDCGAN samples (EMA), step {step}, rows cycle classes {", ".join(class_names)};\n'
                 f'diversity within class x real (pixels): {div}')  # fmt: skip
      report.save_image_grid(imgs, os.path.join(workdir, 'samples', f'step_{step:06d}.png'), nrow=8, title=title)

  result = loop.run(
    prog,
    name=f'gan:{name}',
    workdir=workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.split_batches(
      images_split,
      global_batch=batch,
      total_steps=g.steps,
      seed=seeding.int_seed(gseed, f'gan/{name}/data'),
      start_step=start,
    ),  # fmt: skip
    total_steps=g.steps,
    rng=seeding.jax_key(gseed, f'gan/{name}/step'),
    log_every=g.log_every,
    checkpoint_every=g.checkpoint_every,
    fsdp_min_size=cfg.mesh.fsdp_min_size,
    config_hash=config_lib.generator_hash(cfg),
    callbacks=[watch],
    batch_size=batch,
  )
  return gen, result, batch


def make_sampler(gen: Generator, num_classes: int):
  @jax.jit
  def sample(ema, z, labels):
    return to_uint8(gen.apply(ema, z, labels if num_classes else None, train=False))

  return sample


def train(cfg, gen_dir: str, data, mesh, needed: dict[int, int], backend: Backend) -> tuple[dict, dict]:
  """Trains the cDCGAN (one generator) or the DCGANs (one per class that needs images)."""
  k = data.num_classes
  names = data.dataset.class_names
  channels = data.dataset.image_shape[-1]
  generators, records = {}, {}
  if cfg.gan.conditional:
    gen, res, batch = _train_one(cfg, gen_dir, data.train, mesh, k, channels, 'conditional', names, backend)
    generators['conditional'] = (gen, res.state.g_ema)
    records['conditional'] = dict(
      step=res.step, wall_time_s=res.wall_time_s, batch_size=batch, last=res.history[-1] if res.history else None
    )
    samples = os.path.join('generator', 'samples', f'step_{res.step:06d}.png')
  else:
    samples = ''
    for c, n in needed.items():
      if n <= 0:
        continue
      idx = np.flatnonzero(data.train.labels == c)
      sub = data.train.take(idx)
      gen, res, batch = _train_one(cfg, os.path.join(gen_dir, f'class_{c}'), sub, mesh, k, channels, names[c], names,
                                   backend)  # fmt: skip
      generators[c] = (gen, res.state.g_ema)
      records[names[c]] = dict(step=res.step, wall_time_s=res.wall_time_s, trained_on=int(len(idx)), batch_size=batch,
                               last=res.history[-1] if res.history else None)  # fmt: skip
      samples = samples or os.path.join('generator', f'class_{c}', 'samples', f'step_{res.step:06d}.png')
  g = cfg.gan
  kind = 'cdcgan' if g.conditional else 'dcgan'
  desc = (f'conditional DCGAN over {k} classes, alpha={g.alpha}' if g.conditional
          else 'DCGAN per minority class, trained on that class only')  # fmt: skip
  clamped = {n: r['batch_size'] for n, r in records.items() if r['batch_size'] != g.batch_size}
  info = dict(
    kind=kind,
    description=f'{desc}; G width {g.g_width}, D width {g.d_width}, {g.steps} steps, batch {g.batch_size}'
    + (' (all images when fewer: ' + ', '.join(f'{n} {b}' for n, b in clamped.items()) + ')' if clamped else '')
    + (f', DiffAugment {g.diffaugment}' if g.diffaugment else '')
    + (f', R1 {g.r1_gamma}' if g.r1_gamma else ''),
    step=max(r['step'] for r in records.values()) if records else 0,
    wall_time_s=sum(r['wall_time_s'] for r in records.values()),
    config_hash=config_lib.generator_hash(cfg),
    details=dict(conditional=bool(g.conditional), alpha=g.alpha if g.conditional else None, generators=records),
    samples_png=samples,
  )
  return info, dict(generators=generators, conditional=bool(g.conditional))


def synthesize(cfg, handle: dict, data, labels: np.ndarray, split: str = 'train') -> np.ndarray:
  """uint8 images for `labels`, from the EMA generator(s), seeded; each `split` ('train', 'val') has its own noise."""
  if split == 'test':
    raise ValueError('synthetic images are never made for the test split')
  stream = 'gan/synthesize' if split == 'train' else f'gan/synthesize/{split}'
  out = np.zeros((len(labels), *data.dataset.image_shape), np.uint8)
  bs = cfg.gan.synth_batch
  for c in sorted(set(labels.tolist())):
    gen, ema = handle['generators']['conditional' if handle['conditional'] else c]
    sample = make_sampler(gen, data.num_classes if handle['conditional'] else 0)
    idx = np.flatnonzero(labels == c)
    for i, start in enumerate(range(0, len(idx), bs)):
      part = idx[start : start + bs]
      z = jax.random.normal(seeding.jax_key(cfg.seed, f'{stream}/{c}/{i}'), (bs, cfg.gan.latent_dim))
      y = jnp.full((bs,), c, jnp.int32)
      out[part] = np.asarray(sample(ema, z, y))[: len(part)]
    progress.log(f'[gan] synthesized {len(idx)} images of class {c}')
  return out
