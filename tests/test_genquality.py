"""Generator-quality metrics against closed forms, direct references and planted cases."""

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cxrjax.errors import UserError
from cxrjax.eval import genquality as gq

METHODS = ('sqrtm', 'eigh')


def _correlated(rng, n, d, shift=0.0, scale=1.0):
  mix = np.random.default_rng(123).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  return scale * rng.normal(size=(n, d)) @ mix + shift


def _spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _samples_with_moments(rng, n, mu, sigma):
  """Samples whose sample mean and (N - 1) covariance are exactly mu and sigma."""
  z = rng.normal(size=(n, len(mu)))
  z -= z.mean(axis=0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return mu + z @ np.linalg.cholesky(sigma).T


# --------------------------------------------------------------------------------------------------------------------
# FID


@pytest.mark.parametrize('method', METHODS)
def test_fid_identical_sets_is_zero(method):
  x = _correlated(np.random.default_rng(0), 500, 32)
  assert abs(gq.frechet_distance(x, x, method=method)) < 1e-6


@pytest.mark.parametrize('method', METHODS)
def test_fid_from_moments_matches_closed_form(method):
  rng = np.random.default_rng(1)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = gq.frechet_distance_from_moments(mu1, np.diag(a), mu2, np.diag(b), method=method)
  assert got == pytest.approx(expected, rel=1e-10)
  # Commuting but non-diagonal covariances: the same closed form in a rotated basis.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  got = gq.frechet_distance_from_moments(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
  assert got == pytest.approx(expected, rel=1e-9)
  # One dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert gq.frechet_distance_from_moments([1.0], [[4.0]], [-2.0], [[9.0]], method=method) == pytest.approx(10.0)


@pytest.mark.parametrize('method', METHODS)
def test_fid_from_samples_with_known_moments(method):
  rng = np.random.default_rng(2)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  # Exact sample moments: the sample formula must reproduce the closed form to rounding.
  x, y = _samples_with_moments(rng, 300, mu1, np.diag(a)), _samples_with_moments(rng, 200, mu2, np.diag(b))
  assert gq.frechet_distance(x, y, method=method) == pytest.approx(expected, rel=1e-9)
  # Plain random samples: only sampling error remains (a few per mille at this size).
  x = mu1 + rng.normal(size=(100_000, d)) * np.sqrt(a)
  y = mu2 + rng.normal(size=(100_000, d)) * np.sqrt(b)
  assert gq.frechet_distance(x, y, method=method) == pytest.approx(expected, rel=1e-2)


def test_fid_symmetric_and_methods_agree():
  rng = np.random.default_rng(3)
  x, y = _correlated(rng, 600, 48), _correlated(rng, 400, 48, shift=0.3, scale=1.4)
  ab = gq.frechet_distance(x, y)
  assert ab > 1.0
  assert gq.frechet_distance(y, x) == pytest.approx(ab, rel=1e-9)
  assert gq.frechet_distance(x, y, method='eigh') == pytest.approx(ab, rel=1e-6)
  mu1, s1, mu2, s2 = rng.normal(size=8), _spd(rng, 8), rng.normal(size=8), _spd(rng, 8)
  assert gq.frechet_distance_from_moments(mu1, s1, mu2, s2, method='eigh') == pytest.approx(
    gq.frechet_distance_from_moments(mu1, s1, mu2, s2), rel=1e-6
  )


def test_fid_singular_covariances_stay_finite():
  # Fewer samples than dimensions: both covariances are singular.
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(20, 40)), rng.normal(size=(25, 40)) + 0.5
  values = [gq.frechet_distance(x, y, method=m) for m in METHODS]
  assert np.isfinite(values).all()
  assert values[0] == pytest.approx(values[1], rel=1e-4)


def test_fid_rejects_bad_input():
  with pytest.raises(UserError):
    gq.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(UserError):
    gq.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(UserError):
    gq.frechet_distance(np.zeros((5, 3)), np.zeros((5, 3)), method='svd')


