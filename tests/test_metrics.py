"""Every metric against scikit-learn, with ties, on binary and multi-class data."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrjax.eval import metrics


def _binary_case(seed, n=300, ties=False):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  score = np.clip(0.35 * y + rng.normal(0.35, 0.25, n), 0, 1)
  if ties:
    score = np.round(score, 1)
  return y, score


@pytest.mark.parametrize('seed,ties', [(0, False), (1, True), (2, True)])
@pytest.mark.parametrize('threshold', [0.5, 0.37])
def test_binary_against_sklearn(seed, ties, threshold):
  y, s = _binary_case(seed, ties=ties)
  m = metrics.binary_metrics(y, s, threshold)
  pred = (s >= threshold).astype(int)
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert m['confusion_matrix'] == skm.confusion_matrix(y, pred).tolist()
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  assert m['precision'] == pytest.approx(skm.precision_score(y, pred))
  assert m['recall'] == pytest.approx(skm.recall_score(y, pred))
  assert m['specificity'] == pytest.approx(tn / (tn + fp))
  assert m['f1'] == pytest.approx(skm.f1_score(y, pred))
  assert m['mcc'] == pytest.approx(skm.matthews_corrcoef(y, pred))
  assert m['kappa'] == pytest.approx(skm.cohen_kappa_score(y, pred))
  assert m['youden_j'] == pytest.approx(skm.recall_score(y, pred) + tn / (tn + fp) - 1)
  assert m['auroc'] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  assert m['auprc'] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize('ties', [False, True])
def test_roc_curve_matches_sklearn(ties):
  y, s = _binary_case(3, ties=ties)
  fpr, tpr, thr = metrics.roc_curve(y, s)
  sfpr, stpr, sthr = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sfpr)
  np.testing.assert_allclose(tpr, stpr)
  np.testing.assert_allclose(thr[1:], sthr[1:])


def test_youden_threshold_maximises_j():
  y, s = _binary_case(4, ties=True)
  t = metrics.youden_threshold(y, s)
  fpr, tpr, thr = skm.roc_curve(y, s)
  assert metrics.binary_metrics(y, s, t)['youden_j'] == pytest.approx(np.max(tpr - fpr))


@pytest.mark.parametrize('k', [3, 4])
def test_multiclass_against_sklearn(k):
  rng = np.random.default_rng(k)
  n = 400
  y = rng.integers(0, k, n)
  logits = rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  pred = probs.argmax(1)
  m = metrics.multiclass_metrics(y, probs)
  assert m['confusion_matrix'] == skm.confusion_matrix(y, pred).tolist()
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  assert m['precision'] == pytest.approx(skm.precision_score(y, pred, average='macro'))
  assert m['recall'] == pytest.approx(skm.recall_score(y, pred, average='macro'))
  assert m['f1'] == pytest.approx(skm.f1_score(y, pred, average='macro'))
  assert m['mcc'] == pytest.approx(skm.matthews_corrcoef(y, pred))
  assert m['kappa'] == pytest.approx(skm.cohen_kappa_score(y, pred))
  assert m['auroc'] == pytest.approx(skm.roc_auc_score(y, probs, multi_class='ovr', average='macro'))
  ap = np.mean([skm.average_precision_score(y == c, probs[:, c]) for c in range(k)])
  assert m['auprc'] == pytest.approx(ap)
  per_f1 = skm.f1_score(y, pred, average=None)
  for c in range(k):
    assert m['per_class'][c]['f1'] == pytest.approx(per_f1[c])
    assert m['per_class'][c]['support'] == int((y == c).sum())


def test_evaluate_predictions_binary_uses_positive_class():
  y, s = _binary_case(5)
  probs = np.stack([1 - s, s], 1)
  a = metrics.evaluate_predictions(y, probs, positive_class=1)
  b = metrics.evaluate_predictions(1 - y, probs[:, ::-1], positive_class=0)
  for key in ('f1', 'auroc', 'sensitivity', 'specificity'):
    assert a[key] == pytest.approx(b[key])


def test_single_class_auroc_is_nan():
  assert np.isnan(metrics.auroc(np.ones(5), np.linspace(0, 1, 5)))
