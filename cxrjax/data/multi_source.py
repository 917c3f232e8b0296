"""Several sources in one dataset (`data.sources`), with per-image provenance and cross-source duplicates.

The poster's protocol mixes sources: pneumonia and normals from one tree plus extra normals
from another. Each entry of `data.sources` (grammar in `config_lib.parse_sources` and the
config comment) is read as a dataset of its own by `sources.load_sources` (`load_folder` /
`load_npz`: its own
splits, val carved from its train per source and grouped by its own patient regex), its
classes mapped to the dataset's, its splits filtered, and the rows concatenated in entry
order. Every row keeps where it came from: `Split.sources` (the source's name) beside
`Split.names` (its file, or npz key[index]); group ids are prefixed by the source, so two
sources never share a patient.

Public datasets are often copies of each other (PneumoniaMNIST is Kermany's images, centre
cropped and shrunk), so the same X-ray can arrive twice. `near_duplicates.find_near_duplicates`
compares every pair of sources, and a pair is resolved by two rules (`data.source_duplicates=drop`):

* held-out copies win: of two copies in different splits, the one in the less held-out split
  is dropped (train < val < test), so no training image keeps a twin in val or test and no
  val image one in test;
* within one split the earlier source (first listed) keeps its copy; both copies of a
  test pair stay, since the test split is never changed (except by `data.test_prevalence`).

Of each pair of sources the smaller is looked up in the larger (every image looked up reports its
best partner, so fewer lookups give a wrong partner fewer chances to pass the matcher's threshold).
The matches are cached (`data.cache_dir`), keyed on the compared pixels and the matcher's code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from cxrjax import config_lib, fileio
from cxrjax.data import images as image_lib
from cxrjax.data.dataset import SPLITS, Dataset, Split, concat
from cxrjax.errors import UserError

DUPLICATE_SIZE = 64  # images are compared at most this large (grayscale): the matcher needs no more
RANK = {'train': 0, 'val': 1, 'test': 2}  # how held out a split is: the copy in the lower one is dropped
EXAMPLES = 8  # duplicate pairs named in the record


def _empty(size: int, channels: int) -> Split:
  return Split(np.zeros((0, size, size, channels), np.uint8), np.zeros(0, np.int32), np.zeros(0, str), np.zeros(0, str))


def _source_name(path: str, used: set[str], index: int) -> str:
  base = os.path.basename(path.rstrip('/'))
  base = base[: -len('.npz')] if base.endswith('.npz') else base
  return base if base not in used else f'{base}-{index}'


def _class_lut(spec: config_lib.SourceSpec, ds: Dataset, index: dict[str, int]) -> np.ndarray:
  """Source class -> dataset class (-1: left out), from the entry's class map."""
  lut = np.full(ds.num_classes, -1, np.int64)
  npz = ds.source.get('kind') == 'npz'
  mapped_by: dict[int, str] = {}
  for src, dst in spec.class_map:
    if src == '*':
      lut[:] = index[dst]
      continue
    hits = [k for k, n in enumerate(ds.class_names) if n == src or (npz and str(k) == src)]
    if not hits:
      also = f' or label indices 0-{ds.num_classes - 1}' if npz else ''
      raise UserError(
        f'{spec.where()}: class {src!r} not found; {ds.source["path"]} has classes {list(ds.class_names)}{also}'
      )
    k = hits[0]
    if k in mapped_by:
      raise UserError(
        f'{spec.where()}: class {ds.class_names[k]!r} mapped twice (as {mapped_by[k]!r} and {src!r});'
        ' expected each class once'
      )
    mapped_by[k] = src
    lut[k] = index[dst]
  return lut


def _describe(name: str, spec: config_lib.SourceSpec, ds: Dataset, left_out: dict[str, int]) -> str:
  mapping = ', '.join(f'{a}->{b}' for a, b in spec.class_map)
  text = f'{name} = {ds.source["description"]}; {mapping}'
  if left_out:
    text += ' (left out: ' + ', '.join(f'{c} {n}' for c, n in left_out.items()) + ')'
  return text + f'; feeds {",".join(spec.splits)}'


