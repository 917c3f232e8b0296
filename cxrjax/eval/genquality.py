"""Quality and memorization checks for synthetic images, in NumPy and SciPy.

Everything here works on arrays that the caller has already made: feature
vectors `[N, D]` from whatever feature network the caller chose (the name of
that network goes into `summary(features=...)` so that numbers from different
networks are never compared by mistake), and images `[N, H, W]` or
`[N, H, W, C]`.

- `frechet_distance`: FID, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
- `kernel_inception_distance`: KID, the unbiased MMD^2 with the cubic
  polynomial kernel (Binkowski et al. 2018), averaged over random subsets.
- `precision_recall`: improved precision and recall with k-NN balls
  (Kynkaanniemi et al. 2019); `density_coverage` (Naeem et al. 2020).
- `memorization_audit`: are generated images closer to a training image than
  training images are to each other? Plus exact copies; `pairs_figure` shows
  the closest pairs.

Nearest-neighbour searches are brute force in row blocks of about 64 MB, so
sets of ~5000 x 512 features (or a few thousand flattened images) fit in
memory. Distances come from ||a||^2 + ||b||^2 - 2 a.b, which loses precision
when two points nearly coincide, so every nearest-neighbour distance that is
reported or compared against a threshold is recomputed directly as ||a - b||.

Images: `uint8` arrays are pixels in [0, 255]; floating arrays must be in
[-1, 1] (the generators' tanh range) and are rejected otherwise, because
silently mixing [0, 1] and [-1, 1] images would make every distance wrong.
Pixel distances are L2 norms over all pixels on the [-1, 1] scale.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
from absl import logging
from scipy import linalg

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from cxrjax import fileio
from cxrjax.errors import UserError

# Row blocks of the distance matrix are kept near this size (float64 entries).
_BLOCK_BYTES = 64 << 20
# Exact-copy pairs listed in the audit; the count is always complete.
_MAX_COPY_EXAMPLES = 100


# --------------------------------------------------------------------------------------------------------------------
# Input checks


def _features(x, name: str) -> np.ndarray:
  """[N, D] float64, finite; a UserError otherwise."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise UserError(f'{name}: expected features [N, D], got shape {x.shape}')
  x = x.astype(np.float64, copy=False)
  if not np.isfinite(x).all():
    raise UserError(f'{name}: features contain NaN or inf')
  return x


def _same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise UserError(f'{what}: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})')


