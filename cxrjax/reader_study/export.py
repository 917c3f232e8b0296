"""Builds a study folder: a seeded, shuffled mix of held-out real and synthetic images.

Real images come from the run's held-out splits (test by default, val on request),
re-loaded from the data the run recorded, never from the training split the generator
learned from; a held-out image whose pixels also appear in the training split is left
out. Synthetic images come from the run's `synthetic.npz`. Within each class the same
share is synthetic, so the class seen is no clue to the answer; every image is written
by one PNG encoder under a random name, in the order of those names, with one
modification time. The answer key is written outside `images/`, and its sha256 goes
into the manifest so that `analyze` can tell it is the right, unaltered key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import ml_collections
import numpy as np

from cxrjax import fileio
from cxrjax.data import sources, synthetic
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.reader_study import study

REAL_SPLITS = ('val', 'test')


@dataclasses.dataclass
class Pools:
  """The images a study may draw from, with where each came from."""

  real: Split  # held-out real images; `groups` holds the split ('val' / 'test') each came from
  synthetic: Split  # names say 'synthetic.npz[<row>]'; `groups` is 'synthetic'
  class_names: tuple[str, ...]
  info: dict[str, Any]  # the run, the generator's provenance, the real data and what was left out


def _pinned_data(config: dict[str, Any], source: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run's `config.data`, pointed at the data the run actually read (an 'auto' source is resolved)."""
  data = ml_collections.ConfigDict(config['data'])
  kind = source.get('kind')
  if kind in ('npz', 'folder') and source.get('path'):
    data.source, data.path = kind, source['path']
  elif kind in ('phantom', 'tfds'):
    data.source = kind
  return data


def load_run(run_dir: str, real_splits: tuple[str, ...] = ('test',)) -> Pools:
  """The real and synthetic pools of a finished generative run (a workdir with synthetic.npz and metrics.json)."""
  if not os.path.isdir(run_dir):
    raise UserError(f'--run {run_dir}: no such folder')
  for name in ('config.json', 'metrics.json', 'synthetic.npz'):
    if not os.path.isfile(os.path.join(run_dir, name)):
      raise UserError(f'--run {run_dir}: not a finished generative run (no {name})')
  bad = [s for s in real_splits if s not in REAL_SPLITS]
  if bad or not real_splits:
    raise UserError(f'--real-splits {",".join(real_splits)}: expected val and/or test (never train)')
  metrics = fileio.read_json(os.path.join(run_dir, 'metrics.json'))
  if 'synthetic' not in metrics or 'data' not in metrics:
    raise UserError(f'--run {run_dir}: metrics.json is not a generative run\'s (no "synthetic" section)')
  config = fileio.read_json(os.path.join(run_dir, 'config.json'))['config']
  syn, prov = synthetic.load(os.path.join(run_dir, 'synthetic.npz'))
  if prov != metrics['synthetic'].get('provenance'):
    raise UserError(f'{run_dir}/synthetic.npz: its provenance differs from metrics.json (a set from another run?)')
  recorded = metrics['data']['source']
  ds = sources.load_dataset(_pinned_data(config, recorded), config['seed'])
  if recorded.get('md5') and ds.source.get('md5') != recorded['md5']:
    raise UserError(f'{ds.source.get("path")}: md5 differs from the one the run recorded ({recorded["md5"]})')
  if recorded.get('counts_loaded') and ds.counts() != recorded['counts_loaded']:
    raise UserError(
      f'{ds.source.get("description")}: class counts {ds.counts()} differ from those the run loaded'
      f' ({recorded["counts_loaded"]}); not the data the generator was trained on'
    )
  if list(ds.class_names) != metrics['data']['class_names']:
    raise UserError(f'the data has classes {list(ds.class_names)}; the run had {metrics["data"]["class_names"]}')
  if tuple(syn.images.shape[1:]) != tuple(ds.image_shape):
    raise UserError(f'synthetic images {syn.images.shape[1:]} differ in shape from the real ones {ds.image_shape}')

  # Held-out images only, and none whose pixels the generator could have seen in training.
  train_hashes = set(ds.splits['train'].content_hashes())
  parts, excluded = [], {}
  seen: set[str] = set()
  for split in real_splits:
    s = ds.splits[split]
    keep = []
    for i, h in enumerate(s.content_hashes()):
      if h in train_hashes:
        excluded[f'{split}_in_train'] = excluded.get(f'{split}_in_train', 0) + 1
      elif h in seen:
        excluded['repeated'] = excluded.get('repeated', 0) + 1
      else:
        seen.add(h)
        keep.append(i)
    part = s.take(np.asarray(keep, np.int64))
    parts.append(Split(part.images, part.labels, np.full(len(part), split), part.names))
  real = parts[0]
  for p in parts[1:]:
    real = Split(*(np.concatenate([getattr(real, f), getattr(p, f)]) for f in ('images', 'labels', 'groups', 'names')))
  syn_names = np.array([f'synthetic.npz[{i}]' for i in range(len(syn))])
  syn = Split(syn.images, syn.labels, np.full(len(syn), 'synthetic'), syn_names)

  quality = {}
  for cls, q in (metrics.get('generator_quality') or {}).get('per_class', {}).items():
    kid = q.get('kid')
    quality[cls] = dict(
      fid=q.get('fid'),
      kid=kid.get('mean') if isinstance(kid, dict) else kid,
      precision=q.get('precision'),
      recall=q.get('recall'),
    )
  k = ds.num_classes
  info = dict(
    run=os.path.abspath(run_dir),
    run_config_hash=metrics.get('run', {}).get('config_hash'),
    generator=prov,
    generator_quality=quality,
    real=dict(
      data=ds.source.get('description'),
      phantom=ds.is_phantom,
      splits=list(real_splits),
      available=real.class_counts(k),
      excluded=excluded,
    ),
    synthetic_available=syn.class_counts(k),
  )
  return Pools(real, syn, tuple(ds.class_names), info)


