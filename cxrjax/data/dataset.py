"""In-memory labelled image splits with provenance.

Every source (npz, TFDS, class-per-folder tree, phantom) produces a `Dataset`:
uint8 images `[N, H, W, C]`, int32 labels, a group id per image (the patient,
when known, so that splits never share a patient), a name per image (file
or array position) and the source it came from (the data source's name; for rows
added in training 'smote:...' or 'synthetic:<tag>'), plus a `source` record that
travels into every output. Names and sources are row fields, so every subset,
repetition or concatenation keeps each image's provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from cxrjax.errors import UserError

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass
class Split:
  """One split: images, labels, patient groups, names and sources, aligned by row."""

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  groups: np.ndarray  # str [N]: patient id, or a unique id per image
  names: np.ndarray  # str [N]: where each image came from (file relative to its source, or npz key[index])
  sources: np.ndarray | None = None  # str [N]: the source of each image (data.sources); None: '' for every row

  def __post_init__(self):
    n = len(self.labels)
    if self.sources is None:
      self.sources = np.full(n, '', dtype=str)
    if not (len(self.images) == len(self.groups) == len(self.names) == len(self.sources) == n):
      raise ValueError('Split fields must have the same length')
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'Split images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}')

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, index: np.ndarray) -> Split:
    """Rows `index` (with repetition allowed), in that order."""
    index = np.asarray(index, dtype=np.int64)
    return Split(self.images[index], self.labels[index], self.groups[index], self.names[index], self.sources[index])

  def class_counts(self, num_classes: int) -> list[int]:
    return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()

  def content_hashes(self) -> np.ndarray:
    """A hash per image of its pixels, for leakage checks across splits."""
    flat = self.images.reshape(len(self), -1)
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in flat])


def concat(a: Split, b: Split) -> Split:
  return Split(
    np.concatenate([a.images, b.images]),
    np.concatenate([a.labels, b.labels]),
    np.concatenate([a.groups, b.groups]),
    np.concatenate([a.names, b.names]),
    np.concatenate([a.sources, b.sources]),
  )


@dataclasses.dataclass
class Dataset:
  """The train/val/test splits of one dataset, with class names and provenance."""

  splits: dict[str, Split]
  class_names: tuple[str, ...]
  source: dict[str, Any]  # kind, path, phantom flag, notes: recorded in outputs

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.splits['train'].images.shape[1:])

  @property
  def is_phantom(self) -> bool:
    return bool(self.source.get('phantom', False))

  def counts(self) -> dict[str, list[int]]:
    return {name: split.class_counts(self.num_classes) for name, split in self.splits.items()}


# The stages at which images are counted per source (cxrjax.trainers.common.per_source_counts), with the
# row labels reports give them, in order: 'read' is before cross-source duplicates are dropped.
SOURCE_STAGES = (
  ('train_read', 'train (read, before duplicates)'),
  ('train_loaded', 'train (loaded)'),
  ('train_imbalanced', 'train (imbalanced)'),
  ('trained_on', 'train (per epoch, as trained)'),
  ('val_read', 'val (read)'),
  ('val', 'val (evaluated)'),
  ('test_read', 'test (read)'),
  ('test', 'test (evaluated)'),
)


def counts_by_source(sources: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, list[int]]:
  """Rows per class of each source (`Split.sources`, `Split.labels`; sources in order of first appearance)."""
  out = {}
  for name in dict.fromkeys(sources.tolist()):
    out[str(name)] = np.bincount(labels[sources == name], minlength=num_classes).astype(int).tolist()
  return out


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
  """Labels as int32 [N], each in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise UserError(f'{where}: labels have shape {labels.shape}; expected [N] or [N, 1]')
  if not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f'{where}: labels have dtype {labels.dtype}; expected integers')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(
      f'{where}: labels range over [{labels.min()}, {labels.max()}]; expected [0, {num_classes - 1}]'
      f' for {num_classes} classes'
    )
  return labels.astype(np.int32)
