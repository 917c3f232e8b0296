"""Source-shortcut check: how well pixels alone tell the training sources apart.

When one class comes mostly from one hospital, a classifier can learn the hospital (scanner,
exposure, resizing, text markers) instead of the disease. This check fits a deliberately small
model, logistic regression on 16x16 grayscale thumbnails (standardised), and reports its
stratified 5-fold cross-validated AUROC for telling each source from the others (one-vs-rest),
over all training images and within each class. Within-class separability is the real shortcut
signal: if the normals of source A are told apart from the normals of source B, the model can
use the source as a proxy for the label wherever the sources' class mixes differ. AUROC near 0.5
means the thumbnails carry no source signal; near 1, a strong one (a bigger model only finds more).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrjax.data import images as image_lib
from cxrjax.data.dataset import Split

SIZE = 16
FOLDS = 5
MAX_ROWS = 6000  # a stratified subsample beyond this keeps the check cheap
FEW = 30  # fewer images of a source in a class make its AUROC a rough estimate (said in the reading)
READING = 'AUROC near 1 means the model can learn the hospital instead of the disease; near 0.5, no source signal'


def thumbnails(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 [N, SIZE*SIZE] grayscale in [0, 1]."""
  gray = image_lib.resize_array(image_lib.to_channels(images, 1), SIZE)
  return gray.reshape(len(gray), -1).astype(np.float32) / 255.0


def _cv_auroc(x: np.ndarray, y: np.ndarray, names: list[str], seed: int) -> dict[str, float]:
  """Out-of-fold one-vs-rest AUROC per class of `y` (indices into `names`)."""
  from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - scikit-learn only when the check is on
  from sklearn.metrics import roc_auc_score  # noqa: PLC0415
  from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: PLC0415
  from sklearn.pipeline import make_pipeline  # noqa: PLC0415
  from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

  folds = int(min(FOLDS, np.bincount(y).min()))
  model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
  cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  probs = cross_val_predict(model, x, y, cv=cv, method='predict_proba')
  return {name: float(roc_auc_score(y == s, probs[:, s])) for s, name in enumerate(names)}


def _subsample(n: int, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  if n <= MAX_ROWS:
    return np.arange(n)
  keep = []
  for s in np.unique(strata):
    idx = np.flatnonzero(strata == s)
    keep.append(rng.choice(idx, size=max(1, round(len(idx) * MAX_ROWS / n)), replace=False))
  return np.sort(np.concatenate(keep))


def check(split: Split, class_names, seed: int = 0) -> dict[str, Any]:
  """The source-shortcut check on the real rows of `split` (the training images).

  Returns:
    A record: the features and model, rows used per source, `by_source` (AUROC of each
    source against the rest, all classes together), `within_class` (per class: rows per
    source and AUROC per source, or a note when fewer than two sources give at least two
    images of it), the largest within-class AUROC, and a one-sentence `reading`.
  """
  names = [str(s) for s in dict.fromkeys(split.sources.tolist())]
  record: dict[str, Any] = dict(
    features=f'{SIZE}x{SIZE} grayscale thumbnails, standardised',
    model=f'logistic regression (C=1), stratified {FOLDS}-fold cross-validation, out-of-fold AUROC',
  )
  if len(names) < 2:
    record.update(note='one source: nothing to tell apart', by_source={}, within_class={}, max_within_class=None)
    record['reading'] = 'one training source: no source shortcut to measure'
    return record
  y_all = np.array([names.index(s) for s in split.sources])
  rng = np.random.default_rng([seed, 5831])
  keep = _subsample(len(split), y_all * len(class_names) + split.labels, rng)
  x, y, labels = thumbnails(split.images[keep]), y_all[keep], split.labels[keep]
  record['rows'] = {n: int(np.sum(y == s)) for s, n in enumerate(names)}
  record['by_source'] = _cv_auroc(x, y, names, seed)
  within: dict[str, Any] = {}
  for c, cname in enumerate(class_names):
    rows = labels == c
    present = [s for s in range(len(names)) if np.sum(y[rows] == s) >= 2]
    counts = {names[s]: int(np.sum(y[rows] == s)) for s in range(len(names)) if np.sum(y[rows] == s)}
    if len(present) < 2:
      within[cname] = dict(rows=counts, auroc={}, note='fewer than two sources with at least 2 images of this class')
      continue
    sel = rows & np.isin(y, present)
    sub_names = [names[s] for s in present]
    sub_y = np.searchsorted(present, y[sel])
    within[cname] = dict(rows=counts, auroc=_cv_auroc(x[sel], sub_y, sub_names, seed))
  record['within_class'] = within
  scores = [(max(v['auroc'].values()), c) for c, v in within.items() if v['auroc']]
  record['max_within_class'] = max(scores)[0] if scores else None
  if scores:
    best, cname = max(scores, key=lambda t: t[0])  # the first class with the largest AUROC
    few = min(within[cname]['rows'].items(), key=lambda t: t[1])
    rough = f' (only {few[1]} images from {few[0]}: a rough estimate)' if few[1] < FEW else ''
    record['reading'] = (
      f'Within class {cname!r} the sources are told apart with AUROC {best:.2f} from 16x16 thumbnails{rough}:'
      f' {READING}.'
    )
  else:
    top = max(record['by_source'].values())
    record['reading'] = (
      f'No class comes from two sources, so source and class are confounded (sources told apart with AUROC'
      f' {top:.2f}): {READING}.'
    )
  return record


def line(record: dict[str, Any] | None) -> str:
  """One line for the banner."""
  if not record:
    return ''
  if not record.get('by_source'):
    return f'source check: {record["reading"]}'
  by = ', '.join(f'{n} {v:.3f}' for n, v in record['by_source'].items())
  within = '; '.join(
    f'{c}: ' + (', '.join(f'{n} {v:.3f}' for n, v in w['auroc'].items()) if w['auroc'] else 'one source')
    for c, w in record['within_class'].items()
  )
  return f'source check (CV AUROC, 16x16 logistic regression): by source {by} | within class {within}'
