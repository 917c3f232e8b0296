"""What a command-line entry point does before its work: pick the backend, set up the process, cache compiles.

Library code never calls this: importing cxrjax changes nothing in the process.
`cxrjax.main`, `cxrjax.sweep` and `cxrjax.eval.ldm_probe` call `start` once, after
parsing their config and before any JAX work, because some settings (XLA flags,
malloc, the block cache's restart) only take effect before JAX starts; this module
and what `start` uses before the restart import nothing heavy, so the restarted
process has not imported JAX either.
"""

from __future__ import annotations

import os

from cxrjax import backends, config_lib

DEFAULT_COMPILATION_CACHE = os.path.join('~', '.cache', 'cxrjax', 'jax-compilation-cache')


def start(
  config, *, distributed: bool = False, compilation_cache: str = DEFAULT_COMPILATION_CACHE, one_program: bool = True
):
  """Decides the backend for `config.kernels`, configures the process for it, turns on the compilation cache.

  Args:
    config: the finalized experiment config.
    distributed: the run calls `jax.distributed.initialize()` (several processes).
    compilation_cache: folder of JAX's persistent compilation cache ('' leaves it off).
      A user's `JAX_COMPILATION_CACHE_DIR` wins.
    one_program: the process runs `config`'s experiment only (a sweep runs several kinds).

  Returns:
    The backend to pass to the trainers.

  Raises:
    UserError: `kernels=cpu` asked for where it cannot be had.
  """
  program = config_lib.main_program(config) if one_program else None
  backend = configure(config.kernels, program, distributed=distributed)
  if compilation_cache and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    enable_compilation_cache(os.path.expanduser(compilation_cache))
  return backend


def configure(kernels: str, program: str | None, *, distributed: bool = False):
  """Decides the backend for `kernels`, configures the process for it (for `program`), and makes it.

  The CPU backend's settings come before JAX, flax and optax are imported: the
  process may restart here, once, with the block cache preloaded. Entry points that
  have no experiment config (the benchmarks) call this directly.

  Raises:
    UserError: `kernels=cpu` asked for where it cannot be had.
  """
  name, why = backends.decide(kernels, distributed=distributed)
  done = backends.process.configure(program) if name == 'cpu' else {}
  backend = backends.make(name, why, insist=kernels == 'cpu')
  backend.process.update(done)
  return backend


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path`, for every program however fast it compiled.

  A cached executable is the same compiled program, so results do not change. JAX's
  default skips programs that compile in under a second, but each process would then
  recompile dozens of small ones (random draws, key derivations, casts).
  """
  import jax  # noqa: PLC0415 - heavy: after the process is configured

  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
