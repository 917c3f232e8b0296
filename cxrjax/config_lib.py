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

import hashlib
import json
from typing import Any

import ml_collections

from cxrjax.errors import UserError

PROFILES = ('full', 'cpu', 'smoke')
TRAINERS = ('classifier',)
SOURCES = ('auto', 'npz', 'folder', 'tfds', 'phantom')
MODELS = ('resnet18',)
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')
LOSSES = ('ce', 'focal')
REBALANCE_METHODS = ('none', 'class_weights', 'undersample', 'oversample', 'smote', 'augment')
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
)


def base_config() -> ml_collections.ConfigDict:
  """The shared defaults: the poster's protocol with a ResNet-18 classifier."""
  c = ml_collections.ConfigDict()
  c.trainer = 'classifier'
  c.seed = 0
  c.profile = 'full'
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
  c.data.class_names = ''  # comma-separated; default: folder names, or from the npz name
  c.data.val_fraction = 0.1  # carved from train (grouped by patient) if no val split
  c.data.test_fraction = 0.2  # carved from all images if a folder tree has no split folders
  c.data.group_regex = r'(person\d+|IM-\d+)'  # patient id in file names
  c.data.on_bad_image = 'error'  # or 'skip': count unreadable images and go on
  c.data.tfds_name = 'cxrjax_pneumonia_mnist'
  c.data.tfds_dir = ''  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.cache_dir = ''  # decoded-image cache for folders; default ~/.cache/cxrjax
  c.data.limit_train = 0  # cap per split after the imbalance protocol (0: none)
  c.data.limit_eval = 0
  c.data.num_workers = 0  # Grain worker processes (0: threads in the trainer process)
  c.data.num_threads = 1  # measured: more threads contend for the GIL with the train loop
  c.data.prefetch = 4  # batches in flight
  c.data.augment = ml_collections.ConfigDict(
    dict(
      enabled=True,
      crop_pad=2,  # random crop after edge padding by this many pixels
      rotate_deg=5.0,
      scale=0.05,
      translate=0.0,
      brightness=0.05,
      contrast=0.05,
      hflip=False,  # chest X-rays are not left-right symmetric
    )
  )

  c.imbalance = ml_collections.ConfigDict()
  c.imbalance.minority_class = 1  # pneumonia, as in the poster
  c.imbalance.ratio = 3.0  # majority:minority in train; 0 keeps the split

  c.rebalance = ml_collections.ConfigDict()
  c.rebalance.method = 'none'
  c.rebalance.target_ratio = 1.0  # minority:majority after over/undersampling
  c.rebalance.weighting = 'inverse'  # class_weights: 'inverse' or 'effective' (Cui et al.)
  c.rebalance.beta = 0.999  # effective-number weighting
  c.rebalance.smote_k = 5  # SMOTE neighbours

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'ce'
  c.loss.focal_gamma = 2.0
  c.loss.label_smoothing = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'
  c.model.width = 64  # ResNet base width; 64 is the published network
  c.model.stem = 'auto'  # 'cifar' (3x3, no pool) below 128 px, else 'imagenet'
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adam'
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.momentum = 0.9  # sgd only
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.0
  c.optim.grad_clip = 0.0  # global norm; 0 disables

  c.batch_size = 128  # global, across all devices and processes
  c.eval_batch_size = 256
  c.num_epochs = 15
  c.select_metric = 'auroc'  # on validation; picks the checkpoint that is tested
  c.log_every_steps = 20
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 fills with the devices left over
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # parameters smaller than this stay replicated
  return c


