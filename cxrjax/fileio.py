"""Atomic file writes and the workdir guard.

Outputs are written to a temporary name in the same folder and renamed into
place, so a crash never leaves a half-written metrics file, report, plot or
synthetic set: a reader sees the old version or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from cxrjax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ''):
  """Yields a temporary path next to `path`; renames it to `path` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=suffix or os.path.splitext(path)[1], dir=folder)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)


def _json_default(o: Any):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  raise TypeError(f'not JSON serializable: {type(o).__name__}')


def to_json(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True)


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, to_json(obj) + '\n')


def read_json(path: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: not a readable JSON file ({e})') from e


def atomic_save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  with atomic_path(path, suffix='.npz') as tmp:
    np.savez(tmp, **arrays)


def atomic_savefig(fig, path: str, **kwargs) -> None:
  with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
    fig.savefig(tmp, **kwargs)


class WorkdirLock:
  """An exclusive, advisory lock on a workdir: two runs cannot write one workdir.

  The lock is an `flock` on `workdir/.lock`, released by the kernel when the
  process dies, so a killed run never leaves a stale lock behind.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    # One lock file per process of a multi-process run, so the processes of one
    # run share the workdir while a second run is still refused.
    self.path = os.path.join(workdir, '.lock' if process_index == 0 else f'.lock.p{process_index}')
    self._fd = None

  def acquire(self) -> WorkdirLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      os.close(fd)
      raise UserError(f'{os.path.dirname(self.path)}: workdir is in use by another run (lock {self.path})') from e
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def file_digest(path: str, algorithm: str = 'sha256') -> str:
  """Hex digest of a file's bytes, streamed (weight files and datasets can be large)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, algorithm).hexdigest()
