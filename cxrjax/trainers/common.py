"""What every trainer shares: data preparation, the workdir guard, run records, optimizers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from cxrjax import config_lib, fileio, progress, seeding
from cxrjax.backends.base import Backend
from cxrjax.data import imbalance, multi_source, rebalance, sources, synthetic
from cxrjax.data.dataset import SOURCE_STAGES, SPLITS, Dataset, Split, counts_by_source
from cxrjax.errors import UserError
from cxrjax.eval import source_check

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy', 'scikit-learn', 'ml-collections')


@dataclasses.dataclass
class PreparedData:
  """The dataset after the imbalance protocol and limits, plus the rebalanced training set."""

  dataset: Dataset  # val/test as evaluated (after limit_eval); train as loaded
  train: Split  # after the imbalance protocol (and limit_train)
  training_set: rebalance.TrainingSet
  imbalance_report: dict[str, Any]
  leakage: dict[str, Any]
  test_prevalence: dict[str, Any] | None = None  # data.test_prevalence's report; None when the test split is as found
  # Source -> stage -> images per class (`per_source_counts`); the source-shortcut check when data.source_check.
  per_source: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
  source_check: dict[str, Any] | None = None
  # rebalance.synthetic_val: the validation split plus synthetic rows (real rows first), and what was added.
  val_synthetic: Split | None = None
  val_synthetic_report: dict[str, Any] | None = None

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  def record(self) -> dict[str, Any]:
    """The data section of metrics.json."""
    k = self.num_classes
    extra = {'test_prevalence': self.test_prevalence} if self.test_prevalence else {}
    if self.source_check is not None:
      extra['source_check'] = self.source_check
    counts = dict(
      train_imbalanced=self.train.class_counts(k),
      trained_on=self.training_set.trained_counts(k),
      val=self.dataset.splits['val'].class_counts(k),
      test=self.dataset.splits['test'].class_counts(k),
    )
    if self.val_synthetic is not None:
      counts['val_with_synthetic'] = self.val_synthetic.class_counts(k)
      extra['synthetic_val'] = self.val_synthetic_report
    return dict(
      source=self.dataset.source,
      phantom=self.dataset.is_phantom,
      class_names=list(self.dataset.class_names),
      image_shape=list(self.dataset.image_shape),
      counts_loaded=self.dataset.source.get('counts_loaded'),
      imbalance=self.imbalance_report,
      counts=counts,
      rebalance=self.training_set.summary(k),
      leakage=self.leakage,
      per_source=self.per_source,
      duplicates=self.dataset.source.get('duplicates'),
      **extra,
    )


def per_source_counts(ds: Dataset, loaded: dict[str, dict[str, list[int]]], train: Split, ts) -> dict:
  """Images per class of every source at every stage: read (before cross-source duplicates are
  dropped; only with data.sources), loaded, after the imbalance protocol, trained on (one epoch of
  the plan: SMOTE and synthetic rows appear as their own sources), and val/test as evaluated."""
  k = ds.num_classes
  stages = {f'{split}_read': {n: c[split] for n, c in ds.source.get('counts_read', {}).items() if split in c}
            for split in SPLITS}  # fmt: skip
  stages['train_loaded'] = loaded['train']
  stages['train_imbalanced'] = counts_by_source(train.sources, train.labels, k)
  stages['trained_on'] = counts_by_source(ts.pool.sources[ts.plan], ts.pool.labels[ts.plan], k)
  for split in ('val', 'test'):
    stages[split] = counts_by_source(ds.splits[split].sources, ds.splits[split].labels, k)
  out: dict[str, dict[str, list[int]]] = {}
  for stage, _ in SOURCE_STAGES:
    for name, counts in stages.get(stage, {}).items():
      out.setdefault(name, {})[stage] = counts
  return out


def check_leakage(dataset: Dataset, train: Split) -> dict[str, Any]:
  """Counts training images whose pixels also appear in val or test.

  Exact duplicates across splits are a property of some public datasets (8
  PneumoniaMNIST training images reappear in val); they are reported, never
  hidden, and never added to by cxrjax.
  """
  train_h = set(train.content_hashes())
  out = {}
  for split in ('val', 'test'):
    h = dataset.splits[split].content_hashes()
    out[f'train_in_{split}'] = int(sum(x in train_h for x in h))
  return out


def prepare_data(config: ml_collections.ConfigDict, workdir: str | None = None, feature_encoder=None) -> PreparedData:
  """Loads data, applies the imbalance protocol, limits and the rebalancing method.

  When SMOTE searches neighbours in feature space (`rebalance.smote_space='feature'`),
  `feature_encoder(config, workdir)` gives the image encoder (the caller supplies
  `cxrjax.trainers.reference.feature_encoder`, which trains the shared reference
  network on first use); `workdir` locates that network.
  """
  ds = sources.load_dataset(config.data, config.seed)
  ds.source['counts_loaded'] = ds.counts()
  loaded = {s: counts_by_source(ds.splits[s].sources, ds.splits[s].labels, ds.num_classes) for s in SPLITS}
  k = ds.num_classes
  if config.data.num_classes and config.data.num_classes != k:
    raise UserError(f'config.data.num_classes={config.data.num_classes} but the data has {k} classes')
  if k == 2 and not 0 <= config.data.positive_class < 2:
    raise UserError(f'config.data.positive_class={config.data.positive_class}: expected 0 or 1')
  for split in ('train', 'val', 'test'):
    if len(ds.splits[split]) == 0:
      raise UserError(f'{ds.source.get("path") or ds.source["kind"]}: the {split} split is empty')
  dseed = config_lib.data_seed(config)
  if config.imbalance.class_ratios:
    train, report = imbalance.apply_class_ratios(ds.splits['train'], k, config.imbalance.class_ratios, dseed)
  else:
    train, report = imbalance.apply_imbalance(
      ds.splits['train'], k, config.imbalance.minority_class, config.imbalance.ratio, dseed
    )
  report['seed'] = dseed
  prevalence = None
  if config.data.test_prevalence:  # before limit_eval, whose stratified cap keeps the mix
    ds.splits['test'], prevalence = imbalance.apply_test_prevalence(
      ds.splits['test'], ds.class_names, config.data.test_prevalence, dseed
    )
  if config.data.limit_train:
    keep = imbalance.stratified_cap(train.labels, config.data.limit_train, seeding.numpy_rng(dseed, 'limit/train'))
    train = train.take(keep)
    report['limited_to'] = train.class_counts(k)
  if config.data.limit_eval:
    for split in ('val', 'test'):
      rng = seeding.numpy_rng(dseed, f'limit/{split}')
      ds.splits[split] = ds.splits[split].take(
        imbalance.stratified_cap(ds.splits[split].labels, config.data.limit_eval, rng)
      )
    ds.source['eval_limited_to'] = config.data.limit_eval
  encoder = None
  if config.rebalance.method == 'smote' and config.rebalance.smote_space == 'feature':
    if feature_encoder is None:
      raise ValueError("rebalance.smote_space='feature' needs prepare_data(..., feature_encoder=...)")
    encoder = feature_encoder(config, workdir or os.path.join('runs', 'smote'))
  ts = rebalance.build_training_set(train, k, config.rebalance, config.seed, encoder=encoder)
  val_synthetic, val_report = None, None
  if config.rebalance.method == 'synthetic' and config.rebalance.get('synthetic_val', False):
    # Validation classes get synthetic images as their training classes did (synthetic.val_needed).
    train_syn = np.bincount(ts.pool.labels[np.char.startswith(ts.origin.astype(str), 'synthetic')], minlength=k)
    val_synthetic, val_report = synthetic.mix_validation(
      ds.splits['val'], train.class_counts(k), train_syn.tolist(), config.rebalance.synthetic,
      seeding.numpy_rng(config.seed, 'rebalance/synthetic_val'),
      config.rebalance.get('synthetic_val_rule', 'proportion'), config.rebalance.target_ratio,
    )  # fmt: skip
    val_report['selects'] = 'val+synthetic' if config.rebalance.get('synthetic_val_select', False) else 'val'
  check = source_check.check(train, ds.class_names, dseed) if config.data.get('source_check', False) else None
  # The whole pool is checked: real rows and every added (SMOTE, synthetic) row.
  leakage = check_leakage(ds, ts.pool)
  return PreparedData(
    ds,
    train,
    ts,
    report,
    leakage,
    prevalence,
    per_source_counts(ds, loaded, train, ts),
    check,
    val_synthetic,
    val_report,
  )


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for p in PACKAGES:
    try:
      out[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      out[p] = 'not installed'
  return out


def git_commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True, text=True, timeout=5)
    return out.stdout.strip() or 'unknown'
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def command_line() -> str:
  argv = list(sys.argv)
  for module, script in (('main', 'main.py'), ('sweep', os.path.join('sweep', '__main__.py'))):
    if argv and argv[0].endswith(os.path.join('cxrjax', script)):
      argv[0] = f'python -m cxrjax.{module}'
  return ' '.join(argv)


def run_info(config: ml_collections.ConfigDict, backend: Backend) -> dict[str, Any]:
  return dict(
    cxrjax_commit=git_commit(),
    config_hash=config_lib.config_hash(config),
    seed=config.seed,
    profile=config.profile,
    trainer=config.trainer,
    versions=versions(),
    devices=[str(d) for d in jax.devices()],
    process_count=jax.process_count(),
    platform=jax.default_backend(),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    backend=backend.record(sorted({'init', config_lib.main_program(config), config.model.name})),
    command=command_line(),
    host=platform.node(),
  )


def _config_diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      keys += _config_diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      keys.append(f'{prefix}{k}')
  return keys


class Run:
  """An open workdir: locked, its config recorded, with a metric writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.lock = fileio.WorkdirLock(self.workdir, jax.process_index())
    self.writer: progress.MetricWriter | None = None
    self.t_start = time.time()

  def open(self) -> Run:
    """Creates/locks the workdir; refuses one made with a different config unless overwriting."""
    existed = os.path.isdir(self.workdir) and bool(os.listdir(self.workdir))
    self.lock.acquire()
    cfg_path = os.path.join(self.workdir, 'config.json')
    mine = json.loads(self.config.to_json_best_effort())
    if os.path.isfile(cfg_path):
      theirs = fileio.read_json(cfg_path)
      new_hash = config_lib.config_hash(self.config)
      if theirs.get('config_hash') != new_hash:
        if not self.config.overwrite:
          diff = _config_diff(theirs.get('config', {}), mine)
          diff = [d for d in diff if d not in config_lib.RUNTIME_KEYS and d != 'overwrite']
          raise UserError(
            f'{self.workdir}: workdir holds a run with a different config (differs in {", ".join(diff[:6]) or "?"});'
            ' use another --workdir or pass --overwrite'
          )
        self._clear()
    elif existed and self.config.overwrite:
      self._clear()
    if jax.process_index() == 0:
      fileio.atomic_write_json(cfg_path, dict(config_hash=config_lib.config_hash(self.config), config=mine))
    self.writer = progress.MetricWriter(os.path.join(self.workdir, 'tb'))
    return self

  def _clear(self) -> None:
    progress.log(f'--overwrite: clearing {self.workdir}')
    if jax.process_index() != 0:
      return
    for name in os.listdir(self.workdir):
      if name.startswith('.lock'):
        continue
      p = os.path.join(self.workdir, name)
      shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    self.lock.release()


