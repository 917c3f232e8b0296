"""Where images come from: npz, TFDS, class-per-folder trees, or the phantom.

`load_dataset(data_config, seed)` returns a `Dataset` with train/val/test splits
at `data.image_size` and `data.channels`, and a `source` record describing what
was read (kind, path, checksum, resizing, how a folder tree was read and what
was carved from it, skipped files). With
`data.source='auto'` real data is used when reachable and the phantom only as
a loudly announced fallback.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
from absl import logging

from cxrjax import config_lib, fileio
from cxrjax.data import images as image_lib
from cxrjax.data import medical as medical_lib
from cxrjax.data import multi_source, phantom
from cxrjax.data.dataset import SPLITS, Dataset, Split, check_labels
from cxrjax.errors import UserError

DATA_DIR_ENV = 'CXRJAX_DATA_DIR'
MEDMNIST_SIZES = (28, 64, 128, 224)
PNEUMONIA_CLASSES = ('normal', 'pneumonia')
# Folder names that mean a split, compared in lower case without separators and without a
# trailing 'set' or 'data': Training, TRAIN, train_set, Valid, Validation, dev, Test-Data, ...
SPLIT_NAMES = {
  'train': ('train', 'training'),
  'val': ('val', 'valid', 'validation', 'dev'),
  'test': ('test', 'testing'),
}
SKIPPED_FOLDERS = ('__MACOSX',)  # resource forks that macOS adds to zip archives: never a split or a class


def resolve_path(path: str, what: str = 'data.path') -> str:
  """An existing file or folder for `path`, also looked up under $CXRJAX_DATA_DIR; `what` names it in the error."""
  expanded = os.path.expanduser(os.path.expandvars(path))
  if os.path.exists(expanded):
    return os.path.abspath(expanded)
  data_dir = os.environ.get(DATA_DIR_ENV, '')
  if data_dir and not os.path.isabs(expanded):
    candidate = os.path.join(data_dir, expanded)
    if os.path.exists(candidate):
      return os.path.abspath(candidate)
  where = f' (also looked in ${DATA_DIR_ENV}={data_dir})' if data_dir else ''
  raise UserError(f'{what} {path!r}: no such file or folder{where}')


def medmnist_file(folder: str, size: int, name: str = 'pneumoniamnist') -> tuple[str, int] | None:
  """The MedMNIST npz in `folder` best suited to `size`: exact, else next larger, else largest."""
  found = {}
  for s in MEDMNIST_SIZES:
    fname = f'{name}.npz' if s == 28 else f'{name}_{s}.npz'
    p = os.path.join(folder, fname)
    if os.path.isfile(p):
      found[s] = p
  if not found:
    return None
  if size in found:
    return found[size], size
  larger = [s for s in found if s > size]
  s = min(larger) if larger else max(found)
  return found[s], s


# ----------------------------------------------------------------------------- npz


def load_npz(path: str, size: int, channels: int, num_classes: int, class_names=()) -> Dataset:
  """A MedMNIST-format npz: {train,val,test}_{images,labels}, val optional."""
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: not a readable npz file ({e})') from e
  with npz:
    keys = set(npz.files)
    for split in ('train', 'test'):
      for part in ('images', 'labels'):
        if f'{split}_{part}' not in keys:
          raise UserError(
            f'{path}: missing key {split}_{part!s}; expected MedMNIST keys'
            ' {train,val,test}_{images,labels} (val optional)'
          )
    present = [s for s in SPLITS if f'{s}_images' in keys and f'{s}_labels' in keys]
    raw = {}
    for split in present:
      try:
        imgs = npz[f'{split}_images']
        labs = npz[f'{split}_labels']
      except ValueError as e:  # object arrays need pickle, which we refuse
        raise UserError(f'{path}: key {split}_images/labels is not a plain array ({e})') from e
      raw[split] = (imgs, labs)
  max_label = max(int(np.max(labs)) if np.size(labs) else 0 for _, labs in raw.values())
  k = num_classes or max(max_label + 1, 2)
  source_size = None
  splits = {}
  for split, (imgs, labs) in raw.items():
    where = f'{path}:{split}_images'
    if imgs.dtype != np.uint8:
      raise UserError(f'{where}: dtype {imgs.dtype}; expected uint8 pixels')
    if imgs.ndim == 3:
      imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3, 4) or imgs.shape[1] < 4 or imgs.shape[2] < 4:
      raise UserError(f'{where}: shape {imgs.shape}; expected [N, H, W] or [N, H, W, C] with C in 1, 3')
    labs = check_labels(labs, k, f'{path}:{split}_labels')
    if len(labs) != len(imgs):
      raise UserError(f'{path}: {split}_images has {len(imgs)} rows but {split}_labels has {len(labs)}')
    source_size = imgs.shape[1]
    imgs = image_lib.resize_array(image_lib.to_channels(imgs, channels), size)
    names = np.array([f'{split}[{i}]' for i in range(len(labs))])
    splits[split] = Split(imgs, labs, names.copy(), names)
  if k == 2 and not class_names and 'pneumonia' in os.path.basename(path).lower():
    class_names = PNEUMONIA_CLASSES
  names = tuple(class_names) if class_names else tuple(f'class{i}' for i in range(k))
  if len(names) != k:
    raise UserError(f'data.class_names has {len(names)} names but {path} has {k} classes')
  source = dict(kind='npz', path=path, md5=fileio.file_digest(path, 'md5'), phantom=False, source_size=int(source_size))
  if source_size != size:
    source['resized_from'] = int(source_size)
  source['description'] = f'npz {path} (md5 {source["md5"]})' + (
    f', resized {source_size}->{size} px' if source_size != size else ''
  )
  return Dataset(splits, names, source)


# ----------------------------------------------------------------------------- folders


def _list_images(folder: Path) -> tuple[list[Path], int]:
  files, ignored = [], 0
  for p in sorted(folder.rglob('*')):
    if p.is_file() and not p.name.startswith('.'):
      if image_lib.is_image_file(p):
        files.append(p)
      else:
        ignored += 1
  return files, ignored


def _subdirs(folder: Path) -> list[Path]:
  return sorted(
    p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.') and p.name not in SKIPPED_FOLDERS
  )


def _images_here(folder: Path) -> tuple[list[Path], int]:
  """The image files directly in `folder` (sorted), and how many other files are there."""
  files, other = [], 0
  for p in sorted(folder.iterdir()):
    if p.is_file() and not p.name.startswith('.'):
      if image_lib.is_image_file(p):  # by extension (.nii.gz too), or a DICOM's preamble
        files.append(p)
      else:
        other += 1
  return files, other


def split_meaning(name: str) -> str | None:
  """'train', 'val' or 'test' when a folder name means that split (see SPLIT_NAMES), else None."""
  key = re.sub(r'[\s_.-]+', '', name.lower())
  for suffix in ('set', 'data'):
    if key.endswith(suffix) and len(key) > len(suffix):
      key = key[: -len(suffix)]
      break
  return next((split for split, names in SPLIT_NAMES.items() if key in names), None)


@dataclasses.dataclass
class Tree:
  """How a folder tree is read: which folders are the splits and classes, and their images.

  `splits` maps 'train', 'val', 'test' to split folders, or 'all' to the one folder of class
  folders when the tree has no split folders (val and test are then carved out).
  """

  root: Path  # data.path
  base: Path  # the folder holding the split or class folders: root, or the folder inside a wrapper
  splits: dict[str, Path]
  folders: list[str]  # class folder names, sorted: the same in every split
  files: dict[str, dict[str, list[Path]]]  # split -> class folder -> its images, sorted
  ignored: int  # files that are not images
  named_by: str  # 'name' (recognised split names), 'data.split_dirs', or '' (no split folders)
  wrapper: str  # the single folder(s) descended into, relative to root; '' when none
  notes: list[str]

  def split_dirs(self) -> dict[str, str]:
    """Split -> folder relative to data.path (what `data.split_dirs` would name); {} without split folders."""
    if 'all' in self.splits:
      return {}
    return {s: self.splits[s].relative_to(self.root).as_posix() for s in SPLITS if s in self.splits}

  def describe(self, carved: list[str]) -> str:
    """How the tree was read, in words: the folders used as splits, and what was carved from what."""
    if self.split_dirs():
      how = 'split folders ' + ', '.join(f'{s}={d}' for s, d in self.split_dirs().items())
      how += ' (data.split_dirs)' if self.named_by == 'data.split_dirs' else ''
    else:
      how = 'class folders (no split folders)'
    if self.wrapper:
      how = f'inside {self.wrapper!r}, the only folder in data.path: {how}'
    return '; '.join([how, *carved])


def _unwrap(root: Path) -> tuple[Path, list[str]]:
  """Descends while a folder holds exactly one folder (not a split), no images, and that folder holds folders.

  Archives often unpack to `name/Training/...` or `name/name/train/...`: the wrapper is
  skipped, and said in the layout. A single folder of images stays put (one class is an error).
  """
  base, wrappers = root, []
  while True:
    subs = _subdirs(base)
    if len(subs) != 1 or split_meaning(subs[0].name) or _images_here(base)[0] or not _subdirs(subs[0]):
      return base, wrappers
    base = subs[0]
    wrappers.append(base.name)


def _suggest_split_dirs(folders: list[str], prefix: str = '') -> str:
  """A `data.split_dirs` value for `folders`: by their names' meaning, else in order (train first, then test)."""
  pairs = []
  for i, name in enumerate(folders):
    meaning = split_meaning(name) or ('train', 'test', 'val')[min(i, 2)]
    pairs.append((meaning, f'{prefix}{name}'))
  pairs.sort(key=lambda p: SPLITS.index(p[0]))
  return "data.split_dirs='" + ','.join(f'{s}={f}' for s, f in pairs) + "'"