def _check_images(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
    raise UserError(f'{name}: expected images [N, H, W] or [N, H, W, 1|3], got shape {x.shape}')
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise UserError(f'{name}: dtype {x.dtype}; expected uint8 in [0, 255] or float in [-1, 1]')
  if x.size and not np.isfinite(x).all():
    raise UserError(f'{name}: images contain NaN or inf')
  # A small tolerance for generator outputs that overshoot by rounding; [0, 255]
  # floats are caught, [0, 1] floats cannot be told apart and are the caller's job.
  if x.size and (x.min() < -1.001 or x.max() > 1.001):
    raise UserError(f'{name}: float images must be in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]')
  return x


def _to_unit(x: np.ndarray) -> np.ndarray:
  """Images -> flattened float32 rows on the [-1, 1] scale."""
  flat = x.reshape(len(x), -1)
  if x.dtype == np.uint8:
    return flat.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return np.clip(flat, -1.0, 1.0).astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """Images -> flattened uint8 rows (how they would be saved)."""
  flat = x.reshape(len(x), -1)
  if x.dtype == np.uint8:
    return flat
  return np.clip(np.rint((flat.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Brute-force nearest neighbours in row blocks


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum('ij,ij->i', x, x, dtype=np.float64)


def _row_blocks(n_rows: int, n_cols: int):
  step = max(1, _BLOCK_BYTES // (8 * max(n_cols, 1)))
  for start in range(0, n_rows, step):
    yield slice(start, min(n_rows, start + step))


def _sq_dist_block(q: np.ndarray, q_sq: np.ndarray, r: np.ndarray, r_sq: np.ndarray) -> np.ndarray:
  d = q_sq[:, None] + r_sq[None, :] - 2.0 * (q @ r.T)
  return np.maximum(d, 0.0, out=d)


def _exact_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise ||a_i - b_i||, without the cancellation of the expanded form."""
  return np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=1)


def _kth_neighbour(query: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
  """Distance to, and index of, each query row's k-th nearest row of `ref` (k >= 1).

  With `exclude_self`, `query` is `ref` and a row is never its own neighbour
  (an identical other row still is, at distance 0).
  """
  q_sq, r_sq = _sq_norms(query), _sq_norms(ref)
  idx = np.empty(len(query), np.int64)
  for rows in _row_blocks(len(query), len(ref)):
    d = _sq_dist_block(query[rows], q_sq[rows], ref, r_sq)
    if exclude_self:
      local = np.arange(rows.stop - rows.start)
      d[local, local + rows.start] = np.inf
    if k == 1:
      idx[rows] = np.argmin(d, axis=1)
    else:
      idx[rows] = np.argpartition(d, k - 1, axis=1)[:, k - 1]
  return _exact_dist(query, ref[idx]), idx


def _ball_counts(query: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """For each query row, how many balls B(centre_i, radius_i) (closed) contain it."""
  q_sq, c_sq = _sq_norms(query), _sq_norms(centres)
  r2 = radii.astype(np.float64) ** 2
  counts = np.empty(len(query), np.int64)
  for rows in _row_blocks(len(query), len(centres)):
    d2 = _sq_dist_block(query[rows], q_sq[rows], centres, c_sq)
    # The expanded form leaves rounding of order eps * (|q|^2 + |c|^2) where the exact
    # distance is 0; the slack keeps a point on a zero-radius ball (a duplicate) inside.
    slack = 1e-12 * (q_sq[rows, None] + c_sq[None, :])
    counts[rows] = (d2 <= r2[None, :] + slack).sum(axis=1)
  return counts


# --------------------------------------------------------------------------------------------------------------------
# FID


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    # A singular product (fewer samples than dimensions) can break the Schur
    # square root; nudging both covariances off singularity is the standard fix.
    logging.warning('FID: sqrtm of the covariance product is not finite; adding %g to the diagonals', eps)
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    # The exact root has real eigenvalues (S1 S2 is similar to a PSD matrix);
    # small imaginary parts are rounding, large ones mean the input is broken.
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > 1e-3:
      raise UserError(
        f'FID: the square root of the covariance product has imaginary part {imag:.3g}; '
        'too few samples for the feature dimension? try method="eigh"'
      )
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
  # Tr (S1 S2)^(1/2) = sum of sqrt(eig(S1^(1/2) S2 S1^(1/2))): the two products are
  # similar, and the second is symmetric PSD, so eigvalsh applies and is stable.
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root @ s2 @ root
  ev = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance_from_moments(mu1, sigma1, mu2, sigma2, *, method: str = 'sqrtm', eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: mean [D].
    sigma1: covariance [D, D].
    mu2: mean [D].
    sigma2: covariance [D, D].
    method: 'sqrtm' is scipy's Schur square root of sigma1 @ sigma2, as in
      the reference FID code (numbers comparable with published ones);
      'eigh' uses two symmetric eigendecompositions, faster for large D and
      never complex.
    eps: diagonal offset for the 'sqrtm' retry when the first root is not finite.

  Returns:
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). Not
    clipped at 0: identical inputs give a rounding-sized value of either sign.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise UserError(f'FID: moment shapes do not match: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}')
  if method == 'sqrtm':
    tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
  elif method == 'eigh':
    tr_covmean = _trace_sqrt_product_eigh(s1, s2)
  else:
    raise UserError(f'FID: method {method!r}; expected "sqrtm" or "eigh"')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_moments(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) with the unbiased (N - 1) covariance, as the reference FID code."""
  x = _features(feats, 'FID')
  if len(x) < 2:
    raise UserError(f'FID: needs at least 2 samples, got {len(x)}')
  return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(feats_a, feats_b, *, method: str = 'sqrtm', eps: float = 1e-6) -> float:
  """FID between two feature sets [N_a, D] and [N_b, D]; see `frechet_distance_from_moments`.

  With fewer samples than dimensions the covariances are singular and the
  value is dominated by estimation noise; use it only to compare runs with
  the same sample sizes.
  """
  a, b = _features(feats_a, 'FID feats_a'), _features(feats_b, 'FID feats_b')
  _same_dim(a, b, 'FID')
  mu1, s1 = feature_moments(a)
  mu2, s2 = feature_moments(b)
  return frechet_distance_from_moments(mu1, s1, mu2, s2, method=method, eps=eps)


# --------------------------------------------------------------------------------------------------------------------
# KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 between two equal-sized samples with the cubic polynomial kernel.

  The within-set sums leave out the diagonal (k(x_i, x_i)); the cross sum uses
  all m^2 pairs, which is already unbiased for independent samples. This is
  the estimator of Binkowski et al. and of the reference KID code.
  """
  m = len(x)
  k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats_a, feats_b, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> dict:
  """KID: unbiased MMD^2, kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets.

  Each subset draws `subset_size` rows without replacement from each set;
  the size is clipped to the smaller set. `std` is the spread of the
  per-subset values (ddof=0, as the reference code), not a standard error.

  Returns:
    dict(mean, std, subset_size, num_subsets), with the subset size used.
  """
  a, b = _features(feats_a, 'KID feats_a'), _features(feats_b, 'KID feats_b')
  _same_dim(a, b, 'KID')
  m = min(int(subset_size), len(a), len(b))
  if m < 2:
    raise UserError(f'KID: needs subsets of at least 2 samples, got {m} (sets of {len(a)} and {len(b)})')
  if num_subsets < 1:
    raise UserError(f'KID: num_subsets must be >= 1, got {num_subsets}')
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for s in range(num_subsets):
    ia = rng.choice(len(a), m, replace=False)
    ib = rng.choice(len(b), m, replace=False)
    values[s] = mmd2_unbiased(a[ia], b[ib])
  return dict(mean=float(values.mean()), std=float(values.std()), subset_size=m, num_subsets=int(num_subsets))


# --------------------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def _check_k(n: int, k: int, what: str) -> None:
  if not 1 <= k < n:
    raise UserError(f'{what}: k={k} needs 1 <= k < set size ({n})')


def precision_recall(real_feats, fake_feats, k: int = 3) -> dict:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of closed balls around its points, with
  radius the distance to the point's k-th nearest other point of the same
  set. Precision is the share of fake points inside the real manifold;
  recall the share of real points inside the fake manifold. Balls are closed
  (<=) as in the reference code, so exact duplicates count as covered.
  """
  real, fake = _features(real_feats, 'precision real_feats'), _features(fake_feats, 'precision fake_feats')
  _same_dim(real, fake, 'precision/recall')
  _check_k(len(real), k, 'precision/recall (real)')
  _check_k(len(fake), k, 'precision/recall (fake)')
  real_radii, _ = _kth_neighbour(real, real, k, exclude_self=True)
  fake_radii, _ = _kth_neighbour(fake, fake, k, exclude_self=True)
  precision = float(np.mean(_ball_counts(fake, real, real_radii) > 0))
  recall = float(np.mean(_ball_counts(real, fake, fake_radii) > 0))
  return dict(precision=precision, recall=recall, k=int(k))


def density_coverage(real_feats, fake_feats, k: int = 5) -> dict:
  """Density and coverage (Naeem et al. 2020), with the real k-NN balls only.

  Density is the mean number of real balls containing a fake point, divided
  by k (about 1 when the distributions match, above 1 when fakes crowd
  dense real regions). Coverage is the share of real balls that contain at
  least one fake point. Balls are closed (<=), like `precision_recall`; the
  reference code uses open balls, which differs only on exact ties.
  """
  real, fake = _features(real_feats, 'density real_feats'), _features(fake_feats, 'density fake_feats')
  _same_dim(real, fake, 'density/coverage')
  _check_k(len(real), k, 'density/coverage')
  if len(fake) < 1:
    raise UserError('density/coverage: no fake samples')
  real_radii, _ = _kth_neighbour(real, real, k, exclude_self=True)
  density = float(_ball_counts(fake, real, real_radii).sum() / (k * len(fake)))
  nearest_fake, _ = _kth_neighbour(real, fake, 1, exclude_self=False)
  coverage = float(np.mean(nearest_fake <= real_radii))
  return dict(density=density, coverage=coverage, k=int(k))


# --------------------------------------------------------------------------------------------------------------------
# Memorization


def _first_occurrence(rows: np.ndarray) -> tuple[np.ndarray, dict[bytes, int]]:
  """For each uint8 row, the index of the first identical row; and bytes -> that index."""
  first: dict[bytes, int] = {}
  rep = np.empty(len(rows), np.int64)
  for i, row in enumerate(rows):
    rep[i] = first.setdefault(row.tobytes(), i)
  return rep, first


def _space_audit(gen: np.ndarray, train_unique: np.ndarray, unique_idx: np.ndarray, num_pairs: int) -> dict:
  """Nearest-training-image distances of generated rows against the train reference distribution."""
  d_train, _ = _kth_neighbour(train_unique, train_unique, 1, exclude_self=True)
  d_gen, nn = _kth_neighbour(gen, train_unique, 1, exclude_self=False)
  p5, median = (float(v) for v in np.percentile(d_train, [5, 50]))
  own = d_train[nn]  # how far the matched training image is from its own nearest neighbour
  with np.errstate(divide='ignore', invalid='ignore'):
    local_ratio = np.where(own > 0, d_gen / np.where(own > 0, own, 1.0), np.inf)
  order = np.argsort(d_gen, kind='stable')[:num_pairs]
  return dict(
    d_train_p5=p5,
    d_train_median=median,
    d_gen_min=float(d_gen.min()),
    d_gen_p5=float(np.percentile(d_gen, 5)),
    d_gen_median=float(np.median(d_gen)),
    share_closer=float(np.mean(d_gen < p5)),
    share_closer_median=float(np.mean(d_gen < median)),
    share_closer_local=float(np.mean(d_gen < own)),
    median_ratio=float(np.median(d_gen) / median) if median > 0 else math.nan,
    median_local_ratio=float(np.median(local_ratio)),
    pairs=[dict(generated=int(i), train=int(unique_idx[nn[i]]), distance=float(d_gen[i])) for i in order],
  )


def memorization_audit(train, generated, train_feats=None, gen_feats=None, num_pairs: int = 8) -> dict:
  """Do generated images copy or hug training images?

  For every generated image, d_gen is the distance to its nearest training
  image. The reference is d_train: each training image's distance to its
  nearest other training image. A generator that samples the distribution
  rather than the training set gives d_gen distributed like d_train, so
  about 5% of generated images fall below d_train's 5th percentile; copies
  and near-copies push that share (`share_closer`) towards 1.

  Exact duplicates inside the training set (bit-identical after uint8
  rounding) are collapsed to their first occurrence before anything else:
  d_train is then the distance from each distinct training image to the
  nearest *different* one. Left in, every duplicated image would add a
  zero to d_train, and with a few percent of duplicates the 5th percentile
  would be 0 and nothing could ever fall below it. The duplicates are
  counted under `train_duplicates` instead. Near-duplicates (re-encoded,
  resized) stay in: they are real structure of the data.

  Per space (`pixel`, and `features` when feature arrays are given; feature
  rows are matched to images by index and use the same de-duplication):
    d_train_p5, d_train_median, d_gen_min, d_gen_p5, d_gen_median: distances.
    share_closer: share of generated images with d_gen < 5th percentile of d_train.
    share_closer_median: the same against the median of d_train (~0.5 expected).
    share_closer_local: share with d_gen below the matched training image's own
      nearest-neighbour distance (a density-adaptive version, ~0.5 expected).
    median_ratio: median(d_gen) / median(d_train) (~1 expected, << 1 is copying).
    median_local_ratio: median of d_gen / (matched image's d_train).
    pairs: the `num_pairs` closest (generated, train) pairs, closest first,
      with train indices into the caller's `train` array.

  Args:
    train: training images [N, H, W(, C)], uint8 or float in [-1, 1].
    generated: generated images of the same shape, either dtype.
    train_feats: optional [N, D] features of `train`, row for row.
    gen_feats: optional [M, D] features of `generated`, row for row.
    num_pairs: closest pairs to list per space.

  Returns:
    dict with `num_train`, `num_generated`, `train_duplicates` (unique,
    duplicate_groups, images_in_groups, redundant), `exact_copies` (generated
    images identical to a training image after uint8 rounding),
    `exact_copy_examples` (up to 100 {generated, train} pairs),
    `generated_duplicates` (generated images identical to an earlier
    generated one), `pixel`, and `features` (None without features).
  """
  train, generated = _check_images(train, 'audit train'), _check_images(generated, 'audit generated')
  if train.shape[1:] != generated.shape[1:]:
    raise UserError(f'audit: image shapes differ (train {train.shape[1:]}, generated {generated.shape[1:]})')
  if len(generated) < 1:
    raise UserError('audit: no generated images')
  if (train_feats is None) != (gen_feats is None):
    raise UserError('audit: give both train_feats and gen_feats, or neither')

  train_u8, gen_u8 = _to_uint8(train), _to_uint8(generated)
  rep, first = _first_occurrence(train_u8)
  unique_idx = np.flatnonzero(rep == np.arange(len(train)))
  if len(unique_idx) < 2:
    raise UserError(f'audit: needs at least 2 distinct training images, got {len(unique_idx)}')
  group_sizes = np.bincount(rep)[unique_idx]

  copies = [(g, first[row.tobytes()]) for g, row in enumerate(gen_u8) if row.tobytes() in first]
  gen_rep, _ = _first_occurrence(gen_u8)

  out: dict[str, Any] = dict(
    num_train=len(train),
    num_generated=len(generated),
    train_duplicates=dict(
      unique=len(unique_idx),
      duplicate_groups=int((group_sizes > 1).sum()),
      images_in_groups=int(group_sizes[group_sizes > 1].sum()),
      redundant=int(len(train) - len(unique_idx)),
    ),
    exact_copies=len(copies),
    exact_copy_examples=[dict(generated=int(g), train=int(t)) for g, t in copies[:_MAX_COPY_EXAMPLES]],
    generated_duplicates=int((gen_rep != np.arange(len(generated))).sum()),
  )
  out['pixel'] = _space_audit(_to_unit(generated), _to_unit(train[unique_idx]), unique_idx, num_pairs)
  out['features'] = None
  if train_feats is not None:
    tf, gf = _features(train_feats, 'audit train_feats'), _features(gen_feats, 'audit gen_feats')
    _same_dim(tf, gf, 'audit')
    if len(tf) != len(train) or len(gf) != len(generated):
      raise UserError(
        f'audit: feature rows ({len(tf)}, {len(gf)}) do not match image counts ({len(train)}, {len(generated)})'
      )
    out['features'] = _space_audit(gf, tf[unique_idx], unique_idx, num_pairs)
  return out


# --------------------------------------------------------------------------------------------------------------------
# Figure


def _display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
  """One image -> (array in [0, 1] for imshow, colormap)."""
  x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else (img.astype(np.float64) + 1.0) / 2.0
  x = np.clip(x, 0.0, 1.0)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  return x, ('gray' if x.ndim == 2 else None)


def pairs_figure(generated, train, audit: dict, path: str, title: str, space: str = 'pixel') -> None:
  """Writes a PNG of the closest (generated | nearest training image) pairs of an audit.

  Each pair is drawn side by side, generated on the left, with its distance
  (in the audit's units) above it. Images are uint8 [0, 255] or float [-1, 1] (mixed is fine),
  [H, W], [H, W, 1] or [H, W, 3]; they must be the arrays that were audited,
  since the pairs are indices into them.

  Args:
    generated: the audited generated images.
    train: the audited training images.
    audit: a `memorization_audit` result.
    path: the PNG to write (atomically).
    title: the figure title.
    space: 'pixel' or 'features': whose closest pairs to show.
  """
  if space not in ('pixel', 'features') or not audit.get(space):
    raise UserError(f'pairs_figure: the audit has no {space!r} section')
  generated, train = _check_images(generated, 'pairs generated'), _check_images(train, 'pairs train')
  pairs = audit[space]['pairs']
  if not pairs:
    raise UserError('pairs_figure: the audit lists no pairs (num_pairs=0?)')
  cols = min(4, len(pairs))
  rows = math.ceil(len(pairs) / cols)
  fig = plt.figure(figsize=(2.7 * cols, 1.75 * rows + 0.4), layout='constrained')
  subfigs = fig.subfigures(rows, cols, squeeze=False).ravel()
  for sf, pair in zip(subfigs, pairs):
    axes = sf.subplots(1, 2)
    for ax, img, label in (
      (axes[0], generated[pair['generated']], f'gen {pair["generated"]}'),
      (axes[1], train[pair['train']], f'train {pair["train"]}'),
    ):
      x, cmap = _display(img)
      ax.imshow(x, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
      ax.set_title(label, fontsize=7)
      ax.set_axis_off()
    identical = ' (identical)' if pair['distance'] == 0 else ''
    sf.suptitle(f'd = {pair["distance"]:.3g}{identical}', fontsize=8)
  fig.suptitle(f'{title} ({space} distance)', fontsize=10)
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Everything at once


def summary(
  real_feats,
  fake_feats,
  *,
  features: str,
  train_images=None,
  gen_images=None,
  train_feats=None,
  gen_feats=None,
  k: int = 3,
  density_k: int = 5,
  kid_subset_size: int = 1000,
  kid_num_subsets: int = 100,
  seed: int = 0,
  num_pairs: int = 8,
  fid_method: str = 'sqrtm',
) -> dict:
  """FID, KID, precision/recall, density/coverage and (given images) the memorization audit.

  Args:
    real_feats: [N, D] features of real images (typically held-out ones).
    fake_feats: [M, D] features of generated images.
    features: the name of the feature network and layer (recorded as given).
    train_images: training images for the audit; with `gen_images`.
    gen_images: generated images for the audit.
    train_feats: optional features of `train_images` for the feature-space audit.
    gen_feats: optional features of `gen_images`.
    k: neighbourhood size for precision/recall.
    density_k: neighbourhood size for density/coverage.
    kid_subset_size: see `kernel_inception_distance`.
    kid_num_subsets: see `kernel_inception_distance`.
    seed: KID subset sampling seed.
    num_pairs: closest pairs listed by the audit.
    fid_method: see `frechet_distance_from_moments`.

  Returns:
    A JSON-able dict (plain Python numbers, lists and dicts).
  """
  if (train_images is None) != (gen_images is None):
    raise UserError('summary: give both train_images and gen_images for the memorization audit, or neither')
  real, fake = _features(real_feats, 'summary real_feats'), _features(fake_feats, 'summary fake_feats')
  _same_dim(real, fake, 'summary')
  pr = precision_recall(real, fake, k=k)
  dc = density_coverage(real, fake, k=density_k)
  out: dict[str, Any] = dict(
    features=str(features),
    num_real=len(real),
    num_fake=len(fake),
    feature_dim=int(real.shape[1]),
    fid=frechet_distance(real, fake, method=fid_method),
    kid=kernel_inception_distance(real, fake, kid_subset_size, kid_num_subsets, seed),
    precision=pr['precision'],
    recall=pr['recall'],
    k=pr['k'],
    density=dc['density'],
    coverage=dc['coverage'],
    density_k=dc['k'],
    memorization=None,
  )
  if train_images is not None:
    out['memorization'] = memorization_audit(train_images, gen_images, train_feats, gen_feats, num_pairs)
  return out


# --------------------------------------------------------------------------------------------------------------------
# Diversity and mode collapse, within one class

# Rows beyond this are subsampled (seeded) for the mean pairwise distance: its standard error
# is already small at 1000 rows, and the full matrix of a few thousand images is not needed.
DIVERSITY_MAX_ROWS = 1000

OK, COLLAPSED, CANNOT_JUDGE = 'ok', 'collapsed', 'cannot_judge'


def pixel_rows(images, name: str = 'images') -> np.ndarray:
  """Images [N, H, W(, C)] (uint8, or float in [-1, 1]) -> flattened float32 rows on the [-1, 1] scale."""
  return _to_unit(_check_images(images, name))


def mean_pairwise_distance(rows, *, max_rows: int = DIVERSITY_MAX_ROWS, seed: int = 0) -> float:
  """Mean L2 distance between distinct rows (pairs i != j) of [N, D]; 0 for fewer than 2 rows.

  Sets larger than `max_rows` are subsampled without replacement (seeded).
  """
  x = _features(rows, 'diversity rows')
  if len(x) > max_rows:
    x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
  n = len(x)
  if n < 2:
    return 0.0
  sq = _sq_norms(x)
  total = 0.0
  for rows_ in _row_blocks(n, n):
    d = _sq_dist_block(x[rows_], sq[rows_], x, sq)
    local = np.arange(rows_.stop - rows_.start)
    d[local, local + rows_.start] = 0.0
    total += float(np.sqrt(d).sum())
  return total / (n * (n - 1))


def diversity(real_rows, gen_rows, *, max_rows: int = DIVERSITY_MAX_ROWS, seed: int = 0) -> dict:
  """Mean pairwise distance of generated rows relative to real rows of the same class.

  About 1 when the generated set spreads like the real one; 0 when every
  generated row is the same. Rows are features [N, D] or `pixel_rows`.

  Returns:
    dict(real, generated, ratio); ratio is NaN when the real rows do not differ.
  """
  real, gen = _features(real_rows, 'diversity real'), _features(gen_rows, 'diversity generated')
  _same_dim(real, gen, 'diversity')
  d_real = mean_pairwise_distance(real, max_rows=max_rows, seed=seed)
  d_gen = mean_pairwise_distance(gen, max_rows=max_rows, seed=seed)
  return dict(real=d_real, generated=d_gen, ratio=d_gen / d_real if d_real > 0 else math.nan)


def collapse_verdicts(per_class: dict, *, min_diversity: float, min_recall: float, min_real: int) -> dict:
  """Mode collapse, judged per class from within-class recall and diversity.

  A class is 'collapsed' when its generated images cover too little of its
  real images (`recall` < min_recall: improved recall, k-NN balls around the
  generated features, against all real images of the class) or spread too
  little (`diversity['features']['ratio']` < min_diversity: mean pairwise
  feature distance of the generated images over that of the real ones).
  Below `min_real` real images (or `k` + 1 generated ones) the k-NN
  manifolds are too thin to tell, and the verdict is 'cannot_judge'.

  Args:
    per_class: class name -> a `summary` dict with `recall`, `k`, `num_real`,
      `num_generated` and `diversity` (as `judge` in cxrjax.trainers.generative writes).
    min_diversity: smallest feature-diversity ratio that is not collapse.
    min_recall: smallest recall that is not collapse.
    min_real: fewest real images of a class that can be judged.

  Returns:
    dict(any_collapsed, classes (the collapsed ones, in order), verdicts
    {name: 'ok' | 'collapsed' | 'cannot_judge'}, reasons {name: words},
    thresholds).
  """
  verdicts, reasons = {}, {}
  for name, s in per_class.items():
    n_real, n_gen, k = int(s['num_real']), int(s['num_generated']), int(s.get('k', 3))
    recall = float(s['recall'])
    div = float(s['diversity']['features']['ratio'])
    if n_real < min_real or n_gen <= k:
      verdicts[name] = CANNOT_JUDGE
      reasons[name] = (
        f'cannot judge: {n_real} real and {n_gen} generated images of the class'
        f' (needs >= {min_real} real and > {k} generated)'
      )
      continue
    low = []
    if recall < min_recall:
      low.append(f'recall {recall:.3f} < {min_recall:g} (the generated images cover little of the real class)')
    if not div >= min_diversity:  # NaN (real images all identical) counts as too little
      low.append(f'feature diversity {div:.2f} x real < {min_diversity:g} (the generated images are near-copies)')
    verdicts[name] = COLLAPSED if low else OK
    reasons[name] = '; '.join(low) if low else f'recall {recall:.3f}, feature diversity {div:.2f} x real'
  collapsed = [name for name, v in verdicts.items() if v == COLLAPSED]
  return dict(
    any_collapsed=bool(collapsed),
    classes=collapsed,
    verdicts=verdicts,
    reasons=reasons,
    thresholds=dict(min_diversity=float(min_diversity), min_recall=float(min_recall), min_real=int(min_real)),
  )
