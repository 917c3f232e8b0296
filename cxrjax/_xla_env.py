"""XLA flags, malloc settings and the compilation cache that cxrjax needs for speed, set before JAX starts.

Measured on a 2-core x86 CPU (see BUILD_NOTES.md): the YNN fusion of dots,
elementwise ops and reductions more than doubles ResNet-18 training throughput
on CPU, with gradients unchanged against a float64 reference. Users should not
have to know this, so the package sets it on import unless told not to
(`CXRJAX_KEEP_XLA_FLAGS=1`). The flag only affects the CPU backend.

XLA's CPU runtime allocates each execution's scratch buffer with `malloc` and
frees it afterwards (1.34 GB for a ResNet-18 training step at 28 px, batch 128).
glibc serves blocks that large with a fresh `mmap` and returns them with
`munmap`, so every step page-faults its whole scratch buffer in again (330,000
faults per step). `configure_malloc` keeps freed memory in the heap instead,
where the next step finds it, at the price of a larger peak heap;
`CXRJAX_KEEP_MALLOC=1` leaves malloc alone.
"""

import ctypes
import os
import sys

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# What configure_malloc did, recorded in every run's metrics.json and in the benchmark's machine line.
malloc_setting = 'unchanged'


def configure() -> None:
  """Appends cxrjax's CPU flags to XLA_FLAGS, tunes malloc and turns on JAX's persistent compilation cache."""
  _compilation_cache()
  configure_malloc()
  if os.environ.get('CXRJAX_KEEP_XLA_FLAGS'):
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_FLAGS:
    name = flag.split('=')[0]
    if name not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags


def _compilation_cache() -> None:
  """JAX's on-disk compilation cache, unless the user chose otherwise.

  Measured: a smoke classifier run takes 21 s with a cold cache and 7.5 s with a
  warm one; sweeps and the test suite compile the same programs many times. A
  cached executable is the same compiled program, so results do not change.
  `CXRJAX_NO_COMPILATION_CACHE=1` turns it off (the benchmark does, to time compiles).
  """
  if os.environ.get('CXRJAX_NO_COMPILATION_CACHE') or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return
  cache = os.path.join(os.path.expanduser('~'), '.cache', 'cxrjax', 'jax-compilation-cache')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  if 'jax' in sys.modules:  # imported before cxrjax: the environment was already read
    jax = sys.modules['jax']
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def configure_malloc() -> str:
  """Makes glibc malloc reuse freed memory instead of returning it to the OS.

  Three settings, all needed (each alone leaves the page faults): one arena, so
  that XLA's worker threads allocate from the main heap (other arenas `mmap`
  every block over 64 MB whatever the limits say); no `mmap` for large blocks;
  and no trimming of the heap's free top. Costs: the process keeps its peak
  heap until it exits, fragmentation adds to it (BUILD_NOTES.md: 1.4-2.5x on
  CPU), and all threads share one malloc lock (XLA allocates a few large blocks
  per step, so it is not contended). It only works before JAX starts its CPU
  client: threads that have already allocated keep their arenas, so when JAX
  was started first this is recorded as having no effect.

  Returns:
    What was done, also kept in `malloc_setting`: 'glibc <version>: ...' when
    set, otherwise 'unchanged (<why>)'.
  """
  global malloc_setting
  if os.environ.get('CXRJAX_KEEP_MALLOC'):
    malloc_setting = 'unchanged (CXRJAX_KEEP_MALLOC)'
    return malloc_setting
  if not sys.platform.startswith('linux'):
    malloc_setting = 'unchanged (not glibc)'
    return malloc_setting
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):  # musl and other libcs have no gnu_get_libc_version
    malloc_setting = 'unchanged (not glibc)'
    return malloc_setting
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  started = _jax_backend_started()
  if started is not False:
    why = 'JAX had started before cxrjax was imported' if started else 'cannot tell whether JAX has started'
    malloc_setting = f'unchanged (glibc {version}: {why})'
    return malloc_setting
  # mallopt takes an int; -1 as the trim threshold is SIZE_MAX inside glibc: never trim.
  done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)]
  if all(done):
    malloc_setting = f'glibc {version}: arena_max=1, mmap_max=0, trim_threshold=off'
  else:
    malloc_setting = f'unchanged (glibc {version}: mallopt refused: {done})'
  return malloc_setting


def _jax_backend_started() -> bool | None:
  """Whether JAX's backends (and their threads) exist already; None when this JAX cannot tell."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # noqa: PLC0415 - only when JAX is already imported

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without this private helper
    return None
