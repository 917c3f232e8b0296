"""Classification metrics, binary and multi-class, in plain NumPy.

Each function is checked against scikit-learn in `tests/test_metrics.py`. The
binary suite is reported at a threshold of 0.5 and at the Youden threshold
chosen on validation; the multi-class suite uses the arg-max prediction and
gives macro averages plus one row per class (one-vs-rest).
"""

from __future__ import annotations

import numpy as np

BINARY_KEYS = (
  'accuracy',
  'balanced_accuracy',
  'precision',
  'recall',
  'sensitivity',
  'specificity',
  'f1',
  'mcc',
  'kappa',
  'youden_j',
  'auroc',
  'auprc',
)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
  """[K, K] counts; rows are true classes, columns predictions (sklearn's layout)."""
  idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _div(a: float, b: float) -> float:
  return float(a) / float(b) if b else 0.0


def roc_curve(y_true: np.ndarray, score: np.ndarray):
  """(fpr, tpr, thresholds) at every distinct score, highest threshold first.

  The first point is (0, 0) at threshold +inf, as in scikit-learn.
  """
  y_true = np.asarray(y_true).astype(bool)
  score = np.asarray(score, np.float64)
  order = np.argsort(-score, kind='mergesort')
  s, y = score[order], y_true[order]
  distinct = np.flatnonzero(np.diff(s)) if len(s) > 1 else np.zeros(0, np.int64)
  ends = np.r_[distinct, len(s) - 1]
  tps = np.cumsum(y)[ends]
  fps = (ends + 1) - tps
  pos, neg = y.sum(), (~y).sum()
  tpr = np.r_[0.0, tps / pos if pos else np.zeros_like(tps, float)]
  fpr = np.r_[0.0, fps / neg if neg else np.zeros_like(fps, float)]
  thresholds = np.r_[np.inf, s[ends]]
  return fpr, tpr, thresholds


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve (trapezoidal over all distinct thresholds); nan if one class."""
  y = np.asarray(y_true).astype(bool)
  if y.all() or (~y).all():
    return float('nan')
  fpr, tpr, _ = roc_curve(y, score)
  return float(np.trapezoid(tpr, fpr))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
  """AUPRC as scikit-learn's average precision: sum over thresholds of (R_n - R_{n-1}) P_n."""
  y = np.asarray(y_true).astype(bool)
  if not y.any():
    return float('nan')
  score = np.asarray(score, np.float64)
  order = np.argsort(-score, kind='mergesort')
  s, yy = score[order], y[order]
  distinct = np.flatnonzero(np.diff(s)) if len(s) > 1 else np.zeros(0, np.int64)
  ends = np.r_[distinct, len(s) - 1]
  tps = np.cumsum(yy)[ends]
  precision = tps / (ends + 1)
  recall = tps / y.sum()
  recall_prev = np.r_[0.0, recall[:-1]]
  return float(np.sum((recall - recall_prev) * precision))


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
  """The score threshold maximising sensitivity + specificity - 1 (ties: the highest)."""
  y = np.asarray(y_true).astype(bool)
  if y.all() or (~y).all():
    return 0.5
  fpr, tpr, thr = roc_curve(y, score)
  j = tpr - fpr
  best = int(np.argmax(j[1:])) + 1  # skip the +inf point
  return float(thr[best])


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
  """The binary suite, predicting positive when score >= threshold."""
  y = np.asarray(y_true).astype(np.int64)
  pred = (np.asarray(score) >= threshold).astype(np.int64)
  cm = confusion_matrix(y, pred, 2)
  tn, fp, fn, tp = (float(v) for v in cm.ravel())
  n = tn + fp + fn + tp
  sens = _div(tp, tp + fn)
  spec = _div(tn, tn + fp)
  prec = _div(tp, tp + fp)
  f1 = _div(2 * tp, 2 * tp + fp + fn)
  mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  mcc = _div(tp * tn - fp * fn, mcc_den)
  po = _div(tp + tn, n)
  pe = _div((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp), n * n)
  kappa = _div(po - pe, 1 - pe) if pe != 1 else 0.0
  return dict(
    threshold=float(threshold),
    accuracy=po,
    balanced_accuracy=(sens + spec) / 2,
    precision=prec,
    recall=sens,
    sensitivity=sens,
    specificity=spec,
    f1=f1,
    mcc=mcc,
    kappa=kappa,
    youden_j=sens + spec - 1,
    auroc=auroc(y, score),
    auprc=average_precision(y, score),
    confusion_matrix=cm.tolist(),
    n=int(n),
  )


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, class_names=None) -> dict:
  """Macro-averaged and per-class (one-vs-rest) metrics from arg-max predictions."""
  y = np.asarray(y_true).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  k = probs.shape[1]
  pred = probs.argmax(1)
  cm = confusion_matrix(y, pred, k)
  n = cm.sum()
  per_class = []
  for c in range(k):
    tp = cm[c, c]
    fn = cm[c].sum() - tp
    fp = cm[:, c].sum() - tp
    tn = n - tp - fn - fp
    sens, spec, prec = _div(tp, tp + fn), _div(tn, tn + fp), _div(tp, tp + fp)
    per_class.append(
      dict(
        name=class_names[c] if class_names else str(c),
        support=int(cm[c].sum()),
        precision=prec,
        recall=sens,
        sensitivity=sens,
        specificity=spec,
        f1=_div(2 * tp, 2 * tp + fp + fn),
        youden_j=sens + spec - 1,
        auroc=auroc(y == c, probs[:, c]),
        auprc=average_precision(y == c, probs[:, c]),
      )
    )
  po = _div(np.trace(cm), n)
  pe = _div(float((cm.sum(0) * cm.sum(1)).sum()), float(n) * n)
  # Multi-class MCC (Gorodkin's R_K), as in scikit-learn.
  t, p = cm.sum(1).astype(float), cm.sum(0).astype(float)
  c_, s_ = float(np.trace(cm)), float(n)
  mcc_den = np.sqrt((s_**2 - (p * p).sum()) * (s_**2 - (t * t).sum()))
  macro = {
    key: float(np.nanmean([pc[key] for pc in per_class])) for key in per_class[0] if key not in ('name', 'support')
  }
  out = dict(
    accuracy=po,
    balanced_accuracy=macro['recall'],
    precision=macro['precision'],
    recall=macro['recall'],
    sensitivity=macro['sensitivity'],
    specificity=macro['specificity'],
    f1=macro['f1'],
    mcc=_div(c_ * s_ - (t * p).sum(), mcc_den),
    kappa=_div(po - pe, 1 - pe) if pe != 1 else 0.0,
    youden_j=macro['youden_j'],
    auroc=macro['auroc'],
    auprc=macro['auprc'],
    per_class=per_class,
    confusion_matrix=cm.tolist(),
    n=int(n),
  )
  return out


def evaluate_predictions(y_true, probs, *, positive_class: int = 1, threshold: float = 0.5, class_names=None) -> dict:
  """The full suite for a [N, K] probability matrix: binary when K == 2."""
  probs = np.asarray(probs)
  if probs.shape[1] == 2:
    y = (np.asarray(y_true) == positive_class).astype(np.int64)
    return binary_metrics(y, probs[:, positive_class], threshold)
  return multiclass_metrics(y_true, probs, class_names)


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
  p = np.clip(np.asarray(probs, np.float64)[np.arange(len(y_true)), np.asarray(y_true)], 1e-12, 1.0)
  return float(-np.mean(np.log(p)))