def completed_record(run: Run) -> dict | None:
  """The metrics record of a finished run with the same config (the stage is then skipped)."""
  path = run.path('metrics.json')
  if not os.path.isfile(path):
    return None
  record = fileio.read_json(path)
  if record.get('run', {}).get('config_hash') != config_lib.config_hash(run.config):
    return None
  progress.log(f'{run.workdir}: already complete (metrics.json, same config); skipping')
  return record


def banner(data: PreparedData, config: ml_collections.ConfigDict, backend: Backend) -> None:
  ds = data.dataset
  k = ds.num_classes
  lines = [
    '=' * 78,
    f'cxrjax {config.trainer} | profile {config.profile} | seed {config.seed}',
    f'data: {ds.source["description"]}',
  ]
  if ds.is_phantom:
    lines.append('*** PHANTOM DATA: procedural images, NOT real X-rays; results are labelled PHANTOM ***')
  if ds.source.get('fallback'):
    lines.append(f'*** {ds.source["fallback"]} ***')
  lines += [
    f'classes: {", ".join(ds.class_names)}',
    f'train loaded {ds.splits["train"].class_counts(k) if "counts_loaded" not in ds.source else ds.source["counts_loaded"]["train"]}'
    f' -> imbalanced {data.train.class_counts(k)} -> trained on {data.training_set.trained_counts(k)}'
    f' ({data.training_set.method})',
    f'val {ds.splits["val"].class_counts(k)} | test {ds.splits["test"].class_counts(k)}',
  ]
  if data.test_prevalence:
    lines.append(f'*** {data.test_prevalence["note"]} ***')
  if data.val_synthetic is not None:
    lines.append(
      f'*** validation includes synthetic images (rebalance.synthetic_val): val + synthetic'
      f' {data.val_synthetic.class_counts(k)}; the checkpoint is selected on {data.val_synthetic_report["selects"]} ***'
    )
  lines.append(f'kernels: {backend.describe()}')
  for key, value in backend.process.items():  # what the backend did to the process, where a user looks
    lines.append(f'  {key}: {value}')
  if len(data.per_source) > 1:
    for name, stages in data.per_source.items():
      shown = [f'{key} {stages[key]}' for key, _ in SOURCE_STAGES if key in stages and not key.endswith('_read')]
      lines.append(f'  source {name}: ' + ' | '.join(shown))
  if ds.source.get('duplicates'):
    lines.append(multi_source.duplicates_line(ds.source['duplicates'], ds.class_names))
  if data.source_check is not None:
    lines.append(source_check.line(data.source_check))
    lines.append(f'  {data.source_check["reading"]}')
  if any(data.leakage.values()):
    lines.append(f'note: identical images across splits in the source data: {data.leakage}')
  lines.append('=' * 78)
  for line in lines:
    progress.log(line)


