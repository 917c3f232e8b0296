"""What the CPU backend decides and sets before JAX starts: XLA CPU flags, malloc, XLA's pool, the block cache.

All of it must happen before JAX starts its CPU client, so only an entry point
calls it (`configure`, through `cxrjax.entry.start`), never an import; and this
module imports nothing but the standard library, so that the entry point can
restart and set malloc before JAX, flax and optax are even imported.

- XLA flags: YNN's fusion of dots, elementwise ops and reductions
  (`CPU_FLAGS`) makes CPU training steps much faster; gradients are unchanged
  against a float64 reference. Per program it can be narrowed again
  (`NO_ELEMENTWISE_YNN`): steps made of many small elementwise ops (GroupNorm,
  SiLU, LeakyReLU, embeddings) run faster with XLA's own loop fusions.
- malloc: XLA's CPU runtime allocates each execution's scratch buffer with
  `malloc` and frees it afterwards. glibc serves blocks that large with a fresh
  `mmap` and returns them with `munmap`, so every step would page-fault its whole
  scratch buffer in again. `configure_malloc` keeps freed memory in the heap
  instead, at the price of a larger peak heap.
- The block cache (`block_cache.c`, preloaded with `LD_PRELOAD`): when the next
  step allocates its buffer before the previous step has freed its own
  (asynchronous dispatch makes that a race), glibc serves it from fresh pages and
  fragments its heap; the cache keeps every block of 64 MB or more whole for the
  next request of its size. `LD_PRELOAD` is read only when a process starts, so
  the entry point restarts itself once (`reexec_with_block_cache`).
- One XLA pool thread (`NPROC=1`) for steps that are nearly all oneDNN calls: with
  a pool thread per core, two threads come to lead oneDNN's OpenMP teams and
  libgomp cuts its spin-wait, so each parallel region wakes its workers from sleep.

Opt-outs: `CXRJAX_KEEP_XLA_FLAGS=1` (the user's XLA flags rule: no flags, no
per-program options, no pool size), `CXRJAX_KEEP_MALLOC=1` (no malloc settings, no
block cache). The measurements behind each choice are in BUILD_NOTES.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
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

# LLVM optimization level 1 for the programs that initialize parameters and optimizer state: they
# are mostly random-number generation, compile into hundreds of loop fusions, and run once; at
# level 1 they compile faster and give the same bits (tests/test_cpu_process.py checks it).
INIT_OPTIONS = {'xla_backend_optimization_level': 1}

# Programs whose steps ran faster without YNN's elementwise fusion: many small elementwise ops (SiLU,
# squeeze-excitation, GroupNorm, LeakyReLU, embeddings), which XLA's own loop fusions run better.
# ResNet-18's step keeps it (a few large ReLU / residual maps around oneDNN's kernels); the autoencoder's
# was not measured. Measurements: BUILD_NOTES.md.
WITHOUT_ELEMENTWISE_FUSION = frozenset({'efficientnet_v2_b0', 'efficientnet_v2_s', 'dcgan', 'unet'})

# Programs whose steps are nearly all oneDNN calls, which ran faster with one XLA pool thread; the UNet's
# and EfficientNetV2-S's steps, with more XLA work of their own, ran slower.
ONE_POOL_THREAD = frozenset({'dcgan', 'efficientnet_v2_b0', 'resnet18'})

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def extension_unavailable() -> str | None:
  """Why the oneDNN extension cannot be had here (no wheel; no compiler and no cached build), or None."""
  if not os.environ.get('CXRJAX_ONEDNN_LIB'):
    try:
      importlib.metadata.distribution('onednn-cpu-gomp')
    except importlib.metadata.PackageNotFoundError:
      return 'the onednn-cpu-gomp wheel is not installed (pip install cxrjax[onednn])'
  cached = any(cache_dir('onednn').glob('onednn_conv-*.so')) if cache_dir('onednn').is_dir() else False
  if not cached and shutil.which(os.environ.get('CXX', 'g++')) is None:
    return f'no C++ compiler ({os.environ.get("CXX", "g++")}) to build the oneDNN extension'
  return None


def compile_options(program: str) -> dict | None:
  """XLA options for one jitted program on the CPU backend ('init' or a model's step); None: the flags alone."""
  if keep_xla_flags():
    return None  # the user's XLA flags rule
  if program == 'init':
    return dict(INIT_OPTIONS)
  return dict(NO_ELEMENTWISE_YNN) if program in WITHOUT_ELEMENTWISE_FUSION else None


def configure(program: str | None) -> dict[str, str]:
  """Restarts once with the block cache, then sets XLA's CPU flags, malloc and (per program) the pool size.

  Args:
    program: what the process will mostly run (`config_lib.main_program`), or None
      for a process that runs several kinds of program (a sweep): no pool size then.

  Returns:
    What was done, for the banner and `metrics.json`.
  """
  no_cache = reexec_with_block_cache()  # returns only when no restart was needed or possible
  done = dict(xla_flags=set_xla_flags(), malloc=configure_malloc() + (f'; {no_cache}' if no_cache else ''))
  if program in ONE_POOL_THREAD:
    done['xla_cpu_pool'] = use_one_pool_thread()
  return done


def keep_xla_flags() -> bool:
  """Whether the user asked cxrjax to leave XLA's flags and per-program options alone."""
  return bool(os.environ.get('CXRJAX_KEEP_XLA_FLAGS'))


def set_xla_flags() -> str:
  """Appends `CPU_FLAGS` to `XLA_FLAGS` (those the user has not set); returns the resulting value."""
  flags = os.environ.get('XLA_FLAGS', '')
  if keep_xla_flags():
    return flags
  for flag in CPU_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
  return flags


def configure_malloc() -> str:
  """Makes glibc malloc reuse freed memory instead of returning it to the OS.

  Three settings, all needed (each alone leaves the page faults): one arena, so
  that XLA's worker threads allocate from the main heap (other arenas `mmap`
  every block over 64 MB whatever the limits say); no `mmap` for large blocks;
  and no trimming of the heap's free top. Costs: the process keeps its peak
  heap until it exits, fragmentation adds to it, and all threads share one
  malloc lock (XLA allocates a few large blocks per step, so it is not
  contended). It only works before JAX starts its CPU client: threads that have
  already allocated keep their arenas, so when JAX was started first this is
  recorded as having no effect.

  Returns:
    What was done: 'glibc <version>: ...' when set, otherwise 'unchanged (<why>)'.
  """
  if os.environ.get('CXRJAX_KEEP_MALLOC'):
    return 'unchanged (CXRJAX_KEEP_MALLOC)'
  if not sys.platform.startswith('linux'):
    return 'unchanged (not glibc)'
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):  # musl and other libcs have no gnu_get_libc_version
    return 'unchanged (not glibc)'
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  started = jax_backend_started()
  if started is not False:
    why = 'JAX had started before the backend was configured' if started else 'cannot tell whether JAX has started'
    return f'unchanged (glibc {version}: {why})'
  # mallopt takes an int; -1 as the trim threshold is SIZE_MAX inside glibc: never trim.
  done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)]
  if not all(done):
    return f'unchanged (glibc {version}: mallopt refused: {done})'
  setting = f'glibc {version}: arena_max=1, mmap_max=0, trim_threshold=off'
  if block_cache_active():
    setting += f"; blocks >= {block_cache_stats()['threshold_mb']} MB from cxrjax's block cache (LD_PRELOAD)"
  return setting