def _nested_refusal(tree: Tree, split: str, folder: Path, nested: dict[str, list[str]]) -> str:
  """The one-line refusal of a tree whose class folders hold image folders, with the likely remedy."""
  cname, subs = next(iter(nested.items()))
  shown = ', '.join(subs[:4]) + (', ...' if len(subs) > 4 else '')
  where = f'{folder / cname}: class folder holds image folders ({shown}) instead of images'
  classes = [c.name for c in _subdirs(folder)]
  if any(split_meaning(s) for s in subs):
    return f'{where}; cxrjax reads <split>/<class>/ trees: arrange the images as {folder}/<split>/<class>/*.png'
  same = len({tuple(v) for v in nested.values()}) == 1
  if split == 'all' and len(classes) >= 2 and len(nested) == len(classes) and same:
    rel = tree.base.relative_to(tree.root).as_posix()
    prefix = '' if rel == '.' else f'{rel}/'
    return (
      f'{where}, and every folder of {folder} ({", ".join(classes)}) holds the same ones: if those are splits, say'
      f' which is which with {_suggest_split_dirs(classes, prefix)}; if they are the classes, move their images'
      ' up out of the subfolders'
    )
  if split == 'all':
    return (
      f'{where}; expected images directly in each class folder ({folder}/<class>/*.png, subfolders are not'
      ' read): point data.path at the folder whose subfolders are the classes, or flatten the class folders'
    )
  rels = [f'{s}={(d / cname).relative_to(tree.root).as_posix()}' for s, d in tree.splits.items()]
  return (
    f'{where}; expected {folder}/<class>/*.png: if the classes are one level down, name the folders that hold'
    f" them with data.split_dirs (e.g. '{','.join(rels)}')"
  )


