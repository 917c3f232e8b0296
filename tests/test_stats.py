"""Statistical tests against scipy, sklearn and slow direct implementations."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from cxrjax.eval import metrics, stats


def test_mean_ci_matches_scipy_t_interval():
  v = np.array([0.81, 0.84, 0.79, 0.86, 0.83])
  out = stats.mean_ci(v, confidence=0.9)
  low, high = sps.t.interval(0.9, len(v) - 1, loc=v.mean(), scale=sps.sem(v))
  assert out['mean'] == pytest.approx(v.mean(), abs=1e-15)
  assert out['low'] == pytest.approx(low, abs=1e-12)
  assert out['high'] == pytest.approx(high, abs=1e-12)
  assert out['std'] == pytest.approx(v.std(ddof=1), abs=1e-15)
  assert out['n'] == 5 and not out['single_value']


def test_mean_ci_single_value_and_nan():
  out = stats.mean_ci([0.7])
  assert out['low'] == out['high'] == out['mean'] == 0.7 and out['single_value'] and out['n'] == 1
  out = stats.mean_ci([0.7, np.nan, 0.9])
  assert out['n'] == 2 and out['mean'] == pytest.approx(0.8)
  assert np.isnan(stats.mean_ci([])['mean'])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_paired_tests_match_scipy(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(0.8, 0.02, 7)
  b = a - rng.normal(0.01, 0.02, 7)
  t = stats.paired_t_test(a, b)
  ref = sps.ttest_rel(a, b)
  assert t['statistic'] == ref.statistic and t['p_value'] == ref.pvalue and t['n'] == 7
  w = stats.wilcoxon_signed_rank(a, b)
  ref = sps.wilcoxon(a, b)
  assert w['statistic'] == ref.statistic and w['p_value'] == ref.pvalue


def test_wilcoxon_with_ties_and_zeros_matches_scipy():
  a = np.array([0.80, 0.82, 0.85, 0.79, 0.90, 0.88, 0.81, 0.84, 0.86, 0.83, 0.82, 0.80])
  b = np.array([0.80, 0.80, 0.83, 0.80, 0.87, 0.86, 0.80, 0.82, 0.84, 0.81, 0.82, 0.78])
  w = stats.wilcoxon_signed_rank(a, b)
  ref = sps.wilcoxon(a, b)
  assert w['statistic'] == ref.statistic and w['p_value'] == ref.pvalue
  assert w['n_nonzero'] == 10


def test_wilcoxon_all_zero_differences():
  w = stats.wilcoxon_signed_rank([0.8, 0.9, 0.7], [0.8, 0.9, 0.7])
  assert w['p_value'] == 1.0 and w['statistic'] == 0.0 and w['n_nonzero'] == 0


def _scores(seed, n=300, sep=1.0, ties=False):
  rng = np.random.default_rng(seed)
  y = (rng.random(n) < 0.35).astype(int)
  s = rng.normal(0, 1, n) + sep * y
  if ties:
    s = np.round(s, 1)
  return y, s


def test_bootstrap_identical_methods():
  y, s = _scores(0)
  out = stats.paired_bootstrap(y, s, s.copy(), metrics.auroc, n_boot=300)
  assert out['delta'] == 0 and out['low'] == 0 and out['high'] == 0
  assert out['p_value'] == 1.0 and out['n_valid'] == 300 and out['test'] == 'paired bootstrap'


def test_bootstrap_clearly_different_methods():
  y, good = _scores(1, sep=2.0)
  bad = np.random.default_rng(9).normal(size=len(y))
  out = stats.paired_bootstrap(y, good, bad, metrics.auroc, n_boot=500)
  assert out['delta'] > 0.3 and out['low'] > 0.2
  assert out['p_value'] == pytest.approx(1 / 501)
  # The other way round the interval flips sign.
  rev = stats.paired_bootstrap(y, bad, good, metrics.auroc, n_boot=500)
  assert rev['high'] < -0.2 and rev['delta'] == pytest.approx(-out['delta'])


def test_bootstrap_is_seeded_and_accepts_threshold_closures():
  y, s = _scores(2)
  s_a, s_b = 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-0.5 * s))

  def f1(yy, ss):
    return metrics.binary_metrics(yy, ss, 0.6)['f1']

  one = stats.paired_bootstrap(y, s_a, s_b, f1, n_boot=100, seed=3)
  two = stats.paired_bootstrap(y, s_a, s_b, f1, n_boot=100, seed=3)
  assert one == two
  assert one['low'] <= one['delta'] <= one['high']


def test_bootstrap_skips_single_class_resamples():
  y = np.array([0, 0, 0, 0, 1])
  s_a = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
  s_b = np.array([0.5, 0.2, 0.3, 0.4, 0.35])
  # sklearn raises on one class: the resample must be skipped before the call.
  out = stats.paired_bootstrap(y, s_a, s_b, roc_auc_score, n_boot=200)
  assert 0 < out['n_valid'] < 200
  assert np.isfinite(out['low']) and np.isfinite(out['p_value'])


def _delong_slow(y, sa, sb):
  """DeLong's covariance straight from its definition via the [m, n] kernel matrix."""
  y = y.astype(bool)
  comps = []
  for s in (sa, sb):
    x, z = s[y][:, None], s[~y][None, :]
    psi = (x > z) + 0.5 * (x == z)
    comps.append((psi.mean(), psi.mean(1), psi.mean(0)))
  m, n = y.sum(), (~y).sum()
  s10 = np.cov(np.stack([comps[0][1], comps[1][1]]))
  s01 = np.cov(np.stack([comps[0][2], comps[1][2]]))
  cov = s10 / m + s01 / n
  aucs = np.array([comps[0][0], comps[1][0]])
  var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
  z = (aucs[0] - aucs[1]) / np.sqrt(var)
  return aucs, cov, z, 2 * sps.norm.sf(abs(z))