def jax_backend_started() -> bool | None:
  """Whether JAX's backends (and their threads) exist already; None when this JAX cannot tell."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # noqa: PLC0415 - only when JAX is already imported

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without this private helper
    return None


def forced_device_count(xla_flags: str) -> int:
  """The `--xla_force_host_platform_device_count` in `xla_flags` (the last one wins), 1 without one."""
  counts = [f.split('=', 1)[1] for f in xla_flags.split() if f.startswith('--xla_force_host_platform_device_count=')]
  try:
    return int(counts[-1]) if counts else 1
  except ValueError:
    return 1


def use_one_pool_thread() -> str:
  """Before JAX's CPU client starts: sizes XLA's CPU thread pool to one thread (`NPROC=1`).

  Does nothing off Linux, under `CXRJAX_KEEP_XLA_FLAGS=1`, when the user set NPROC or
  PJRT_NPROC, with several forced CPU devices, or once JAX's backend has started.

  Returns:
    What was done.
  """
  devices = forced_device_count(os.environ.get('XLA_FLAGS', ''))
  why_not = (
    'not on Linux' if not sys.platform.startswith('linux')
    else 'CXRJAX_KEEP_XLA_FLAGS=1' if keep_xla_flags()
    else f'NPROC={os.environ["NPROC"]} set by the user' if 'NPROC' in os.environ
    else f'PJRT_NPROC={os.environ["PJRT_NPROC"]} set by the user' if 'PJRT_NPROC' in os.environ
    else f'{devices} forced CPU devices' if devices != 1
    else 'JAX had already started' if jax_backend_started() is not False
    else None
  )  # fmt: skip
  if why_not:
    return f'default (one XLA thread per core; one thread asked for, not set: {why_not})'
  os.environ['NPROC'] = '1'  # read by XLA's CPU client when it starts (its pool size)
  return 'one XLA thread (NPROC=1)'


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


def reexec_with_block_cache() -> str | None:
  """Restarts this process (same PID, arguments and environment) with the block cache preloaded.

  Called by the entry point before JAX starts. Returns (without restarting) when
  the cache is already active, under `CXRJAX_KEEP_MALLOC=1`, off Linux, or when an
  earlier attempt did not take (the library is in LD_PRELOAD but not loaded: no
  loop). When the library cannot be built the process goes on with glibc's heap.

  Returns:
    None, or why there is no block cache (recorded beside the malloc setting).
  """
  if os.environ.get('CXRJAX_KEEP_MALLOC') or not sys.platform.startswith('linux') or block_cache_active():
    return None
  if 'block_cache-' in os.environ.get('LD_PRELOAD', ''):
    return 'no block cache (the loader did not load it from LD_PRELOAD)'
  try:
    lib = block_cache_library()
  except (RuntimeError, OSError) as e:
    return f'no block cache ({" ".join(str(e).split())[:200]})'
  if any(c in str(lib) for c in ' :'):  # LD_PRELOAD separates entries with spaces and colons
    return f'no block cache (its path {str(lib)!r} cannot go in LD_PRELOAD)'
  env = dict(os.environ)
  env['LD_PRELOAD'] = ' '.join(filter(None, [str(lib), env.get('LD_PRELOAD', '')]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  return None  # not reached