def combine(read: list[tuple[config_lib.SourceSpec, str, Dataset]], data) -> Dataset:
  """The dataset of `data.sources` from its entries, each read as a dataset of its own.

  Every entry's classes are mapped, its splits filtered, its group ids prefixed by its name;
  the rows are concatenated in entry order and cross-source near-duplicates resolved.

  Args:
    read: (entry, resolved path, the source read at the run's size and channels) per entry
      (`sources.load_sources`).
    data: `config.data` (image size, channels, source_duplicates, cache_dir, group_regex).

  Returns:
    A `Dataset` whose splits carry `sources` per row and whose `source` record (kind 'sources')
    lists each source, the counts read per source and split, and the duplicates found.

  Raises:
    UserError: a class the source does not have, a source left without images, a class without
      training images.
  """
  specs = [spec for spec, _, _ in read]
  class_names = config_lib.source_class_names(specs)
  index = {n: i for i, n in enumerate(class_names)}
  size, channels, k = data.image_size, data.channels, len(class_names)
  per_source: list[tuple[str, dict[str, Split]]] = []
  records, used = [], set()
  for spec, path, ds in read:
    name = _source_name(path, used, spec.index)
    used.add(name)
    lut = _class_lut(spec, ds, index)
    left_out: dict[str, int] = {}
    kept: dict[str, Split] = {}
    for split in SPLITS:
      part = ds.splits.get(split)
      if part is None or split not in spec.splits:
        continue
      keep = lut[part.labels] >= 0
      for c in np.flatnonzero(lut < 0):
        n = int(np.sum(part.labels == c))
        if n:
          left_out[ds.class_names[c]] = left_out.get(ds.class_names[c], 0) + n
      sub = part.take(np.flatnonzero(keep))
      kept[split] = Split(
        sub.images,
        lut[sub.labels].astype(np.int32),
        np.array([f'{name}:{g}' for g in sub.groups], dtype=str),
        sub.names,
        np.full(len(sub), name),
      )
    if not sum(len(s) for s in kept.values()):
      raise UserError(
        f'{spec.where()}: no images left after the class map and splits (it has classes {list(ds.class_names)},'
        f' splits {sorted(ds.splits)}); expected some'
      )
    unused = [s for s in SPLITS if s in ds.splits and len(ds.splits[s]) and s not in spec.splits]
    per_source.append((name, kept))
    records.append(
      dict(
        name=name,
        entry=spec.text,
        kind=ds.source['kind'],
        path=path,
        splits=list(spec.splits),
        class_map={a: b for a, b in spec.class_map},
        group_regex=data.group_regex if spec.group_regex is None else spec.group_regex,
        left_out=left_out,
        unused_splits=unused,
        counts_read={s: p.class_counts(k) for s, p in kept.items()},
        source=ds.source,
        description=_describe(name, spec, ds, left_out),
      )
    )

  duplicates = None
  if len(per_source) > 1 and data.source_duplicates != 'off':
    per_source, duplicates = resolve_duplicates(per_source, k, data.source_duplicates, data.cache_dir)

  splits = {}
  for split in SPLITS:
    out = _empty(size, channels)
    for _, kept in per_source:
      if split in kept:
        out = concat(out, kept[split])
    splits[split] = out
  train_counts = splits['train'].class_counts(k)
  for c, n in enumerate(train_counts):
    if n == 0:
      by = [s.index for s in specs if any(dst == class_names[c] for _, dst in s.class_map) and 'train' in s.splits]
      raise UserError(
        f'config.data.sources: class {class_names[c]!r} has no training images after the class maps'
        f' (mapped for train by entries {by or "none"}); expected some in a source that feeds train'
      )
  notes = [f'{r["name"]}: {n}' for r in records for n in r['source'].get('notes', [])]
  source = dict(
    kind='sources',
    path='',
    phantom=False,
    sources=records,
    counts_read={r['name']: r['counts_read'] for r in records},
    duplicates=duplicates,
    notes=notes,
    description=f'{len(records)} sources: ' + ' | '.join(r['description'] for r in records),
  )
  return Dataset(splits, class_names, source)


