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
where the next step finds it, at the price of a larger peak heap.

Even so, when the next step allocates its buffer before the previous step has
freed its own (asynchronous dispatch makes that a race), glibc serves it from
fresh pages at the top of its heap and fragments it later (a "fault storm", up
to 25% slower steps). The command-line entry points therefore restart
themselves once with `block_cache.c` preloaded (`reexec_with_block_cache`),
which keeps every block of 64 MB or more whole for the next request of its
size. `CXRJAX_KEEP_MALLOC=1` leaves malloc alone (and skips the block cache).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',)

# The same flag for one program, as a per-compilation override (which takes the enum's names), with YNN's
# elementwise fusion left out: derived from CPU_FLAGS, so the two cannot drift apart.
_YNN_FLAG, _YNN_TYPES = CPU_FLAGS[0].removeprefix('--').split('=')
NO_ELEMENTWISE_YNN = {
  _YNN_FLAG: ','.join(f'LIBRARY_FUSION_TYPE_{t.upper()}' for t in _YNN_TYPES.split(',') if t != 'eltwise')
}


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


def compiler_options(*, fuse_elementwise: bool) -> dict[str, str] | None:
  """XLA options for one jitted program (`jax.jit(..., compiler_options=...)`); None keeps the process's flags.

  YNN's elementwise fusion (in `CPU_FLAGS`) pays in the ResNet-18 step, whose
  elementwise work is a few large ReLU / residual maps around oneDNN's kernels, but
  costs in steps made of many small elementwise ops (GroupNorm, SiLU, LeakyReLU,
  embeddings), where XLA's own loop fusions do better: measured (BUILD_NOTES.md,
  issue 8) the UNet and DCGAN training steps ran about 5% faster without it, the
  ResNet-18 step no faster. So steps of the second kind ask for it off here. Only
  on the CPU backend, and not under `CXRJAX_KEEP_XLA_FLAGS=1` (the user's flags rule).

  Args:
    fuse_elementwise: False for a program that should run without YNN's elementwise fusion.
  """
  return None if fuse_elementwise else _cpu_override(NO_ELEMENTWISE_YNN)


# LLVM optimization level 1 for parameter initialization programs (see `init_compiler_options`).
INIT_OPTIONS = {'xla_backend_optimization_level': 1}


def init_compiler_options() -> dict[str, int] | None:
  """XLA options for the programs that initialize parameters and optimizer state; None keeps the process's flags.

  An initialization program is mostly random-number generation, one threefry hash and
  a float transform per parameter, which XLA CPU compiles into hundreds of loop
  fusions: 8-34 s per model at XLA's default optimization level, paid once per model
  configuration (and again on every cold compilation cache: a fresh machine, the test
  suite in CI). At LLVM optimization level 1 the same programs compile 1.4-2.9x faster,
  give bit-identical parameters (measured for every model cxrjax trains, BUILD_NOTES.md;
  `tests/test_xla_env.py` checks it) and run once, so their speed does not matter. Only
  on the CPU backend, and not under `CXRJAX_KEEP_XLA_FLAGS=1`.
  """
  return _cpu_override(INIT_OPTIONS)


def _cpu_override(options: dict) -> dict | None:
  """A copy of per-program `options` on the CPU backend; None elsewhere or under `CXRJAX_KEEP_XLA_FLAGS=1`."""
  if os.environ.get('CXRJAX_KEEP_XLA_FLAGS'):
    return None  # the user's XLA_FLAGS rule
  import jax  # noqa: PLC0415 - this module runs before JAX is imported

  return dict(options) if jax.default_backend() == 'cpu' else None


def _compilation_cache() -> None:
  """JAX's on-disk compilation cache, unless the user chose otherwise.

  Measured: a smoke classifier run takes 21 s with a cold cache and 7.5 s with a
  warm one; sweeps and the test suite compile the same programs many times. A
  cached executable is the same compiled program, so results do not change. Every
  program is cached, however fast it compiled: JAX's default skips those under 1 s,
  but each process then recompiles dozens of small ones (eager random draws, key
  derivations, casts); reading them back is faster (warm smoke run 9.6 s against 10.1 s
  with a 0.5 s threshold, BUILD_NOTES.md).
  `CXRJAX_NO_COMPILATION_CACHE=1` turns it off (the benchmark does, to time compiles).
  """
  if os.environ.get('CXRJAX_NO_COMPILATION_CACHE') or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return
  cache = os.path.join(os.path.expanduser('~'), '.cache', 'cxrjax', 'jax-compilation-cache')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  if 'jax' in sys.modules:  # imported before cxrjax: the environment was already read
    jax = sys.modules['jax']
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


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
    threshold = block_cache_stats()['threshold_mb'] if block_cache_active() else None
    if threshold is not None:
      malloc_setting += f"; blocks >= {threshold} MB from cxrjax's block cache (LD_PRELOAD)"
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


# What `use_one_pool_thread` did, recorded in every run's metrics.json and in the benchmark's rows.
pool_setting = 'default (one XLA thread per core)'