def make_schedule(optim, total_steps: int, steps_per_epoch: int):
  """The learning rate against the step from `config.optim` (warmup, then constant or cosine)."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if optim.schedule == 'cosine':
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1))
    return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1))
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
                                [warmup])  # fmt: skip
  return optax.constant_schedule(optim.lr)


def make_update(optim, schedule, backend: Backend):
  """The optimizer's update at learning rate `schedule` (no clipping); Adam's is the backend's."""
  if optim.name == 'adam':
    tx = backend.adam(schedule, b1=optim.b1, b2=optim.b2)
    if optim.weight_decay:
      # L2 penalty added to the gradient, as torch.optim.Adam(weight_decay=...)
      tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), tx)
  elif optim.name == 'adamw':
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=optim.momentum, nesterov=True)
    if optim.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(optim.weight_decay), tx)
  return tx


def clip(optim, tx):
  """`tx` after clipping the global gradient norm, when `optim.grad_clip` asks for it."""
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx) if optim.grad_clip else tx


def make_optimizer(optim, total_steps: int, steps_per_epoch: int, backend: Backend):
  """(optax transform, learning-rate schedule) from `config.optim`; Adam's update is the backend's."""
  schedule = make_schedule(optim, total_steps, steps_per_epoch)
  return clip(optim, make_update(optim, schedule, backend)), schedule


