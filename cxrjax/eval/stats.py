"""Statistics for comparing rebalancing methods: over seeds and on one test set.

Two kinds of comparison appear in the report, and they answer different
questions:

* Across training seeds (one number per seed and method): `mean_ci` for the
  spread of a method, and `paired_t_test` / `wilcoxon_signed_rank` for two
  methods trained with the same seeds. With 3-5 seeds these tests have little
  power; the t-interval is the honest summary.
* On one test set (one score per image and method): `paired_bootstrap` for
  any metric, `delong_test` for AUROC and `mcnemar_test` for thresholded
  predictions. These measure test-set sampling noise only, not seed-to-seed
  training noise.

`holm_bonferroni` adjusts a family of p-values (e.g. every method against the
baseline). Everything is NumPy + scipy.stats and takes plain arrays; the
seed-level tests are checked against scipy in `tests/test_stats.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats as sps


def mean_ci(values, confidence: float = 0.95) -> dict:
  """Mean and Student-t confidence interval of per-seed values.

  NaN values (e.g. a seed whose AUROC is undefined) are dropped and `n`
  counts the finite ones. With one value there is no spread to estimate:
  `low == high == mean`, `std` is 0 and `single_value` is True, so a report
  can mark the interval as missing rather than print a zero-width one.

  Args:
    values: one number per seed.
    confidence: coverage of the two-sided interval.

  Returns:
    dict(mean, low, high, std, n, single_value); `std` uses ddof=1.
  """
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  n = int(v.size)
  if n == 0:
    nan = float('nan')
    return dict(mean=nan, low=nan, high=nan, std=nan, n=0, single_value=False)
  mean = float(v.mean())
  if n == 1:
    return dict(mean=mean, low=mean, high=mean, std=0.0, n=1, single_value=True)
  std = float(v.std(ddof=1))
  half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
  return dict(mean=mean, low=mean - half, high=mean + half, std=std, n=n, single_value=False)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f'paired samples differ in length: {a.size} and {b.size}')
  return a, b


def paired_t_test(a, b) -> dict:
  """Two-sided paired t-test of a - b (e.g. one metric per seed for two methods).

  Exactly `scipy.stats.ttest_rel(a, b)`; with fewer than two pairs, or
  identical differences, scipy's NaN/inf statistic is passed through.
  """
  a, b = _paired(a, b)
  if a.size < 2:
    return dict(statistic=float('nan'), p_value=float('nan'), test='paired t-test', n=int(a.size))
  res = sps.ttest_rel(a, b)
  return dict(statistic=float(res.statistic), p_value=float(res.pvalue), test='paired t-test', n=int(a.size))


def wilcoxon_signed_rank(a, b) -> dict:
  """Two-sided Wilcoxon signed-rank test of a - b.

  Exactly `scipy.stats.wilcoxon(a, b)` with its defaults: zero differences
  are dropped ('wilcox'), and the p-value is exact for small samples without
  ties (scipy's 'auto'), otherwise from the normal approximation. When every
  difference is zero there is no evidence of a difference at all, so the
  result is statistic 0 and p = 1 (scipy would warn and return NaN).

  Returns:
    dict(statistic, p_value, test, n, n_nonzero).
  """
  a, b = _paired(a, b)
  d = a - b
  n_nonzero = int(np.count_nonzero(d))
  out = dict(test='Wilcoxon signed-rank', n=int(a.size), n_nonzero=n_nonzero)
  if a.size == 0:
    return dict(statistic=float('nan'), p_value=float('nan'), **out)
  if n_nonzero == 0:
    return dict(statistic=0.0, p_value=1.0, **out)
  res = sps.wilcoxon(a, b)
  return dict(statistic=float(res.statistic), p_value=float(res.pvalue), **out)


def paired_bootstrap(
  y_true,
  scores_a,
  scores_b,
  metric_fn: Callable[[np.ndarray, np.ndarray], float],
  n_boot: int = 2000,
  seed: int = 0,
  confidence: float = 0.95,
) -> dict:
  """Paired bootstrap of metric(a) - metric(b) over test images.

  Each resample draws test images with replacement and scores both methods
  on the same images, so the correlation between the methods (they see the
  same hard cases) is kept and the interval is narrower than two independent
  ones. Resamples containing only one class are skipped, because AUROC and
  most rate metrics are undefined there; resamples where `metric_fn` returns
  a non-finite value are skipped too. `n_valid` reports how many remained.

  The p-value is the two-sided percentile p-value
  `2 * min(P*(delta* <= 0), P*(delta* >= 0))` over the valid resamples, capped
  at 1 and floored at 1 / (n_valid + 1): a Monte-Carlo p-value cannot resolve
  probabilities below that, and reporting 0 would overstate the evidence.
  Identical methods give delta* = 0 everywhere, hence p = 1.

  Args:
    y_true: [N] labels (0/1 for binary metrics).
    scores_a: [N] scores (or any per-image array `metric_fn` accepts) of method A.
    scores_b: the same for method B.
    metric_fn: `(y_true, scores) -> float`, e.g. `metrics.auroc`, or F1 at a
      fixed threshold: `lambda y, s: metrics.binary_metrics(y, s, t)['f1']`.
    n_boot: resamples drawn.
    seed: NumPy seed of the resampling.
    confidence: coverage of the percentile interval.

  Returns:
    dict(delta, low, high, p_value, test, n_boot, n_valid).
  """
  y = np.asarray(y_true)
  sa, sb = np.asarray(scores_a), np.asarray(scores_b)
  n = len(y)
  if len(sa) != n or len(sb) != n:
    raise ValueError('y_true, scores_a and scores_b must have the same length')
  delta = float(metric_fn(y, sa)) - float(metric_fn(y, sb))
  rng = np.random.default_rng(seed)
  # All indices at once: one [n_boot, N] draw, so the result does not depend on the loop.
  idx = rng.integers(0, n, size=(n_boot, n))
  deltas = np.full(n_boot, np.nan)
  for i in range(n_boot):
    yi = y[idx[i]]
    if np.all(yi == yi[0]):
      continue
    deltas[i] = float(metric_fn(yi, sa[idx[i]])) - float(metric_fn(yi, sb[idx[i]]))
  valid = deltas[np.isfinite(deltas)]
  nv = int(valid.size)
  out = dict(delta=delta, test='paired bootstrap', n_boot=int(n_boot), n_valid=nv)
  if nv == 0:
    return dict(low=float('nan'), high=float('nan'), p_value=float('nan'), **out)
  alpha = 1 - confidence
  low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  p = 2 * min(np.mean(valid <= 0), np.mean(valid >= 0))
  p = float(np.clip(p, 1 / (nv + 1), 1.0))
  return dict(low=float(low), high=float(high), p_value=p, **out)


def _midrank(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank, in O(n log n)."""
  order = np.argsort(x, kind='mergesort')
  xs = x[order]
  n = len(x)
  # Tie groups are runs of equal sorted values; each gets the mean of its positions.
  starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
  ends = np.r_[starts[1:], n]
  mean_rank = (starts + ends + 1) / 2.0
  ranks_sorted = np.repeat(mean_rank, ends - starts)
  out = np.empty(n, np.float64)
  out[order] = ranks_sorted
  return out


def delong_covariance(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
  """AUROCs of K correlated scores and their [K, K] DeLong covariance.

  The fast midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389): with m
  positives and n negatives, the structural components are
  V10_i = (rank of positive i among all - its rank among positives) / n and
  V01_j = 1 - (rank of negative j among all - its rank among negatives) / m,
  and Cov = S10 / m + S01 / n with S the sample covariances (ddof=1).

  Args:
    y_true: [N] 0/1 labels (both classes present).
    scores: [K, N] scores, higher meaning positive.

  Returns:
    (aucs [K], cov [K, K]).
  """
  y = np.asarray(y_true).astype(bool).ravel()
  s = np.atleast_2d(np.asarray(scores, np.float64))
  m, n = int(y.sum()), int((~y).sum())
  if m == 0 or n == 0:
    raise ValueError('DeLong needs both classes in y_true')
  k = s.shape[0]
  pos, neg = s[:, y], s[:, ~y]
  v10 = np.empty((k, m))
  v01 = np.empty((k, n))
  aucs = np.empty(k)
  for r in range(k):
    tz = _midrank(np.r_[pos[r], neg[r]])
    tx, ty = _midrank(pos[r]), _midrank(neg[r])
    aucs[r] = (tz[:m].sum() / m - (m + 1) / 2) / n
    v10[r] = (tz[:m] - tx) / n
    v01[r] = 1.0 - (tz[m:] - ty) / m
  s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
  s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
  return aucs, s10 / m + s01 / n


def delong_test(y_true, score_a, score_b) -> dict:
  """DeLong et al. (1988) test of AUROC(a) = AUROC(b) on the same test images.

  The AUROC difference is compared with its standard error from the joint
  covariance (`delong_covariance`), z = delta / se, two-sided normal p-value.
  Identical scores give se = 0; then z = 0 and p = 1 when delta is 0.

  Returns:
    dict(auc_a, auc_b, delta, se, z, p_value, test).
  """
  aucs, cov = delong_covariance(y_true, np.stack([np.asarray(score_a), np.asarray(score_b)]))
  delta = float(aucs[0] - aucs[1])
  var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  # Rounding can leave a tiny negative variance for (nearly) identical scores.
  se = float(np.sqrt(max(var, 0.0)))
  if se > 0:
    z = delta / se
  else:
    z = 0.0 if delta == 0 else float(np.sign(delta) * np.inf)
  p = float(2 * sps.norm.sf(abs(z)))
  return dict(auc_a=float(aucs[0]), auc_b=float(aucs[1]), delta=delta, se=se, z=float(z), p_value=p, test='DeLong')


def mcnemar_test(y_true, pred_a, pred_b, exact_below: int = 25) -> dict:
  """McNemar's test of equal error rates for two classifiers on the same images.

  Only discordant images count: b = A right and B wrong, c = A wrong and B
  right. With fewer than `exact_below` discordant pairs the chi-square
  approximation is poor, so the exact two-sided binomial test of b against
  Binomial(b + c, 1/2) is used (statistic = min(b, c)); otherwise the
  chi-square test with Edwards' continuity correction,
  (|b - c| - 1)^2 / (b + c) on 1 degree of freedom. No discordant pairs
  means no evidence of a difference: p = 1.

  Returns:
    dict(statistic, p_value, test, b, c, n).
  """
  y = np.asarray(y_true).ravel()
  ok_a = np.asarray(pred_a).ravel() == y
  ok_b = np.asarray(pred_b).ravel() == y
  b = int(np.sum(ok_a & ~ok_b))
  c = int(np.sum(~ok_a & ok_b))
  out = dict(b=b, c=c, n=int(y.size))
  if b + c == 0:
    return dict(statistic=0.0, p_value=1.0, test='McNemar exact', **out)
  if b + c < exact_below:
    p = sps.binomtest(b, b + c, 0.5).pvalue
    return dict(statistic=float(min(b, c)), p_value=float(p), test='McNemar exact', **out)
  stat = (abs(b - c) - 1) ** 2 / (b + c)
  return dict(statistic=float(stat), p_value=float(sps.chi2.sf(stat, 1)), test='McNemar chi-square (corrected)', **out)


def holm_bonferroni(p_values) -> np.ndarray:
  """Holm's step-down adjusted p-values, in the input order.

  Sorting the m p-values ascending, the i-th (0-based) is multiplied by
  m - i, a running maximum keeps the adjusted values monotone, and they are
  capped at 1. Rejecting where adjusted <= alpha controls the family-wise
  error rate at alpha. NaN entries stay NaN and do not count towards m.
  """
  p = np.asarray(p_values, np.float64).ravel()
  out = np.full(p.shape, np.nan)
  ok = np.flatnonzero(np.isfinite(p))
  m = ok.size
  if m == 0:
    return out
  order = ok[np.argsort(p[ok], kind='mergesort')]
  adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out[order] = np.minimum(adj, 1.0)
  return out