def _parse_classes(spec: str | list[str] | None, pools: Pools) -> list[int]:
  names = list(pools.class_names)
  if not spec:
    chosen = [c for c in range(len(names)) if np.any(pools.synthetic.labels == c)]
    if not chosen:
      raise UserError('the synthetic set is empty')
    return chosen
  items = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec) if s.strip()]
  out = []
  for item in items:
    if item in names:
      out.append(names.index(item))
    elif item.isdigit() and int(item) < len(names):
      out.append(int(item))
    else:
      raise UserError(f'--classes: unknown class {item!r}; the run has {", ".join(names)}')
  if len(set(out)) != len(out):
    raise UserError(f'--classes {",".join(items)}: a class is named twice')
  return out


def _weights(spec: str | list[float] | None, n: int) -> list[float]:
  if not spec:
    return [1.0] * n
  try:
    w = [float(x) for x in (spec.split(',') if isinstance(spec, str) else spec)]
  except ValueError as e:
    raise UserError(f'--class-weights {spec!r}: expected numbers, one per class') from e
  if len(w) != n or min(w) <= 0:
    raise UserError(f'--class-weights {spec!r}: expected {n} positive numbers, one per class of --classes')
  return w


def plan(
  pools: Pools, n: int, seed: int, synthetic_share: float = 0.5, classes=None, class_weights=None
) -> tuple[list[dict[str, Any]], str]:
  """The study's items before any file is written, ([{token, truth, class_index, row}] sorted by token, study id).

  `n` images are split over `classes` by `class_weights` (equal by default), and within
  each class `synthetic_share` of them are synthetic (largest remainder rounding). Rows
  are drawn without replacement from seeded streams; the tokens are random, so their
  order says nothing about an image. The study id and the tokens derive from the seed and
  what was drawn from which generator, so two studies made with one seed from different
  runs share neither (a reader's answers cannot be taken for another study's).
  """
  if n < 2:
    raise UserError(f'--n {n}: expected at least 2 images')
  if not 0.0 <= synthetic_share <= 1.0:
    raise UserError(f'--synthetic-share {synthetic_share}: expected a fraction in [0, 1]')
  chosen = _parse_classes(classes, pools)
  per_class = synthetic.allocate(n, _weights(class_weights, len(chosen)))
  items = []
  for c, n_c in zip(chosen, per_class):
    n_syn, n_real = synthetic.allocate(n_c, [synthetic_share, 1.0 - synthetic_share])
    name = pools.class_names[c]
    for truth, pool, want in (('synthetic', pools.synthetic, n_syn), ('real', pools.real, n_real)):
      rows = np.flatnonzero(pool.labels == c)
      if len(rows) < want:
        where = (
          'the synthetic set' if truth == 'synthetic' else f'the held-out real images ({pools.info["real"]["splits"]})'
        )
        raise UserError(
          f'class {name}: {want} {truth} images needed, {where} has {len(rows)}'
          ' (lower --n, change --synthetic-share or --class-weights, or add --real-splits val,test)'
        )
      take = study.rng(seed, f'reader_study/{truth}/{name}').choice(rows, size=want, replace=False)
      items += [dict(truth=truth, class_index=int(c), row=int(r)) for r in np.sort(take)]
  design = [pools.info.get('run_config_hash'), pools.info.get('generator'), pools.info.get('real', {}).get('data')]
  design.append([(it['truth'], it['class_index'], it['row']) for it in items])
  fingerprint = hashlib.sha256(json.dumps([int(seed), design], sort_keys=True, default=str).encode()).hexdigest()
  raw = study.rng(seed, f'reader_study/tokens/{fingerprint}').bytes(8 * len(items))
  tokens = [raw[8 * i : 8 * i + 8].hex() for i in range(len(items))]
  if len(set(tokens)) != len(tokens):  # 2^-64 per pair; checked, not assumed
    raise RuntimeError('token collision; choose another --seed')
  for item, token in zip(items, tokens):
    item['token'] = token
  return sorted(items, key=lambda it: it['token']), fingerprint[:16]