def read_tree(root: str, split_dirs: str = '') -> Tree:
  """Reads a class-per-folder tree's structure: split folders, class folders, image files.

  Split folders are recognised by name (SPLIT_NAMES, any case) at the top of the tree, or
  named by `split_dirs` ('train=Training,test=Testing'; val optional). Without split folders
  every top-level folder is a class. A single wrapper folder is descended into. Anything
  that could be read more than one way is refused with one line saying what was found and
  what to pass: image folders inside class folders, class folders named like splits, split
  folders with different class folders, empty class folders, several folders for one split,
  folders beside the split folders, a train folder without a test folder.

  Raises:
    UserError: naming the folder, what was found and the remedy (data.path or data.split_dirs).
  """
  rootp = Path(root)
  named = config_lib.parse_split_dirs(split_dirs)
  notes: list[str] = []
  if named:
    base, wrappers = rootp, []
    if not all((base / f).is_dir() for f in named.values()):
      base, wrappers = _unwrap(rootp)
    for f in named.values():
      if not (base / f).is_dir():
        found = [p.name for p in _subdirs(rootp)]
        raise UserError(
          f'config.data.split_dirs={split_dirs!r}: {rootp} has no folder {f!r} (its folders: {found}); expected'
          ' folder names relative to data.path'
        )
    splits = {s: base / named[s] for s in SPLITS if s in named}
    top = {p.relative_to(base).parts[0] for p in splits.values()}
    unused = [p.name for p in _subdirs(base) if p.name not in top]
    if unused:
      notes.append(f'folders not named in data.split_dirs left out: {unused}')
    named_by = 'data.split_dirs'
  else:
    base, wrappers = _unwrap(rootp)
    subs = _subdirs(base)
    by_meaning: dict[str, list[Path]] = {}
    for p in subs:
      if split_meaning(p.name):
        by_meaning.setdefault(split_meaning(p.name), []).append(p)
    if by_meaning:
      found = [p.name for ps in by_meaning.values() for p in ps]
      for split, ps in by_meaning.items():
        if len(ps) > 1:
          raise UserError(
            f'{base}: folders {[p.name for p in ps]} all look like the {split} split; say which to read with'
            f" data.split_dirs='train=FOLDER,test=FOLDER' (val=FOLDER optional)"
          )
      others = [p.name for p in subs if not split_meaning(p.name)]
      if 'train' not in by_meaning:
        raise UserError(
          f'{base}: found split folder(s) {found} but no train folder (train or training, any case); name the'
          f" splits with data.split_dirs='train=FOLDER,test=FOLDER', or point data.path at a folder of class folders"
        )
      train_name = by_meaning['train'][0].name
      if 'test' not in by_meaning:
        raise UserError(
          f'{base}: has a {train_name}/ split folder but no test folder (test or testing, any case); add one, name'
          f" it with data.split_dirs='train={train_name},test=FOLDER', or point data.path at"
          f' {base / train_name} to carve test and val out of it'
        )
      if others:
        raise UserError(
          f'{base}: besides the split folders {found} there are folders {others} that are not splits; read only the'
          f' split folders with {_suggest_split_dirs(found)}, or move the others out'
        )
      splits = {s: by_meaning[s][0] for s in SPLITS if s in by_meaning}
      named_by = 'name'
    else:
      splits = {'all': base}
      named_by = ''
  tree = Tree(rootp, base, splits, [], {}, 0, named_by, '/'.join(wrappers), notes)

  classes = {split: [c.name for c in _subdirs(d)] for split, d in splits.items()}
  for split, names in classes.items():
    split_like = [n for n in names if split_meaning(n)]
    if split_like:
      d = splits[split]
      rel = d.relative_to(rootp).as_posix()
      prefix = '' if rel == '.' else f'{rel}/'
      raise UserError(
        f'{d}: class folders {split_like} look like split folders, not classes; name the splits with'
        f' {_suggest_split_dirs(split_like, prefix)} or point data.path at {d}'
      )
  for split, d in splits.items():
    tree.files[split] = {}
    nested = {}
    for c in _subdirs(d):
      files, other = _images_here(c)
      tree.ignored += other
      for sub in _subdirs(c):
        images, other = _list_images(sub)
        if images:
          nested.setdefault(c.name, []).append(sub.name)
        else:
          tree.ignored += other
      tree.files[split][c.name] = files
    if nested:
      raise UserError(_nested_refusal(tree, split, d, nested))
    loose, _ = _images_here(d)
    if loose:
      notes.append(f'left out {len(loose)} image(s) outside the class folders of {d}, e.g. {loose[0].name}')
  if 'all' not in splits:
    train_set = set(classes['train'])
    for split in ('val', 'test'):
      if split in splits and set(classes[split]) != train_set:
        extra, missing = sorted(set(classes[split]) - train_set), sorted(train_set - set(classes[split]))
        diff = []
        if extra:
          diff.append(f'only in {split}: {extra}')
        if missing:
          diff.append(f'only in train: {missing}')
        raise UserError(
          f"{splits[split]}: {split} class folders {sorted(classes[split])} differ from train's"
          f' {sorted(train_set)} in {splits["train"]} ({"; ".join(diff)}); expected the same class folders in every split'
        )
  tree.folders = sorted({c for names in classes.values() for c in names})
  if len(tree.folders) < 2:
    raise UserError(
      f'{base}: found {len(tree.folders)} class folder(s) {tree.folders}; expected at least 2'
      ' (layout root/<class>/*.png or root/{train,test}/<class>/*.png)'
    )
  for split, per_class in tree.files.items():
    for c, files in per_class.items():
      if not files:
        raise UserError(
          f'{splits[split] / c}: class {c!r} has no images; expected image files'
          f' ({", ".join(image_lib.IMAGE_EXTENSIONS)}) in every class folder'
        )
  return tree