# ----------------------------------------------------------------------------- duplicates


def _gray_small(images: np.ndarray) -> np.ndarray:
  """uint8 [N, s, s] grayscale at most DUPLICATE_SIZE px: what the matcher compares."""
  gray = image_lib.to_channels(images, 1)
  if gray.shape[1] > DUPLICATE_SIZE:
    gray = image_lib.resize_array(gray, DUPLICATE_SIZE)
  return gray[..., 0]


def _stacked(kept: dict[str, Split]) -> tuple[np.ndarray, list[tuple[str, int]]]:
  """A source's images of all its splits, in SPLITS order, and (split, row) of each."""
  parts, where = [], []
  for split in SPLITS:
    if split in kept and len(kept[split]):
      parts.append(_gray_small(kept[split].images))
      where += [(split, i) for i in range(len(kept[split]))]
  return np.concatenate(parts), where


def matcher_fingerprint() -> str:
  """A hash of the near-duplicate matcher's code: a changed matcher never reads old cached matches."""
  try:
    from cxrjax.data import near_duplicates  # noqa: PLC0415 - the matcher loads only when sources are compared
  except ImportError as e:
    raise UserError(
      f'config.data.source_duplicates: the matcher cxrjax.data.near_duplicates cannot be imported ({e});'
      " expected it installed, or data.source_duplicates='off'"
    ) from e
  return hashlib.sha256(Path(near_duplicates.__file__).read_bytes()).hexdigest()[:16]


def cached_matches(a: np.ndarray, b: np.ndarray, cache_dir: str) -> tuple[np.ndarray, str, bool]:
  """`find_near_duplicates(a, b)` as a structured array (a, b, score, crop0, crop1), cached.

  The key is the matcher's code and the pixels compared, so the result is recomputed
  exactly when it could differ. Returns (matches, cache path, whether it was read from the cache).
  """
  h = hashlib.sha256(matcher_fingerprint().encode())  # imports the matcher, or says it is missing
  from cxrjax.data import near_duplicates  # noqa: PLC0415

  for arr in (a, b):
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  root = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'cxrjax')
  path = os.path.join(root, f'neardup-{h.hexdigest()[:24]}.npz')
  if os.path.isfile(path):
    with np.load(path, allow_pickle=False) as z:
      return z['matches'], path, True
  found = near_duplicates.find_near_duplicates(a, b)
  dtype = [('a', np.int64), ('b', np.int64), ('score', np.float64), ('crop0', np.float64), ('crop1', np.float64)]
  matches = np.array([(m.a, m.b, m.score, m.crop[0], m.crop[1]) for m in found], dtype=dtype)
  try:
    fileio.atomic_save_npz(path, dict(matches=matches))
  except OSError as e:  # a read-only cache is no reason to fail
    logging.warning('could not cache near-duplicate matches at %s: %s', path, e)
  return matches, path, False


