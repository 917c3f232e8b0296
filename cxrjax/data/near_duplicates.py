"""The same picture across two image sources, despite another resolution, crop or encoding.

Two copies of one radiograph seldom share bytes: MedMNIST cropped the originals to the
square of their short edge and resized them to 28x28; the shared Kermany copy squashed
the same originals to 224x224 and re-encoded them as JPEG. What relates two such copies
is a central crop: the field of one is a central crop of the other's, with width
fraction w (full height) or height fraction h (full width) in the coordinates of the
squashed image, the fraction unknown per image. `find_near_duplicates` searches that
crop on either side of each pair and scores the aligned images:

1. Grayscale (ITU-R 601 luma), area-averaged to working images of at most 96x96.
2. Coarse: 8x8 area averages of the full image and of its central crops with w or h in
   0.30, 0.35, ..., 0.95, each zero-mean and unit-norm (brightness and contrast drop
   out). The coarse score of a pair is the best cosine similarity of one image's full
   descriptor with the other's full or cropped ones; blocks of matrix products keep the
   CANDIDATES best images of `images_b` for each image of `images_a`.
3. Fine: each candidate's best coarse crop is searched again, +- 0.05 in steps of 0.01
   and then +- 0.005, at 28x28 and band-passed (BAND); the best cosine similarity,
   clipped to [0, 1], is the score.

Area averaging (each output pixel the mean of the input area it covers, fractional
pixels weighted) makes a resize, a crop at any fraction and a re-encoding land on nearly
the same small image. At 8x8 every chest looks alike, but the twin of an image is still
its best coarse candidate; the score needs detail, and detail is where two copies of one
picture differ most (another resampling filter, JPEG blocks): the band-pass keeps the
scale in between. Measured on PneumoniaMNIST against the Kermany folders, it set twins
and the best wrong partners further apart than plain 12x12, 16x16 or 24x24 descriptors.

Not searched: crops cut in width on one side and in height on the other, off-centre
crops, flips and rotations. A flat image (one grey level) matches nothing.

Command line, for an npz (MedMNIST keys; all splits, or `path.npz:test`, `path.npz:train,val`)
or a folder tree of images (read recursively, relative names kept), a summary on stdout
and the pairs (indices, names, score, crop) in JSON:

  python -m cxrjax.data.near_duplicates pneumoniamnist.npz:test chest_xray/test --out pairs.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cxrjax import fileio
from cxrjax.data import images as image_lib
from cxrjax.errors import UserError

WORK_SIZE = 96  # working images are area-averaged to at most this many pixels per side
COARSE_SIZE = 8  # side of the coarse descriptors
FINE_SIZE = 28  # side of the fine descriptors (the score)
# The fine descriptors are band-passed: a Gaussian blur of BAND[0] fine pixels minus one of BAND[1]
# (a difference of Gaussians) keeps structures of about 6% to 20% of the field (ribs, vessels, tubes,
# lettering), which tell two chests apart, and drops the shape every chest shares and the pixel-level
# differences that resampling and JPEG leave between two copies of one picture.
BAND = (1.75, 6.0)
# Central crop fractions of the coarse search, width or height: originals of aspect ratios up to 3.3:1
# (the Kermany originals measure 384 to 2916 by 127 to 2713 pixels).
CROP_FRACTIONS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
# The fine search: the coarse best fraction +- 0.05 in steps of 0.01, then +- 0.005 around the best of those.
FINE_OFFSETS = (tuple(round(0.01 * k, 2) for k in range(-5, 6)), (-0.005, 0.005))
CANDIDATES = 4  # coarse candidates per image of images_a that the fine step scores
# Near-duplicate at or above this score: the middle of the gap measured across sources. The 5,773
# twins of PneumoniaMNIST in the Kermany folders (train+val against train, test against test) score
# 0.9854 and up, 99% of them above 0.996; the best wrong partner of each PneumoniaMNIST test image among
# the 5,216 Kermany train images scores at most 0.9795. Within one source at one resolution look-alikes
# score higher: searched against itself, the Kermany train folder finds a different picture at 0.983 to
# 0.995 for 12 of its images (6 pairs, two of them one child's), besides its exact duplicates at 0.999
# and up. For duplicates within one source, a threshold of 0.996 keeps only the exact ones.
DEFAULT_THRESHOLD = 0.983
CHUNK = 512  # images (or pairs) per block: bounds the memory of every step to a few tens of MB


@dataclasses.dataclass(frozen=True)
class Match:
  """An image of images_a and its near-duplicate in images_b."""

  a: int  # index into images_a
  b: int  # index into images_b
  score: float  # similarity in [0, 1] (1 = identical after alignment), higher is closer
  # the central crop fractions (width, height) of the LARGER-field image that matched best, (1, 1) = none
  crop: tuple[float, float]


# ----------------------------------------------------------------------------- image geometry


def _edges(length: int, fractions, n: int) -> np.ndarray:
  """[..., n + 1] pixel coordinates of n equal bins over the central `fractions` of `length` pixels."""
  f = np.asarray(fractions, np.float64)[..., None]
  return length * ((1.0 - f) / 2.0 + f * np.arange(n + 1) / n)


def _bins(x: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
  """Area averages of `x` along `axis` between consecutive `edges`, the same edges for every line.

  Pixel i covers [i, i + 1); `edges` [..., n + 1] are coordinates in [0, length], and `axis` of the
  result is replaced by the edges' leading axes and n bins. The running integral of a line is linear
  within each pixel, so every bin's mean is exact for fractional edges: one formula for a resize (down
  or up) and for a central crop at any fraction, at a cost linear in the pixels.
  """
  length = x.shape[axis]
  zero = np.zeros_like(np.take(x, [0], axis=axis))
  integral = np.concatenate([zero, np.cumsum(x, axis=axis)], axis=axis)
  e = np.clip(np.asarray(edges, np.float64), 0.0, length)
  i = np.minimum(e.astype(np.int64), length - 1).reshape(-1)
  line = [1] * x.ndim
  line[axis] = -1
  t = (e.reshape(-1) - i).astype(x.dtype).reshape(line)
  at = np.take(integral, i, axis=axis) + t * np.take(x, i, axis=axis)
  at = at.reshape(x.shape[:axis] + e.shape + x.shape[axis + 1 :])
  width = np.diff(e, axis=-1).astype(x.dtype)
  return np.diff(at, axis=axis + e.ndim - 1) / width.reshape(width.shape + (1,) * (x.ndim - axis - 1))


def _bins_per_line(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """`_bins` along the last axis with edges of their own per line (`edges` broadcasts against `x`'s leading axes)."""
  length = x.shape[-1]
  integral = np.concatenate([np.zeros_like(x[..., :1]), np.cumsum(x, axis=-1)], axis=-1)
  e = np.clip(edges, 0.0, length)
  i = np.minimum(e.astype(np.int64), length - 1)
  t = (e - i).astype(x.dtype)
  at = np.take_along_axis(integral, i, axis=-1) + t * np.take_along_axis(x, i, axis=-1)
  return np.diff(at, axis=-1) / np.diff(e, axis=-1).astype(x.dtype)


def _gray(images: np.ndarray) -> np.ndarray:
  """uint8 [n, h, w] or [n, h, w, c] -> float32 [n, h, w] (ITU-R 601 luma for 3 or 4 channels)."""
  x = np.asarray(images)
  if x.ndim == 4:
    if x.shape[-1] == 1:
      x = x[..., 0]
    elif x.shape[-1] in (3, 4):
      return x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
      raise ValueError(f'images: {x.shape[-1]} channels; expected 1, 3 or 4')
  return x.astype(np.float32)


def _check(images: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim not in (3, 4) or len(x) == 0 or min(x.shape[1:3]) < 2:
    raise ValueError(f'{name}: shape {x.shape}; expected a non-empty [N, H, W] or [N, H, W, C] image array')
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f'{name}: dtype {x.dtype}; expected uint8 images')
  return x


def _working(images: np.ndarray) -> np.ndarray:
  """Grayscale working images, each side area-averaged to at most WORK_SIZE pixels.

  Kept as float16 (steps of 1/8 grey level at most: far below what JPEG changes) to halve their memory;
  every use takes a chunk of them back to float32.
  """
  n, h, w = images.shape[:3]
  oh, ow = min(h, WORK_SIZE), min(w, WORK_SIZE)
  out = np.empty((n, oh, ow), np.float16)
  for s in range(0, n, CHUNK // 4):
    g = _gray(images[s : s + CHUNK // 4])
    if oh < h:  # rows first: a running sum down the columns adds whole rows at a time
      g = _bins(g, _edges(h, 1.0, oh), axis=1)
    if ow < w:
      g = _bins(g, _edges(w, 1.0, ow), axis=2)
    out[s : s + CHUNK // 4] = g
  return out


def _normalise(d: np.ndarray) -> np.ndarray:
  """Zero mean, unit norm along the last axis (flat descriptors stay zero: they match nothing)."""
  d = d - d.mean(axis=-1, keepdims=True)
  norm = np.linalg.norm(d, axis=-1, keepdims=True)
  return d / np.where(norm > 1e-6, norm, np.inf)


def _coarse(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Coarse descriptors: full [n, D] float32 and crops [n, 2F, D] float16 (D = COARSE_SIZE**2).

  Separable: the rows are averaged once for all width crops and the columns once for all height crops.
  """
  n, h, w = work.shape
  s, nf = COARSE_SIZE, len(CROP_FRACTIONS)
  full = np.empty((n, s * s), np.float32)
  crops = np.empty((n, 2 * nf, s * s), np.float16)
  for i in range(0, n, CHUNK):
    x = work[i : i + CHUNK].astype(np.float32)
    rows = _bins(x, _edges(h, 1.0, s), axis=1)  # [c, s, w]
    cols = _bins(x, _edges(w, 1.0, s), axis=2)  # [c, h, s]
    full[i : i + CHUNK] = _normalise(_bins(rows, _edges(w, 1.0, s), axis=2).reshape(len(x), -1))
    wide = _bins(rows, _edges(w, CROP_FRACTIONS, s), axis=2).transpose(0, 2, 1, 3)  # [c, F, s, s]
    high = _bins(cols, _edges(h, CROP_FRACTIONS, s), axis=1)  # [c, F, s, s]
    crops[i : i + CHUNK] = _normalise(np.concatenate([wide, high], axis=1).reshape(len(x), 2 * nf, -1))
  return full, crops


@functools.lru_cache(maxsize=8)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
  """[n, n]: a Gaussian blur of a line of n pixels, the edge pixels repeated outwards (rows sum to 1)."""
  reach = int(np.ceil(4 * sigma))
  taps = np.arange(-reach, n + reach)
  k = np.exp(-0.5 * ((np.arange(n)[:, None] - taps[None, :]) / sigma) ** 2)
  m = k @ (np.clip(taps, 0, n - 1)[:, None] == np.arange(n)[None, :])
  m = m / m.sum(axis=1, keepdims=True)
  m.setflags(write=False)
  return m.astype(np.float32)


def _band_pass(d: np.ndarray) -> np.ndarray:
  """[..., n, n] descriptors blurred at BAND[0] minus blurred at BAND[1] (separable blurs as matrix products)."""
  n = d.shape[-1]
  flat = d.reshape(-1, n, n)
  out = np.zeros_like(flat)
  for sigma, sign in ((BAND[0], 1.0), (BAND[1], -1.0)):
    g = _blur_matrix(n, sigma)
    t = (flat.reshape(-1, n) @ g.T).reshape(flat.shape).swapaxes(1, 2)  # rows blurred, then transposed
    out += sign * (np.ascontiguousarray(t).reshape(-1, n) @ g.T).reshape(flat.shape).swapaxes(1, 2)
  return out.reshape(d.shape)


def _fine_full(work: np.ndarray) -> np.ndarray:
  """Fine descriptors of the full images: [n, FINE_SIZE**2], band-passed, zero-mean and unit-norm."""
  n, h, w = work.shape
  out = np.empty((n, FINE_SIZE * FINE_SIZE), np.float32)
  for i in range(0, n, CHUNK):
    rows = _bins(work[i : i + CHUNK].astype(np.float32), _edges(h, 1.0, FINE_SIZE), axis=1)
    d = _bins(rows, _edges(w, 1.0, FINE_SIZE), axis=2)
    out[i : i + CHUNK] = _normalise(_band_pass(d).reshape(len(d), -1))
  return out


# ----------------------------------------------------------------------------- search


def _coarse_candidates(full_a, crops_a, full_b, crops_b, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best images of b for each image of a by coarse score: indices [N, k] (-1 = none) and scores."""
  n, m = len(full_a), len(full_b)
  k = min(k, m)
  top_s = np.full((n, k), -np.inf, np.float32)
  top_i = np.full((n, k), -1, np.int64)
  c = crops_a.shape[1]
  for j in range(0, m, CHUNK):
    fb = full_b[j : j + CHUNK]
    cb = crops_b[j : j + CHUNK].astype(np.float32)
    mb = len(fb)
    cb_flat = cb.reshape(mb * c, -1)
    for i in range(0, n, CHUNK):
      fa = full_a[i : i + CHUNK]
      ca = crops_a[i : i + CHUNK].astype(np.float32)
      na = len(fa)
      s = fa @ fb.T  # full against full
      s = np.maximum(s, (fa @ cb_flat.T).reshape(na, mb, c).max(axis=2))  # b's crops
      s = np.maximum(s, (ca.reshape(na * c, -1) @ fb.T).reshape(na, c, mb).max(axis=1))  # a's crops
      both_s = np.concatenate([top_s[i : i + na], s], axis=1)
      both_i = np.concatenate([top_i[i : i + na], np.broadcast_to(np.arange(j, j + mb), (na, mb))], axis=1)
      order = np.lexsort((both_i, -both_s), axis=1)[:, :k]  # by score, ties to the lower index
      top_s[i : i + na] = np.take_along_axis(both_s, order, axis=1)
      top_i[i : i + na] = np.take_along_axis(both_i, order, axis=1)
  return top_i, top_s


def _best_coarse_crop(full_a, crops_a, full_b, crops_b, pa, pb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For pairs (pa, pb): the side whose crop matched best (0 = a, 1 = b), the dimension (0 = width,
  1 = height) and the fraction (1.0 when the full images matched best)."""
  nf = len(CROP_FRACTIONS)
  side = np.empty(len(pa), np.int64)
  dim = np.empty(len(pa), np.int64)
  frac = np.empty(len(pa), np.float64)
  fr = np.asarray(CROP_FRACTIONS)
  for s in range(0, len(pa), CHUNK):
    a, b = pa[s : s + CHUNK], pb[s : s + CHUNK]
    on_b = np.einsum('pd,pcd->pc', full_a[a], crops_b[b].astype(np.float32))
    on_a = np.einsum('pcd,pd->pc', crops_a[a].astype(np.float32), full_b[b])
    both = np.concatenate([on_a, on_b], axis=1)  # [p, 2 * 2F]: side-major, then width/height, then fraction
    best = both.argmax(axis=1)
    side[s : s + CHUNK] = best // (2 * nf)
    dim[s : s + CHUNK] = (best % (2 * nf)) // nf
    full = np.einsum('pd,pd->p', full_a[a], full_b[b])
    frac[s : s + CHUNK] = np.where(full >= both.max(axis=1), 1.0, fr[best % nf])
  return side, dim, frac


def _fine_scores(work_crop, fine_other, side_images, other_images, dims, fracs) -> tuple[np.ndarray, np.ndarray]:
  """Fine score and fraction of pairs whose crop is on one side.

  work_crop: working images of the cropped side; fine_other: fine full descriptors of the other side;
  side_images / other_images: the pair's image on each; dims: 0 width, 1 height; fracs: coarse fractions.
  """
  n = FINE_SIZE
  lowest = min(CROP_FRACTIONS) - max(FINE_OFFSETS[0])
  scores = np.full(len(side_images), -1.0, np.float32)
  best_f = np.asarray(fracs, np.float64).copy()
  for d in (0, 1):
    sel = np.flatnonzero(dims == d)
    x = work_crop if d == 0 else work_crop.swapaxes(1, 2)  # a height crop is a width crop of the transpose
    other = fine_other.reshape(-1, n, n)
    other = (other if d == 0 else other.swapaxes(1, 2)).reshape(len(other), -1)
    for s in range(0, len(sel), CHUNK):
      p = sel[s : s + CHUNK]
      full_height = _edges(x.shape[1], 1.0, n)
      rows = _bins(x[side_images[p]].astype(np.float32), full_height, axis=1)  # [p, n, w]
      target = other[other_images[p]]
      for offsets in FINE_OFFSETS:
        f = np.clip(np.round(best_f[p, None] + offsets, 3), lowest, 1.0)  # [p, L]
        desc = _bins_per_line(rows[:, :, None, :], _edges(x.shape[2], f, n)[:, None])  # [p, n, L, n]
        desc = _normalise(_band_pass(desc.transpose(0, 2, 1, 3)).reshape(len(p), f.shape[1], -1))
        sim = np.einsum('pld,pd->pl', desc, target)
        k = sim.argmax(axis=1)
        top = sim[np.arange(len(p)), k]
        better = top > scores[p]
        scores[p] = np.where(better, top, scores[p])
        best_f[p] = np.where(better, f[np.arange(len(p)), k], best_f[p])
  return scores, best_f


def _scored_candidates(images_a, images_b, candidates: int):
  """Every candidate pair with its fine score: arrays a, b, score, crop width, crop height."""
  work_a, work_b = _working(images_a), _working(images_b)
  full_a, crops_a = _coarse(work_a)
  full_b, crops_b = _coarse(work_b)
  top_i, _ = _coarse_candidates(full_a, crops_a, full_b, crops_b, candidates)
  pa = np.repeat(np.arange(len(work_a)), top_i.shape[1])
  pb = top_i.reshape(-1)
  keep = pb >= 0
  pa, pb = pa[keep], pb[keep]
  side, dim, frac = _best_coarse_crop(full_a, crops_a, full_b, crops_b, pa, pb)
  del crops_a, crops_b
  fine_a, fine_b = _fine_full(work_a), _fine_full(work_b)
  score = np.empty(len(pa), np.float32)
  fine_frac = np.empty(len(pa), np.float64)
  for which, work, fine_other, mine, theirs in ((0, work_a, fine_b, pa, pb), (1, work_b, fine_a, pb, pa)):
    sel = np.flatnonzero(side == which)
    score[sel], fine_frac[sel] = _fine_scores(work, fine_other, mine[sel], theirs[sel], dim[sel], frac[sel])
  score = np.clip(score, 0.0, 1.0)
  crop_w = np.where(dim == 0, fine_frac, 1.0)
  crop_h = np.where(dim == 1, fine_frac, 1.0)
  return pa, pb, score, crop_w, crop_h


TIE = 1e-5  # scores closer than this are ties: copies of one image score alike only to float32 rounding


def _by_score(score: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
  """Pair order, best first; scores within TIE of the next better one tie, and ties go to the lower indices.

  Two copies of one image score the same but for the last bits (the matrix products round differently at
  different positions in a block), so exact ties would not be ties.
  """
  order = np.lexsort((pb, pa, -score))
  group = np.concatenate([[0], np.cumsum(np.diff(score[order]) < -TIE)])
  return order[np.lexsort((pb[order], pa[order], group))]


def find_near_duplicates(
  images_a: np.ndarray,
  images_b: np.ndarray,
  *,
  threshold: float | None = None,
  one_to_one: bool = False,
  candidates: int = CANDIDATES,
) -> list[Match]:
  """For each image of `images_a` (uint8 [N, h, w, c] or [N, h, w]) its best match in `images_b` (uint8 [M, H, W, C]),
  kept when it is a near-duplicate (score >= threshold). Symmetric in meaning: either side may be the
  cropped/lower-resolution one (crops of both are searched).

  threshold: None for DEFAULT_THRESHOLD, the middle of the gap between the scores of twins and of the best
    wrong partners measured on PneumoniaMNIST against the Kermany folders (its comment has the numbers);
    0 keeps every image's best match, which is how those distributions are measured.
  one_to_one: each image of `images_b` matched at most once: pairs are taken by descending score among the
    `candidates` best of each image of `images_a`, so an image whose best partner went to a closer twin
    falls back to its next candidate if that one passes the threshold. Without it, two images of `images_a`
    (duplicates within a source) can both name one image of `images_b`.
  candidates: coarse candidates per image of `images_a` that the fine step scores.

  Returns the matches ordered by `a`; the crop is that of the image with the larger field (either side).
  Deterministic: ties go to the lower index. Memory, besides the inputs: about 25 kB per image (the working
  image at 96x96 float16, its coarse and fine descriptors), and blocks of CHUNK images in the search.

  Raises:
    ValueError: an empty array, or one not shaped as images.
  """
  images_a, images_b = _check(images_a, 'images_a'), _check(images_b, 'images_b')
  threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
  if candidates < 1:
    raise ValueError(f'candidates={candidates}; expected at least 1')
  pa, pb, score, crop_w, crop_h = _scored_candidates(images_a, images_b, candidates)
  order = _by_score(score, pa, pb)
  used_a = np.zeros(len(images_a), bool)
  used_b = np.zeros(len(images_b), bool)
  out = []
  for q in order:
    a, b = int(pa[q]), int(pb[q])
    if score[q] < threshold or used_a[a] or (one_to_one and used_b[b]):
      continue
    used_a[a] = used_b[b] = True
    out.append(Match(a, b, float(score[q]), (float(crop_w[q]), float(crop_h[q]))))
  return sorted(out, key=lambda m: m.a)


# ----------------------------------------------------------------------------- command line

SPLIT_ORDER = ('train', 'val', 'test')
SKIPPED_FOLDERS = ('__MACOSX',)  # resource forks that macOS adds to zip archives


@dataclasses.dataclass
class Source:
  """Images read for the command: uint8 [n, h, w], a name and a group (split or top folder) per image."""

  spec: str
  images: np.ndarray
  names: list[str]
  groups: list[str]


def _read_npz(path: str, splits: str) -> Source:
  try:
    with np.load(path) as z:
      arrays = {k[: -len('_images')]: k for k in z.files if k.endswith('_images')}
      if not arrays:
        raise UserError(f'{path}: no <split>_images arrays (MedMNIST keys); it holds {", ".join(z.files) or "nothing"}')
      known = sorted(arrays, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
      wanted = [s.strip() for s in splits.split(',') if s.strip()] if splits else known
      for s in wanted:
        if s not in arrays:
          raise UserError(f'{path}: no split {s!r}; it has {", ".join(known)}')
      images, names, groups = [], [], []
      for s in wanted:
        x = z[arrays[s]]
        if x.ndim not in (3, 4) or x.dtype != np.uint8:
          raise UserError(f'{path}: {arrays[s]} is {x.dtype} {x.shape}; expected uint8 [N, H, W] or [N, H, W, C]')
        images.append(x)
        names += [f'{s}[{i}]' for i in range(len(x))]
        groups += [s] * len(x)
  except (OSError, ValueError) as e:  # not a zip, a truncated file, a pickled array
    raise UserError(f'{path}: not a readable npz file ({e})') from e
  shapes = {x.shape[1:] for x in images}
  if len(shapes) > 1:
    raise UserError(f'{path}: the splits {", ".join(wanted)} differ in image shape ({sorted(shapes)}); name one split')
  return Source(path, np.concatenate(images), names, groups)


def _read_image(path: Path) -> np.ndarray:
  """One file as uint8 [WORK_SIZE, WORK_SIZE] grayscale, squashed (a squash keeps central crops central)."""
  try:
    with Image.open(path) as im:
      im.draft('L', (WORK_SIZE, WORK_SIZE))  # JPEG: decode at a reduced scale, never below the size asked for
      if im.mode.startswith(('I', 'F')):  # 16-bit or float: stretched to 8 bits (the score ignores contrast)
        x = np.asarray(im, np.float64)
        im = Image.fromarray(np.rint(255 * (x - x.min()) / max(float(x.max() - x.min()), 1e-9)).astype(np.uint8))
      im = im.convert('L')
      if im.size != (WORK_SIZE, WORK_SIZE):
        im = im.resize((WORK_SIZE, WORK_SIZE), Image.BOX)  # BOX: area averaging, as the matcher does
      return np.asarray(im, np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f'{path}: not a readable image ({e})') from e


def _read_folder(root: Path) -> Source:
  files = sorted(
    p
    for p in root.rglob('*')
    if p.is_file()
    and p.name.lower().endswith(image_lib.PIL_EXTENSIONS)
    and not any(part.startswith('.') or part in SKIPPED_FOLDERS for part in p.relative_to(root).parts)
  )
  if not files:
    raise UserError(f'{root}: no image files ({", ".join(image_lib.PIL_EXTENSIONS)}) in the folder or below it')
  names = [p.relative_to(root).as_posix() for p in files]
  groups = [n.split('/', 1)[0] if '/' in n else '.' for n in names]
  return Source(str(root), np.stack([_read_image(p) for p in files]), names, groups)


def read_source(spec: str) -> Source:
  """An npz (`path.npz`, all splits; `path.npz:test` or `path.npz:train,val`) or a folder tree of images.

  Raises:
    UserError: no such file or folder, an unknown split, an unreadable npz or image, no images.
  """
  path, splits = spec, ''
  if not os.path.exists(spec) and ':' in spec:
    path, _, splits = spec.rpartition(':')
  if not os.path.exists(path):
    raise UserError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    if splits:
      raise UserError(f'{spec}: a split (:{splits}) is for npz files; name the subfolder instead')
    return _read_folder(Path(path))
  if not path.endswith('.npz'):
    raise UserError(f'{path}: expected an .npz file (MedMNIST keys) or a folder of images')
  return dataclasses.replace(_read_npz(path, splits), spec=spec)


def _counts(groups: list[str]) -> str:
  return ', '.join(f'{g} {n}' for g, n in collections.Counter(groups).items())


def run(spec_a: str, spec_b: str, threshold: float | None = None, one_to_one: bool = False, out: str = '') -> dict:
  """Reads two sources, pairs them, prints a summary and returns (and writes to `out`) the record."""
  threshold = DEFAULT_THRESHOLD if threshold is None else threshold
  if not 0.0 <= threshold <= 1.0:
    raise UserError(f'--threshold {threshold}: expected a score in [0, 1]')
  a, b = read_source(spec_a), read_source(spec_b)
  # Every best match (threshold 0) for the score quantiles; one-to-one needs the threshold for its fallbacks.
  try:
    matches = find_near_duplicates(
      a.images, b.images, threshold=threshold if one_to_one else 0.0, one_to_one=one_to_one
    )
  except ValueError as e:  # images of 2 channels, say
    raise UserError(f'{spec_a} against {spec_b}: {e}') from e
  best = np.array([m.score for m in matches]) if not one_to_one else None
  pairs = [m for m in matches if m.score >= threshold]
  claims = collections.Counter(m.b for m in pairs)
  record = {
    'a': {'source': a.spec, 'images': len(a.names), 'groups': dict(collections.Counter(a.groups))},
    'b': {'source': b.spec, 'images': len(b.names), 'groups': dict(collections.Counter(b.groups))},
    'threshold': threshold,
    'one_to_one': one_to_one,
    'matched': len(pairs),
    'matched_per_group': {
      g: {'images': n, 'matched': sum(a.groups[m.a] == g for m in pairs)}
      for g, n in collections.Counter(a.groups).items()
    },
    'b_claimed': len(claims),
    'b_claimed_more_than_once': sum(c > 1 for c in claims.values()),
    'pairs': [
      {'a': m.a, 'b': m.b, 'a_name': a.names[m.a], 'b_name': b.names[m.b], 'score': round(m.score, 5), 'crop': m.crop}
      for m in pairs
    ],
  }
  if best is not None:
    q = np.quantile(best, [0.0, 0.01, 0.05, 0.5, 1.0])
    record['best_score_quantiles'] = dict(zip(('min', 'q01', 'q05', 'median', 'max'), np.round(q, 5).tolist()))
  n = len(a.names)
  print(f'A: {a.spec}: {n} images ({_counts(a.groups)})')
  print(f'B: {b.spec}: {len(b.names)} images ({_counts(b.groups)})')
  if best is not None:
    print(
      'best score of each image of A: ' + ', '.join(f'{k} {v:.4f}' for k, v in record['best_score_quantiles'].items())
    )
  one = ', one-to-one' if one_to_one else ''
  print(f'{len(pairs)} of {n} images of A ({100 * len(pairs) / n:.1f}%) have a twin in B (score >= {threshold}{one})')
  if len(record['matched_per_group']) > 1 or next(iter(record['matched_per_group'])) != '.':
    for g, c in record['matched_per_group'].items():
      print(f'  {g}: {c["matched"]} of {c["images"]} ({100 * c["matched"] / c["images"]:.1f}%)')
  per_b = collections.Counter(b.groups[k] for k in claims)
  claimed = ', '.join(f'{g} {per_b[g]}' for g in dict.fromkeys(b.groups) if per_b[g]) or 'none'
  print(
    f'B: {len(claims)} images claimed ({claimed}), {record["b_claimed_more_than_once"]} by more than one image of A'
  )
  if out:
    fileio.atomic_write_json(out, record)
    print(f'pairs written to {out}')
  return record


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(
    prog='python -m cxrjax.data.near_duplicates', description=__doc__.split('\n\n')[0], allow_abbrev=False
  )
  p.add_argument('a', help='path.npz[:split[,split]] or a folder of images: the images to find twins for')
  p.add_argument('b', help='path.npz[:split[,split]] or a folder of images: where to look')
  p.add_argument('--out', default='', help='write the pairs (indices, names, score, crop) to this JSON file')
  p.add_argument(
    '--threshold', type=float, default=None, help=f'near-duplicate at this score (default {DEFAULT_THRESHOLD})'
  )
  p.add_argument('--one-to-one', action='store_true', help='match each image of B at most once')
  args = p.parse_args(argv)
  try:
    run(args.a, args.b, args.threshold, args.one_to_one, args.out)
  except UserError as e:
    print(f'cxrjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
