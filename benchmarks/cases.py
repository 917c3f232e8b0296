"""What the benchmark times: one `Case` per row, its JAX side built by the trainers' program factories.

- resnet18_28 / resnet18_64: ResNet-18 (CIFAR stem, 1 channel, 2 classes), `classifier.program`.
- efficientnet_v2_b0 / efficientnet_v2_s: 64 px, 1 channel, 2 classes, `classifier.program` (stem 'auto':
  stride 1 at 64 px; stochastic depth 0.2); batch 32, a quarter of the others', since their steps at this
  resolution are the slowest of the set on a CPU.
- dcgan: the unconditional 64-px DCGAN, `gan.program` (D with BatchNorm, the config's upsampling, EMA
  of G); then its sampler (`gan.make_sampler`, G in eval mode on the EMA variables, to uint8).
- unet: the latent UNet denoiser, `ldm.diffusion_program` with an identity encoder in place of the
  autoencoder (random unit-variance latents, scale 1: the autoencoder is not timed); then DDIM with
  classifier-free guidance over latents (`diffusion.ddim_sample`, the core of `ldm.make_sampler`
  without the decoder).
- pipeline: the Grain training pipeline over PneumoniaMNIST (`measure_pipeline`), host only.

A training case's JAX side is its `program`: `program.init` and `program.step`, jitted with
`program.init_options` and `program.step_options` (`timing.jax_step_runner`), fed a fixed random batch
with the keys and dtypes the trainer's input pipeline yields. Its bfloat16 variant is the same factory
with `config.model.dtype='bfloat16'`, which every one of these programs reads. The PyTorch side is the
twin network (`torch_models`) in the step of `torch_steps`, built in the PyTorch process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import timing
from benchmarks.plan import Variant
from cxrjax import config_lib, diffusion, seeding
from cxrjax.backends.base import Backend
from cxrjax.data import pipeline, rebalance, sources
from cxrjax.data.augment import AugmentParams
from cxrjax.trainers import classifier, gan, ldm
from cxrjax.trainers.program import Program

MODELS = ('resnet18_28', 'resnet18_64', 'dcgan', 'unet', 'efficientnet_v2_b0', 'efficientnet_v2_s')
EXTRAS = ('pipeline',)
CLASSIFIERS = ('resnet18_28', 'resnet18_64', 'efficientnet_v2_b0', 'efficientnet_v2_s')
NUM_CLASSES = 2
# Only the classifier's learning-rate schedule reads these (constant by default).
STEPS_PER_EPOCH = 100

# Full and --quick settings per model.
FULL = dict(
  resnet18_28=dict(batch=128, image_size=28, width=64),
  resnet18_64=dict(batch=128, image_size=64, width=64),
  dcgan=dict(batch=128, image_size=64, width=64, sample_batch=256),
  unet=dict(batch=128, latent_size=14, base=64, heads=4, sample_batch=64, sample_steps=50),
  efficientnet_v2_b0=dict(batch=32, image_size=64, width=1.0, depth=1.0),
  efficientnet_v2_s=dict(batch=32, image_size=64, width=1.0, depth=1.0),
  pipeline=dict(batch=128, batches=24),
)
QUICK = dict(
  # Width 16, not 8: PyTorch 2.13 corrupts the heap in the backward pass of a channels_last 1x1 stride-2
  # convolution with 8 input channels on 64x64 maps (ResNet-18's first projection at width 8).
  resnet18_28=dict(batch=8, image_size=28, width=16),
  resnet18_64=dict(batch=4, image_size=64, width=16),
  dcgan=dict(batch=8, image_size=64, width=8, sample_batch=16),
  unet=dict(batch=8, latent_size=14, base=16, heads=2, sample_batch=4, sample_steps=5),
  efficientnet_v2_b0=dict(batch=4, image_size=64, width=0.25, depth=0.25),
  efficientnet_v2_s=dict(batch=4, image_size=64, width=0.25, depth=0.25),
  pipeline=dict(batch=32, batches=4),
)


def program_name(model: str) -> str | None:
  """The program a benchmark model's worker mostly runs (`entry.configure`); None for the pipeline."""
  if model == 'pipeline':
    return None
  return 'resnet18' if model.startswith('resnet18') else model