@pytest.mark.parametrize('seed,ties', [(0, False), (1, True), (2, True), (3, False)])
def test_delong_against_slow_reference_and_sklearn(seed, ties):
  y, sa = _scores(seed, n=60, ties=ties)
  sb = np.round(sa + np.random.default_rng(seed + 10).normal(0, 0.8, len(y)), 1 if ties else 8)
  out = stats.delong_test(y, sa, sb)
  aucs, cov, z, p = _delong_slow(y, sa, sb)
  fast_aucs, fast_cov = stats.delong_covariance(y, np.stack([sa, sb]))
  np.testing.assert_allclose(fast_cov, cov, rtol=0, atol=1e-10)
  assert out['auc_a'] == pytest.approx(aucs[0], abs=1e-10)
  assert out['auc_b'] == pytest.approx(aucs[1], abs=1e-10)
  assert out['auc_a'] == pytest.approx(roc_auc_score(y, sa), abs=1e-10)
  assert out['auc_b'] == pytest.approx(roc_auc_score(y, sb), abs=1e-10)
  assert out['z'] == pytest.approx(z, abs=1e-10)
  assert out['p_value'] == pytest.approx(p, abs=1e-10)


def test_delong_identical_scores_and_one_class():
  y, s = _scores(4)
  out = stats.delong_test(y, s, s)
  assert out['delta'] == 0 and out['p_value'] == 1.0
  with pytest.raises(ValueError):
    stats.delong_test(np.zeros(5), np.arange(5.0), np.arange(5.0))


def test_delong_se_agrees_with_bootstrap():
  y, sa = _scores(5, n=400)
  sb = sa + np.random.default_rng(6).normal(0, 1.0, len(y))
  d = stats.delong_test(y, sa, sb)
  rng = np.random.default_rng(0)
  deltas = []
  for _ in range(600):
    i = rng.integers(0, len(y), len(y))
    deltas.append(metrics.auroc(y[i], sa[i]) - metrics.auroc(y[i], sb[i]))
  assert np.std(deltas) == pytest.approx(d['se'], rel=0.15)


def test_mcnemar_exact_matches_binomtest():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  pa = y.copy()
  pb = y.copy()
  pb[:9] = 1 - pb[:9]  # B wrong on 9 where A is right
  pa[9:12] = 1 - pa[9:12]  # A wrong on 3 where B is right
  out = stats.mcnemar_test(y, pa, pb)
  assert (out['b'], out['c']) == (9, 3) and out['test'] == 'McNemar exact'
  assert out['p_value'] == sps.binomtest(9, 12, 0.5).pvalue
  assert out['statistic'] == 3


def test_mcnemar_chi_square_and_no_discordance():
  y = np.zeros(100, int)
  pa = np.zeros(100, int)
  pb = np.zeros(100, int)
  pb[:30] = 1
  pa[30:40] = 1
  out = stats.mcnemar_test(y, pa, pb)
  assert (out['b'], out['c']) == (30, 10) and out['test'].startswith('McNemar chi-square')
  assert out['statistic'] == pytest.approx((20 - 1) ** 2 / 40)
  assert out['p_value'] == pytest.approx(sps.chi2.sf((20 - 1) ** 2 / 40, 1))
  assert stats.mcnemar_test(y, pa, pa)['p_value'] == 1.0


def test_holm_bonferroni():
  adj = stats.holm_bonferroni([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
  adj = stats.holm_bonferroni([0.5, np.nan, 0.01])
  assert np.isnan(adj[1])
  np.testing.assert_allclose(adj[[0, 2]], [0.5, 0.02])
  rng = np.random.default_rng(0)
  p = rng.random(9)
  adj = stats.holm_bonferroni(p)
  # Brute force from the definition: max over the smaller p-values of (m - rank) * p.
  order = np.argsort(p)
  for r, i in enumerate(order):
    expect = min(1.0, max((9 - k) * p[order[k]] for k in range(r + 1)))
    assert adj[i] == pytest.approx(expect)
