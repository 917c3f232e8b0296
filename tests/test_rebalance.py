"""Rebalancing methods: exact counts, determinism, SMOTE geometry, weights, no val/test access."""

import numpy as np
import pytest

from cxrjax import config_lib
from cxrjax.data import rebalance, sources, synthetic
from cxrjax.errors import UserError
from cxrjax.trainers import common

from conftest import random_split

METHODS = tuple(m for m in rebalance.METHODS if m != 'synthetic')  # synthetic: tested below


def cfg(method, **kw):
  c = config_lib.base_config().rebalance
  c.method = method
  for k, v in kw.items():
    c[k] = v
  return c


EXPECTED_COUNTS = {
  'none': [120, 40],
  'class_weights': [120, 40],
  'undersample': [40, 40],
  'oversample': [120, 120],
  'smote': [120, 120],
  'augment': [120, 120],
}


@pytest.mark.parametrize('method', METHODS)
def test_exact_counts_per_method(method):
  ts = rebalance.build_training_set(random_split([120, 40]), 2, cfg(method), seed=0)
  assert ts.trained_counts(2) == EXPECTED_COUNTS[method]


@pytest.mark.parametrize(
  'method,ratio,expected',
  [
    ('oversample', 0.5, [120, 60]),
    ('smote', 0.5, [120, 60]),
    ('augment', 0.75, [120, 90]),
    ('undersample', 0.5, [80, 40]),
  ],
)
def test_target_ratio(method, ratio, expected):
  ts = rebalance.build_training_set(random_split([120, 40]), 2, cfg(method, target_ratio=ratio), seed=0)
  assert ts.trained_counts(2) == expected


def test_three_classes():
  ts = rebalance.build_training_set(random_split([90, 30, 10]), 3, cfg('oversample'), seed=0)
  assert ts.trained_counts(3) == [90, 90, 90]
  ts = rebalance.build_training_set(random_split([90, 30, 10]), 3, cfg('undersample'), seed=0)
  assert ts.trained_counts(3) == [10, 10, 10]


@pytest.mark.parametrize('method', METHODS)
def test_deterministic_per_seed(method):
  s = random_split([60, 20])
  a = rebalance.build_training_set(s, 2, cfg(method), seed=3)
  b = rebalance.build_training_set(s, 2, cfg(method), seed=3)
  np.testing.assert_array_equal(a.plan, b.plan)
  np.testing.assert_array_equal(a.pool.images, b.pool.images)
  if method in ('oversample', 'undersample', 'smote', 'augment'):
    c = rebalance.build_training_set(s, 2, cfg(method), seed=4)
    assert not (np.array_equal(a.plan, c.plan) and np.array_equal(a.pool.images, c.pool.images))