@dataclasses.dataclass
class Case:
  """One row: the trainer's program (JAX side), the PyTorch twin, and what the row describes.

  Attributes:
    model: the row's name.
    kind: 'train' (a training step) or 'sample' (a sampling call).
    batch: images (or latents) per step or call.
    image_size: side of the input: pixels, or latent size.
    input_shape: one input's shape (HWC).
    config: the experiment config the program was built from (float32).
    program: the trainer's program, from its factory with `config` and the backend.
    build_program: dtype -> the same factory's program with `config.model.dtype = dtype`.
    jax_batch: a training case's batch, host arrays as the trainer's input pipeline yields them.
    sampler: a sampling case's `program -> (fn(variables, *args), init() -> variables, args)`.
    torch_build: `Variant -> step()`, the PyTorch twin (imports torch: the PyTorch process only).
    count_torch: the twin's parameter count (imports torch).
    notes: what the row measures, in words.
  """

  model: str
  kind: str
  batch: int
  image_size: int
  input_shape: tuple
  config: ml_collections.ConfigDict
  program: Program
  build_program: Callable[[str], Program]
  torch_build: Callable[[Variant], Callable[[], Any]]
  count_torch: Callable[[], int]
  jax_batch: dict | None = None
  sampler: Callable[[Program], tuple[Callable, Callable, tuple]] | None = None
  notes: str = ''

  def program_for(self, dtype: str) -> Program:
    return self.program if dtype == self.config.model.dtype else self.build_program(dtype)

  def jax_runner(self, variant: Variant) -> timing.Runner:
    """The JAX variant built and warmed up: the program of its dtype, as the trainer compiles it."""
    program = self.program_for(variant.dtype)
    if self.jax_batch is not None:
      return timing.jax_step_runner(program, self.jax_batch, variant)
    fn, init, args = self.sampler(program)
    return timing.jax_call_runner(fn, init, args, program.init_options, variant)

  def num_params(self) -> int:
    """Trainable parameters of the JAX side: the program's state, or what a sampler reads."""
    if self.kind == 'train':
      return self.program.num_params()
    _, init, _ = self.sampler(self.program)
    params = jax.eval_shape(init)
    params = params.get('params', params) if isinstance(params, dict) else params
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def trainer_batch(images: np.ndarray, labels: np.ndarray) -> dict:
  """A batch with the keys and dtypes of the Grain pipeline's (`cxrjax.data.pipeline`)."""
  return dict(image=images, label=labels.astype(np.int32), weight=np.ones(len(labels), np.float32))


