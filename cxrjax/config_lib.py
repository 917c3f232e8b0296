"""Experiment configuration: the shared base, profiles, and validation.

Every file in `configs/` is `get_config(arg)` = `base_config()` plus a few
changed fields, passed through `with_profile(config, arg)`. The profile argument
comes after a colon on the command line (`configs/baseline.py:smoke`):

* `full`  (default) published architectures and schedules, for GPU/TPU users;
* `cpu`   narrower models and shorter schedules that finish on a 2-core CPU;
* `smoke` tiny widths, one short epoch and capped data: about a minute.

`finalize(config)` is the single place where a config is validated before
anything trains; it raises `UserError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import ml_collections

from cxrjax.data import medical
from cxrjax.errors import UserError

PROFILES = ('full', 'cpu', 'smoke')
TRAINERS = ('classifier', 'gan', 'ldm')
SOURCES = ('auto', 'npz', 'folder', 'tfds', 'phantom')
MODELS = ('resnet18', 'efficientnet_v2_b0', 'efficientnet_v2_s', 'inception_v3')
INPUT_NORMS = ('auto', 'none', 'imagenet', 'inception')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')
LOSSES = ('ce', 'focal')
REBALANCE_METHODS = ('none', 'class_weights', 'undersample', 'oversample', 'smote', 'augment', 'synthetic')
SELECT_METRICS = (
  'auroc',
  'auprc',
  'accuracy',
  'balanced_accuracy',
  'f1',
  'mcc',
  'kappa',
  'youden_j',
  'loss',
)

# Keys added after runs existed, with the value that means "as before": at that value they
# hash like their absence, so adding such an option never invalidates finished workdirs.
OPTIONAL_KEYS = {
  'quality.inception_weights': '',
  'model.pretrained': '',
  'model.pretrained_head': False,
  'model.input_norm': 'auto',
  'model.batch_norm': 'train',
  'model.aux_logits': False,
  'model.aux_loss_weight': 0.4,
  'model.dropout_rate': 0.5,
  'optim.backbone_lr_mult': 1.0,
  'optim.freeze_backbone_epochs': 0.0,
  'data.split_dirs': '',
  'data.test_prevalence': '',
  'data.dicom_window': '',
  'data.nifti_axis': 2,
  'data.nifti_slices': 'middle',
  'data.sources': '',
  'data.source_duplicates': 'drop',
  'data.source_check': False,
  'rebalance.synthetic_dose': 0.0,
  'rebalance.dose_classes': 'minority',
  'rebalance.synthetic_only': False,
  'quality.tstr': False,
  'rebalance.synthetic_val': False,
  'rebalance.synthetic_val_select': False,
  'rebalance.synthetic_val_rule': 'proportion',
  'ldm.per_class_finetune': False,
  'ldm.finetune_steps': 0,
  'ldm.finetune_lr': 0.0,
}

SPLIT_KEYS = ('train', 'val', 'test')

KERNELS = ('auto', 'stock', 'cpu')  # config.kernels: see cxrjax.backends
LEGACY_CONVOLUTION = {'auto': 'auto', 'cpu': 'onednn', 'stock': 'xla'}
# Renamed keys: an override of the old name is refused with the new one.
RENAMED_KEYS = {'convolution': 'kernels (auto, stock or cpu; was auto, xla or onednn)'}

# Keys that change how a run is executed or logged but not what it computes;
# they are left out of the config hash that guards a workdir.
RUNTIME_KEYS = (
  'log_every_steps',
  'data.num_workers',
  'data.num_threads',
  'data.prefetch',
  'data.cache_dir',
  'checkpoint_every_steps',
  'overwrite',
  'generator_dir',
  # The collapse verdict is re-derived from gen_metrics.json's numbers on every run, and the
  # gate decides only whether stage 4 runs: changing them must not redo a generator.
  'quality.collapse_min_diversity',
  'quality.collapse_min_recall',
  'quality.collapse_min_real',
  'quality.on_collapse',
)


def base_config() -> ml_collections.ConfigDict:
  """The shared defaults: the poster's protocol with a ResNet-18 classifier."""
  c = ml_collections.ConfigDict()
  c.trainer = 'classifier'
  c.seed = 0
  c.profile = 'full'
  c.generator_tag = ''  # names the synthetic set (default: the trainer name)
  c.generator_seed = -1  # seeds generator training; -1: config.seed
  c.generator_dir = ''  # where the generator is trained/stored; default workdir/generator (a sweep shares it)
  c.overwrite = False  # reuse a workdir made with another config (set by --overwrite)

  c.data = ml_collections.ConfigDict()
  # 'auto': data.path, else $CXRJAX_DATA_DIR, else a prepared or downloadable
  # TFDS dataset, else the phantom (announced loudly and recorded everywhere).
  c.data.source = 'auto'
  c.data.path = ''  # npz file or folder; relative paths also tried under $CXRJAX_DATA_DIR
  c.data.image_size = 28
  c.data.channels = 1
  c.data.num_classes = 0  # 0: inferred from the data
  c.data.positive_class = 1  # the class whose probability is scored in binary tasks
  c.data.subclasses = ''  # folders: split a class by file name, e.g. 'PNEUMONIA:bacteria=bacterial|virus=viral'
  c.data.class_names = ''  # comma-separated; default: folder names, or from the npz name
  c.data.val_fraction = 0.1  # carved from train (grouped by patient) if no val split
  c.data.test_fraction = 0.2  # carved from all images if a folder tree has no split folders
  # Folders: which top-level folders are the splits, e.g. 'train=Training,val=Validation,test=Testing';
  # '' recognises them by name (train/training, val/valid/validation/dev, test/testing, any case).
  c.data.split_dirs = ''
  # The test split's class mix, e.g. '1,1' (subsampled, never upsampled; seeded by the data seed); '' = as found.
  c.data.test_prevalence = ''
  c.data.group_regex = r'(person\d+|IM-\d+)'  # patient id in file names
  # Several sources in one dataset (cxrjax.data.multi_source); '' reads data.path alone. Entries separated
  # by ';', each 'PATH | CLASS_MAP | SPLITS | GROUP_REGEX' (the last two optional):
  #   PATH       a folder tree or an npz; relative paths are also tried under $CXRJAX_DATA_DIR
  #   CLASS_MAP  'FROM:TO,...': FROM a class folder (or data.subclasses name), or for an npz a label index
  #              (or its class name); TO the dataset's class. '*:TO' maps every class. Unmapped classes are left out.
  #   SPLITS     the splits it may feed, e.g. 'train' or 'train,val,test' (default all three); a source's own
  #              splits are used, val carved from its train (grouped by patient) when it has none
  #   GROUP_REGEX  its patient id in file names (default data.group_regex); the rest of the entry, '|' allowed
  # Class names: the TO names in order of first appearance. data.subclasses and data.split_dirs apply to
  # every folder tree among the sources (a subclass rule to the trees that have its folder). The poster's:
  #   'chest_xray | NORMAL:normal,PNEUMONIA:pneumonia | train,val,test; pneumoniamnist.npz | 0:normal | train'
  c.data.sources = ''
  # Near-duplicates across sources (cxrjax.data.near_duplicates): 'drop' (a train copy of a val or test image
  # and a val copy of a test image are dropped; within a split the later source's copy; test is never changed),
  # 'report' (found and counted only) or 'off' (not looked for).
  c.data.source_duplicates = 'drop'
  c.data.source_check = False  # how well pixels alone tell the training sources apart (cxrjax.eval.source_check)
  c.data.on_bad_image = 'error'  # or 'skip': count unreadable images and go on
  # DICOM and NIfTI in folders (cxrjax.data.medical; needs the `medical` extra).
  c.data.dicom_window = ''  # '': the file's WindowCenter/Width (else min-max); 'minmax'; or 'CENTER,WIDTH'
  c.data.nifti_axis = 2  # slicing axis of the canonical (RAS+) volume: 0 sagittal, 1 coronal, 2 axial
  c.data.nifti_slices = 'middle'  # also picks multi-frame DICOM frames: 'middle', 'all', 'every:K', 'range:0.3-0.7'
  c.data.tfds_name = 'cxrjax_pneumonia_mnist'
  c.data.tfds_dir = ''  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.cache_dir = ''  # decoded-image cache for folders; default ~/.cache/cxrjax
  c.data.limit_train = 0  # cap per split after the imbalance protocol (0: none)
  c.data.limit_eval = 0
  c.data.num_workers = 0  # Grain worker processes (0: threads in the trainer process)
  c.data.num_threads = 1  # more threads contend for the GIL with the train loop (BUILD_NOTES.md)
  c.data.prefetch = 4  # batches in flight
  c.data.augment = ml_collections.ConfigDict(
    dict(
      enabled=True,
      crop_pad=2,  # random crop after padding by this many pixels
      pad_mode='edge',  # 'edge' or 'zero' (black, as torchvision's RandomCrop(padding=...))
      rotate_deg=0.0,
      scale=0.0,
      translate=0.0,
      brightness=0.0,
      contrast=0.0,
      hflip=False,  # chest X-rays are not left-right symmetric
    )
  )

  c.imbalance = ml_collections.ConfigDict()
  c.imbalance.minority_class = 1  # pneumonia, as in the poster
  c.imbalance.ratio = 3.0  # majority:minority in train; 0 keeps the split
  c.imbalance.class_ratios = ''  # K classes: 'r0,r1,...' = largest:class ratio per class (overrides the above)
  c.imbalance.seed = -1  # which images are dropped; -1: config.seed (a sweep fixes it: same data for all)

  c.rebalance = ml_collections.ConfigDict()
  c.rebalance.method = 'none'
  c.rebalance.target_ratio = 1.0  # minority:majority after over/undersampling
  c.rebalance.weighting = 'inverse'  # class_weights: 'inverse' or 'effective' (Cui et al.)
  c.rebalance.beta = 0.999  # effective-number weighting
  c.rebalance.smote_k = 5  # SMOTE neighbours
  c.rebalance.smote_space = 'pixel'  # neighbour search: 'pixel' or 'feature' (reference network embedding)
  c.rebalance.synthetic = ''  # 'synthetic': 'path[:weight],...' (set by the generative pipelines)
  # 'synthetic': how many synthetic images. 0: fill each class up to target_ratio of the largest. > 0: add
  # synthetic_dose x the class's own real count to each of dose_classes ('minority': every class smaller than
  # the largest; 'all': every class, which keeps the class ratio), target_ratio unused; e.g. 0.5, 1, 2, 4.
  c.rebalance.synthetic_dose = 0.0
  c.rebalance.dose_classes = 'minority'
  # 'synthetic': train on the synthetic sets alone, as many images per class as the real training split has,
  # no real training image (train on synthetic, test on real; the generative runs' utility stage sets it).
  c.rebalance.synthetic_only = False
  # 'synthetic': validation gets synthetic images too (the latent-diffusion study's design), each class in
  # the proportion training gets, from each set's companion `<name>_val.npz` (made from validation images
  # only); metrics are reported on real-only and on real+synthetic validation, and the report flags it.
  c.rebalance.synthetic_val = False
  c.rebalance.synthetic_val_select = False  # with synthetic_val: the real+synthetic validation picks the checkpoint
  # How many per validation class: 'proportion' (synthetic per real image as in training) or 'fill' (up to
  # target_ratio of the largest validation class, as training was filled; none when it is the largest).
  c.rebalance.synthetic_val_rule = 'proportion'

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'ce'
  c.loss.focal_gamma = 2.0
  c.loss.label_smoothing = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'
  c.model.width = 64  # ResNet base width; 64 is the published network
  c.model.width_mult = 1.0  # EfficientNetV2 width multiplier (1.0: published)
  c.model.depth_mult = 1.0  # EfficientNetV2 depth multiplier (1.0: published)
  c.model.drop_path_rate = 0.2  # EfficientNetV2 stochastic depth
  c.model.stem = 'auto'  # 'cifar': full resolution stem for small images; 'imagenet': stride 2 (4 for ResNet)
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators
  c.model.ema_decay = 0.0  # > 0: validate and test an exponential moving average of the weights
  # Start from pretrained weights: a torchvision/timm `.pth` or `.safetensors` file, 'torchvision'
  # (the file torchvision caches under $TORCH_HOME), or a cxrjax run's `export/` folder. '' trains
  # from scratch. The classification head is new (K classes) unless `pretrained_head`.
  c.model.pretrained = ''
  c.model.pretrained_head = False  # keep the file's head too (same classes, e.g. an export of this task)
  # The input path (cxrjax.models.preprocess): 'auto' is what the weights expect (ImageNet
  # mean/std for ResNet and EfficientNetV2, [-1, 1] for Inception-V3; an export's own), else 'none'.
  c.model.input_norm = 'auto'
  c.model.batch_norm = 'train'  # 'frozen': normalise with the (imported) running statistics, never update them
  c.model.aux_logits = False  # Inception-V3's auxiliary classifier (trained with weight aux_loss_weight)
  c.model.aux_loss_weight = 0.4
  c.model.dropout_rate = 0.5  # Inception-V3's dropout before the head

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adam'
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.momentum = 0.9  # sgd only
  c.optim.schedule = 'constant'  # higher test specificity than cosine on PneumoniaMNIST (BUILD_NOTES.md)
  c.optim.warmup_epochs = 0.0
  c.optim.grad_clip = 0.0  # global norm; 0 disables
  # Fine-tuning: the backbone (every parameter but the head) learns at lr * backbone_lr_mult,
  # and not at all for the first freeze_backbone_epochs (the head alone adapts first).
  c.optim.backbone_lr_mult = 1.0
  c.optim.freeze_backbone_epochs = 0.0

  c.batch_size = 128  # global, across all devices and processes
  c.eval_batch_size = 256
  c.num_epochs = 15
  c.select_metric = 'auroc'  # on validation; picks the checkpoint that is tested
  c.log_every_steps = 20
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch

  c.gan = ml_collections.ConfigDict()  # DCGAN / cDCGAN (trainer 'gan')
  c.gan.conditional = False  # False: one DCGAN per minority class (the poster's DCGAN)
  c.gan.alpha = 0.5  # cDCGAN: P(a generated training label is 0, "healthy")
  c.gan.latent_dim = 100
  c.gan.g_width = 64  # ngf
  c.gan.d_width = 64  # ndf
  c.gan.upsample = 'transpose'  # 'transpose' (4x4 stride-2 transposed convolutions) or 'resize'
  c.gan.d_norm = 'batch'  # 'batch' or 'none'
  c.gan.steps = 6000
  c.gan.batch_size = 64
  c.gan.lr_g = 2e-4
  c.gan.lr_d = 2e-4
  c.gan.b1 = 0.5
  c.gan.b2 = 0.999
  c.gan.ema_decay = 0.999
  c.gan.diffaugment = ''  # e.g. 'color,translation,cutout'
  c.gan.r1_gamma = 0.0  # R1 penalty weight on real images (0: off)
  c.gan.collapse_margin = 0.01  # D(real) > 1 - m and D(fake) < m counts as D winning completely
  c.gan.collapse_patience = 20  # ... for this many reports in a row stops the run
  c.gan.log_every = 50
  c.gan.checkpoint_every = 500
  c.gan.sample_every = 1000
  c.gan.synth_batch = 256

  c.ldm = ml_collections.ConfigDict()  # latent diffusion (trainer 'ldm')
  c.ldm.mode = 'sample'  # 'sample': from noise; 'img2img': majority image -> minority label
  c.ldm.strength = 0.6  # img2img: how far the source is noised (0: unchanged, 1: pure noise)
  c.ldm.source_class = -1  # img2img source class (-1: the largest class)
  c.ldm.schedule = 'linear'  # 'linear' or 'cosine'
  c.ldm.num_timesteps = 1000
  # 'v' (Salimans & Ho): its x0 estimate stays well conditioned at the noisiest steps. 'eps' with
  # this schedule divides by sqrt(abar_T) ~ 0.006 there, and its DDIM samples left the data and
  # decoded to noise (BUILD_NOTES.md).
  c.ldm.prediction = 'v'  # 'eps' or 'v'
  c.ldm.label_dropout = 0.1  # classifier-free guidance training
  c.ldm.guidance_scale = 2.0  # 1: the conditional model; > 1 stronger class signal
  c.ldm.sample_steps = 50  # DDIM steps
  c.ldm.eta = 0.0  # 0: deterministic DDIM
  c.ldm.sample_batch = 256
  c.ldm.log_every = 50
  c.ldm.checkpoint_every = 500
  c.ldm.sample_every = 1000
  # The latent-diffusion study's "individual" models: after pretraining on all training images, a copy
  # of the UNet per class that needs images is fine-tuned on that class's images alone (from the
  # pretrained EMA weights) and makes that class's images; other classes use the pretrained model.
  c.ldm.per_class_finetune = False
  c.ldm.finetune_steps = 0  # per class; 0: a quarter of ldm.unet.steps
  c.ldm.finetune_lr = 0.0  # constant, no warm-up; 0: ldm.unet.lr
  c.ldm.ae = ml_collections.ConfigDict(
    dict(base_channels=64, channel_mults=(1, 2), latent_channels=4, num_res_blocks=1, kl_weight=1e-6,
         lr=1e-3, steps=3000, batch_size=64)
  )  # fmt: skip
  c.ldm.unet = ml_collections.ConfigDict(
    dict(base_channels=64, channel_mults=(1, 2), num_res_blocks=2, attention_levels=(-1,), num_heads=4,
         dropout=0.0, lr=2e-4, warmup_steps=200, steps=10000, batch_size=64, ema_decay=0.999)
  )  # fmt: skip

  c.quality = ml_collections.ConfigDict()  # generator quality (FID/KID/PR/memorization)
  c.quality.reference_dir = ''  # reference feature network; default: beside the workdir, shared
  c.quality.reference_width = 16
  c.quality.reference_epochs = 8
  c.quality.reference_limit_train = 0  # > 0: train the reference on this many rows (0: the whole real training split)
  c.quality.num_pairs = 8  # closest generated/train pairs shown
  c.quality.inception_weights = ''  # a pytorch-fid pt_inception-2015-12-05 .pth: FID on Inception pool3 too
  # Generative runs: the generator's utility (cxrjax.trainers.utility). A synthetic copy of the real training
  # split (every class, its real counts) trains a classifier tested on the real test split (TSTR); a classifier
  # of the same config trained on the real training split alone (TRTR, shared beside the reference network) is
  # tested on that synthetic set (TRTS). False: no utility stage.
  c.quality.tstr = False
  # Mode collapse, judged per synthesized class on the reference network's features
  # (genquality.collapse_verdicts): collapsed when within-class recall or the generated/real
  # mean-pairwise-distance ratio falls below these; below collapse_min_real real images of the
  # class the verdict is 'cannot_judge'.
  c.quality.collapse_min_recall = 0.25
  c.quality.collapse_min_diversity = 0.4
  c.quality.collapse_min_real = 20
  c.quality.on_collapse = 'stop'  # a collapsed class: 'stop' before the classifier (exit 2) or 'continue' (flagged)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 fills with the devices left over
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # parameters smaller than this stay replicated
  # Platform kernels (cxrjax.backends): 'auto' (the CPU backend's oneDNN kernels when the run is
  # on one CPU device and the `onednn` extra can be built, stock otherwise), 'stock' (plain
  # Flax/optax/XLA: what GPU/TPU run) or 'cpu' (insist). Same parameters and checkpoints either way.
  c.kernels = 'auto'
  return c