def _decode_all(
  files: list[Path], size: int, channels: int, on_bad_image: str, threads: int, options: medical_lib.Options
):
  """Decodes `files` in a thread pool: (images, keep, bad, suffixes, originals).

  A file gives one image, or several (slices of a NIfTI volume, frames of a DICOM):
  `keep[i]` is the index in `files` of image i, `suffixes[i]` what its name adds
  and `originals[i]` its size and mode before normalisation.
  """

  def one(p):
    try:
      return image_lib.decode_images(str(p), size, channels, options), None
    except UserError:  # a missing optional library is no bad image
      raise
    except Exception as e:  # noqa: BLE001 - PIL, pydicom and nibabel raise many types for bad files
      return None, f'{type(e).__name__}: {e}'

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    results = list(pool.map(one, files))
  images, keep, bad, suffixes, originals = [], [], [], [], []
  for i, (p, (parts, err)) in enumerate(zip(files, results)):
    if err is None:
      for part in parts:
        images.append(part.image)
        keep.append(i)
        suffixes.append(part.suffix)
        originals.append(part.original)
    else:
      if on_bad_image == 'error':
        raise UserError(
          f'{p}: unreadable image ({err}); fix or remove it, or set data.on_bad_image=skip to skip and count it'
        )
      bad.append(str(p))
  return images, np.array(keep, np.int64), bad, suffixes, originals