def with_profile(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the profile named by the config-file argument ('cpu', 'smoke')."""
  profile = (arg or 'full').strip()
  if profile not in PROFILES:
    raise UserError(f'config argument {profile!r}: expected one of {", ".join(PROFILES)}')
  config.profile = profile
  if profile == 'cpu':
    config.model.width = 16
  elif profile == 'smoke':
    config.model.width = 4
    config.num_epochs = 1
    config.batch_size = 32
    config.eval_batch_size = 128
    config.data.limit_train = 320
    config.data.limit_eval = 128
    config.log_every_steps = 5
  return config


def get_path(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short hash of everything in the config that changes results."""
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  for key in RUNTIME_KEYS:
    node = d
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  blob = json.dumps(d, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


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
  _one_of(config, 'trainer', TRAINERS)
  _one_of(config, 'profile', PROFILES)
  _one_of(config, 'data.source', SOURCES)
  _one_of(config, 'data.on_bad_image', ('error', 'skip'))
  _one_of(config, 'data.channels', (1, 3))
  _one_of(config, 'model.name', MODELS)
  _one_of(config, 'model.stem', ('auto', 'cifar', 'imagenet'))
  _one_of(config, 'model.dtype', ('float32', 'bfloat16'))
  _one_of(config, 'optim.name', OPTIMIZERS)
  _one_of(config, 'optim.schedule', SCHEDULES)
  _one_of(config, 'loss.name', LOSSES)
  _one_of(config, 'rebalance.method', REBALANCE_METHODS)
  _one_of(config, 'rebalance.weighting', ('inverse', 'effective'))
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
  a = d.augment
  _require(0 <= a.crop_pad <= d.image_size // 4, 'data.augment.crop_pad', a.crop_pad, f'in [0, {d.image_size // 4}]')
  _require(0 <= a.rotate_deg <= 45, 'data.augment.rotate_deg', a.rotate_deg, 'degrees in [0, 45]')
  for key in ('scale', 'translate', 'brightness', 'contrast'):
    _require(0 <= a[key] < 0.5, f'data.augment.{key}', a[key], 'in [0, 0.5)')

  r = config.imbalance.ratio
  _require(r == 0 or r >= 1, 'imbalance.ratio', r, '0 (keep the split) or a majority:minority ratio >= 1')
  _require(config.imbalance.minority_class >= 0, 'imbalance.minority_class', config.imbalance.minority_class, '>= 0')
  t = config.rebalance.target_ratio
  _require(0 < t <= 1, 'rebalance.target_ratio', t, 'a minority:majority ratio in (0, 1]')

  _require(0 < config.rebalance.beta < 1, 'rebalance.beta', config.rebalance.beta, 'in (0, 1)')
  _require(config.rebalance.smote_k >= 1, 'rebalance.smote_k', config.rebalance.smote_k, '>= 1')
  _require(config.loss.focal_gamma >= 0, 'loss.focal_gamma', config.loss.focal_gamma, '>= 0')
  _require(0 <= config.loss.label_smoothing < 1, 'loss.label_smoothing', config.loss.label_smoothing, 'in [0, 1)')
  _require(config.model.width >= 1, 'model.width', config.model.width, '>= 1')
  _require(config.optim.lr > 0, 'optim.lr', config.optim.lr, '> 0')
  _require(config.optim.weight_decay >= 0, 'optim.weight_decay', config.optim.weight_decay, '>= 0')
  _require(config.optim.warmup_epochs >= 0, 'optim.warmup_epochs', config.optim.warmup_epochs, '>= 0')
  _require(config.optim.grad_clip >= 0, 'optim.grad_clip', config.optim.grad_clip, '>= 0')
  _require(config.batch_size >= 1, 'batch_size', config.batch_size, '>= 1')
  _require(config.eval_batch_size >= 1, 'eval_batch_size', config.eval_batch_size, '>= 1')
  _require(config.num_epochs >= 1, 'num_epochs', config.num_epochs, '>= 1')
  _require(config.log_every_steps >= 1, 'log_every_steps', config.log_every_steps, '>= 1')
  _require(config.checkpoint_every_steps >= 0, 'checkpoint_every_steps', config.checkpoint_every_steps, '>= 0')
  _require(config.mesh.data == -1 or config.mesh.data >= 1, 'mesh.data', config.mesh.data, '-1 or >= 1')
  _require(config.mesh.fsdp == -1 or config.mesh.fsdp >= 1, 'mesh.fsdp', config.mesh.fsdp, '-1 or >= 1')
  _require(
    not (config.mesh.data == -1 and config.mesh.fsdp == -1), 'mesh', config.mesh.to_dict(), 'at most one axis = -1'
  )
  config.lock()
  return config