# --------------------------------------------------------------------------------------------------------------------
# KID


def _mmd2_reference(x, y):
  m, d = len(x), x.shape[1]

  def k(u, v):
    return (float(np.dot(u, v)) / d + 1.0) ** 3

  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_matches_direct_reference():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 6)) * 1.2 + 0.1
  expected = _mmd2_reference(x, y)
  assert gq.mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
  # One subset of the full size is a permutation of the full sets: the same value.
  kid = gq.kernel_inception_distance(x, y, subset_size=1000, num_subsets=1)
  assert kid['subset_size'] == 25
  assert kid['mean'] == pytest.approx(expected, rel=1e-10)
  assert kid['std'] == 0.0


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(6)
  x, y, z = rng.normal(size=(600, 16)), rng.normal(size=(600, 16)), rng.normal(size=(450, 16)) + 0.3
  same = gq.kernel_inception_distance(x, y, subset_size=200, num_subsets=50)
  assert abs(same['mean']) < 3 * same['std']
  other = gq.kernel_inception_distance(x, z, subset_size=1000, num_subsets=20)
  assert other['subset_size'] == 450  # clipped to the smaller set
  assert other['mean'] > 5 * other['std'] > 0
  assert gq.kernel_inception_distance(x, z, 100, 5, seed=1) == gq.kernel_inception_distance(x, z, 100, 5, seed=1)


# --------------------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def _manifold_reference(real, fake, k):
  """Kynkaanniemi and Naeem metrics from full cdist matrices."""
  rr, ff, rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
  r_radii = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
  f_radii = np.sort(ff, axis=1)[:, k]
  inside = rf <= r_radii[:, None]  # [real ball i, fake j]
  return dict(
    precision=inside.any(axis=0).mean(),
    recall=(rf <= f_radii[None, :]).any(axis=1).mean(),
    density=inside.sum() / (k * len(fake)),
    coverage=inside.any(axis=1).mean(),
  )


def test_manifold_metrics_match_reference_across_blocks(monkeypatch):
  # Blocks of a few rows exercise the block boundaries and the self-exclusion offsets.
  monkeypatch.setattr(gq, '_BLOCK_BYTES', 8 * 7 * 90)
  rng = np.random.default_rng(7)
  real, fake = rng.normal(size=(90, 5)), rng.normal(size=(70, 5)) * 1.3 + 0.4
  for k in (1, 3, 5):
    ref = _manifold_reference(real, fake, k)
    pr, dc = gq.precision_recall(real, fake, k=k), gq.density_coverage(real, fake, k=k)
    assert pr['precision'] == pytest.approx(ref['precision'])
    assert pr['recall'] == pytest.approx(ref['recall'])
    assert dc['density'] == pytest.approx(ref['density'])
    assert dc['coverage'] == pytest.approx(ref['coverage'])


def test_precision_recall_identical_sets():
  x = np.random.default_rng(8).normal(size=(400, 8))
  pr = gq.precision_recall(x, x.copy())
  assert (pr['precision'], pr['recall']) == (1.0, 1.0)
  assert gq.density_coverage(x, x.copy())['coverage'] == 1.0
  # Points repeated more than k times have zero-radius balls, which still hold their copies.
  rep = np.concatenate([x[:100], np.repeat(x[100:110] * 7.3, 5, axis=0)])
  assert gq.precision_recall(rep, rep[::-1].copy(), k=3) == dict(precision=1.0, recall=1.0, k=3)


def test_precision_recall_one_of_two_clusters():
  rng = np.random.default_rng(9)
  c = np.array([10.0, 0.0])
  real = np.concatenate([rng.normal(size=(250, 2)) + c, rng.normal(size=(250, 2)) - c])
  fake = rng.normal(size=(250, 2)) + c  # fresh samples of the first cluster only
  pr = gq.precision_recall(real, fake, k=3)
  assert pr['precision'] > 0.9
  assert 0.4 < pr['recall'] <= 0.5
  dc = gq.density_coverage(real, fake)
  assert 0.4 < dc['coverage'] <= 0.5
  assert 0.7 < dc['density'] < 1.3


