"""What a command-line entry point does before its work: pick the backend, set up the process, cache compiles.

Library code never calls this: importing cxrjax changes nothing in the process.
`cxrjax.main` and `cxrjax.sweep` call `start` once, after parsing their config and
before any JAX work, because some settings (XLA flags, malloc, the block cache's
restart) only take effect before JAX starts.
"""

from __future__ import annotations

import os

import jax

from cxrjax import backends
from cxrjax.backends.base import Backend, main_program

DEFAULT_COMPILATION_CACHE = os.path.join('~', '.cache', 'cxrjax', 'jax-compilation-cache')


def start(
  config, *, distributed: bool = False, compilation_cache: str = DEFAULT_COMPILATION_CACHE, one_program: bool = True
) -> Backend:
  """Selects the backend for `config.kernels`, lets it configure the process, turns on the compilation cache.

  Args:
    config: the finalized experiment config.
    one_program: the process runs `config`'s experiment only (a sweep runs several kinds).
    distributed: the run calls `jax.distributed.initialize()` (several processes).
    compilation_cache: folder of JAX's persistent compilation cache ('' leaves it off).
      A user's `JAX_COMPILATION_CACHE_DIR` wins.

  Returns:
    The backend to pass to the trainers.

  Raises:
    UserError: `kernels=cpu` asked for where it cannot be had.
  """
  backend = backends.select(config.kernels, distributed=distributed)
  # The CPU backend may restart the process here, once.
  backend.configure_process(main_program(config) if one_program else None)
  if compilation_cache and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    enable_compilation_cache(os.path.expanduser(compilation_cache))
  return backend


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path`, for every program however fast it compiled.

  A cached executable is the same compiled program, so results do not change. JAX's
  default skips programs that compile in under a second, but each process would then
  recompile dozens of small ones (random draws, key derivations, casts).
  """
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
