"""The study folder on disk: manifest, answer key, image files and readers' answers.

Everything here is shared by the three commands and reads no flags. Files are JSON
(no pickle) and every write is atomic (`cxrjax.fileio`), so a killed server or export
leaves the previous version or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import zlib
from typing import Any

import numpy as np

from cxrjax import fileio
from cxrjax.errors import UserError

FORMAT = 'cxrjax-reader-study/1'
KEY_FORMAT = 'cxrjax-reader-key/1'
READER_FORMAT = 'cxrjax-reader-answers/1'

MANIFEST = 'study.json'
IMAGES = 'images'  # the only folder the server reads images from
READERS = 'readers'
ANALYSIS = 'analysis'
DEFAULT_KEY = os.path.join('key', 'answer_key.json')

CALLS = ('real', 'synthetic')
REALISM = (1, 2, 3, 4, 5)
REALISM_LABELS = {
  1: 'clearly artificial',
  2: 'mostly artificial',
  3: 'unsure',
  4: 'mostly realistic',
  5: 'fully realistic',
}

TOKEN_RE = re.compile(r'^[0-9a-f]{16}$')
READER_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')


def rng(seed: int, name: str) -> np.random.Generator:
  """A named random stream of the study seed (the same construction as `cxrjax.seeding`, without JAX)."""
  return np.random.default_rng([int(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF])


def now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def sha256_file(path: str) -> str:
  return fileio.file_digest(path)


def png_bytes(image: np.ndarray) -> bytes:
  """One uint8 [H, W, C] image as PNG bytes: 8-bit gray (C=1) or RGB (C=3), no ancillary chunks.

  Every image of a study goes through this one function, so real and synthetic files
  differ in their pixels only: same size, mode, bit depth, compression settings and
  chunk layout (IHDR, IDAT, IEND), with no text, time or gamma chunk to tell them apart.
  """
  from PIL import Image  # noqa: PLC0415 - only the export writes images

  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected uint8 [H,W,1|3], got {image.dtype} {image.shape}')
  pil = Image.fromarray(image[..., 0], 'L') if image.shape[-1] == 1 else Image.fromarray(image, 'RGB')
  out = io.BytesIO()
  pil.save(out, format='PNG', compress_level=9, optimize=False)
  return out.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
  """The (type, payload) chunks of a PNG file, in order (for the tests and the export's own check)."""
  if data[:8] != b'\x89PNG\r\n\x1a\n':
    raise ValueError('not a PNG file')
  out, pos = [], 8
  while pos < len(data):
    length = int.from_bytes(data[pos : pos + 4], 'big')
    kind = data[pos + 4 : pos + 8]
    out.append((kind, data[pos + 8 : pos + 8 + length]))
    pos += 12 + length
  return out


def study_path(study_dir: str, *parts: str) -> str:
  return os.path.join(study_dir, *parts)


def load_manifest(study_dir: str) -> dict[str, Any]:
  """The study's manifest, checked: its format, its image list and that every image file exists."""
  path = study_path(study_dir, MANIFEST)
  if not os.path.isdir(study_dir):
    raise UserError(f'{study_dir}: no such study folder (make one with `python -m cxrjax.reader_study export`)')
  if not os.path.isfile(path):
    raise UserError(f'{study_dir}: not a reader study (no {MANIFEST}; make one with `export`)')
  manifest = fileio.read_json(path)
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise UserError(f'{path}: not a cxrjax reader study manifest (format {FORMAT!r} expected)')
  tokens = manifest.get('images')
  if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and TOKEN_RE.match(t) for t in tokens):
    raise UserError(f'{path}: malformed image list')
  missing = [t for t in tokens if not os.path.isfile(study_path(study_dir, IMAGES, f'{t}.png'))]
  if missing:
    raise UserError(
      f'{study_dir}: {len(missing)} of {len(tokens)} images missing from {IMAGES}/ (first: {missing[0]}.png)'
    )
  return manifest


def key_location(study_dir: str, manifest: dict[str, Any], override: str | None = None) -> str:
  """Where the answer key is: `override`, else the manifest's path (relative to the study folder)."""
  if override:
    return override
  path = manifest['key']['path']
  return path if os.path.isabs(path) else study_path(study_dir, path)