def test_precision_recall_rejects_bad_k():
  x = np.zeros((3, 2))
  with pytest.raises(UserError):
    gq.precision_recall(x, x, k=3)


# --------------------------------------------------------------------------------------------------------------------
# Memorization audit

_SIZE = 12
_GRID = np.mgrid[0:_SIZE, 0:_SIZE] / _SIZE
_BASIS = np.stack(
  [
    np.cos(2 * np.pi * (fx * _GRID[1] + fy * _GRID[0]) + 0.3 * i)
    for i, (fx, fy) in enumerate([(1, 0), (0, 1), (1, 1), (2, 1)])
  ]
)


def _images(rng, n):
  """Smooth uint8 images from a 4-d latent (also returned, as stand-in features), plus pixel noise."""
  z = rng.normal(size=(n, len(_BASIS)))
  img = 128 + 25 * np.einsum('nk,khw->nhw', z, _BASIS) + rng.normal(scale=3.0, size=(n, _SIZE, _SIZE))
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)[..., None], z


@pytest.fixture(scope='module')
def sets():
  rng = np.random.default_rng(10)
  train, train_z = _images(rng, 300)
  fresh, fresh_z = _images(rng, 200)
  return train, train_z, fresh, fresh_z


def test_audit_fresh_samples_not_flagged(sets):
  train, train_z, fresh, fresh_z = sets
  audit = gq.memorization_audit(train, fresh, train_z, fresh_z)
  assert audit['exact_copies'] == 0
  assert audit['train_duplicates']['redundant'] == 0
  for space in ('pixel', 'features'):
    a = audit[space]
    assert a['share_closer'] < 0.15
    assert 0.3 < a['share_closer_median'] < 0.7
    assert 0.8 < a['median_ratio'] < 1.25
    assert len(a['pairs']) == 8
    distances = [p['distance'] for p in a['pairs']]
    assert distances == sorted(distances) and distances[0] == pytest.approx(a['d_gen_min'])


def test_audit_finds_planted_copies(sets):
  train, train_z, fresh, fresh_z = sets
  copied = np.arange(0, 300, 10)  # 30 training images
  gen = np.concatenate([train[copied], fresh[:170]])
  gen_z = np.concatenate([train_z[copied], fresh_z[:170]])
  audit = gq.memorization_audit(train, gen, train_z, gen_z, num_pairs=30)
  assert audit['exact_copies'] == 30
  assert {(e['generated'], e['train']) for e in audit['exact_copy_examples']} == set(zip(range(30), copied.tolist()))
  for space in ('pixel', 'features'):
    a = audit[space]
    assert {(p['generated'], p['train']) for p in a['pairs']} == set(zip(range(30), copied.tolist()))
    assert all(p['distance'] == 0.0 for p in a['pairs'])
    assert 30 / 200 <= a['share_closer'] < 30 / 200 + 0.15

  # All copies, and as [-1, 1] floats (a generator's raw output): every one is flagged.
  as_float = train[copied].astype(np.float64) / 127.5 - 1.0
  audit = gq.memorization_audit(train, as_float)
  assert audit['exact_copies'] == 30
  assert audit['pixel']['share_closer'] == 1.0
  assert audit['pixel']['median_ratio'] < 1e-3
  assert audit['generated_duplicates'] == 0
  assert gq.memorization_audit(train, np.concatenate([train[:2], train[:2]]))['generated_duplicates'] == 2


