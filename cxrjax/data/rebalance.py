"""Rebalancing methods: one interface, in the data layer and the loss.

A method sees only the (imbalanced) training split and returns a
`TrainingSet`: a pool of examples (the real training images, then any extra
examples such as SMOTE interpolations or generator samples, each with its
provenance: each row's `Split.sources` is its data source, 'smote:<source>' or
'synthetic:<tag>'), a sampling plan (pool indices for one epoch, repetition allowed),
a per-row strong-augmentation flag, and per-class loss weights. Trainers
consume a `TrainingSet` and never branch on the method; validation and test
splits never reach this module.

Methods (`config.rebalance.method`):
  none           the imbalanced split as it is
  class_weights  inverse-frequency (or effective-number) weights in the loss
  undersample    drop random majority rows down to the target ratio
  oversample     repeat random minority rows (with replacement) up to it
  smote          add minority interpolations between k-nearest neighbours
  augment        like oversample, but the repeats get strong augmentation
  synthetic      fill minority classes with generator samples read from the
                 synthetic sets in `rebalance.synthetic` ('path[:weight],...'),
                 mixed in proportion to the weights (DCGAN, cDCGAN, LDM, mixes)
`rebalance.target_ratio` is minority:majority after rebalancing (1.0: equal).

How many synthetic images each class gets (`synthetic_needed`): enough to reach
the target ratio, or, with `rebalance.synthetic_dose` > 0, the dose times the
class's own real count, for the minority classes (every class smaller than the
largest) or, with `rebalance.dose_classes='all'`, for every class.
`rebalance.synthetic_only` trains on synthetic images alone (train on synthetic,
test on real): the pool is the synthetic rows only, as many per class as the
real training split has, and no real training row is in it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cxrjax import seeding
from cxrjax.data import synthetic
from cxrjax.data.dataset import Split, concat
from cxrjax.errors import UserError

METHODS = ('none', 'class_weights', 'undersample', 'oversample', 'smote', 'augment', 'synthetic')


@dataclasses.dataclass
class TrainingSet:
  """What a classifier trains on: a pool of rows and a per-epoch sampling plan."""

  pool: Split  # real training rows first, then extra rows (synthetic_only: the synthetic rows alone)
  plan: np.ndarray  # int64 pool indices for one epoch (repetition allowed)
  strong: np.ndarray  # bool per pool row: use strong augmentation
  origin: np.ndarray  # str per pool row: 'real', 'smote', 'synthetic:<tag>', ...
  class_weights: np.ndarray  # float32 [K]: loss weight of each class
  method: str
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  def trained_counts(self, num_classes: int) -> list[int]:
    """Examples per class in one epoch of the plan: what the classifier really sees."""
    return np.bincount(self.pool.labels[self.plan], minlength=num_classes).astype(int).tolist()

  def origin_counts(self) -> dict[str, int]:
    kinds = np.array([o.split(':')[0] for o in self.origin[self.plan]])
    values, counts = np.unique(kinds, return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

  def summary(self, num_classes: int) -> dict[str, Any]:
    return dict(
      method=self.method,
      trained_counts=self.trained_counts(num_classes),
      origin_counts=self.origin_counts(),
      pool_size=len(self.pool),
      epoch_size=int(len(self.plan)),
      class_weights=[float(w) for w in self.class_weights],
      **self.details,
    )


def class_weights(counts: np.ndarray, weighting: str = 'inverse', beta: float = 0.999) -> np.ndarray:
  """Per-class loss weights.

  'inverse': N / (K * n_k), scikit-learn's 'balanced'. 'effective': the
  effective number of samples (Cui et al. 2019), (1 - beta) / (1 - beta^n_k),
  normalised to sum to K.
  """
  counts = np.asarray(counts, np.float64)
  k = len(counts)
  if weighting == 'inverse':
    w = counts.sum() / (k * np.maximum(counts, 1))
  elif weighting == 'effective':
    w = (1 - beta) / (1 - beta ** np.maximum(counts, 1))
    w = w / w.sum() * k
  else:
    raise UserError(f'config.rebalance.weighting={weighting!r}: expected inverse or effective')
  return w.astype(np.float32)


def _targets_up(counts: np.ndarray, target_ratio: float) -> np.ndarray:
  """Per-class counts after oversampling: every class at least target_ratio * largest."""
  goal = int(round(target_ratio * counts.max()))
  return np.maximum(counts, goal)


def _targets_down(counts: np.ndarray, target_ratio: float) -> np.ndarray:
  """Per-class counts after undersampling: no class above smallest / target_ratio."""
  cap = int(round(counts.min() / target_ratio))
  return np.minimum(counts, cap)


def synthetic_needed(
  counts, target_ratio: float, dose: float = 0.0, dose_classes: str = 'minority', only: bool = False
) -> np.ndarray:
  """Synthetic images per class, for real training counts `counts` [K].

  only: the real counts themselves (a synthetic copy of the training split's class mix).
  dose > 0: round(dose * n_c) for every dosed class c (dose_classes 'minority': the
    classes below the largest; 'all': every class, which keeps the class ratio), 0 for the rest.
  dose == 0: what fills each class up to target_ratio * the largest class.
  """
  counts = np.asarray(counts, np.int64)
  if only:
    return counts.copy()
  if dose > 0:
    if dose_classes not in ('minority', 'all'):
      raise UserError(f"config.rebalance.dose_classes={dose_classes!r}: expected 'minority' or 'all'")
    dosed = counts < counts.max() if dose_classes == 'minority' else np.ones(len(counts), bool)
    return np.where(dosed, np.floor(dose * counts + 0.5), 0).astype(np.int64)
  return _targets_up(counts, target_ratio) - counts


def smote_samples(images: np.ndarray, n_new: int, k: int, rng: np.random.Generator, feats: np.ndarray | None = None):
  """SMOTE (Chawla et al. 2002) for one class, interpolating pixels.

  Each new sample is x_i + lam * (x_j - x_i), with x_i a random row, x_j one
  of its k nearest neighbours (Euclidean, same class) and lam ~ U(0, 1). The
  neighbours are found in pixel space, or in `feats` (e.g. a reference
  network's embedding) when given, so that partners are semantically close;
  the interpolation itself stays in pixel space (a classifier needs images).

  Returns:
    (uint8 images [n_new, ...], base indices i, neighbour indices j, lambdas).
  """
  from sklearn.neighbors import NearestNeighbors  # noqa: PLC0415 - only this method needs it

  n = len(images)
  if n < 2:
    raise UserError(f'SMOTE needs at least 2 images of a class to interpolate; got {n}')
  k = min(k, n - 1)
  flat = images.reshape(n, -1).astype(np.float32)
  space = flat if feats is None else np.asarray(feats, np.float32)
  nn_ = NearestNeighbors(n_neighbors=k + 1).fit(space)
  _, neigh = nn_.kneighbors(space)
  # Drop the point itself (not necessarily first when it has exact duplicates).
  neigh = np.array([[j for j in row if j != i][:k] for i, row in enumerate(neigh)])
  base = rng.integers(0, n, n_new)
  pick = neigh[base, rng.integers(0, k, n_new)]
  lam = rng.random(n_new).astype(np.float32)
  new = flat[base] + lam.reshape(-1, 1) * (flat[pick] - flat[base])
  new = np.clip(np.rint(new), 0, 255).astype(np.uint8).reshape((n_new,) + images.shape[1:])
  return new, base, pick, lam


def build_training_set(train: Split, num_classes: int, rebalance, seed: int, encoder=None) -> TrainingSet:
  """Applies `config.rebalance` to the imbalanced training split.

  Args:
    train: the training split after the imbalance protocol (never val/test).
    num_classes: K.
    rebalance: `config.rebalance`.
    seed: the experiment seed; the result is a function of (train, config, seed).
    encoder: images -> features, for SMOTE's neighbour search in feature space.

  Returns:
    A `TrainingSet`.
  """
  method = rebalance.method
  if method not in METHODS:
    raise UserError(f'config.rebalance.method={method!r}: expected one of {", ".join(METHODS)}')
  rng = seeding.numpy_rng(seed, f'rebalance/{method}')
  counts = np.bincount(train.labels, minlength=num_classes)
  n = len(train)
  origin = np.full(n, 'real', dtype=object)
  strong = np.zeros(n, bool)
  weights = np.ones(num_classes, np.float32)
  plan = np.arange(n, dtype=np.int64)
  pool = train
  details: dict[str, Any] = {}

  if method == 'class_weights':
    weights = class_weights(counts, rebalance.weighting, rebalance.beta)
    details['weighting'] = rebalance.weighting
  elif method == 'undersample':
    targets = _targets_down(counts, rebalance.target_ratio)
    keep = []
    for c in range(num_classes):
      idx = np.flatnonzero(train.labels == c)
      keep.append(np.sort(rng.choice(idx, size=targets[c], replace=False)) if targets[c] < len(idx) else idx)
    plan = np.sort(np.concatenate(keep)).astype(np.int64)
  elif method in ('oversample', 'augment'):
    targets = _targets_up(counts, rebalance.target_ratio)
    extra = []
    for c in range(num_classes):
      idx = np.flatnonzero(train.labels == c)
      if targets[c] > len(idx):
        extra.append(rng.choice(idx, size=targets[c] - len(idx), replace=True))
    extra = np.concatenate(extra).astype(np.int64) if extra else np.zeros(0, np.int64)
    if method == 'augment':
      # The repeats become their own pool rows so that only they (not the
      # originals) are augmented strongly.
      pool = concat(train, train.take(extra))
      origin = np.concatenate([origin, np.full(len(extra), 'augmented', dtype=object)])
      strong = np.concatenate([strong, np.ones(len(extra), bool)])
      plan = np.arange(len(pool), dtype=np.int64)
    else:
      plan = np.concatenate([plan, extra])
  elif method == 'smote':
    targets = _targets_up(counts, rebalance.target_ratio)
    new_parts = []
    for c in range(num_classes):
      need = int(targets[c] - counts[c])
      if need <= 0:
        continue
      idx = np.flatnonzero(train.labels == c)
      feats = encoder(train.images[idx]) if encoder is not None else None
      imgs, base, pick, lam = smote_samples(train.images[idx], need, rebalance.smote_k, rng, feats)
      names = np.array(
        [f'smote:{train.names[idx[b]]}+{train.names[idx[p]]}@{lv:.4f}' for b, p, lv in zip(base, pick, lam)]
      )
      src_a, src_b = train.sources[idx[base]], train.sources[idx[pick]]
      sources = np.array([f'smote:{a}' if a == b else f'smote:{a}+{b}' for a, b in zip(src_a, src_b)])
      new_parts.append(Split(imgs, np.full(need, c, np.int32), train.groups[idx[base]], names, sources))
    for part in new_parts:
      pool = concat(pool, part)
      origin = np.concatenate([origin, np.full(len(part), 'smote', dtype=object)])
      strong = np.concatenate([strong, np.zeros(len(part), bool)])
    plan = np.arange(len(pool), dtype=np.int64)
    details['smote_k'] = int(rebalance.smote_k)
    details['smote_space'] = 'feature (reference network)' if encoder is not None else 'pixel'
  elif method == 'synthetic':
    dose = float(rebalance.get('synthetic_dose', 0.0))
    only = bool(rebalance.get('synthetic_only', False))
    dose_classes = rebalance.get('dose_classes', 'minority')
    sources = []
    for path, weight in synthetic.parse_sources(rebalance.synthetic):
      split, prov = synthetic.load(path)
      prov = dict(prov, path=path)
      sources.append((split, prov, weight))
    need = synthetic_needed(counts, rebalance.target_ratio, dose, dose_classes, only)
    needed = {c: int(need[c]) for c in range(num_classes)}
    extra, origins, summary = synthetic.draw(sources, needed, train.images.shape[1:], rng)
    if only:
      # Train on synthetic: the real rows leave the pool; the synthetic rows are all of it.
      if extra is None:
        raise UserError('config.rebalance.synthetic_only: the synthetic sets gave no image; expected every class')
      pool = dataclasses.replace(extra, sources=origins.astype(str))
      origin = origins.astype(object)
      strong = np.zeros(len(extra), bool)
    elif extra is not None:
      pool = concat(pool, dataclasses.replace(extra, sources=origins.astype(str)))  # 'synthetic:<tag>', as origin
      origin = np.concatenate([origin, origins.astype(object)])
      strong = np.concatenate([strong, np.zeros(len(extra), bool)])
    plan = np.arange(len(pool), dtype=np.int64)
    details['synthetic'] = dict(
      sources=[dict(path=p['path'], weight=w, tag=p.get('tag'), generator=p.get('generator')) for _, p, w in sources],
      drawn=summary,
    )
    if only:
      details['synthetic_only'] = True
    if dose > 0:
      details['synthetic_dose'] = dict(dose=dose, classes=dose_classes, added=[int(n) for n in need])
  ts = TrainingSet(pool, plan, strong, origin.astype(str), weights, method, details)
  ratio_used = method not in ('none', 'class_weights') and not (method == 'synthetic' and (dose > 0 or only))
  ts.details['target_ratio'] = float(rebalance.target_ratio) if ratio_used else None
  return ts


def add_extra(ts: TrainingSet, extra: Split, tag: str, strong: bool = False) -> TrainingSet:
  """Appends extra rows (e.g. generator samples) to the pool and the plan."""
  n = len(ts.pool)
  pool = concat(ts.pool, dataclasses.replace(extra, sources=np.full(len(extra), tag)))
  return dataclasses.replace(
    ts,
    pool=pool,
    plan=np.concatenate([ts.plan, np.arange(n, n + len(extra), dtype=np.int64)]),
    strong=np.concatenate([ts.strong, np.full(len(extra), strong)]),
    origin=np.concatenate([ts.origin, np.full(len(extra), tag)]).astype(str),
  )