def base_key(config: ml_collections.ConfigDict, name: str) -> jax.Array:
  return seeding.jax_key(config.seed, name)


def finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


def fit_batch(batch_size: int, num_images: int, mesh, tag: str, key: str) -> int:
  """The batch a generator's stage trains on: `batch_size`, or all its images when there are fewer.

  A generator of a tiny class (a dozen images at 100:1) then trains on what there is instead of
  stopping; the smaller batch stays a multiple of the devices and processes, and is announced
  (`key`, the config entry, is unchanged). Fewer images than that multiple is an error.
  """
  if num_images >= batch_size:
    return batch_size
  unit = math.lcm(mesh.devices.size, jax.process_count())
  batch = num_images - num_images % unit
  if batch < 1:
    raise UserError(f'{num_images} training images for a generator on {unit} devices: needs at least {unit}')
  progress.log(f'{tag} {num_images} training images, fewer than a batch of {batch_size}: training on batches'
               f' of {batch} ({key} unchanged)')  # fmt: skip
  return batch


def sync(name: str) -> None:
  """Waits for every process at `name` (a no-op in one process): what process 0 wrote is there to read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only with several processes

    multihost_utils.sync_global_devices(name)


def ensure_synthetic(
  path: str,
  provenance: dict[str, Any],
  counts: dict[int, int],
  make: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
  tag: str,
  what: str,
) -> Split:
  """The synthetic set at `path` for `provenance`, made first if it is missing or was made for another.

  The one way a stage gets a synthetic set (training set, its validation companion, the TSTR copy):
  a set whose stored provenance equals `provenance` is read as it is, so a finished stage's set is
  reused on resume and a changed generator or config remakes it. Otherwise `make(labels)` (labels:
  `counts[c]` of class c, in class order) returns the images and, for image-to-image sets, the real
  image each was made from (None otherwise). Process 0 writes the file atomically; every process
  passes one barrier, whichever way it went (a process that found process 0's finished file made
  nothing), and then reads the file.
  """
  current = synthetic.load(path)[1] if os.path.isfile(path) else None
  if current != provenance:
    labels = synthetic.labels_for(counts)
    progress.log(f'{tag} synthesizing {what}: {len(labels)} images, per class {counts}')
    images, derived_from = make(labels)
    if jax.process_index() == 0:
      synthetic.save(path, images, labels, provenance, derived_from=derived_from)
  sync(f'synthetic set {path}')
  return synthetic.load(path)[0]