def load_folder(
  root: str,
  size: int,
  channels: int,
  *,
  val_fraction: float,
  test_fraction: float,
  group_regex: str,
  on_bad_image: str,
  seed: int,
  cache_dir: str = '',
  threads: int = 4,
  subclasses: str = '',
  split_dirs: str = '',
  medical: medical_lib.Options = medical_lib.DEFAULT,
) -> Dataset:
  """A class-per-folder tree, with or without split folders.

  Layouts (see `read_tree`): `root/<split>/<class>/...` with split folders
  recognised by name (train/training, val/valid/validation/dev, test/testing, any
  case; val optional and carved from train when absent) or named by `split_dirs`;
  or `root/<class>/...` (val and test carved out, grouped by patient). A single
  wrapper folder around either is descended into. Class names are the folder
  names, sorted; images of any size and mode are squashed to `size` x `size`
  with `channels` channels. Decoded arrays are cached. The source record says how
  the tree was read (`layout`, `split_dirs`).

  `subclasses` splits a folder's images into classes by a substring of the file
  name, e.g. 'PNEUMONIA:bacteria=bacterial|virus=viral' turns Kermany's
  NORMAL/PNEUMONIA into NORMAL/bacterial/viral (folders separated by ';').

  DICOM and NIfTI files are read as `medical` says (cxrjax.data.medical); the
  slices of a volume (frames of a DICOM) are named `<file>#slice<k>` (`#frame<k>`)
  and share their file's group, so no split separates them.
  """
  rootp = Path(root)
  tree = read_tree(root, split_dirs)
  rules = parse_subclasses(subclasses)
  for folder in rules:
    if folder not in tree.folders:
      raise UserError(f'data.subclasses names folder {folder!r}; {root} has class folders {tree.folders}')
  folders = tree.folders
  class_names = [n for c in folders for n in ([name for _, name in rules[c]] if c in rules else [c])]
  index = {n: i for i, n in enumerate(class_names)}
  per_split_files, ignored = {}, tree.ignored
  for split, per_class in tree.files.items():
    entries = []
    for cname in folders:
      for f in per_class[cname]:
        if cname in rules:
          match = [name for sub, name in rules[cname] if sub.lower() in f.name.lower()]
          if not match:
            raise UserError(
              f'{f}: file name matches none of {[sub for sub, _ in rules[cname]]} (data.subclasses for {cname})'
            )
          entries.append((f, index[match[0]]))
        else:
          entries.append((f, index[cname]))
    per_split_files[split] = entries

  train_key = 'train' if 'train' in per_split_files else 'all'
  counts = np.bincount([k for _, k in per_split_files[train_key]], minlength=len(class_names))
  for k, n in enumerate(counts):
    if n == 0:  # every class folder has images (read_tree): a data.subclasses class matched none
      raise UserError(
        f'data.subclasses={subclasses!r}: class {class_names[k]!r} matches no file name in the training data'
        f' ({tree.splits[train_key]}); expected some of every class'
      )

  # Decoding thousands of JPEGs takes a while: cache the arrays, keyed on the
  # file list, sizes and modification times, so a changed file is re-read.
  fingerprint = hashlib.sha256()
  # 'originals': caches written before the original sizes and modes were kept are re-read.
  fingerprint.update(json.dumps([os.path.abspath(root), size, channels, on_bad_image, 'originals']).encode())
  if any(medical_lib.kind(str(f)) for entries in per_split_files.values() for f, _ in entries):
    # The window and slice rule change what DICOM and NIfTI files decode to (other trees keep their key).
    fingerprint.update(json.dumps(['medical', *dataclasses.astuple(medical)]).encode())
  for split in sorted(per_split_files):
    for f, k in per_split_files[split]:
      st = f.stat()
      fingerprint.update(f'{split}|{f.relative_to(rootp)}|{k}|{st.st_size}|{st.st_mtime_ns}\n'.encode())
  key = fingerprint.hexdigest()[:24]
  cache_root = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'cxrjax')
  cache_path = os.path.join(cache_root, f'folder-{key}.npz')

  bad: list[str] = []
  decoded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
  originals: list[str] = []
  if os.path.isfile(cache_path):
    with np.load(cache_path, allow_pickle=False) as z:
      for split in per_split_files:
        decoded[split] = (z[f'{split}_images'], z[f'{split}_labels'], z[f'{split}_names'])
      bad = list(z['bad']) if 'bad' in z.files else []
      originals = list(z['originals'])
    cached = True
  else:
    cached = False
    for split, entries in per_split_files.items():
      files = [f for f, _ in entries]
      imgs, keep, bad_here, suffixes, origs = _decode_all(files, size, channels, on_bad_image, threads, medical)
      bad += bad_here
      originals += origs
      labels = np.array([k for _, k in entries], np.int32)[keep]
      names = np.array([str(files[i].relative_to(rootp)) + s for i, s in zip(keep, suffixes)], dtype=str)
      arr = np.stack(imgs) if imgs else np.zeros((0, size, size, channels), np.uint8)
      decoded[split] = (arr, labels, names)
    payload = {}
    for split, (arr, labels, names) in decoded.items():
      payload[f'{split}_images'] = arr
      payload[f'{split}_labels'] = labels
      payload[f'{split}_names'] = names
    payload['bad'] = np.array(bad, dtype=str)
    payload['originals'] = np.array(originals, dtype=str)
    try:
      fileio.atomic_save_npz(cache_path, payload)
    except OSError as e:  # a read-only home is no reason to fail
      logging.warning('could not cache decoded images at %s: %s', cache_path, e)

  pattern = re.compile(group_regex) if group_regex else None

  def groups_for(names: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = []
    for name, lab in zip(names, labels):
      file = medical_lib.source_file(str(name))  # the slices of a volume share their file's group
      m = pattern.search(os.path.basename(file)) if pattern else None
      # A patient id is only shared within a class folder (e.g. NORMAL vs
      # PNEUMONIA use different numbering schemes), so prefix it.
      out.append(f'{class_names[lab]}/{m.group(1)}' if m else file)
    return np.array(out)

  splits = {}
  for split, (arr, labels, names) in decoded.items():
    splits[split] = Split(arr, labels.astype(np.int32), groups_for(names, labels), names)
  carved, notes = [], list(tree.notes)
  # A fraction of 0 carves nothing (data.sources passes 0 for a split the source does not feed).
  if 'all' in splits:
    all_split = splits.pop('all')
    test_idx, rest_idx = grouped_split(all_split.labels, all_split.groups, test_fraction, seed, salt=1)
    splits['test'] = all_split.take(test_idx)
    splits['train'] = all_split.take(rest_idx)
    if test_fraction > 0:
      carved.append(f'test carved from all images ({test_fraction:.0%}, grouped by patient)')
  if 'val' not in splits or len(splits['val']) == 0:
    train = splits['train']
    val_idx, train_idx = grouped_split(train.labels, train.groups, val_fraction, seed, salt=2)
    splits['val'] = train.take(val_idx)
    splits['train'] = train.take(train_idx)
    if val_fraction > 0:
      carved.append(f'val carved from train ({val_fraction:.0%}, grouped by patient)')
  for split in SPLITS:
    c = splits[split].class_counts(len(class_names))
    for k, n in enumerate(c):
      if n == 0:
        notes.append(f'{split} has no images of class {class_names[k]!r}')
  if bad:
    notes.append(f'skipped {len(bad)} unreadable image(s), e.g. {bad[0]}')
  normalised = image_lib.normalisation_summary(originals, size, channels)
  if normalised['resized'] or normalised['converted']:
    common = ', '.join(f'{wh} ({n})' for wh, n in normalised['common_sizes'].items())
    notes.append(
      f'normalised to {normalised["target"]}: {normalised["resized"]} of {normalised["images"]} image(s) resized'
      f' (from {normalised["distinct_sizes"]} size(s); most common {common}),'
      f' {normalised["converted"]} converted (modes {normalised["modes"]})'
    )
  if ignored:
    notes.append(f'ignored {ignored} non-image file(s)')
  layout = tree.describe(carved)
  parts = [n for n in map(str, np.concatenate([s.names for s in splits.values()])) if medical_lib.source_file(n) != n]
  if parts:
    volumes = len({medical_lib.source_file(n) for n in parts})
    notes.append(f'{len(parts)} slices/frames of {volumes} volume(s) (data.nifti_slices={medical.nifti_slices!r})')
  source = dict(
    kind='folder',
    path=os.path.abspath(root),
    phantom=False,
    layout=layout,
    split_dirs=tree.split_dirs(),
    split_dirs_from=tree.named_by or 'none: no split folders',
    tree=os.path.abspath(tree.base),
    cache=cache_path if cached else '',
    skipped_images=len(bad),
    normalised=normalised,
    notes=notes,
    description=f'folder {os.path.abspath(root)} ({size}x{size}): {layout}'
    + ('; ' + '; '.join(notes) if notes else ''),
  )
  return Dataset(splits, tuple(class_names), source)


def parse_subclasses(spec: str) -> dict[str, list[tuple[str, str]]]:
  """'A:x=one|y=two;B:z=three' -> {'A': [('x', 'one'), ('y', 'two')], 'B': [('z', 'three')]}."""
  rules = {}
  for part in [p.strip() for p in spec.split(';') if p.strip()]:
    folder, sep, body = part.partition(':')
    pairs = [item.split('=', 1) for item in body.split('|') if item.strip()]
    if not sep or not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
      raise UserError(f"data.subclasses={spec!r}: expected 'FOLDER:substring=class|substring=class[;...]'")
    rules[folder.strip()] = [(a.strip(), b.strip()) for a, b in pairs]
  return rules


def grouped_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, salt: int = 0):
  """Indices (held_out, rest): about `fraction` of each class, whole groups only.

  Groups are visited in a seeded random order and given to the held-out side
  while their class (the group's most common label) is below its quota, so
  that no patient has images on both sides.
  """
  n = len(labels)
  if fraction <= 0 or n == 0:
    return np.zeros(0, np.int64), np.arange(n)
  uniq, inverse = np.unique(groups, return_inverse=True)
  num_classes = int(labels.max()) + 1
  group_label = np.zeros(len(uniq), np.int64)
  group_size = np.bincount(inverse, minlength=len(uniq))
  for g in range(len(uniq)):
    group_label[g] = np.bincount(labels[inverse == g], minlength=num_classes).argmax()
  quota = np.bincount(labels, minlength=num_classes) * fraction
  taken = np.zeros(num_classes)
  held = np.zeros(len(uniq), bool)
  rng = np.random.default_rng([seed, 7919, salt])
  for g in rng.permutation(len(uniq)):
    c = group_label[g]
    if taken[c] + group_size[g] / 2 <= quota[c]:
      held[g] = True
      taken[c] += group_size[g]
  mask = held[inverse]
  return np.flatnonzero(mask), np.flatnonzero(~mask)


