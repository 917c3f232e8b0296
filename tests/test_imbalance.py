"""The imbalance protocol: exact counts, seeded, val/test untouched."""

import numpy as np
import pytest

from cxrjax.data import imbalance, sources
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError


def _split(counts):
  labels = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(counts)])
  n = len(labels)
  images = np.arange(n, dtype=np.int64).astype(np.uint8).reshape(n, 1, 1, 1).repeat(4, 1).repeat(4, 2)
  names = np.array([f'r{i}' for i in range(n)])
  return Split(images, labels, names, names)


def test_poster_protocol_on_pneumoniamnist(npz_path):
  ds = sources.load_npz(str(npz_path), 28, 1, 0)
  train, report = imbalance.apply_imbalance(ds.splits['train'], 2, 1, 3.0, seed=0)
  # PneumoniaMNIST has 1214 normal / 3494 pneumonia; 3:1 keeps every normal image.
  assert train.class_counts(2) == [1214, 405]
  assert report['counts_before'] == [1214, 3494]
  again, _ = imbalance.apply_imbalance(ds.splits['train'], 2, 1, 3.0, seed=0)
  other, _ = imbalance.apply_imbalance(ds.splits['train'], 2, 1, 3.0, seed=1)
  np.testing.assert_array_equal(train.names, again.names)
  assert set(train.names) != set(other.names)
  assert set(train.names) <= set(ds.splits['train'].names)


def test_ratio_zero_keeps_split():
  s = _split([10, 30])
  out, report = imbalance.apply_imbalance(s, 2, 1, 0.0, seed=0)
  assert out is s and report['counts_after'] == [10, 30]


def test_small_minority_reduces_majority_instead():
  out, report = imbalance.apply_imbalance(_split([100, 20]), 2, 1, 3.0, seed=0)
  assert out.class_counts(2) == [60, 20]
  assert 'reduced to at most 60' in report['note']


def test_three_classes_ratio_to_largest_other():
  out, _ = imbalance.apply_imbalance(_split([90, 60, 50]), 3, 2, 3.0, seed=0)
  assert out.class_counts(3) == [90, 60, 30]


def test_empty_class_after_protocol_is_an_error():
  with pytest.raises(UserError, match='leaves class 1'):
    imbalance.apply_imbalance(_split([10, 3]), 2, 1, 30.0, seed=0)


def test_stratified_cap_keeps_proportions():
  labels = np.array([0] * 300 + [1] * 100)
  keep = imbalance.stratified_cap(labels, 40, np.random.default_rng(0))
  assert np.bincount(labels[keep]).tolist() == [30, 10]
