"""Every random stream derives from the one config seed and a stable name.

`numpy_rng(seed, 'imbalance')` and `jax_key(seed, 'classifier')` give
independent, reproducible streams; adding a new consumer never shifts the
numbers that existing ones draw.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np


def stream_id(name: str) -> int:
  """A stable 31-bit id for a stream name (crc32, identical across runs and machines)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def numpy_rng(seed: int, name: str) -> np.random.Generator:
  return np.random.default_rng([int(seed), stream_id(name)])


def int_seed(seed: int, name: str) -> int:
  """A derived 32-bit integer seed (for Grain, which takes ints)."""
  return int(numpy_rng(seed, name).integers(0, 2**31 - 1))


def jax_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(int(seed)), stream_id(name))