def export_study(
  out: str,
  pools: Pools,
  n: int = 100,
  seed: int = 0,
  synthetic_share: float = 0.5,
  classes=None,
  class_weights=None,
  key_path: str | None = None,
  command: str | None = None,
) -> dict[str, Any]:
  """Writes the study folder `out` (which must not exist or be empty); returns its manifest.

  The folder is built under a temporary name beside `out` and renamed into place at the
  end, so an interrupted export leaves no study. `key_path` (default
  `out/key/answer_key.json`) must lie outside `out/images/`.
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f'--out {out}: exists and is not empty; choose a new folder')
  items, study_id = plan(pools, n, seed, synthetic_share, classes, class_weights)
  key_abs = os.path.abspath(key_path) if key_path else os.path.join(out, study.DEFAULT_KEY)
  images_dir = os.path.join(out, study.IMAGES)
  if os.path.commonpath([key_abs, images_dir]) == images_dir:
    raise UserError(f'--key {key_path}: inside {images_dir}, which the server shows to readers; put it elsewhere')
  if key_path and os.path.exists(key_abs):
    raise UserError(f'--key {key_path}: exists; choose a new file')

  names = pools.class_names
  chosen = sorted({it['class_index'] for it in items})
  shape = pools.real.images.shape[1:] if len(pools.real) else pools.synthetic.images.shape[1:]
  counts = {names[c]: {t: sum(1 for it in items if it['class_index'] == c and it['truth'] == t) for t in study.CALLS}
            for c in chosen}  # fmt: skip
  key = dict(format=study.KEY_FORMAT, study_id=study_id, classes=[names[c] for c in chosen], items={})
  for it in items:
    pool = pools.synthetic if it['truth'] == 'synthetic' else pools.real
    key['items'][it['token']] = dict(
      truth=it['truth'],
      **{'class': names[it['class_index']]},
      split=str(pool.groups[it['row']]),
      origin=str(pool.names[it['row']]),
    )
  key_text = fileio.to_json(key) + '\n'
  key_inside = os.path.commonpath([key_abs, out]) == out

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would outlive the rename
    tmp_images = os.path.join(tmp, study.IMAGES)
    os.makedirs(tmp_images)
    layout = set()
    stamp = None
    for it in items:  # in token order: creation order and inode numbers follow the random names
      pool = pools.synthetic if it['truth'] == 'synthetic' else pools.real
      data = study.png_bytes(pool.images[it['row']])
      chunks = study.png_chunks(data)
      layout.add((tuple(kind for kind, _ in chunks if kind != b'IDAT'), chunks[0][1]))
      path = os.path.join(tmp_images, f'{it["token"]}.png')
      with open(path, 'wb') as f:
        f.write(data)
      stamp = stamp or os.stat(path).st_mtime_ns
    if len(layout) != 1:  # one encoder, one layout: checked on the files written, not assumed
      raise RuntimeError(f'images were written with {len(layout)} different PNG layouts')
    for it in items:  # one modification time for all
      os.utime(os.path.join(tmp_images, f'{it["token"]}.png'), ns=(stamp, stamp))
    key_rel = study.DEFAULT_KEY if not key_path else (os.path.relpath(key_abs, out) if key_inside else key_abs)
    if key_inside:
      fileio.atomic_write_text(os.path.join(tmp, key_rel), key_text)
    digest = hashlib.sha256(key_text.encode('utf-8')).hexdigest()
    n_syn = sum(it['truth'] == 'synthetic' for it in items)
    manifest = dict(
      format=study.FORMAT,
      study_id=study_id,
      seed=int(seed),
      n=len(items),
      synthetic_share=dict(requested=float(synthetic_share), actual=n_syn / len(items)),
      classes=[names[c] for c in chosen],
      ask_class=len(chosen) > 1,
      counts=counts,
      image=dict(
        format='PNG',
        height=int(shape[0]),
        width=int(shape[1]),
        channels=int(shape[2]),
        mode='L' if shape[2] == 1 else 'RGB',
        bit_depth=8,
      ),
      images=[it['token'] for it in items],
      key=dict(path=key_rel, sha256=digest),
      source=pools.info,
      command=command,
    )
    fileio.atomic_write_json(os.path.join(tmp, study.MANIFEST), manifest)
    if not key_inside:
      fileio.atomic_write_text(key_abs, key_text)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return manifest


def summary(manifest: dict[str, Any]) -> str:
  counts = ', '.join(f'{c}: {v["real"]} real + {v["synthetic"]} synthetic' for c, v in manifest['counts'].items())
  return f'{manifest["n"]} images ({counts}); study id {manifest["study_id"]}'