def resolve_duplicates(
  per_source: list[tuple[str, dict[str, Split]]], num_classes: int, mode: str, cache_dir: str
) -> tuple[list[tuple[str, dict[str, Split]]], dict[str, Any]]:
  """Finds near-duplicates between every pair of sources and drops copies by the module's rules.

  Args:
    per_source: (name, split -> rows) per source, in entry order.
    num_classes: K.
    mode: 'drop', or 'report' (count what would be dropped, drop nothing).
    cache_dir: `data.cache_dir` ('' = ~/.cache/cxrjax).

  Returns:
    (per_source with the dropped rows removed, the record: pairs per source pair and split
    pair, copies dropped per split, source and class, examples, cache files).
  """
  stacked = [_stacked(kept) for _, kept in per_source]
  drop: dict[tuple[int, str], set[int]] = {}
  pairs: dict[str, dict[str, int]] = {}
  kept_in_test, conflicts, examples, caches, cached_all = 0, 0, [], [], True
  for i in range(len(per_source)):
    for j in range(i + 1, len(per_source)):
      (name_a, kept_a), (name_b, kept_b) = per_source[i], per_source[j]
      (imgs_a, where_a), (imgs_b, where_b) = stacked[i], stacked[j]
      # Each image of the matcher's first argument reports its best partner in the second, so every image
      # that has no twin is one more chance for a wrong partner to pass the threshold: the smaller source asks.
      flip = len(imgs_b) <= len(imgs_a)
      matches, path, cached = cached_matches(*((imgs_b, imgs_a) if flip else (imgs_a, imgs_b)), cache_dir)
      caches.append(path)
      cached_all &= cached
      counts = pairs.setdefault(f'{name_a}~{name_b}', {})
      for m in matches:
        ia, ib = (int(m['b']), int(m['a'])) if flip else (int(m['a']), int(m['b']))
        (sa, ra), (sb, rb) = where_a[ia], where_b[ib]
        counts[f'{sa}~{sb}'] = counts.get(f'{sa}~{sb}', 0) + 1
        la, lb = int(kept_a[sa].labels[ra]), int(kept_b[sb].labels[rb])
        conflicts += la != lb
        if len(examples) < EXAMPLES:
          examples.append(
            dict(
              a=f'{name_a}:{kept_a[sa].names[ra]}',
              b=f'{name_b}:{kept_b[sb].names[rb]}',
              score=float(m['score']),
              crop=[float(m['crop0']), float(m['crop1'])],
            )
          )
        if sa == sb == 'test':
          kept_in_test += 1  # the test split is never changed: both copies stay, counted
        elif sa == sb or RANK[sb] < RANK[sa]:
          drop.setdefault((j, sb), set()).add(rb)  # the later source's copy, or the less held-out one
        else:
          drop.setdefault((i, sa), set()).add(ra)
  dropped: dict[str, dict[str, list[int]]] = {}
  out = []
  for s, (name, kept) in enumerate(per_source):
    new = dict(kept)
    for split, rows in kept.items():
      gone = np.array(sorted(drop.get((s, split), ())), np.int64)
      if len(gone):
        dropped.setdefault(split, {})[name] = np.bincount(rows.labels[gone], minlength=num_classes).tolist()
        if mode == 'drop':
          new[split] = rows.take(np.setdiff1d(np.arange(len(rows)), gone))
    out.append((name, new))
  per_class = {split: np.sum([c for c in by.values()], axis=0).astype(int).tolist() for split, by in dropped.items()}
  record = dict(
    mode=mode,
    applied=mode == 'drop',
    compared=f'in grayscale at most {DUPLICATE_SIZE} px by cxrjax.data.near_duplicates, the smaller source of'
    ' each pair looked up in the larger',
    rule='held-out copies win (a train copy of a val/test image, a val copy of a test image are dropped); within'
    ' a split the first listed source keeps its copy; test pairs are kept (the test split is never changed)',
    pairs=pairs,
    pairs_total=int(sum(sum(c.values()) for c in pairs.values())),
    label_conflicts=int(conflicts),
    kept_in_test=int(kept_in_test),
    dropped=dropped,
    dropped_per_class=per_class,
    examples=examples,
    cache=caches,
    cached=bool(cached_all),
  )
  return out if mode == 'drop' else per_source, record


def duplicates_line(record: dict[str, Any] | None, class_names) -> str:
  """One line for the banner and report: pairs found per source and split pair, copies dropped per class."""
  if not record:
    return ''
  pairs = '; '.join(
    f'{pair}: ' + ', '.join(f'{sp} {n}' for sp, n in sorted(by.items())) if by else f'{pair}: none'
    for pair, by in record['pairs'].items()
  )
  verb = 'dropped' if record['applied'] else 'would drop (data.source_duplicates=report)'
  drops = '; '.join(
    f'{split} ' + ', '.join(f'{c} {n}' for c, n in zip(class_names, counts))
    for split, counts in record['dropped_per_class'].items()
  )
  text = f'near-duplicates across sources: {record["pairs_total"]} pair(s) ({pairs}); {verb}: {drops or "none"}'
  if record['kept_in_test']:
    text += f'; {record["kept_in_test"]} test~test pair(s) kept (test is never changed)'
  if record['label_conflicts']:
    text += f'; {record["label_conflicts"]} pair(s) with different labels'
  return text