def test_smote_samples_lie_on_segments_between_minority_neighbours():
  s = random_split([50, 12], size=5)
  ts = rebalance.build_training_set(s, 2, cfg('smote', smote_k=3), seed=0)
  minority_idx = np.flatnonzero(s.labels == 1)
  minority = s.images[minority_idx].reshape(12, -1).astype(np.float64)
  d = ((minority[:, None] - minority[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  neighbours = np.argsort(d, 1)[:, :3]
  row_of = {s.names[r]: i for i, r in enumerate(minority_idx)}
  new = np.flatnonzero(ts.origin == 'smote')
  assert len(new) == 38 and (ts.pool.labels[new] == 1).all()
  lams = []
  for r in new:
    # provenance: smote:<base>+<neighbour>@<lambda>
    base, rest = ts.pool.names[r][len('smote:') :].split('+')
    nb, lam = rest.split('@')
    i, j, lam = row_of[base], row_of[nb], float(lam)
    assert j in neighbours[i], 'the partner is one of the base image k nearest minority neighbours'
    expected = minority[i] + lam * (minority[j] - minority[i])
    got = ts.pool.images[r].reshape(-1).astype(np.float64)
    assert np.abs(got - expected).max() <= 0.5 + 0.02, 'on the segment, up to uint8 rounding'
    lams.append(lam)
  assert 0 <= min(lams) and max(lams) <= 1 and np.std(lams) > 0.1


def test_class_weights_inverse_and_effective():
  ts = rebalance.build_training_set(random_split([120, 40]), 2, cfg('class_weights'), seed=0)
  np.testing.assert_allclose(ts.class_weights, [160 / (2 * 120), 160 / (2 * 40)])
  w = rebalance.class_weights(np.array([120, 40]), 'effective', beta=0.99)
  e = (1 - 0.99) / (1 - 0.99 ** np.array([120, 40]))
  np.testing.assert_allclose(w, e / e.sum() * 2, rtol=1e-6)


def test_augment_marks_only_repeats_strong():
  ts = rebalance.build_training_set(random_split([30, 10]), 2, cfg('augment'), seed=0)
  assert ts.strong[:40].sum() == 0 and ts.strong[40:].all()
  assert (ts.pool.labels[40:] == 1).all()


def test_smote_needs_two_images():
  with pytest.raises(UserError, match='at least 2'):
    rebalance.build_training_set(random_split([10, 1]), 2, cfg('smote'), seed=0)


@pytest.mark.parametrize('method', METHODS)
def test_no_method_touches_val_or_test(method, npz_path, monkeypatch):
  """Val/test are frozen before rebalancing; nothing may change them or leak into training."""
  config = config_lib.base_config()
  config.rebalance.method = method
  config.data.path = str(npz_path)
  config.data.limit_train = 300
  real_load = sources.load_dataset

  def frozen_load(*args, **kwargs):
    ds = real_load(*args, **kwargs)
    for name in ('val', 'test'):
      for arr in (ds.splits[name].images, ds.splits[name].labels):
        arr.setflags(write=False)  # any in-place change raises
    return ds

  monkeypatch.setattr(sources, 'load_dataset', frozen_load)
  data = common.prepare_data(config_lib.finalize(config))
  ref = real_load(config.data, 0)
  for name in ('val', 'test'):
    np.testing.assert_array_equal(data.dataset.splits[name].images, ref.splits[name].images)
  pool_hashes = set(data.training_set.pool.content_hashes())
  test_hashes = set(ref.splits['test'].content_hashes())
  assert not pool_hashes & test_hashes, 'no test image may enter the training pool'
  val_hashes = set(ref.splits['val'].content_hashes())
  train_hashes = set(ref.splits['train'].content_hashes())
  # PneumoniaMNIST itself has 8 train images duplicated in val; the pool may hold only those.
  assert pool_hashes & val_hashes <= train_hashes & val_hashes
  assert data.training_set.trained_counts(2) == EXPECTED_FOR_LIMIT[method]


EXPECTED_FOR_LIMIT = {  # limit_train=300 after 3:1 -> [225, 75]
  'none': [225, 75],
  'class_weights': [225, 75],
  'undersample': [75, 75],
  'oversample': [225, 225],
  'smote': [225, 225],
  'augment': [225, 225],
}


def _synthetic_set(tmp_path, name, counts, size=6, seed=1):
  s = random_split(counts, size=size, seed=seed)
  path = str(tmp_path / f'{name}.npz')
  synthetic.save(path, s.images, s.labels, dict(tag=name, generator='test', step=7, config_hash='abc', seed=seed))
  return path


def test_synthetic_fills_minority_from_one_set(tmp_path):
  path = _synthetic_set(tmp_path, 'dcgan', [0, 100])
  ts = rebalance.build_training_set(random_split([120, 40]), 2, cfg('synthetic', synthetic=path), seed=0)
  assert ts.trained_counts(2) == [120, 120]
  assert ts.origin_counts() == {'real': 160, 'synthetic': 80}
  assert (ts.origin[160:] == 'synthetic:dcgan').all()
  assert ts.details['synthetic']['drawn'] == {'dcgan': {'1': 80}}


def test_generator_mixing_in_set_proportions(tmp_path):
  a = _synthetic_set(tmp_path, 'dcgan', [0, 100], seed=1)
  b = _synthetic_set(tmp_path, 'cdcgan', [50, 100], seed=2)
  ts = rebalance.build_training_set(
    random_split([120, 40]), 2, cfg('synthetic', synthetic=f'{a}:0.75,{b}:0.25'), seed=0
  )
  assert ts.details['synthetic']['drawn'] == {'dcgan': {'1': 60}, 'cdcgan': {'1': 20}}
  assert ts.trained_counts(2) == [120, 120]
  again = rebalance.build_training_set(
    random_split([120, 40]), 2, cfg('synthetic', synthetic=f'{a}:0.75,{b}:0.25'), seed=0
  )
  np.testing.assert_array_equal(ts.pool.images, again.pool.images)


def test_synthetic_errors_name_the_set(tmp_path):
  small = _synthetic_set(tmp_path, 'small', [0, 10])
  with pytest.raises(UserError, match='has 10 images of class 1; 80 are needed'):
    rebalance.build_training_set(random_split([120, 40]), 2, cfg('synthetic', synthetic=small), seed=0)
  other = _synthetic_set(tmp_path, 'big', [0, 100], size=8)
  with pytest.raises(UserError, match='images \\(8, 8, 1\\)'):
    rebalance.build_training_set(random_split([120, 40]), 2, cfg('synthetic', synthetic=other), seed=0)
  with pytest.raises(UserError, match='no such file'):
    rebalance.build_training_set(
      random_split([120, 40]), 2, cfg('synthetic', synthetic=str(tmp_path / 'x.npz')), seed=0
    )
  junk = tmp_path / 'junk.npz'
  np.savez(junk, a=np.zeros(3))
  with pytest.raises(UserError, match='not a cxrjax synthetic set'):
    rebalance.build_training_set(random_split([120, 40]), 2, cfg('synthetic', synthetic=str(junk)), seed=0)


def test_synthetic_provenance_round_trip(tmp_path):
  path = _synthetic_set(tmp_path, 'ldm', [3, 4])
  s, prov = synthetic.load(path)
  assert prov == dict(tag='ldm', generator='test', step=7, config_hash='abc', seed=1)
  assert s.names[0] == 'ldm[0]' and len(s) == 7


def test_smote_neighbours_in_feature_space():
  s = random_split([50, 12], size=5)
  minority = np.flatnonzero(s.labels == 1)
  # A feature space where image i's only close partner is its index pair (i xor 1).
  feats = np.repeat(np.arange(12) // 2, 4).reshape(12, 4).astype(np.float32) * 100
  encoder = lambda images: feats[: len(images)]  # noqa: E731
  ts = rebalance.build_training_set(s, 2, cfg('smote', smote_k=1, smote_space='feature'), seed=0, encoder=encoder)
  assert ts.details['smote_space'].startswith('feature')
  row_of = {s.names[r]: i for i, r in enumerate(minority)}
  for name in ts.pool.names[ts.origin == 'smote']:
    base, rest = name[len('smote:') :].split('+')
    assert row_of[rest.split('@')[0]] == row_of[base] ^ 1


def test_prepare_data_takes_the_smote_feature_encoder_from_its_caller(npz_path, tmp_path):
  # The data layer sits below the reference network (trainers/reference.py): its caller hands the encoder in.
  config = config_lib.base_config()
  config.rebalance.method = 'smote'
  config.rebalance.smote_space = 'feature'
  config.data.path = str(npz_path)
  config.data.limit_train = 300
  config = config_lib.finalize(config)
  calls = []

  def feature_encoder(cfg, workdir):
    calls.append(workdir)
    return lambda images: images.reshape(len(images), -1)[:, :16].astype(np.float32)

  data = common.prepare_data(config, str(tmp_path / 'run'), feature_encoder)
  assert calls == [str(tmp_path / 'run')]
  assert data.training_set.details['smote_space'].startswith('feature')
  assert data.training_set.trained_counts(2) == EXPECTED_FOR_LIMIT['smote']
  with pytest.raises(ValueError, match='feature_encoder'):
    common.prepare_data(config)  # never a silent fall back to pixel space