def test_audit_train_duplicates_do_not_break_reference(sets):
  train, _, fresh, _ = sets
  rng = np.random.default_rng(11)
  # 40 training images appear three times each, shuffled in.
  dup = np.concatenate([train, np.repeat(train[:40], 2, axis=0)])
  order = rng.permutation(len(dup))
  dup = dup[order]
  clean = gq.memorization_audit(train, fresh)
  audit = gq.memorization_audit(dup, fresh)
  assert audit['train_duplicates'] == dict(unique=300, duplicate_groups=40, images_in_groups=120, redundant=80)
  # De-duplicated, the reference is the clean one: 80 zero distances would have made the 5th percentile 0.
  assert audit['pixel']['d_train_p5'] == pytest.approx(clean['pixel']['d_train_p5'], rel=1e-6)
  assert audit['pixel']['d_train_p5'] > 0
  assert audit['pixel']['share_closer'] == clean['pixel']['share_closer'] < 0.15
  # Copies of a duplicated image are still copies, reported at the first occurrence of that image.
  gen = np.concatenate([train[:5], fresh[:20]])
  audit = gq.memorization_audit(dup, gen)
  assert audit['exact_copies'] == 5
  assert audit['pixel']['share_closer'] >= 5 / 25
  for p in audit['pixel']['pairs'][:5]:
    assert p['distance'] == 0.0
    assert np.array_equal(dup[p['train']], gen[p['generated']])
    assert p['train'] == int(np.flatnonzero((dup == gen[p['generated']]).all(axis=(1, 2, 3)))[0])


def test_audit_rejects_bad_input(sets):
  train, train_z, fresh, _ = sets
  with pytest.raises(UserError, match=r'\[-1, 1\]'):
    gq.memorization_audit(train, fresh.astype(np.float32))  # [0, 255] floats
  with pytest.raises(UserError, match='shapes differ'):
    gq.memorization_audit(train, fresh[:, :6])
  with pytest.raises(UserError, match='both'):
    gq.memorization_audit(train, fresh, train_feats=train_z)
  with pytest.raises(UserError, match='distinct'):
    gq.memorization_audit(np.repeat(train[:1], 5, axis=0), fresh)


# --------------------------------------------------------------------------------------------------------------------
# Figure and summary


@pytest.mark.parametrize('rgb', [False, True])
def test_pairs_figure_writes_png(tmp_path, sets, rgb):
  train, _, fresh, _ = sets
  gen = np.concatenate([train[:3], fresh[:7]]).astype(np.float32) / 127.5 - 1.0  # float generated, uint8 train
  if rgb:
    train, gen = np.repeat(train, 3, axis=-1), np.repeat(gen, 3, axis=-1)
  audit = gq.memorization_audit(train, gen, num_pairs=6)
  path = tmp_path / 'sub' / 'pairs.png'
  gq.pairs_figure(gen, train, audit, str(path), 'closest pairs')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert [p.name for p in path.parent.iterdir()] == ['pairs.png']  # no temp file left behind
  with pytest.raises(UserError):
    gq.pairs_figure(gen, train, audit, str(path), 'x', space='features')


def test_summary_is_json_able(sets):
  train, train_z, fresh, fresh_z = sets
  rng = np.random.default_rng(12)
  real, fake = rng.normal(size=(120, 8)), rng.normal(size=(100, 8)) + 0.2
  out = gq.summary(
    real,
    fake,
    features='test-latents',
    train_images=train,
    gen_images=fresh[:50],
    train_feats=train_z,
    gen_feats=fresh_z[:50],
    kid_subset_size=50,
    kid_num_subsets=5,
  )
  text = json.dumps(out)  # no default=: plain Python values only
  back = json.loads(text)
  assert back['features'] == 'test-latents'
  assert back['fid'] == pytest.approx(gq.frechet_distance(real, fake))
  assert set(back['kid']) >= {'mean', 'std'}
  assert {'precision', 'recall', 'density', 'coverage'} <= set(back)
  assert back['memorization']['features']['share_closer'] < 0.2
  assert gq.summary(real, fake, features='x', kid_subset_size=50, kid_num_subsets=2)['memorization'] is None