# ----------------------------------------------------------------------------- auto


def _online(host: str = 'zenodo.org', timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def source_label(source: dict) -> str:
  """The name of a single-source dataset's images in `Split.sources`: its file or folder name, else its kind."""
  path = source.get('path') or ''
  name = os.path.basename(path.rstrip('/'))
  return (name[: -len('.npz')] if name.endswith('.npz') else name) or source.get('kind', 'data')


def load_dataset(data, seed: int) -> Dataset:
  """Loads the dataset that `data` (the `config.data` section) asks for.

  With `data.sources` several sources are read into one dataset (`cxrjax.data.multi_source`);
  otherwise one, and every image's `Split.sources` names it (`source_label`).

  Args:
    data: `config.data`.
    seed: the experiment seed (used to carve validation splits, phantom).

  Returns:
    A `Dataset`; `dataset.source['description']` says what was read.

  Raises:
    UserError: missing or malformed data, naming the path or key.
  """
  if data.get('sources', ''):
    return load_sources(data, seed)
  ds = _load_one(data, seed)
  label = source_label(ds.source)
  for split in ds.splits.values():
    if not np.any(split.sources != ''):
      split.sources = np.full(len(split), label)
  return ds


def load_sources(data, seed: int) -> Dataset:
  """The dataset of `data.sources`: each entry read as a dataset of its own, then `multi_source.combine`d.

  Raises:
    UserError: an entry's path that does not exist, or that another entry reaches too.
  """
  read, resolved = [], {}
  for spec in config_lib.parse_sources(data.sources):
    path = resolve_path(spec.path, f'config.data.sources entry {spec.index} path')
    if path in resolved:
      raise UserError(
        f'{spec.where()}: {path} is also entry {resolved[path]}; expected each file or folder once'
        ' (one entry can feed several splits and map several classes)'
      )
    resolved[path] = spec.index
    read.append((spec, path, _read_source(spec, path, data, seed)))
  folders = set()
  if data.subclasses:  # each rule applies to the trees that have its folder, and must apply to one
    folders = {f for _, path, _ in read if os.path.isdir(path) for f in read_tree(path, data.split_dirs).folders}
  unknown = sorted(set(parse_subclasses(data.subclasses)) - folders)
  if unknown:
    raise UserError(
      f'data.subclasses={data.subclasses!r} names folder(s) {unknown}; the folder sources have class folders'
      f' {sorted(folders)}'
    )
  return multi_source.combine(read, data)


def _read_source(spec: config_lib.SourceSpec, path: str, data, seed: int) -> Dataset:
  """One entry of `data.sources` as a dataset of its own, at the run's size and channels."""
  size, channels = data.image_size, data.channels
  if os.path.isdir(path):
    kwargs = folder_kwargs(data, seed)
    # A split the source does not feed is not carved out of its train.
    kwargs['val_fraction'] = data.val_fraction if 'val' in spec.splits else 0.0
    kwargs['test_fraction'] = data.test_fraction if 'test' in spec.splits else 0.0
    kwargs['group_regex'] = data.group_regex if spec.group_regex is None else spec.group_regex
    if data.subclasses:  # the rules for the class folders this tree has
      folders = set(read_tree(path, data.split_dirs).folders)
      rules = parse_subclasses(data.subclasses)
      kwargs['subclasses'] = ';'.join(
        f'{f}:' + '|'.join(f'{a}={b}' for a, b in pairs) for f, pairs in rules.items() if f in folders
      )
    return load_folder(path, size, channels, **kwargs)
  if path.endswith('.npz') or os.path.isfile(path):
    return load_npz(path, size, channels, 0)
  raise UserError(f'{spec.where()}: {path} is neither a folder tree nor an .npz file')


def folder_kwargs(data, seed: int) -> dict:
  """`load_folder`'s keyword arguments from `config.data`."""
  return dict(
    val_fraction=data.val_fraction,
    test_fraction=data.test_fraction,
    group_regex=data.group_regex,
    on_bad_image=data.on_bad_image,
    seed=seed,
    cache_dir=data.cache_dir,
    threads=max(data.num_threads, 4),
    subclasses=data.subclasses,
    split_dirs=data.split_dirs,
    medical=medical_lib.Options(data.dicom_window, data.nifti_axis, data.nifti_slices),
  )


def _load_one(data, seed: int) -> Dataset:
  """The dataset of `data.source` and `data.path`."""
  size, channels, k = data.image_size, data.channels, data.num_classes
  names = tuple(n.strip() for n in data.class_names.split(',') if n.strip())
  kwargs = folder_kwargs(data, seed)
  source = data.source

  def from_path(path: str, kind: str) -> Dataset:
    if os.path.isdir(path) and kind in ('npz', 'auto'):
      found = medmnist_file(path, size)
      if found is not None:
        return load_npz(found[0], size, channels, k, names)
      if kind == 'npz':
        raise UserError(f'data.path {path!r}: folder has no pneumoniamnist[_SIZE].npz; expected an npz file')
    if os.path.isdir(path):
      ds = load_folder(path, size, channels, **kwargs)
      if k and ds.num_classes != k:
        raise UserError(f'{path}: found {ds.num_classes} class folders {ds.class_names}; config.data.num_classes={k}')
      return ds
    if path.endswith('.npz') or kind == 'npz':
      return load_npz(path, size, channels, k, names)
    raise UserError(f'data.path {path!r}: expected an .npz file or a folder of class folders')

  if source == 'phantom':
    return phantom.load_phantom(k or 2, size, channels, seed)
  if source == 'tfds':
    from cxrjax.data import tfds_source  # noqa: PLC0415 - TFDS is slow to import

    return tfds_source.load(data.tfds_name, size, channels, data.tfds_dir, download=True)
  if source in ('npz', 'folder'):
    if not data.path:
      raise UserError(f'data.source={source!r} needs data.path (an npz file or a folder)')
    path = resolve_path(data.path)
    if source == 'folder' and not os.path.isdir(path):
      raise UserError(f'data.path {path!r}: expected a folder for data.source=folder')
    return from_path(path, source)

  # auto
  if data.path:
    return from_path(resolve_path(data.path), 'auto')
  env_dir = os.environ.get(DATA_DIR_ENV, '')
  if env_dir:
    if not os.path.isdir(env_dir):
      raise UserError(f'${DATA_DIR_ENV}={env_dir!r}: not a folder')
    found = medmnist_file(env_dir, size)
    if found is not None:
      return load_npz(found[0], size, channels, k, names)
  from cxrjax.data import tfds_source  # noqa: PLC0415

  if tfds_source.is_prepared(data.tfds_name, size, data.tfds_dir):
    return tfds_source.load(data.tfds_name, size, channels, data.tfds_dir, download=False)
  if _online():
    try:
      return tfds_source.load(data.tfds_name, size, channels, data.tfds_dir, download=True)
    except UserError as e:
      logging.warning('TFDS download failed (%s); falling back to the phantom', e)
  ds = phantom.load_phantom(k or 2, size, channels, seed)
  ds.source['fallback'] = (
    f'no real data found (data.path empty, ${DATA_DIR_ENV} unset or without pneumoniamnist npz,'
    ' no prepared TFDS dataset, offline): using the PHANTOM'
  )
  return ds