def use_one_pool_thread() -> str:
  """Before JAX's CPU client starts: sizes XLA's CPU thread pool to one thread (`NPROC=1`).

  Why: with one pool thread per core, any of them can run a oneDNN custom call, so on
  two cores two threads come to lead oneDNN's OpenMP teams. libgomp then manages more
  threads than there are cores and cuts its spin-wait after each parallel region from
  about 3 ms to 100 spins, so each parallel region of each oneDNN call wakes its worker
  from sleep. Steps made of many short oneDNN calls pay for that: measured (BUILD_NOTES.md,
  issue 8) EfficientNetV2-B0's step ran about 12%, the DCGAN step about 6% and
  ResNet-18's 2-3% faster with one pool thread (no XLA fusion then runs beside a
  convolution); but XLA's own fusions then run on one core, and the UNet step ran about
  10% and EfficientNetV2-S's 5% slower. So the experiments ask for it per model
  (`models.one_pool_thread`).

  Does nothing off Linux, under `CXRJAX_KEEP_XLA_FLAGS=1`, when the user set NPROC or
  PJRT_NPROC, with several forced CPU devices (oneDNN is not used there), or once JAX's
  backend has started. The command line does not ask for it under `jax.distributed`.

  Returns:
    What was done (also kept in `pool_setting`).
  """
  global pool_setting
  flags = os.environ.get('XLA_FLAGS', '')
  devices = [f.split('=', 1)[1] for f in flags.split() if f.startswith('--xla_force_host_platform_device_count=')]
  why_not = (
    'not on Linux' if not sys.platform.startswith('linux')
    else 'CXRJAX_KEEP_XLA_FLAGS=1' if os.environ.get('CXRJAX_KEEP_XLA_FLAGS')
    else f'NPROC={os.environ["NPROC"]} set by the user' if 'NPROC' in os.environ
    else f'PJRT_NPROC={os.environ["PJRT_NPROC"]} set by the user' if 'PJRT_NPROC' in os.environ
    else f'{devices[-1]} forced CPU devices' if devices and devices[-1] != '1'
    else 'JAX had already started' if _jax_backend_started() is not False
    else None
  )  # fmt: skip
  if why_not:
    pool_setting = f'default (one XLA thread per core; one thread asked for, not set: {why_not})'
  else:
    os.environ['NPROC'] = '1'  # read by XLA's CPU client when it starts (its pool size)
    pool_setting = 'one XLA thread (NPROC=1, set by cxrjax)'
  return pool_setting


BLOCK_CACHE_SOURCE = Path(__file__).with_name('block_cache.c')
_CFLAGS = ('-O2', '-shared', '-fPIC', '-Wall')


def block_cache_active() -> bool:
  """Whether `block_cache.c` was preloaded into this process."""
  try:
    return hasattr(ctypes.CDLL(None), 'cxrjax_block_cache_stats')
  except OSError:
    return False


def block_cache_stats() -> dict[str, int]:
  """The block cache's counters in this process (it must be active).

  Returns:
    `mapped` (blocks taken from the system), `reused` (requests served by a kept
    block), `unmapped` (idle blocks given back) and `threshold_mb`.
  """
  counts = (ctypes.c_uint64 * 4)()
  ctypes.CDLL(None).cxrjax_block_cache_stats(counts)
  return dict(mapped=counts[0], reused=counts[1], unmapped=counts[2], threshold_mb=counts[3] >> 20)


def block_cache_library() -> Path:
  """The compiled block cache, built with the C compiler on first use and cached by source hash.

  Raises:
    RuntimeError: no C compiler, or it failed.
  """
  key = hashlib.sha256(BLOCK_CACHE_SOURCE.read_bytes() + ' '.join(_CFLAGS).encode()).hexdigest()[:16]
  out = cache_dir('block_cache') / f'block_cache-{key}.so'
  if out.exists():
    return out
  cc = shutil.which(os.environ.get('CC', 'cc')) or shutil.which('gcc')
  if cc is None:
    raise RuntimeError(f'no C compiler ({os.environ.get("CC", "cc")}) to build {BLOCK_CACHE_SOURCE.name}')
  return compile_once([cc, *_CFLAGS, str(BLOCK_CACHE_SOURCE), '-ldl', '-lpthread'], out)


def cache_dir(name: str) -> Path:
  """`~/.cache/cxrjax/<name>` (or under `CXRJAX_CACHE_DIR`): where compiled helpers are kept."""
  return Path(os.environ.get('CXRJAX_CACHE_DIR', Path.home() / '.cache' / 'cxrjax')) / name


def compile_once(cmd: list[str], out: Path) -> Path:
  """Runs the compiler command `cmd -o <temporary file>` and moves the result to `out`.

  Concurrent builders (test workers, processes of one launch) each write their own
  temporary file, so `out` is always whole.

  Raises:
    RuntimeError: the compiler failed (its command and the end of its stderr).
  """
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [*cmd, '-o', tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f'{" ".join(cmd)} failed: {proc.stderr.strip()[-500:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def reexec_with_block_cache() -> None:
  """Restarts this process (same PID, arguments and environment) with the block cache preloaded.

  The command-line entry points call it first, before JAX starts: LD_PRELOAD is
  only read when a process starts. Does nothing when the cache is already
  active, under `CXRJAX_KEEP_MALLOC=1`, off Linux, or when an earlier attempt
  did not take (the library is in LD_PRELOAD but not loaded: no loop). When the
  library cannot be built the process goes on with glibc's heap, and its
  `malloc_setting` (in every output) says so.
  """
  global malloc_setting
  if os.environ.get('CXRJAX_KEEP_MALLOC') or not sys.platform.startswith('linux') or block_cache_active():
    return
  if 'block_cache-' in os.environ.get('LD_PRELOAD', ''):
    return  # preloaded before and not loaded: the loader refused it, do not try forever
  try:
    lib = block_cache_library()
  except (RuntimeError, OSError) as e:
    malloc_setting += f'; no block cache ({" ".join(str(e).split())[:200]})'
    return
  if any(c in str(lib) for c in ' :'):  # LD_PRELOAD separates entries with spaces and colons
    malloc_setting += f'; no block cache (its path {str(lib)!r} cannot go in LD_PRELOAD)'
    return
  env = dict(os.environ)
  env['LD_PRELOAD'] = ' '.join(filter(None, [str(lib), env.get('LD_PRELOAD', '')]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