def with_profile(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the profile named by the config-file argument ('cpu', 'smoke')."""
  profile = (arg or 'full').strip()
  if profile not in PROFILES:
    raise UserError(f'config argument {profile!r}: expected one of {", ".join(PROFILES)}')
  config.profile = profile
  if profile == 'cpu':
    config.model.width = 16
    config.model.width_mult = 0.5
  elif profile == 'smoke':
    config.model.width = 4
    config.model.width_mult = 0.25
    config.model.depth_mult = 0.25
    config.num_epochs = 1
    config.batch_size = 32
    config.eval_batch_size = 128
    config.data.limit_train = 320
    config.data.limit_eval = 128
    config.log_every_steps = 5
    config.quality.reference_width = 4
    config.quality.reference_epochs = 1
    config.quality.reference_limit_train = 1024
    # A 20-step smoke generator is collapsed by construction: the verdict is recorded and
    # flagged, and the pipeline goes on (what a smoke run is for).
    config.quality.on_collapse = 'continue'
  _generator_profile(config, profile)
  return config


def _generator_profile(config: ml_collections.ConfigDict, profile: str) -> None:
  """Generator sizes and schedules per profile (applied to every config; used by 'gan'/'ldm')."""
  gan, ldm = config.gan, config.ldm
  if profile == 'cpu':
    gan.g_width, gan.d_width, gan.steps = 32, 32, 3000
    ldm.ae.base_channels, ldm.ae.steps = 32, 800
    ldm.unet.base_channels, ldm.unet.steps = 32, 2500
    ldm.sample_steps, ldm.sample_every = 25, 500
  elif profile == 'smoke':
    gan.g_width, gan.d_width, gan.steps, gan.batch_size = 8, 8, 20, 32
    gan.log_every, gan.checkpoint_every, gan.sample_every = 10, 10, 20
    ldm.ae.base_channels, ldm.ae.steps, ldm.ae.batch_size = 8, 20, 32
    ldm.unet.base_channels, ldm.unet.steps, ldm.unet.batch_size, ldm.unet.num_heads = 8, 20, 32, 1
    ldm.unet.warmup_steps = 0
    ldm.sample_steps, ldm.log_every, ldm.checkpoint_every, ldm.sample_every = 5, 10, 10, 20


def main_program(config: ml_collections.ConfigDict) -> str:
  """The program that dominates an experiment's time: the generator's step, or the classifier's model."""
  return {'gan': 'dcgan', 'ldm': 'unet'}.get(config.trainer, config.model.name)


def get_path(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _drop_absent_optional_keys(d: dict) -> None:
  """Optional keys added after runs existed hash like their absence when unset, so
  adding such an option never invalidates finished workdirs (or trained generators)."""
  for key, absent in OPTIONAL_KEYS.items():
    section, leaf = key.split('.')
    if leaf in d.get(section, {}) and d[section][leaf] == absent:
      d[section].pop(leaf)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short hash of everything in the config that changes results."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  _drop_absent_optional_keys(d)
  for key in RUNTIME_KEYS:
    node = d
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  # `kernels` was `convolution` ('auto', 'onednn', 'xla'): hashed under the old name and value, so
  # that workdirs made before the rename still resume.
  d['convolution'] = LEGACY_CONVOLUTION[d.pop('kernels')]
  blob = json.dumps(d, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def differences_from_full(config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(key, full-profile value, this value) for every field where `config` differs from
  `base_config()` under the 'full' profile (published sizes and schedules).

  Reports state with this what a narrower profile (or an override) changed.
  """
  full = _flatten(json.loads(with_profile(base_config(), 'full').to_json_best_effort()))
  this = _flatten(json.loads(config.to_json_best_effort()))
  keys = sorted(set(full) | set(this))
  return [(k, full.get(k), this.get(k)) for k in keys if k != 'profile' and full.get(k) != this.get(k)]


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the imbalance protocol (which training images are kept)."""
  return config.imbalance.seed if config.imbalance.seed >= 0 else config.seed


def generator_seed(config: ml_collections.ConfigDict) -> int:
  return config.generator_seed if config.generator_seed >= 0 else config.seed


# Fields that only change how a trained generator is sampled, not how it is trained.
SYNTHESIS_ONLY = ('ldm.mode', 'ldm.strength', 'ldm.source_class', 'ldm.guidance_scale', 'ldm.sample_steps',
                  'ldm.eta', 'ldm.sample_batch', 'gan.synth_batch', 'gan.sample_every', 'ldm.sample_every')  # fmt: skip


def generator_hash(config: ml_collections.ConfigDict) -> str:
  """Hash of what determines a trained generator: data, protocol, generator settings and seed."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  _drop_absent_optional_keys(d)
  for key in SYNTHESIS_ONLY:
    section, leaf = key.split('.')
    d.get(section, {}).pop(leaf, None)
  # The generator sees the training split only: test-side keys leave its hash alone.
  for key in ('num_workers', 'num_threads', 'prefetch', 'cache_dir', 'limit_eval', 'test_prevalence', 'source_check'):
    d['data'].pop(key, None)
  for key, absent in OPTIONAL_KEYS.items():  # keys added since, at their "as before" value
    section, leaf = key.split('.')
    if section == 'data' and d['data'].get(leaf, absent) == absent:
      d['data'].pop(leaf, None)
  keep = dict(
    trainer=d['trainer'], data=d['data'], imbalance=d['imbalance'], model_dtype=d['model']['dtype'],
    generator=d.get(d['trainer'], {}), seed=generator_seed(config), data_seed=data_seed(config), mesh=d['mesh'],
  )  # fmt: skip
  return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parse_split_dirs(spec: str) -> dict[str, str]:
  """`data.split_dirs`: 'train=Training,val=Validation,test=Testing' -> {'train': 'Training', ...}; '' -> {}.

  Folder names are relative to `data.path` ('/' allowed); train and test are required, val optional.
  """
  out: dict[str, str] = {}
  expected = "'train=FOLDER,test=FOLDER' (val=FOLDER optional), folders relative to data.path"
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    key, sep, folder = (x.strip() for x in part.partition('='))
    if not sep or key not in SPLIT_KEYS or not folder or folder.startswith('/') or key in out:
      raise UserError(f'config.data.split_dirs={spec!r}: expected {expected}')
    out[key] = folder.rstrip('/')
  if len(set(out.values())) < len(out):
    raise UserError(f'config.data.split_dirs={spec!r}: names one folder for two splits; expected a folder per split')
  if out and not {'train', 'test'} <= set(out):
    raise UserError(f'config.data.split_dirs={spec!r}: names no {"train" if "train" not in out else "test"} folder;'
                    f' expected {expected}')  # fmt: skip
  return out


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of `data.sources`: where the images are, how their classes map, which splits they feed."""

  index: int  # 1-based position in data.sources
  text: str  # the entry as written (for messages)
  path: str
  class_map: tuple[tuple[str, str], ...]  # (the source's class, the dataset's class); ('*', name): every class
  splits: tuple[str, ...]  # in SPLIT_KEYS order
  group_regex: str | None  # None: data.group_regex

  def where(self) -> str:
    return f'config.data.sources entry {self.index} ({self.text!r})'


SOURCES_GRAMMAR = "'PATH | FROM:TO,... | SPLITS[ | GROUP_REGEX][; ...]'"


def parse_sources(spec: str) -> list[SourceSpec]:
  """`data.sources` -> one `SourceSpec` per ';'-separated entry; '' -> [] (see base_config for the grammar).

  Refused with one line naming the entry: a missing path or class map, an unknown split, an empty class
  map, one class of a source mapped twice, '*' beside other classes, two entries naming the same path,
  no entry feeding train, val or test.
  """
  out: list[SourceSpec] = []
  entries = [e.strip() for e in spec.split(';')]
  if not any(entries):
    return []
  for i, text in enumerate(entries, 1):
    if not text:
      raise UserError(f'config.data.sources: entry {i} is empty; expected {SOURCES_GRAMMAR}')
    fields = [f.strip() for f in text.split('|', 3)]
    where = f'config.data.sources entry {i} ({text!r})'
    if len(fields) < 2 or not fields[0]:
      raise UserError(f'{where}: expected {SOURCES_GRAMMAR}')
    path, mapping = fields[0], fields[1]
    pairs: list[tuple[str, str]] = []
    for item in [m.strip() for m in mapping.split(',') if m.strip()]:
      src, sep, dst = (x.strip() for x in item.rpartition(':'))
      if not sep or not src or not dst:
        raise UserError(f'{where}: class map item {item!r}; expected FROM:TO (e.g. NORMAL:normal, 0:normal, *:normal)')
      pairs.append((src, dst))
    if not pairs:
      raise UserError(f'{where}: empty class map; expected FROM:TO pairs, e.g. NORMAL:normal,PNEUMONIA:pneumonia')
    seen: dict[str, str] = {}
    for src, dst in pairs:
      if src in seen:
        raise UserError(f'{where}: class {src!r} mapped twice (to {seen[src]!r} and {dst!r}); expected each class once')
      seen[src] = dst
    if '*' in seen and len(seen) > 1:
      raise UserError(f"{where}: '*' maps every class and stands alone; expected '*:TO' or FROM:TO pairs")
    split_text = fields[2] if len(fields) > 2 and fields[2] else ','.join(SPLIT_KEYS)
    splits = [x.strip() for x in split_text.split(',') if x.strip()]
    for s in splits:
      if s not in SPLIT_KEYS:
        raise UserError(f'{where}: unknown split {s!r}; expected a comma-separated subset of train, val, test')
    regex = fields[3] if len(fields) > 3 and fields[3] else None
    if regex is not None:
      try:
        re.compile(regex)
      except re.error as e:
        raise UserError(f'{where}: group regex {regex!r} does not compile ({e})') from None
    out.append(SourceSpec(i, text, path, tuple(pairs), tuple(s for s in SPLIT_KEYS if s in splits), regex))
  named: dict[str, int] = {}
  for s in out:
    key = os.path.normpath(os.path.expanduser(s.path))
    if key in named:
      raise UserError(
        f'config.data.sources: entries {named[key]} and {s.index} both name {s.path!r}; expected each path once'
        ' (one entry can feed several splits and map several classes)'
      )
    named[key] = s.index
  for split in SPLIT_KEYS:
    if not any(split in s.splits for s in out):
      hint = ' (a source without a val split has val carved from its train when its SPLITS name val)'
      raise UserError(
        f'config.data.sources={spec!r}: no entry feeds the {split} split; expected at least one'
        + (hint if split == 'val' else '')
      )
  return out


def source_class_names(specs: list[SourceSpec]) -> tuple[str, ...]:
  """The dataset's classes under `data.sources`: the TO names, in order of first appearance."""
  return tuple(dict.fromkeys(dst for s in specs for _, dst in s.class_map))


def parse_prevalence(spec: str) -> list[float]:
  """`data.test_prevalence`: '1,1' or '0.5,0.5' -> [1.0, 1.0] / [0.5, 0.5] (one positive weight per class); '' -> []."""
  if not spec.strip():
    return []
  try:
    values = [float(x) for x in spec.split(',')]
  except ValueError:
    values = []
  if len(values) < 2 or not all(0 < v < float('inf') for v in values):
    raise UserError(f'config.data.test_prevalence={spec!r}: expected one positive number per class, e.g. 1,1')
  return values


def _require(cond: bool, key: str, value: Any, expected: str) -> None:
  if not cond:
    raise UserError(f'config.{key}={value!r}: expected {expected}')


def _one_of(config, key: str, choices) -> None:
  value = get_path(config, key)
  _require(value in choices, key, value, 'one of ' + ', '.join(map(str, choices)))


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates a config before anything trains; returns it locked.

  Args:
    config: the experiment config, after command-line overrides.

  Returns:
    The same config, locked against new keys.

  Raises:
    UserError: naming the first offending key and what was expected.
  """
  for old, new in RENAMED_KEYS.items():
    if old in config:
      raise UserError(f'config.{old}: this key was renamed; use config.{new}')
  _one_of(config, 'trainer', TRAINERS)
  _one_of(config, 'profile', PROFILES)
  _one_of(config, 'data.source', SOURCES)
  _one_of(config, 'data.on_bad_image', ('error', 'skip'))
  _one_of(config, 'data.channels', (1, 3))
  _one_of(config, 'model.name', MODELS)
  _one_of(config, 'model.stem', ('auto', 'cifar', 'imagenet'))
  _one_of(config, 'model.dtype', ('float32', 'bfloat16'))
  _one_of(config, 'model.input_norm', INPUT_NORMS)
  _one_of(config, 'model.batch_norm', ('train', 'frozen'))
  _one_of(config, 'kernels', KERNELS)
  _one_of(config, 'optim.name', OPTIMIZERS)
  _one_of(config, 'optim.schedule', SCHEDULES)
  _one_of(config, 'loss.name', LOSSES)
  _one_of(config, 'rebalance.method', REBALANCE_METHODS)
  _one_of(config, 'rebalance.weighting', ('inverse', 'effective'))
  _one_of(config, 'rebalance.smote_space', ('pixel', 'feature'))
  _one_of(config, 'select_metric', SELECT_METRICS)

  d = config.data
  _require(8 <= d.image_size <= 1024, 'data.image_size', d.image_size, 'an integer in [8, 1024]')
  _require(d.num_classes == 0 or d.num_classes >= 2, 'data.num_classes', d.num_classes, '0 (infer) or >= 2')
  _require(0.0 <= d.val_fraction < 0.5, 'data.val_fraction', d.val_fraction, 'a fraction in [0, 0.5)')
  _require(0.0 < d.test_fraction < 0.5, 'data.test_fraction', d.test_fraction, 'a fraction in (0, 0.5)')
  _require(d.limit_train >= 0, 'data.limit_train', d.limit_train, '>= 0')
  _require(d.limit_eval >= 0, 'data.limit_eval', d.limit_eval, '>= 0')
  _require(d.num_workers >= 0, 'data.num_workers', d.num_workers, '>= 0')
  _require(d.num_threads >= 1, 'data.num_threads', d.num_threads, '>= 1')
  _require(d.positive_class >= 0, 'data.positive_class', d.positive_class, '>= 0')
  parse_split_dirs(d.split_dirs)
  _one_of(config, 'data.source_duplicates', ('drop', 'report', 'off'))
  _one_of(config, 'data.source_check', (False, True))
  specs = parse_sources(d.sources)
  if specs:
    _require(not d.path, 'data.path', d.path, "'' with data.sources (its entries name the paths)")
    _require(d.source == 'auto', 'data.source', d.source, "'auto' with data.sources (each entry is a folder or npz)")
    _require(not d.class_names, 'data.class_names', d.class_names,
             "'' with data.sources (the class map names the classes, in order of first appearance)")  # fmt: skip
    names = source_class_names(specs)
    _require(len(names) >= 2, 'data.sources', d.sources, f'class maps naming at least 2 classes (found {list(names)})')
    _require(not d.num_classes or d.num_classes == len(names), 'data.num_classes', d.num_classes,
             f'0 or {len(names)}: data.sources maps to {len(names)} classes ({", ".join(names)})')  # fmt: skip
  prevalence = parse_prevalence(d.test_prevalence)
  _require(not prevalence or not d.num_classes or len(prevalence) == d.num_classes, 'data.test_prevalence',
           d.test_prevalence, f'{d.num_classes} values (data.num_classes={d.num_classes})')  # fmt: skip
  for key, parse in (('dicom_window', medical.parse_window), ('nifti_slices', medical.parse_slices)):
    try:
      parse(d[key])
    except ValueError as e:
      raise UserError(f'config.data.{key}={d[key]!r}: {e}') from None
  _one_of(config, 'data.nifti_axis', (0, 1, 2))
  a = d.augment
  _require(0 <= a.crop_pad <= d.image_size // 4, 'data.augment.crop_pad', a.crop_pad, f'in [0, {d.image_size // 4}]')
  _one_of(config, 'data.augment.pad_mode', ('edge', 'zero'))
  _require(0 <= a.rotate_deg <= 45, 'data.augment.rotate_deg', a.rotate_deg, 'degrees in [0, 45]')
  for key in ('scale', 'translate', 'brightness', 'contrast'):
    _require(0 <= a[key] < 0.5, f'data.augment.{key}', a[key], 'in [0, 0.5)')

  r = config.imbalance.ratio
  _require(r == 0 or r >= 1, 'imbalance.ratio', r, '0 (keep the split) or a majority:minority ratio >= 1')
  _require(config.imbalance.minority_class >= 0, 'imbalance.minority_class', config.imbalance.minority_class, '>= 0')
  t = config.rebalance.target_ratio
  _require(0 < t <= 1, 'rebalance.target_ratio', t, 'a minority:majority ratio in (0, 1]')
  rb = config.rebalance
  _require(0 <= rb.synthetic_dose <= 100, 'rebalance.synthetic_dose', rb.synthetic_dose,
           'a multiple of the real class count in [0, 100] (0: fill to rebalance.target_ratio)')  # fmt: skip
  _one_of(config, 'rebalance.dose_classes', ('minority', 'all'))
  _one_of(config, 'rebalance.synthetic_only', (False, True))
  if rb.synthetic_dose > 0 or rb.synthetic_only:
    key = 'rebalance.synthetic_dose' if rb.synthetic_dose > 0 else 'rebalance.synthetic_only'
    _require(rb.method == 'synthetic', key, get_path(config, key), "its default unless rebalance.method='synthetic'")
  _require(not (rb.synthetic_dose > 0 and rb.synthetic_only), 'rebalance.synthetic_dose', rb.synthetic_dose,
           '0 with rebalance.synthetic_only (it takes the real counts)')  # fmt: skip
  _one_of(config, 'quality.tstr', (False, True))
  _require(not config.quality.tstr or config.trainer in ('gan', 'ldm'), 'quality.tstr', config.quality.tstr,
           "False unless trainer is 'gan' or 'ldm' (the utility of a generator)")  # fmt: skip

  _one_of(config, 'gan.upsample', ('transpose', 'resize'))
  _one_of(config, 'gan.d_norm', ('batch', 'none'))
  _require(0 < config.gan.alpha < 1, 'gan.alpha', config.gan.alpha, 'a probability in (0, 1)')
  for op in [p for p in config.gan.diffaugment.split(',') if p]:
    _require(op in ('color', 'translation', 'cutout'), 'gan.diffaugment', config.gan.diffaugment,
             'a comma-separated subset of color, translation, cutout')  # fmt: skip
  _require(config.gan.r1_gamma >= 0, 'gan.r1_gamma', config.gan.r1_gamma, '>= 0')
  _require(config.gan.steps >= 1, 'gan.steps', config.gan.steps, '>= 1')
  if config.trainer == 'gan':
    _require(config.data.image_size in (28, 32, 64, 128), 'data.image_size', config.data.image_size,
             'one of 28, 32, 64, 128 for the DCGAN')  # fmt: skip
  _one_of(config, 'ldm.mode', ('sample', 'img2img'))
  _one_of(config, 'ldm.schedule', ('linear', 'cosine'))
  _one_of(config, 'ldm.prediction', ('eps', 'v'))
  _require(0 < config.ldm.strength <= 1, 'ldm.strength', config.ldm.strength, 'in (0, 1]')
  _require(0 <= config.ldm.label_dropout < 1, 'ldm.label_dropout', config.ldm.label_dropout, 'in [0, 1)')
  _require(config.ldm.guidance_scale >= 0, 'ldm.guidance_scale', config.ldm.guidance_scale, '>= 0')
  _require(1 <= config.ldm.sample_steps <= config.ldm.num_timesteps, 'ldm.sample_steps', config.ldm.sample_steps,
           f'in [1, ldm.num_timesteps={config.ldm.num_timesteps}]')  # fmt: skip
  if config.trainer == 'ldm':
    f = 2 ** (len(config.ldm.ae.channel_mults) - 1)
    _require(config.data.image_size % f == 0, 'data.image_size', config.data.image_size,
             f'a multiple of the autoencoder downsampling factor {f} (ldm.ae.channel_mults)')  # fmt: skip
    lat = config.data.image_size // f
    g = 2 ** (len(config.ldm.unet.channel_mults) - 1)
    _require(lat % g == 0, 'ldm.unet.channel_mults', tuple(config.ldm.unet.channel_mults),
             f'a depth whose downsampling ({g}) divides the {lat}-pixel latents')  # fmt: skip
  _require(0 < config.rebalance.beta < 1, 'rebalance.beta', config.rebalance.beta, 'in (0, 1)')
  _one_of(config, 'rebalance.synthetic_val', (False, True))
  _one_of(config, 'rebalance.synthetic_val_select', (False, True))
  _one_of(config, 'rebalance.synthetic_val_rule', ('proportion', 'fill'))
  if config.rebalance.synthetic_val:
    _require(config.rebalance.method == 'synthetic', 'rebalance.method', config.rebalance.method,
             "'synthetic' with rebalance.synthetic_val (a generator's images enter validation)")  # fmt: skip
  _require(not config.rebalance.synthetic_val_select or config.rebalance.synthetic_val, 'rebalance.synthetic_val_select',
           config.rebalance.synthetic_val_select, 'False unless rebalance.synthetic_val')  # fmt: skip
  _one_of(config, 'ldm.per_class_finetune', (False, True))
  _require(
    config.ldm.finetune_steps >= 0, 'ldm.finetune_steps', config.ldm.finetune_steps, '>= 0 (0: ldm.unet.steps // 4)'
  )
  _require(config.ldm.finetune_lr >= 0, 'ldm.finetune_lr', config.ldm.finetune_lr, '>= 0 (0: ldm.unet.lr)')
  _require(config.rebalance.smote_k >= 1, 'rebalance.smote_k', config.rebalance.smote_k, '>= 1')
  _require(config.loss.focal_gamma >= 0, 'loss.focal_gamma', config.loss.focal_gamma, '>= 0')
  _require(0 <= config.loss.label_smoothing < 1, 'loss.label_smoothing', config.loss.label_smoothing, 'in [0, 1)')
  _require(0 <= config.model.ema_decay < 1, 'model.ema_decay', config.model.ema_decay, 'in [0, 1)')
  _require(config.model.width >= 1, 'model.width', config.model.width, '>= 1')
  _require(0 < config.model.width_mult <= 4, 'model.width_mult', config.model.width_mult, 'in (0, 4]')
  _require(0 < config.model.depth_mult <= 4, 'model.depth_mult', config.model.depth_mult, 'in (0, 4]')
  _require(0 <= config.model.drop_path_rate < 1, 'model.drop_path_rate', config.model.drop_path_rate, 'in [0, 1)')
  _require(config.optim.lr > 0, 'optim.lr', config.optim.lr, '> 0')
  _require(config.optim.weight_decay >= 0, 'optim.weight_decay', config.optim.weight_decay, '>= 0')
  _require(config.optim.warmup_epochs >= 0, 'optim.warmup_epochs', config.optim.warmup_epochs, '>= 0')
  _require(config.optim.grad_clip >= 0, 'optim.grad_clip', config.optim.grad_clip, '>= 0')
  _require(config.optim.backbone_lr_mult >= 0, 'optim.backbone_lr_mult', config.optim.backbone_lr_mult, '>= 0')
  freeze = config.optim.freeze_backbone_epochs
  _require(
    0 <= freeze <= config.num_epochs, 'optim.freeze_backbone_epochs', freeze, f'in [0, num_epochs={config.num_epochs}]'
  )
  _require(config.model.aux_loss_weight >= 0, 'model.aux_loss_weight', config.model.aux_loss_weight, '>= 0')
  _require(0 <= config.model.dropout_rate < 1, 'model.dropout_rate', config.model.dropout_rate, 'in [0, 1)')
  if config.model.name == 'inception_v3':
    # Inception-V3's valid convolutions and pools need 75 px (its auxiliary head 299 px: torchvision's sizes).
    low = 299 if config.model.aux_logits else 75
    _require(config.data.image_size >= low, 'data.image_size', config.data.image_size,
             f'>= {low} for inception_v3' + (' with model.aux_logits' if config.model.aux_logits else ''))  # fmt: skip
  _require(not config.model.aux_logits or config.model.name == 'inception_v3', 'model.aux_logits',
           config.model.aux_logits, 'False (only inception_v3 has an auxiliary classifier)')  # fmt: skip
  _require(config.batch_size >= 1, 'batch_size', config.batch_size, '>= 1')
  _require(config.eval_batch_size >= 1, 'eval_batch_size', config.eval_batch_size, '>= 1')
  _require(config.num_epochs >= 1, 'num_epochs', config.num_epochs, '>= 1')
  q = config.quality
  _require(q.reference_limit_train >= 0, 'quality.reference_limit_train', q.reference_limit_train, '>= 0')
  _require(0 <= q.collapse_min_recall <= 1, 'quality.collapse_min_recall', q.collapse_min_recall, 'in [0, 1]')
  _require(q.collapse_min_diversity >= 0, 'quality.collapse_min_diversity', q.collapse_min_diversity, '>= 0')
  _require(q.collapse_min_real >= 2, 'quality.collapse_min_real', q.collapse_min_real, '>= 2')
  _one_of(config, 'quality.on_collapse', ('stop', 'continue'))
  _require(config.log_every_steps >= 1, 'log_every_steps', config.log_every_steps, '>= 1')
  _require(config.checkpoint_every_steps >= 0, 'checkpoint_every_steps', config.checkpoint_every_steps, '>= 0')
  _require(config.mesh.data == -1 or config.mesh.data >= 1, 'mesh.data', config.mesh.data, '-1 or >= 1')
  _require(config.mesh.fsdp == -1 or config.mesh.fsdp >= 1, 'mesh.fsdp', config.mesh.fsdp, '-1 or >= 1')
  _require(
    not (config.mesh.data == -1 and config.mesh.fsdp == -1), 'mesh', config.mesh.to_dict(), 'at most one axis = -1'
  )
  config.lock()
  return config
