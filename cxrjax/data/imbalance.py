"""The imbalance protocol: subsample the training split to a set class ratio.

The poster's protocol keeps the majority class whole and drops minority
(pneumonia) images until majority:minority = `ratio` (3:1). Validation and test
splits are never touched by it; only `data.test_prevalence` subsamples the test
split, to an evaluation class mix the user asks for (`apply_test_prevalence`).
All sampling is seeded from the one config seed.
"""

from __future__ import annotations

import numpy as np

from cxrjax import config_lib, seeding
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError


def stratified_cap(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of at most `limit` rows, keeping class proportions (at least one per class)."""
  n = len(labels)
  if limit <= 0 or limit >= n:
    return np.arange(n)
  classes, counts = np.unique(labels, return_counts=True)
  # Largest-remainder allocation: quotas sum to exactly `limit`.
  exact = counts / n * limit
  quota = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - quota), kind='stable')[: limit - quota.sum()]:
    quota[i] += 1
  quota = np.maximum(quota, 1)
  keep = []
  for c, q in zip(classes, quota):
    idx = np.flatnonzero(labels == c)
    keep.append(rng.choice(idx, size=min(q, len(idx)), replace=False))
  return np.sort(np.concatenate(keep))


def subsample_per_class(labels: np.ndarray, target, rng: np.random.Generator) -> np.ndarray:
  """Sorted row indices keeping `target[c]` rows of each class c, drawn without replacement in class order.

  A class with no more than `target[c]` rows keeps them all (no draw is made for it).
  """
  keep = []
  for c, n in enumerate(target):
    idx = np.flatnonzero(labels == c)
    keep.append(rng.choice(idx, size=n, replace=False) if n < len(idx) else idx)
  return np.sort(np.concatenate(keep))


def apply_imbalance(train: Split, num_classes: int, minority_class: int, ratio: float, seed: int):
  """Subsamples `train` to majority:minority = `ratio`.

  The minority class is reduced to round(n_largest_other / ratio). If it has
  fewer images than that, the other classes are reduced to
  round(n_minority * ratio) instead, so the ratio always holds.

  Args:
    train: the training split.
    num_classes: number of classes.
    minority_class: the class to make rare.
    ratio: majority:minority; 0 keeps the split as it is.
    seed: the experiment seed.

  Returns:
    (subsampled split, report dict with counts before and after).

  Raises:
    UserError: unknown minority class, or a class left empty.
  """
  before = train.class_counts(num_classes)
  report = dict(minority_class=minority_class, ratio=ratio, counts_before=before)
  if ratio == 0:
    report.update(counts_after=before, note='imbalance.ratio=0: training split kept as it is')
    return train, report
  if not 0 <= minority_class < num_classes:
    raise UserError(f'config.imbalance.minority_class={minority_class}: expected a class in [0, {num_classes - 1}]')
  others = [before[c] for c in range(num_classes) if c != minority_class]
  n_major = max(others)
  target_min = int(round(n_major / ratio))
  target = list(before)
  if before[minority_class] >= target_min:
    target[minority_class] = target_min
    note = f'minority class {minority_class} reduced to {target_min} = round({n_major}/{ratio:g})'
  else:
    cap = int(round(before[minority_class] * ratio))
    target = [min(n, cap) if c != minority_class else n for c, n in enumerate(before)]
    note = (
      f'minority class {minority_class} has only {before[minority_class]} images: other classes'
      f' reduced to at most {cap} = round({before[minority_class]}*{ratio:g})'
    )
  out = train.take(subsample_per_class(train.labels, target, seeding.numpy_rng(seed, 'imbalance')))
  after = out.class_counts(num_classes)
  for c, n in enumerate(after):
    if n == 0:
      raise UserError(
        f'imbalance protocol (minority_class={minority_class}, ratio={ratio:g}) leaves class {c} with no'
        f' training images (counts before: {before}); lower imbalance.ratio'
      )
  report.update(counts_after=after, note=note)
  return out, report


def apply_class_ratios(train: Split, num_classes: int, spec: str, seed: int):
  """K-class protocol: class c keeps round(n_largest / r_c) images (r_c >= 1; 1 keeps it whole).

  Args:
    train: the training split.
    num_classes: K.
    spec: 'r0,r1,...', one largest:class ratio per class.
    seed: the data seed.

  Returns:
    (subsampled split, report dict).
  """
  try:
    ratios = [float(x) for x in spec.split(',') if x.strip()]
  except ValueError as e:
    raise UserError(f'config.imbalance.class_ratios={spec!r}: expected comma-separated numbers') from e
  if len(ratios) != num_classes or any(r < 1 for r in ratios):
    raise UserError(f'config.imbalance.class_ratios={spec!r}: expected {num_classes} ratios >= 1 (one per class)')
  before = train.class_counts(num_classes)
  n_max = max(before)
  target = [min(n, int(round(n_max / r))) for n, r in zip(before, ratios)]
  out = train.take(subsample_per_class(train.labels, target, seeding.numpy_rng(seed, 'imbalance')))
  after = out.class_counts(num_classes)
  if min(after) == 0:
    raise UserError(f'config.imbalance.class_ratios={spec!r} leaves a class with no training images ({after})')
  note = f'per-class ratios {ratios} to the largest class ({n_max})'
  return out, dict(
    class_ratios=ratios,
    counts_before=before,
    counts_after=after,
    note=note,
    minority_class=int(np.argmin(after)),
    ratio=float(n_max / max(min(after), 1)),
  )


def apply_test_prevalence(test: Split, class_names, spec: str, seed: int):
  """Subsamples the test split to the class mix `spec` ('1,1', '0.5,0.5', '1,3'), keeping as many images as it can.

  Images are only dropped, never repeated: with n_c test images of class c and the mix p_c
  (the weights normalised), the kept total is N = floor(min_c n_c / p_c) and class c keeps
  round(N p_c) <= n_c images, drawn from the data seed's own 'test_prevalence' stream so that
  no other draw changes. Some papers evaluate on a more balanced test set than the one
  distributed; this reproduces their mix, and the record says so.

  Args:
    test: the test split.
    class_names: the dataset's class names (one weight each).
    spec: `data.test_prevalence`, comma-separated positive weights.
    seed: the data seed.

  Returns:
    (subsampled split, report dict: spec, mix, counts before and after, note).

  Raises:
    UserError: a weight count other than the number of classes, or a class left without test images.
  """
  k = len(class_names)
  weights = config_lib.parse_prevalence(spec)
  if len(weights) != k:
    raise UserError(
      f'config.data.test_prevalence={spec!r}: {len(weights)} values but the data has {k} classes ({", ".join(class_names)})'
    )
  before = test.class_counts(k)
  for c, n in enumerate(before):
    if n == 0:
      raise UserError(
        f'config.data.test_prevalence={spec!r}: the test split has no images of class {class_names[c]!r};'
        " expected some of every class (or data.test_prevalence='')"
      )
  mix = np.asarray(weights) / sum(weights)
  total = int(np.floor(min(n / p for n, p in zip(before, mix)) * (1 + 1e-12)))
  target = [min(n, int(np.floor(total * p + 0.5))) for n, p in zip(before, mix)]
  for c, n in enumerate(target):
    if n == 0:
      raise UserError(
        f'config.data.test_prevalence={spec!r} leaves class {class_names[c]!r} with no test images (test counts'
        f' {before}); expected a mix the test split can give'
      )
  out = test.take(subsample_per_class(test.labels, target, seeding.numpy_rng(seed, 'test_prevalence')))
  after = out.class_counts(k)
  ratio = ':'.join(f'{w:g}' for w in weights)
  return out, dict(
    spec=spec,
    mix=[float(p) for p in mix],
    counts_before=before,
    counts_after=after,
    seed=seed,
    note=f'test subsampled to {ratio} (data.test_prevalence) from {before} to {after}: metrics are for this mix,'
    ' not the test split as distributed',
  )
