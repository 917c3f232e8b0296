"""Synthetic image sets on disk, with provenance, and their mixing into training.

A synthetic set is one npz (no pickle): uint8 `images` [N,H,W,C], int32
`labels`, str `names`, and `provenance`, a JSON string naming the generator,
its training step, the config hash and seed that made it. Sets are written
atomically. `config.rebalance.synthetic` lists sets to mix,
`'path[:weight],path[:weight]'`; each class below the target ratio is filled
from them in proportion to the weights (generator mixing).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cxrjax import fileio
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError


def save(path: str, images: np.ndarray, labels: np.ndarray, provenance: dict[str, Any]) -> None:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'synthetic images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}')
  tag = provenance.get('tag', 'synthetic')
  names = np.array([f'{tag}[{i}]' for i in range(len(images))])
  fileio.atomic_save_npz(
    path,
    dict(
      images=images,
      labels=np.asarray(labels, np.int32),
      names=names,
      provenance=np.array(json.dumps(provenance, sort_keys=True, default=str)),
    ),
  )


def load(path: str) -> tuple[Split, dict[str, Any]]:
  """Reads a synthetic set; raises UserError naming the file if it is not one."""
  if not os.path.isfile(path):
    raise UserError(f'synthetic set {path!r}: no such file')
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ('images', 'labels', 'names', 'provenance') if k not in z.files]
      if missing:
        raise UserError(f'{path}: not a cxrjax synthetic set (missing {", ".join(missing)})')
      images, labels, names = z['images'], z['labels'], z['names']
      provenance = json.loads(str(z['provenance']))
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: not a readable synthetic set ({e})') from e
  if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
    raise UserError(f'{path}: images must be uint8 [N,H,W,C] aligned with labels; got {images.dtype} {images.shape}')
  return Split(images, labels.astype(np.int32), names.copy(), names), provenance


def parse_sources(spec: str) -> list[tuple[str, float]]:
  """'a.npz:0.7,b.npz:0.3' -> [('a.npz', 0.7), ('b.npz', 0.3)] (weights default to 1)."""
  out = []
  for item in [s.strip() for s in spec.split(',') if s.strip()]:
    path, sep, weight = item.rpartition(':')
    if not sep or not _is_number(weight):
      path, weight = item, '1'
    w = float(weight)
    if w <= 0:
      raise UserError(f'config.rebalance.synthetic: weight {w} for {path!r}; expected > 0')
    out.append((path, w))
  if not out:
    raise UserError("config.rebalance.synthetic is empty; expected 'path[:weight],...'")
  return out


def _is_number(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


def allocate(needed: int, weights: list[float]) -> list[int]:
  """Splits `needed` images over sources in proportion to weights (largest remainder)."""
  w = np.asarray(weights, np.float64)
  exact = needed * w / w.sum()
  out = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - out), kind='stable')[: needed - out.sum()]:
    out[i] += 1
  return out.tolist()


def draw(
  sources: list[tuple[Split, dict, float]], per_class_needed: dict[int, int], image_shape, rng: np.random.Generator
) -> tuple[Split | None, np.ndarray, dict[str, Any]]:
  """Takes the needed images per class from the sources, without replacement.

  Returns:
    (extra rows or None, origin tag per row, a summary of what came from where).
  """
  parts, origins = [], []
  summary: dict[str, Any] = {}
  for c, needed in sorted(per_class_needed.items()):
    if needed <= 0:
      continue
    shares = allocate(needed, [w for _, _, w in sources])
    for (split, prov, _), n in zip(sources, shares):
      if n == 0:
        continue
      tag = prov.get('tag', 'synthetic')
      if tuple(split.images.shape[1:]) != tuple(image_shape):
        raise UserError(
          f'synthetic set {prov.get("path", tag)}: images {split.images.shape[1:]}; the data has {tuple(image_shape)}'
        )
      idx = np.flatnonzero(split.labels == c)
      if len(idx) < n:
        raise UserError(
          f'synthetic set {prov.get("path", tag)} has {len(idx)} images of class {c}; {n} are needed'
          ' (generate more, or lower rebalance.target_ratio or rebalance.synthetic_dose)'
        )
      take = np.sort(rng.choice(idx, size=n, replace=False))
      parts.append(split.take(take))
      origins += [f'synthetic:{tag}'] * n
      summary.setdefault(tag, {})[str(c)] = int(n)
  if not parts:
    return None, np.zeros(0, str), summary
  out = parts[0]
  for p in parts[1:]:
    out = Split(
      np.concatenate([out.images, p.images]),
      np.concatenate([out.labels, p.labels]),
      np.concatenate([out.groups, p.groups]),
      np.concatenate([out.names, p.names]),
      np.concatenate([out.sources, p.sources]),
    )
  return out, np.array(origins), summary
