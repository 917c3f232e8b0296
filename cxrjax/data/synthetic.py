"""Synthetic image sets on disk, with provenance, and their mixing into training.

A synthetic set is one npz (no pickle): uint8 `images` [N,H,W,C], int32
`labels`, str `names`, and `provenance`, a JSON string naming the generator,
its training step, the config hash and seed that made it. Sets are written
atomically. `config.rebalance.synthetic` lists sets to mix,
`'path[:weight],path[:weight]'`; each class below the target ratio is filled
from them in proportion to the weights (generator mixing).

With `config.rebalance.synthetic_val`, validation gets synthetic images too (the
latent-diffusion study's design): each set's companion `<name>_val.npz`
(`val_companion`), made for the validation split (image-to-image from validation
images only; its own random stream), fills each validation class in the
proportion its training class was filled (`mix_validation`). The test split
never reaches this module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cxrjax import fileio
from cxrjax.data.dataset import Split, concat
from cxrjax.errors import UserError


def save(
  path: str, images: np.ndarray, labels: np.ndarray, provenance: dict[str, Any], derived_from: np.ndarray | None = None
) -> None:
  """Writes a set; `derived_from` names, per image, the real image it was made from (image-to-image)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'synthetic images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}')
  tag = provenance.get('tag', 'synthetic')
  names = np.array([f'{tag}[{i}]' for i in range(len(images))])
  arrays = dict(
    images=images,
    labels=np.asarray(labels, np.int32),
    names=names,
    provenance=np.array(json.dumps(provenance, sort_keys=True, default=str)),
  )
  if derived_from is not None:
    arrays['derived_from'] = np.asarray(derived_from, str)
  fileio.atomic_save_npz(path, arrays)


def load_derived_from(path: str) -> np.ndarray | None:
  """The real image each synthetic image of a set was made from (image-to-image), or None (from noise)."""
  with np.load(path, allow_pickle=False) as z:
    return z['derived_from'].copy() if 'derived_from' in z.files else None


def val_companion(path: str) -> str:
  """The validation set that goes with a synthetic set: 'x/synthetic.npz' -> 'x/synthetic_val.npz'."""
  root, ext = os.path.splitext(path)
  return f'{root}_val{ext or ".npz"}'


VAL_RULES = {
  'proportion': 'each validation class gets synthetic images in the proportion its training class did',
  'fill': 'each validation class that training filled is filled to rebalance.target_ratio of the largest'
  ' validation class',
}


def val_needed(train_counts, train_synthetic, val_counts, rule: str = 'proportion', target_ratio: float = 1.0):
  """Synthetic images per validation class (a dict), for the classes training got synthetic images for.

  'proportion': round(synthetic_c / real_train_c * real_val_c), the share of synthetic images in the
  class as in training (with the training split's class mix in validation, this fills a validation
  class exactly as its training class was filled). 'fill': up to `target_ratio` times the largest
  validation class, as training was filled (nothing when that class is already the largest).
  """
  goal = int(round(target_ratio * max(val_counts)))
  out = {}
  for c, (n_train, n_syn, n_val) in enumerate(zip(train_counts, train_synthetic, val_counts)):
    if not (n_train and n_syn):
      out[c] = 0
    elif rule == 'proportion':
      out[c] = int(round(n_syn * n_val / n_train))
    elif rule == 'fill':
      out[c] = max(goal - int(n_val), 0)
    else:
      raise UserError(f'config.rebalance.synthetic_val_rule={rule!r}: expected one of {", ".join(VAL_RULES)}')
  return out


def mix_validation(
  val: Split,
  train_counts,
  train_synthetic,
  spec: str,
  rng: np.random.Generator,
  rule: str = 'proportion',
  target_ratio: float = 1.0,
) -> tuple[Split, dict[str, Any]]:
  """The validation split with synthetic rows added (`val_needed` per class), drawn from the
  companions of the sets in `spec` ('path[:weight],...', as `rebalance.synthetic`).

  Returns:
    (real validation rows, then synthetic rows with sources 'synthetic:<tag>'; a summary).
  """
  k = len(train_counts)
  needed = val_needed(train_counts, train_synthetic, val.class_counts(k), rule, target_ratio)
  sources = []
  for path, weight in parse_sources(spec):
    vpath = val_companion(path)
    if not os.path.isfile(vpath):
      raise UserError(
        f'rebalance.synthetic_val: {vpath} (the validation companion of {path}) does not exist;'
        ' rerun the generative run that made it with --config.rebalance.synthetic_val=True'
      )
    split, prov = load(vpath)
    if prov.get('split') != 'val':
      raise UserError(f'{vpath}: not a validation synthetic set (provenance split {prov.get("split")!r})')
    sources.append((split, dict(prov, path=vpath), weight))
  extra, origins, drawn = draw(sources, needed, val.images.shape[1:], rng)
  summary: dict[str, Any] = dict(
    sources=[p['path'] for _, p, _ in sources],
    drawn=drawn,
    synthetic_counts=[needed[c] for c in range(k)],
    rule=f'{rule}: {VAL_RULES[rule]}',
  )
  if extra is None:
    summary['counts'] = val.class_counts(k)
    return val, summary
  mixed = concat(val, Split(extra.images, extra.labels, extra.groups, extra.names, origins.astype(str)))
  summary['counts'] = mixed.class_counts(k)
  return mixed, summary


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


def labels_for(counts: dict[int, int]) -> np.ndarray:
  """int32 labels, `counts[c]` of class c, in class order (empty for no counts)."""
  parts = [np.full(n, c, np.int32) for c, n in counts.items() if n > 0]
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


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