def load_key(path: str, manifest: dict[str, Any]) -> dict[str, Any]:
  """The answer key at `path`, after checking its sha256 against the one the export recorded."""
  if not os.path.isfile(path):
    raise UserError(f'answer key {path}: no such file (pass --key PATH if it was moved)')
  digest = sha256_file(path)
  if digest != manifest['key']['sha256']:
    raise UserError(
      f'answer key {path}: sha256 {digest[:16]}... does not match the study manifest'
      f' ({manifest["key"]["sha256"][:16]}...): a key of another study, or altered'
    )
  key = fileio.read_json(path)
  if key.get('format') != KEY_FORMAT or key.get('study_id') != manifest['study_id']:
    raise UserError(f'answer key {path}: not the key of study {manifest["study_id"]}')
  if sorted(key['items']) != sorted(manifest['images']):
    raise UserError(f'answer key {path}: its images differ from the manifest')
  return key


def check_reader_name(name: str) -> str:
  if not READER_RE.match(name or ''):
    raise UserError(
      f'--reader {name!r}: expected 1-64 letters, digits, "_", "-" or "." (not starting with one of the last three)'
    )
  return name


def reader_path(study_dir: str, name: str) -> str:
  return study_path(study_dir, READERS, f'{check_reader_name(name)}.json')


def reader_order(manifest: dict[str, Any], name: str) -> list[str]:
  """The order in which reader `name` sees the images: a permutation seeded by the study and the reader.

  Each reader gets their own order, so no image is always seen first (when readers are
  freshest) or last, and the same reader always gets the same order back.
  """
  tokens = sorted(manifest['images'])
  perm = rng(manifest['seed'], f'reader_study/order/{manifest["study_id"]}/{name}').permutation(len(tokens))
  return [tokens[i] for i in perm]


def new_reader(manifest: dict[str, Any], name: str, simulated: bool = False) -> dict[str, Any]:
  return dict(
    format=READER_FORMAT,
    study_id=manifest['study_id'],
    reader=name,
    simulated=bool(simulated),
    order=reader_order(manifest, name),
    answers={},
    started_at=now(),
    updated_at=None,
  )


def load_reader(path: str, manifest: dict[str, Any]) -> dict[str, Any]:
  record = fileio.read_json(path)
  if not isinstance(record, dict) or record.get('format') != READER_FORMAT:
    raise UserError(f'{path}: not a cxrjax reader answers file')
  if record.get('study_id') != manifest['study_id']:
    raise UserError(f'{path}: answers of study {record.get("study_id")}, not of this study ({manifest["study_id"]})')
  if sorted(record.get('order', [])) != sorted(manifest['images']):
    raise UserError(f'{path}: its image order does not match the study')
  for token, answer in record.get('answers', {}).items():
    check_answer(manifest, token, answer, where=path)
  return record


def save_reader(path: str, record: dict[str, Any]) -> None:
  fileio.atomic_write_json(path, record)


def check_answer(manifest: dict[str, Any], token: str, answer: dict[str, Any], where: str = 'answer') -> dict[str, Any]:
  """One answer, validated: {'call': 'real'|'synthetic', 'realism': 1-5, 'class': a study class or None}."""
  if token not in set(manifest['images']):
    raise UserError(f'{where}: unknown image {token!r}')
  if not isinstance(answer, dict):
    raise UserError(f'{where}: an answer must be an object')
  if answer.get('call') not in CALLS:
    raise UserError(f'{where}: call {answer.get("call")!r}; expected real or synthetic')
  realism = answer.get('realism')
  if isinstance(realism, bool) or realism not in REALISM:
    raise UserError(f'{where}: realism {realism!r}; expected an integer 1-5')
  cls = answer.get('class')
  if manifest['ask_class']:
    if cls not in manifest['classes']:
      raise UserError(f'{where}: class {cls!r}; expected one of {", ".join(manifest["classes"])}')
  elif cls not in (None, ''):
    raise UserError(f'{where}: this study does not ask for the class')
  return answer


def record_answer(
  record: dict[str, Any], manifest: dict[str, Any], token: str, answer: dict[str, Any], seconds: float | None = None
) -> dict[str, Any]:
  """`record` with `answer` for image `token` (a revised answer replaces the old one and counts the revision)."""
  check_answer(manifest, token, answer)
  old = record['answers'].get(token)
  entry = dict(
    call=answer['call'],
    realism=int(answer['realism']),
    **{'class': answer.get('class') or None},
    seconds=None if seconds is None else round(float(seconds), 2),
    answered_at=now(),
    revisions=0 if old is None else old.get('revisions', 0) + 1,
  )
  record['answers'][token] = entry
  record['updated_at'] = entry['answered_at']
  return record


def next_index(record: dict[str, Any]) -> int:
  """Where a reader resumes: the first image in their order without an answer (len(order) when done)."""
  for i, token in enumerate(record['order']):
    if token not in record['answers']:
      return i
  return len(record['order'])


def reader_files(study_dir: str) -> list[str]:
  folder = study_path(study_dir, READERS)
  if not os.path.isdir(folder):
    return []
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.json') and not f.startswith('.'))