def random_images(batch: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def _torch_models():
  from benchmarks import torch_models  # noqa: PLC0415 - imports torch: the PyTorch process only

  return torch_models


def _torch_steps():
  from benchmarks import torch_steps  # noqa: PLC0415 - imports torch: the PyTorch process only

  return torch_steps


def _count_torch(*modules) -> int:
  return sum(_torch_models().count_params(m) for m in modules)


# ----------------------------------------------------------------------------- classifiers


def classifier_config(name: str, s: dict, dtype: str = 'float32') -> ml_collections.ConfigDict:
  """The base config with the case's model: ResNet-18 (CIFAR stem, `width`) or EfficientNetV2 multipliers."""
  config = config_lib.base_config()
  config.model.name = program_name(name)
  config.model.dtype = dtype
  if config.model.name == 'resnet18':
    config.model.width, config.model.stem = s['width'], 'cifar'
  else:
    config.model.width_mult, config.model.depth_mult = s['width'], s['depth']
  config.data.image_size = s['image_size']
  config.batch_size = s['batch']
  return config


def classifier_case(name: str, s: dict, backend: Backend) -> Case:
  """A classifier's training step: `classifier.program` (weighted cross-entropy, Adam, the config's model)."""
  batch, size = s['batch'], s['image_size']
  shape = (size, size, 1)

  def build(dtype: str) -> Program:
    config = classifier_config(name, s, dtype)
    return classifier.program(config, NUM_CLASSES, shape, backend, config.num_epochs * STEPS_PER_EPOCH,
                              STEPS_PER_EPOCH)  # fmt: skip

  config = classifier_config(name, s)
  program = build(config.model.dtype)
  model = program.modules['classifier']
  images = random_images(batch, size, 1)
  labels = np.arange(batch) % NUM_CLASSES
  optim = config.optim

  def torch_model():
    tm = _torch_models()
    if config.model.name == 'resnet18':
      return tm.ResNet18(NUM_CLASSES, s['width'], 'cifar', 1)
    return tm.EfficientNetV2(NUM_CLASSES, model.variant, width=s['width'], depth=s['depth'],
                             stem_stride=model.stem_stride, drop_path_rate=model.drop_path_rate, in_channels=1)  # fmt: skip

  def torch_build(variant: Variant):
    return _torch_steps().classifier_train(torch_model(), images, labels, optim.lr, (optim.b1, optim.b2), variant)

  if config.model.name == 'resnet18':
    what = f'ResNet-18 CIFAR stem, width {s["width"]}'
  else:
    what = (f'EfficientNetV2-{model.variant.upper()}, stem stride {model.stem_stride}, width x{s["width"]},'
            f' depth x{s["depth"]}')  # fmt: skip
  return Case(
    name, 'train', batch, size, shape, config, program, build, torch_build, lambda: _count_torch(torch_model()),
    jax_batch=trainer_batch(images, labels),
    notes=f'{what}, 1 channel, {NUM_CLASSES} classes, {optim.name} {optim.lr:g}, loss {config.loss.name}',
  )  # fmt: skip


# ----------------------------------------------------------------------------- DCGAN


def gan_config(s: dict, dtype: str = 'float32', upsample: str | None = None) -> ml_collections.ConfigDict:
  """The base config's unconditional DCGAN at the case's size and widths."""
  config = config_lib.base_config()
  config.model.dtype = dtype
  config.data.image_size = s['image_size']
  config.data.channels = s.get('channels', 1)
  config.gan.g_width = config.gan.d_width = s['width']
  config.gan.batch_size = s['batch']
  config.gan.conditional = False
  if upsample is not None:
    config.gan.upsample = upsample
  return config


def dcgan_cases(s: dict, backend: Backend, upsample: str | None = None) -> list[Case]:
  """The DCGAN's training step (`gan.program`) and its sampler in eval mode.

  Args:
    s: settings (batch, image_size, width, sample_batch; optional channels).
    backend: the backend the program is built for.
    upsample: `config.gan.upsample` ('transpose' or 'resize'); None keeps the config's default.
  """
  config = gan_config(s, upsample=upsample)
  g = config.gan
  batch, size, channels, latent = s['batch'], s['image_size'], config.data.channels, g.latent_dim
  shape = (size, size, channels)
  key = seeding.jax_key(config.seed, 'gan/benchmark/init')

  def build(dtype: str) -> Program:
    return gan.program(gan_config(s, dtype, upsample), channels, NUM_CLASSES, backend, key)

  program = build(config.model.dtype)
  images = random_images(batch, size, channels, seed=1)

  def torch_nets():
    tm = _torch_models()
    gen = tm.Generator(size, channels, latent, g.g_width, 0, g.upsample)
    return gen, tm.Discriminator(size, channels, g.d_width, 0, g.d_norm)

  def torch_train(variant: Variant):
    return _torch_steps().dcgan_train(*torch_nets(), images, latent, g, variant)

  train = Case(
    'dcgan', 'train', batch, size, shape, config, program, build, torch_train, lambda: _count_torch(*torch_nets()),
    jax_batch=trainer_batch(images, np.zeros(batch)),
    notes=f'{size}-px DCGAN G+D step (ngf=ndf={g.g_width}, upsample {g.upsample!r}, D norm {g.d_norm!r}), Adam'
    f' {g.lr_g:g} b1 {g.b1}, non-saturating loss, EMA of G',
  )  # fmt: skip

  sb = s['sample_batch']
  z = np.random.default_rng(2).standard_normal((sb, latent)).astype(np.float32)

  def sampler(program: Program):
    sample = gan.make_sampler(program.modules['generator'], 0)
    return (lambda ema, z: sample(ema, z, None)), (lambda: program.init().g_ema), (jnp.asarray(z),)

  def torch_sample(variant: Variant):
    return _torch_steps().dcgan_sample(torch_nets()[0], z, variant)

  sample = Case(
    'dcgan_sample', 'sample', sb, size, shape, config, program, build, torch_sample,
    lambda: _count_torch(torch_nets()[0]), sampler=sampler,
    notes='DCGAN G forward in eval mode (EMA variables), to uint8',
  )  # fmt: skip
  return [train, sample]


# ----------------------------------------------------------------------------- latent UNet


def ldm_config(s: dict, dtype: str = 'float32') -> ml_collections.ConfigDict:
  """The base config's latent UNet at the case's width, heads, batch and DDIM steps."""
  config = config_lib.base_config()
  config.model.dtype = dtype
  config.ldm.unet.base_channels = s['base']
  config.ldm.unet.num_heads = s['heads']
  config.ldm.unet.batch_size = s['batch']
  config.ldm.sample_steps = s['sample_steps']
  return config


def _identity_encoder(x, rng):
  del rng
  return x


def unet_cases(s: dict, backend: Backend) -> list[Case]:
  """The latent denoiser's training step (`ldm.diffusion_program`, no autoencoder) and DDIM sampling."""
  config = ldm_config(s)
  lc, u = config.ldm, config.ldm.unet
  batch, hw, ch = s['batch'], s['latent_size'], lc.ae.latent_channels
  shape = (hw, hw, ch)
  key = seeding.jax_key(config.seed, 'ldm/benchmark/init')

  def build(dtype: str) -> Program:
    return ldm.diffusion_program(ldm_config(s, dtype), NUM_CLASSES, shape, _identity_encoder, 1.0, backend, key)

  program = build(config.model.dtype)
  schedule = diffusion.make_schedule(lc.schedule, lc.num_timesteps)
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((batch, *shape)).astype(np.float32)
  labels = np.arange(batch) % NUM_CLASSES

  def torch_unet():
    return _torch_models().UNet(ch, NUM_CLASSES, u.base_channels, tuple(u.channel_mults), u.num_res_blocks,
                                tuple(u.attention_levels), u.num_heads, u.dropout)  # fmt: skip

  def torch_train(variant: Variant):
    return _torch_steps().unet_train(torch_unet(), latents, labels, schedule, lc, variant)

  # The step maps batch['image'] through `to_unit` (x / 127.5 - 1) and the encoder; with the identity
  # encoder and scale 1, these float 'images' arrive as the latents above.
  jax_batch = trainer_batch((latents + 1.0) * 127.5, labels)
  count_torch = lambda: _count_torch(torch_unet())  # noqa: E731
  train = Case(
    'unet', 'train', batch, hw, shape, config, program, build, torch_train, count_torch, jax_batch=jax_batch,
    notes=f'latent UNet denoiser step, base {u.base_channels}, mults {tuple(u.channel_mults)},'
    f' {u.num_res_blocks} res blocks, attention at {tuple(u.attention_levels)}, {u.num_heads} heads, random'
    f' {hw}x{hw}x{ch} latents (no autoencoder), {lc.prediction!r} prediction, Adam {u.lr:g}, label dropout'
    f' {lc.label_dropout}, EMA',
  )  # fmt: skip

  sb, steps = s['sample_batch'], lc.sample_steps
  sample_labels = (np.arange(sb) % NUM_CLASSES).astype(np.int32)

  def sampler(program: Program):
    unet = program.modules['unet']

    def sample(params, labels, key):
      apply = lambda x_t, t, y: unet.apply({'params': params}, x_t, t, y)  # noqa: E731
      return diffusion.ddim_sample(apply, schedule, (labels.shape[0], *shape), labels, key, num_steps=steps,
                                   eta=0.0, guidance_scale=lc.guidance_scale, prediction=lc.prediction,
                                   null_label=NUM_CLASSES)  # fmt: skip

    return sample, (lambda: program.init().ema), (jnp.asarray(sample_labels), jax.random.key(4))

  def torch_sample(variant: Variant):
    return _torch_steps().ddim_sample(torch_unet(), sample_labels, shape, schedule, lc, variant)

  sample = Case(
    f'ldm_ddim{steps}_sample', 'sample', sb, hw, shape, config, program, build, torch_sample, count_torch,
    sampler=sampler,
    notes=f'DDIM-{steps} (eta 0) over {hw}x{hw}x{ch} latents with guidance {lc.guidance_scale:g}'
    ' (cond + uncond in one call per step); latents only, no decoder',
  )  # fmt: skip
  return [train, sample]


def cases_for(name: str, quick: bool, backend: Backend) -> list[Case]:
  """The cases (rows) of one benchmark model, built for `backend`."""
  s = (QUICK if quick else FULL)[name]
  if name in CLASSIFIERS:
    return [classifier_case(name, s, backend)]
  if name == 'dcgan':
    return dcgan_cases(s, backend)
  if name == 'unet':
    return unet_cases(s, backend)
  raise ValueError(f'unknown model {name!r}')


# ----------------------------------------------------------------------------- input pipeline


def data_dir() -> Path:
  """$CXRJAX_DATA_DIR, else ../shared/data beside the checkout (as the tests)."""
  env = os.environ.get('CXRJAX_DATA_DIR')
  return Path(env) if env else Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def measure_pipeline(s: dict, reps: int, log) -> list[dict]:
  """Images/s of the Grain training pipeline on PneumoniaMNIST with 1 and 2 threads (rows of kind 'input')."""
  path = data_dir() / 'pneumoniamnist.npz'
  base = dict(model='grain_pipeline', kind='input', jax_images_per_s=None, torch_images_per_s=None, ratio=None,
              compile_s=None, peak_mem_mb=None, batch=s['batch'], image_size=28, input_shape=[28, 28, 1])  # fmt: skip
  if not path.is_file():
    return [dict(base, images_per_s=None, notes=f'{path} not found: set CXRJAX_DATA_DIR')]
  cfg = config_lib.base_config()
  ds = sources.load_npz(str(path), 28, 1, 0)
  ts = rebalance.build_training_set(ds.splits['train'], ds.num_classes, cfg.rebalance, cfg.seed)
  augment = AugmentParams.from_config(cfg.data.augment)
  batch, n = s['batch'], s['batches']
  warm = cfg.data.prefetch + 2
  spe = pipeline.steps_per_epoch(ts, batch)
  epochs = math.ceil((warm + reps * n) / spe) + 1
  rows = []
  for threads in (1, 2):
    tds = pipeline.make_train_dataset(ts, global_batch=batch, num_epochs=epochs, seed=cfg.seed, augment=augment)
    it = pipeline.train_iterator(tds, 0, num_threads=threads, prefetch=cfg.data.prefetch)
    for _ in range(warm):  # more than the prefetch buffer, so the timed batches are produced while timed
      next(it)
    per_batch = []
    for _ in range(reps):
      t = time.perf_counter()
      for _ in range(n):
        next(it)
      per_batch.append((time.perf_counter() - t) / n)
    ips = batch / statistics.median(per_batch)
    log(f'  grain pipeline, {threads} thread(s): {ips:.0f} images/s')
    rows.append(dict(base, model=f'grain_pipeline_threads{threads}', images_per_s=round(ips, 1), num_threads=threads,
                     images_per_s_range=[round(batch / max(per_batch), 1), round(batch / min(per_batch), 1)],
                     steps_per_rep=n, reps=reps, load_avg=round(os.getloadavg()[0], 2),
                     notes=f'PneumoniaMNIST train split ({len(ts.plan)} images), default augmentation,'
                     f' prefetch {cfg.data.prefetch}'))  # fmt: skip
  return rows
