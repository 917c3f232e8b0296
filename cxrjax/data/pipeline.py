"""Grain input pipelines: seeded, resumable by step, sharded by process.

Training stream (the same on every process, so every process agrees on each
global batch):

  range(epoch_size) -> shuffle(seed) -> first steps_per_epoch*B -> repeat(epochs)
    -> look up the pool row of the plan -> augment (seeded per element)
    -> this process's rows of each global batch -> batch(B / processes)

Grain shuffles every epoch differently and seeds each element's augmentation
from its position, so batch `s` is a pure function of (seed, s): a resumed run
starts the stream at its checkpointed step (`ds[step:]`) and sees exactly the
batches an uninterrupted run would. Batches drop the remainder of each epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import numpy as np

from cxrjax import seeding
from cxrjax.data.augment import AugmentParams, augment_image
from cxrjax.data.dataset import Split
from cxrjax.data.rebalance import TrainingSet
from cxrjax.errors import UserError


@dataclasses.dataclass
class _PoolLookup:
  """Plan position -> training example (picklable, for Grain worker processes)."""

  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray  # per pool row
  strong: np.ndarray
  plan: np.ndarray

  def __call__(self, position: int) -> dict:
    row = int(self.plan[position])
    return dict(
      image=self.images[row],
      label=np.int32(self.labels[row]),
      weight=np.float32(self.weights[row]),
      strong=bool(self.strong[row]),
    )


@dataclasses.dataclass
class _Augment:
  normal: AugmentParams
  strong: AugmentParams

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    params = self.strong if element.pop('strong') else self.normal
    element['image'] = augment_image(element['image'], rng, params)
    return element


class _ProcessRows:
  """The rows of each global batch that belong to one process, as a random-access source."""

  def __init__(self, stream: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    self.stream = stream
    self.local = global_batch // process_count
    self.global_batch = global_batch
    self.offset = process_index * self.local
    self.num_batches = len(stream) // global_batch

  def __len__(self) -> int:
    return self.num_batches * self.local

  def __getitem__(self, k: int):
    b, r = divmod(int(k), self.local)
    return self.stream[b * self.global_batch + self.offset + r]


def steps_per_epoch(ts: TrainingSet, global_batch: int) -> int:
  return len(ts.plan) // global_batch


def make_train_dataset(
  ts: TrainingSet,
  *,
  global_batch: int,
  num_epochs: int,
  seed: int,
  augment: AugmentParams,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """A random-access dataset of this process's local batches, one per training step."""
  if global_batch % process_count:
    raise UserError(f'config.batch_size={global_batch}: expected a multiple of the {process_count} processes')
  spe = steps_per_epoch(ts, global_batch)
  if spe == 0:
    raise UserError(
      f'config.batch_size={global_batch} is larger than the {len(ts.plan)} training examples per epoch;'
      ' lower batch_size'
    )
  weights = ts.class_weights[ts.pool.labels]
  lookup = _PoolLookup(ts.pool.images, ts.pool.labels, weights, ts.strong, ts.plan)
  stream = (
    grain.MapDataset.range(len(ts.plan))
    .shuffle(seed=seeding.int_seed(seed, 'pipeline/shuffle'))[: spe * global_batch]
    .repeat(num_epochs)
    .map(lookup)
    .random_map(_Augment(augment, augment.strong()), seed=seeding.int_seed(seed, 'pipeline/augment'))
  )
  rows = _ProcessRows(stream, global_batch, process_index, process_count)
  return grain.MapDataset.source(rows).batch(global_batch // process_count, drop_remainder=True)


def train_iterator(
  ds: grain.MapDataset, start_step: int, *, num_threads: int = 4, prefetch: int = 4, num_workers: int = 0
) -> Iterator[dict]:
  """Iterates local batches from `start_step`, with thread (or process) prefetch."""
  it = ds[start_step:].to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)


def eval_batches(split: Split, global_batch: int, process_index: int = 0, process_count: int = 1):
  """Yields (images, labels, mask) local batches covering `split`, the last one padded.

  Every process pads identically and takes its own rows of each global batch,
  so the global arrays line up with the split's order.
  """
  n = len(split)
  local = global_batch // process_count
  lo = process_index * local
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    idx, mask = idx[lo : lo + local], mask[lo : lo + local]
    yield split.images[idx], split.labels[idx], mask


def split_batches(
  split: Split,
  *,
  global_batch: int,
  total_steps: int,
  seed: int,
  start_step: int,
  augment: AugmentParams | None = None,
  num_threads: int = 1,
  prefetch: int = 4,
) -> Iterator[dict]:
  """`total_steps` shuffled batches of a whole split (for generator training), from `start_step`.

  Raises:
    UserError: the split has fewer images than one batch.
  """
  n = len(split)
  if n < global_batch:
    raise UserError(f'{n} training images for a generator batch of {global_batch}; lower the batch size')
  ts = TrainingSet(
    split, np.arange(n), np.zeros(n, bool), np.full(n, 'real'), np.ones(int(split.labels.max()) + 1, np.float32), 'none'
  )
  spe = n // global_batch
  epochs = -(-total_steps // spe)
  ds = make_train_dataset(
    ts,
    global_batch=global_batch,
    num_epochs=epochs,
    seed=seed,
    augment=augment or AugmentParams(),
    process_index=_process_index(),
    process_count=_process_count(),
  )
  return train_iterator(ds, start_step, num_threads=num_threads, prefetch=prefetch)


def _process_index() -> int:
  import jax  # noqa: PLC0415 - the pipeline itself does not need JAX

  return jax.process_index()


def _process_count() -> int:
  import jax  # noqa: PLC0415

  return jax.process_count()
