"""Procedural chest-X-ray-like phantom images, for offline demos and unit tests.

Not real data: every output made from it says PHANTOM. Each image is a
frontal-chest caricature (body outline, two dark lung fields with rib
shadows, spine and heart) with random pose, size and exposure. Class 0 is
"normal"; class k > 0 adds a pattern of patchy opacities in the lung fields
whose location and size depend on k (class 1: lower-zone consolidation, as in
bacterial pneumonia; class 2: diffuse bilateral haze, as in viral; further
classes: other zones), so that a classifier has something real to learn and
Grad-CAM has somewhere to look.
"""

from __future__ import annotations

import numpy as np

from cxrjax.data.dataset import Dataset, Split

SPLIT_SIZES = {'train': 600, 'val': 100, 'test': 200}  # per class


def lung_masks(size: int, params: np.ndarray | None = None) -> np.ndarray:
  """Boolean [size, size] mask of both lung fields for the neutral pose."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
  left = ((xx + 0.38) / 0.26) ** 2 + ((yy - 0.02) / 0.62) ** 2 < 1
  right = ((xx - 0.38) / 0.26) ** 2 + ((yy - 0.02) / 0.62) ** 2 < 1
  return left | right


def _render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
  # Pose: shift, scale and a little rotation of the whole chest.
  dx, dy = rng.normal(0, 0.04, 2)
  s = rng.uniform(0.9, 1.08)
  th = rng.normal(0, 0.05)
  x = (np.cos(th) * (xx - dx) + np.sin(th) * (yy - dy)) / s
  y = (-np.sin(th) * (xx - dx) + np.cos(th) * (yy - dy)) / s

  img = np.full((size, size), 0.08, np.float32)
  body = (x / 0.92) ** 2 + ((y - 0.1) / 1.1) ** 2 < 1
  img += 0.55 * body
  lw = rng.uniform(0.22, 0.3)
  lh = rng.uniform(0.55, 0.68)
  left = ((x + 0.38) / lw) ** 2 + ((y - 0.02) / lh) ** 2
  right = ((x - 0.38) / lw) ** 2 + ((y - 0.02) / lh) ** 2
  lungs = np.exp(-np.maximum(np.minimum(left, right) - 1, 0) * 6) * (np.minimum(left, right) < 1.6)
  img -= 0.38 * lungs
  # Ribs: bright arcs across the lung fields.
  phase = rng.uniform(0, 2 * np.pi)
  ribs = 0.5 + 0.5 * np.sin((y + 0.15 * x**2) * rng.uniform(17, 21) + phase)
  img += 0.09 * ribs * lungs
  spine = np.exp(-((x / 0.07) ** 2)) * body
  img += 0.22 * spine
  heart = np.exp(-(((x + 0.12) / 0.22) ** 2 + ((y - 0.32) / 0.2) ** 2))
  img += 0.25 * heart
  # Opacities for the disease classes.
  if label > 0:
    k = label - 1
    n_blobs = 4 + rng.integers(0, 5)
    for _ in range(n_blobs):
      side = rng.choice([-1, 1]) if k != 0 else rng.choice([-1, 1], p=[0.4, 0.6])
      if k == 0:  # lower-zone consolidation
        cy = rng.uniform(0.15, 0.5)
        rad = rng.uniform(0.08, 0.16)
      elif k == 1:  # diffuse haze, both lungs
        cy = rng.uniform(-0.4, 0.45)
        rad = rng.uniform(0.15, 0.3)
      else:  # other zones for further classes
        cy = -0.45 + 0.25 * ((k - 2) % 4) + rng.normal(0, 0.05)
        rad = rng.uniform(0.07, 0.14)
      cx = side * 0.38 + rng.normal(0, 0.07)
      blob = np.exp(-(((x - cx) / rad) ** 2 + ((y - cy) / (rad * 1.2)) ** 2))
      texture = 0.7 + 0.3 * rng.random((size, size)).astype(np.float32)
      img += (0.14 if k == 1 else 0.26) * blob * lungs * texture
  exposure = rng.uniform(0.85, 1.15)
  img = img * exposure + rng.normal(0, 0.025, (size, size)).astype(np.float32)
  return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def make_split(counts: list[int], size: int, channels: int, seed: int, split: str) -> Split:
  """Renders `counts[k]` images of class k; deterministic per seed and split."""
  rng = np.random.default_rng([seed, 9973, SPLIT_SIZES.get(split, 0), len(counts)])
  labels = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(counts)])
  rng.shuffle(labels)
  images = np.stack([_render(int(lab), size, rng) for lab in labels])[..., None]
  if channels == 3:
    images = np.repeat(images, 3, axis=-1)
  names = np.array([f'phantom:{split}[{i}]' for i in range(len(labels))])
  return Split(images, labels, names.copy(), names)


def load_phantom(num_classes: int, size: int, channels: int, seed: int = 0, scale: float = 1.0) -> Dataset:
  """A phantom dataset with SPLIT_SIZES images per class (times `scale`)."""
  num_classes = max(num_classes, 2)
  splits = {}
  for split, n in SPLIT_SIZES.items():
    n = max(int(round(n * scale)), 4)
    splits[split] = make_split([n] * num_classes, size, channels, seed, split)
  names = (
    ('normal', 'pneumonia') if num_classes == 2 else ('normal',) + tuple(f'lesion{k}' for k in range(1, num_classes))
  )
  source = dict(
    kind='phantom',
    path='',
    phantom=True,
    description=f'PHANTOM procedural chest images ({size}x{size}, seed {seed}): NOT real data',
  )
  return Dataset(splits, names, source)
