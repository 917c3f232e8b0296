"""The CPU backend's process settings (cxrjax/backends/cpu/process.py) and how a run gets them.

XLA's CPU flags, glibc malloc's reuse of freed buffers, XLA's pool size, the block cache
(`block_cache.c`, preloaded) and the command line's restart with it, and the per-program
compiler options. None of it happens on import: the entry point sets it up
(`cxrjax.entry.start` -> `entry.configure` -> `process.configure`) before JAX starts, so every
test that looks at a process setting runs in a fresh interpreter.

Tolerances: the compiler options change how XLA fuses the elementwise ops of a step, so
the order of float32 operations and which multiply-adds are contracted; the results differ
by float32 rounding (unit roundoff 6e-8) carried through a few dozen operations, well
inside rtol 1e-5 for the loss and 1e-4 for gradients (sums over 16 x 14 x 14 samples).
Everything else is compared bit for bit: the initialisation programs' option does not
change their arithmetic, and the block cache only decides where a buffer lives.
"""

import json
import os
import platform
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import process
from cxrjax.backends.cpu.backend import CpuBackend
from cxrjax.models import dcgan

from conftest import ROOT

GLIBC = platform.libc_ver()[0] == 'glibc'
HAS_CC = bool(shutil.which('cc') or shutil.which('gcc'))
needs_glibc = pytest.mark.skipif(not GLIBC, reason='the malloc settings are for glibc only')
needs_block_cache = pytest.mark.skipif(
  not GLIBC or not HAS_CC, reason='the block cache is a glibc preload built with the C compiler'
)
BLOCK_CACHE_MALLOC = "blocks >= 64 MB from cxrjax's block cache (LD_PRELOAD)"
MB = 1 << 20


def _clean_env(**env_extra: str) -> dict[str, str]:
  """This process's environment without what would decide the settings under test, plus `env_extra`."""
  drop = ('XLA_FLAGS', 'LD_PRELOAD', 'NPROC', 'PJRT_NPROC')
  env = {k: v for k, v in os.environ.items() if not k.startswith('CXRJAX_KEEP_') and k not in drop}
  env.update(env_extra)
  return env


def _run(script: str, **env_extra: str) -> dict:
  """Runs `script` in a fresh interpreter; returns the JSON its last line prints."""
  proc = subprocess.run(
    [sys.executable, '-c', script], env=_clean_env(**env_extra), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- configure_process: flags, malloc, pool, block cache ---------------------------------------

# A script file (the restart re-runs it): prints a line as it starts, starts as the command line
# does (`entry.start`: the CPU backend, asked for, configures the process) for the experiment
# named by argv (model, trainer), then starts JAX.
_CONFIGURE = """
import json, os, sys
print('start', os.getpid(), flush=True)
from cxrjax import config_lib, entry
from cxrjax.backends.cpu import process
config = config_lib.base_config()
config.kernels = 'cpu'
config.model.name, config.trainer = sys.argv[1], sys.argv[2]
backend = entry.start(config, compilation_cache='')
import jax
jax.numpy.zeros(1).block_until_ready()  # XLA reads its flags (and the pool size) as JAX starts
print(json.dumps(dict(pid=os.getpid(), process=backend.process, backend=type(backend).__name__,
                      env={k: os.environ.get(k) for k in ('XLA_FLAGS', 'NPROC')},
                      block_cache=process.block_cache_active())))
"""


def _configure(tmp_path, model: str, trainer: str, **env_extra: str) -> tuple[dict, list[str]]:
  """Runs `_CONFIGURE` for one experiment; returns its JSON and its 'start' lines."""
  script = tmp_path / 'configure.py'
  script.write_text(_CONFIGURE)
  proc = subprocess.run([sys.executable, str(script), model, trainer], env=_clean_env(**env_extra),
                        capture_output=True, text=True, timeout=300)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-1]), [line for line in lines if line.startswith('start')]


def test_configure_process_sets_xla_flags_malloc_and_pool_and_records_them(tmp_path):
  user_flag = '--xla_cpu_enable_fast_math=false'
  r, starts = _configure(tmp_path, 'resnet18', 'classifier', XLA_FLAGS=user_flag)
  assert r['backend'] == 'CpuBackend'
  # XLA's flags: CPU_FLAGS appended to the user's, in the environment JAX started with, and recorded.
  assert r['process']['xla_flags'] == r['env']['XLA_FLAGS'] == ' '.join((user_flag, *process.CPU_FLAGS))
  # ResNet-18's steps are nearly all oneDNN calls: one XLA pool thread.
  assert r['process']['xla_cpu_pool'] == 'one XLA thread (NPROC=1)' and r['env']['NPROC'] == '1'
  if GLIBC:
    # Set before JAX started (the backend's construction loads the extension but starts no JAX client).
    assert (
      r['process']['malloc'].startswith('glibc')
      and 'arena_max=1, mmap_max=0, trim_threshold=off' in r['process']['malloc']
    ), r
    if HAS_CC:  # restarted once with the block cache preloaded
      assert r['block_cache'] and r['process']['malloc'].endswith(BLOCK_CACHE_MALLOC), r
      assert len(starts) == 2 and starts[0] == starts[1] == f'start {r["pid"]}', starts
  # The UNet's steps do much XLA work of their own: XLA's pool keeps a thread per core.
  r, _ = _configure(tmp_path, 'resnet18', 'ldm')
  assert 'xla_cpu_pool' not in r['process'] and r['env']['NPROC'] is None
  assert r['process']['xla_flags'] == ' '.join(process.CPU_FLAGS)
  # The opt-outs: the user's XLA flags rule (no flags, no pool size); malloc and the block cache untouched.
  r, starts = _configure(tmp_path, 'resnet18', 'classifier', XLA_FLAGS=user_flag, CXRJAX_KEEP_XLA_FLAGS='1',
                         CXRJAX_KEEP_MALLOC='1')  # fmt: skip
  assert r['process']['xla_flags'] == r['env']['XLA_FLAGS'] == user_flag
  assert r['process']['xla_cpu_pool'].endswith('not set: CXRJAX_KEEP_XLA_FLAGS=1)') and r['env']['NPROC'] is None
  assert r['process']['malloc'] == 'unchanged (CXRJAX_KEEP_MALLOC)' and not r['block_cache']
  assert len(starts) == 1


# Run in a fresh interpreter (malloc must be configured before JAX's CPU client starts), as the
# CPU backend sets it up (its XLA flags, then malloc; without the flags XLA fuses the slice into
# the addition and there is no scratch buffer): a jitted function with a 256 MB scratch buffer,
# which XLA's runtime allocates and frees on every call; prints the minor page faults of calls
# 3 to 10. JAX_FIRST=1 starts JAX's backend before malloc is configured.
_FAULTS_OF_A_REPEATED_CALL = """
import json, os, resource
if os.environ.get('JAX_FIRST'):
  import jax
  jax.numpy.zeros(1).block_until_ready()
from cxrjax.backends.cpu import process
process.set_xla_flags()
setting = process.configure_malloc()
import jax, jax.numpy as jnp
x = jnp.zeros((64, 1024, 1024), jnp.float32)
# The barrier keeps x + 1 whole in XLA's scratch buffer, as a training step's activations are.
f = jax.jit(lambda x: jax.lax.optimization_barrier(x + 1.0)[:, 0, 0])
faults = []
for call in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(faults=faults[2:], setting=setting)))
"""


@needs_glibc
def test_freed_xla_buffers_are_reused_without_page_faults():
  # 256 MB is 65,536 pages of 4 KB: glibc's defaults mmap such a block on every call (or at
  # least 128 pages of 2 MB with transparent huge pages), so every call faults; reused heap
  # memory faults none. Only "some call reuses" is asserted for the setting: on a loaded
  # machine a call can allocate before the previous call's scratch is freed, and then the
  # heap grows once more (BUILD_NOTES.md).
  tuned = _run(_FAULTS_OF_A_REPEATED_CALL)
  untuned = _run(_FAULTS_OF_A_REPEATED_CALL, CXRJAX_KEEP_MALLOC='1')
  late = _run(_FAULTS_OF_A_REPEATED_CALL, JAX_FIRST='1')
  assert tuned['setting'].startswith('glibc'), tuned
  assert tuned['setting'].endswith(': arena_max=1, mmap_max=0, trim_threshold=off'), tuned
  assert untuned['setting'] == 'unchanged (CXRJAX_KEEP_MALLOC)'
  assert min(untuned['faults']) >= 100, untuned
  assert min(tuned['faults']) < 50, tuned
  # Configured after JAX started: the threads already have their arenas; recorded as no effect.
  assert late['setting'].startswith('unchanged (glibc') and 'JAX had started' in late['setting'], late


# In a fresh interpreter: asks for one XLA pool thread, starts JAX, runs a program and counts
# XLA's pool threads (named tf_XLAEigen...). JAX_FIRST=1 starts JAX's backend before the request.
_POOL_THREADS = """
import json, os
if os.environ.get('JAX_FIRST'):
  import jax
  jax.numpy.zeros(1).block_until_ready()
from cxrjax.backends.cpu import process
setting = process.use_one_pool_thread() if os.environ.get('ASK') else None
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024))
jax.jit(lambda x: jnp.tanh(x @ x).sum())(x).block_until_ready()
names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]
print(json.dumps(dict(threads=sum(n.startswith('tf_XLAEigen') for n in names), setting=setting)))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='counts threads in /proc')
def test_one_pool_thread_sizes_xla_cpu_pool_before_jax_starts():
  cores = len(os.sched_getaffinity(0))
  default = _run(_POOL_THREADS)
  assert default['threads'] == cores  # one pool thread per core unless asked
  one = _run(_POOL_THREADS, ASK='1')
  assert one == dict(threads=1, setting='one XLA thread (NPROC=1)')
  # Not applied, and said why: the user's NPROC rules; a started backend keeps its pool; so do
  # several forced devices (their data-parallel programs use XLA's convolutions, not oneDNN's).
  user = _run(_POOL_THREADS, ASK='1', NPROC=str(cores + 1))
  assert user['threads'] == cores + 1 and user['setting'].endswith(f'not set: NPROC={cores + 1} set by the user)')
  late = _run(_POOL_THREADS, ASK='1', JAX_FIRST='1')
  assert late['threads'] == cores and late['setting'].endswith('not set: JAX had already started)')
  forced = _run(_POOL_THREADS, ASK='1', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert 'NPROC' not in forced['setting'] and forced['setting'].endswith('not set: 2 forced CPU devices)')


# --- Per-program compiler options --------------------------------------------------------------


def test_compile_options_per_program(monkeypatch):
  monkeypatch.delenv('CXRJAX_KEEP_XLA_FLAGS', raising=False)
  backend = CpuBackend()
  # Steps made of many small elementwise ops leave them to XLA's own fusions; ResNet-18's keep YNN's.
  for program in ('dcgan', 'unet', 'efficientnet_v2_b0', 'efficientnet_v2_s'):
    assert backend.compile_options(program) == process.NO_ELEMENTWISE_YNN, program
  assert backend.compile_options('resnet18') is None
  assert backend.compile_options('init') == process.INIT_OPTIONS == {'xla_backend_optimization_level': 1}
  # NO_ELEMENTWISE_YNN is CPU_FLAGS' own flag, by the enum's names, without 'eltwise'.
  (flag, types), = process.NO_ELEMENTWISE_YNN.items()  # fmt: skip
  assert f'--{flag}=dot,eltwise,reduce' in process.CPU_FLAGS
  assert types == 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'
  record = backend.record(['init', 'resnet18', 'dcgan'])
  assert record['compile_options'] == {
    'init': process.INIT_OPTIONS,
    'resnet18': None,
    'dcgan': process.NO_ELEMENTWISE_YNN,
  }
  monkeypatch.setenv('CXRJAX_KEEP_XLA_FLAGS', '1')  # the user's XLA flags rule
  stock = Backend()
  for program in ('dcgan', 'unet', 'efficientnet_v2_b0', 'resnet18', 'init'):
    assert backend.compile_options(program) is None, program
    assert stock.compile_options(program) is None, program
  monkeypatch.delenv('CXRJAX_KEEP_XLA_FLAGS')
  assert all(stock.compile_options(p) is None for p in ('dcgan', 'resnet18', 'init'))


# In a fresh interpreter with the CPU backend's XLA flags (set before JAX starts, as the entry
# point does): a GroupNorm + SiLU + Dense loss and its gradients (the kind of step the UNet's
# and the DCGAN's option is for), compiled with the process's flags alone and with the option.
_YNN_ELEMENTWISE = """
import json
from cxrjax.backends.cpu.backend import CpuBackend
from cxrjax.backends.cpu import layers, process
process.set_xla_flags()
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.silu(layers.GroupNorm(num_groups=4)(x))
    return nn.Dense(8)(h * jax.nn.sigmoid(h) + 1.0).mean()

x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 14, 14, 32), dtype=np.float32))
params = Net().init(jax.random.key(1), x)
lowered = jax.jit(jax.value_and_grad(lambda p, x: Net().apply(p, x))).lower(params, x)
options = CpuBackend().compile_options('unet')
default, without = lowered.compile(), lowered.compile(compiler_options=options)
(loss_a, grads_a), (loss_b, grads_b) = default(params, x), without(params, x)
print(json.dumps(dict(
  options=options,
  fusions=[default.as_text().count('__ynn_fusion'), without.as_text().count('__ynn_fusion')],
  loss=[float(loss_a), float(loss_b)],
  grads=[[np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()]
         for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b))],
)))
"""


def test_compiler_options_turn_off_ynn_elementwise_fusion_without_changing_results():
  r = _run(_YNN_ELEMENTWISE)
  assert r['options'] == process.NO_ELEMENTWISE_YNN
  # The process's flags fuse the elementwise ops into YNN fusions; the option leaves them to XLA's own fusions.
  assert r['fusions'][0] > r['fusions'][1], r['fusions']
  np.testing.assert_allclose(r['loss'][0], r['loss'][1], rtol=1e-5)
  assert len(r['grads']) == 4  # the GroupNorm's scale and bias, the Dense's kernel and bias
  for a, b in r['grads']:
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))


class _EveryInitializer(nn.Module):
  """One parameter per kind of initializer cxrjax's models use: normal, truncated normal, uniform, constants."""

  @nn.compact
  def __call__(self, x, labels):
    x = nn.Conv(8, (3, 3), kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))(x)  # ResNet
    x = nn.Conv(8, (3, 3))(x)  # flax's default: lecun_normal, a truncated normal
    x = nn.BatchNorm(use_running_average=True, scale_init=dcgan._bn_scale_init)(x)  # DCGAN: N(1, 0.02)
    x = nn.GroupNorm(num_groups=4)(x)
    x = x.mean((1, 2)) + nn.Embed(3, 8)(labels)
    return nn.Dense(2, kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'))(x)  # ResNet, UNet


def test_init_programs_compile_at_level_1_to_the_same_bits(monkeypatch):
  monkeypatch.delenv('CXRJAX_KEEP_XLA_FLAGS', raising=False)
  options = CpuBackend().compile_options('init')
  assert options == {'xla_backend_optimization_level': 1}
  model, tx = _EveryInitializer(), optax.adam(1e-3)

  def init(rng):
    params = model.init(rng, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32))
    return params, tx.init(params['params'])

  lowered = jax.jit(init).lower(jax.random.key(3))
  default, level_1 = lowered.compile(), lowered.compile(compiler_options=options)
  a, b = default(jax.random.key(3)), level_1(jax.random.key(3))
  assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b)) > 10
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bit for bit: the trainers' parameters do not depend on the option


# --- The block cache ---------------------------------------------------------------------------

# Runs in a fresh interpreter with the cache preloaded (threshold 8 MB, at most 40 MB idle),
# calling the C allocator directly through ctypes; prints what it saw as JSON.
_ALLOCATOR_CALLS = """
import ctypes, json, resource
from cxrjax.backends.cpu import process
libc = ctypes.CDLL(None)
for name in ('malloc', 'calloc', 'realloc', 'aligned_alloc'):
  getattr(libc, name).restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
MB = 1 << 20
out = {}
stats = process.block_cache_stats
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

out['active'] = process.block_cache_active()
out['threshold_mb'] = stats()['threshold_mb']
# A 16 MB block, touched, freed and asked for again (15 MB, within 25%): the same block, no faults.
a = libc.malloc(16 * MB)
f = faults(); ctypes.memset(a, 0xAB, 16 * MB); out['faults_first'] = faults() - f
out['usable'] = libc.malloc_usable_size(a)
libc.free(a)
b = libc.malloc(15 * MB)
f = faults(); ctypes.memset(b, 0xCD, 15 * MB); out['faults_again'] = faults() - f
out['same_block'] = a == b
out['page_aligned'] = a % 4096 == 0
libc.free(b)
# Checked a page in every 256 KB: Python objects of 8 MB and more would come from the cache too.
def pages(p, n):
  return {ctypes.string_at(p + off, 4096) for off in range(0, n, 256 * 1024)}
# calloc on a kept (dirty) block still returns zeros.
c = libc.calloc(16, MB)
out['calloc_same_block'] = c == a
out['calloc_zero'] = pages(c, 16 * MB) == {bytes(4096)}
# realloc of a kept block keeps its contents.
ctypes.memset(c, 0x5A, 16 * MB)
d = libc.realloc(c, 30 * MB)
out['realloc_kept'] = pages(d, 16 * MB) == {b'\\x5a' * 4096}
# At most 40 MB idle: with the 30 MB block freed too (46 MB idle), the older 16 MB block goes back.
libc.free(d)
out['unmapped_at_46_mb'] = stats()['unmapped']
# Best fit, never more than 25% too large: a 9 MB request does not get the idle 30 MB block.
before = stats()
e = libc.malloc(9 * MB)
out['small_request_new_block'] = e != d and stats()['mapped'] == before['mapped'] + 1
# Below the threshold: glibc's, untouched by the cache.
before = stats()
s = libc.malloc(1 * MB)
out['small_is_glibc'] = stats() == before and libc.malloc_usable_size(s) >= MB  # glibc's own answer
libc.free(s)
g = libc.aligned_alloc(64, 12 * MB)
out['aligned_alloc_cached'] = g % 64 == 0 and stats()['mapped'] == before['mapped'] + 1
libc.free(g)
libc.free(e)  # 30 + 12 + 9 MB idle: the 30 MB block, now the least recently used, goes back
out['unmapped_at_51_mb'] = stats()['unmapped']
out['stats'] = stats()
# C23's free_sized (glibc 2.39+ has its own) must hand our blocks back to the cache too.
h = libc.malloc(20 * MB)
libc.free_sized(ctypes.c_void_p(h), ctypes.c_size_t(20 * MB))
reused = stats()['reused']
out['free_sized_kept'] = libc.malloc(20 * MB) == h and stats()['reused'] == reused + 1
print(json.dumps(out))
"""

# A small jitted training loop whose XLA scratch buffer goes through the cache when it is
# preloaded with a 1 MB threshold; prints a hash of the final parameters and the cache's counters.
_TRAINING = """
import hashlib, json
import jax, jax.numpy as jnp, numpy as np
from cxrjax.backends.cpu import process
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
w = (jax.random.normal(k1, (3, 3, 8, 8)) * 0.1, jax.random.normal(k2, (8 * 32 * 32, 2)) * 0.01)
x = jax.random.normal(k3, (64, 32, 32, 8))
y = jnp.arange(64) % 2
def loss(w, x, y):
  h = jax.nn.relu(jax.lax.conv_general_dilated(x, w[0], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  logits = h.reshape(h.shape[0], -1) @ w[1]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(64), y])
step = jax.jit(lambda w, x, y: jax.tree.map(lambda p, g: p - 0.1 * g, w, jax.grad(loss)(w, x, y)))
for _ in range(5):
  w = step(w, x, y)
digest = hashlib.sha256(b''.join(np.asarray(p).tobytes() for p in w)).hexdigest()
active = process.block_cache_active()
print(json.dumps(dict(digest=digest, active=active, stats=process.block_cache_stats() if active else None)))
"""


def _run_preloaded(script: str, preload: bool, **env_extra: str) -> dict:
  """`_run`, with the block cache preloaded when `preload`."""
  if preload:
    env_extra['LD_PRELOAD'] = str(process.block_cache_library())
  return _run(script, **env_extra)


@needs_block_cache
def test_large_blocks_are_kept_and_reused_small_ones_left_to_glibc():
  r = _run_preloaded(_ALLOCATOR_CALLS, True, CXRJAX_BLOCK_CACHE_MB='8', CXRJAX_BLOCK_CACHE_IDLE_MB='40')
  assert r['active'] and r['threshold_mb'] == 8
  # 16 MB is 4,096 pages of 4 KB: all fault the first time, none when the block comes back.
  assert r['faults_first'] >= 4000, r
  assert r['faults_again'] < 40, r
  assert r['same_block'] and r['page_aligned'] and r['usable'] == 16 * MB
  assert r['calloc_same_block'] and r['calloc_zero']
  assert r['realloc_kept']
  assert r['small_request_new_block'] and r['small_is_glibc'] and r['aligned_alloc_cached']
  assert r['unmapped_at_46_mb'] == 1 and r['unmapped_at_51_mb'] == 2, r
  assert r['stats']['reused'] == 2, r  # the 15 MB malloc and the calloc
  assert r['free_sized_kept'], r


@needs_block_cache
def test_training_gives_identical_bits_with_and_without_the_cache():
  # With a 1 MB threshold XLA's scratch buffer for this step comes from the cache.
  cached = _run_preloaded(_TRAINING, True, CXRJAX_BLOCK_CACHE_MB='1')
  plain = _run_preloaded(_TRAINING, False)
  assert cached['active'] and not plain['active']
  assert cached['stats']['reused'] > 0, cached
  assert cached['digest'] == plain['digest']


# --- The command line --------------------------------------------------------------------------

# `python -m cxrjax.main`, with a line printed as the interpreter starts the script: the
# restart (same PID, same arguments) runs it again.
_CLI = 'import os\nprint("start", os.getpid(), flush=True)\nfrom cxrjax.main import run\nrun()\n'


@needs_block_cache
def test_the_command_line_restarts_itself_with_the_cache_once_and_records_the_settings(tmp_path, shared_data):
  script = tmp_path / 'cli.py'
  script.write_text(_CLI)

  def cli(*args: str, **env_extra: str):
    proc = subprocess.run([sys.executable, str(script), '--config=configs/baseline.py:smoke', *args], cwd=ROOT,
                          env=_clean_env(**env_extra), capture_output=True, text=True, timeout=600)  # fmt: skip
    starts = [line for line in proc.stdout.splitlines() if line.startswith('start')]
    return proc, starts

  # Flags are parsed first: a bad one ends the run before any restart.
  proc, starts = cli('--config.no_such_key=1')
  assert proc.returncode == 2 and 'no_such_key' in proc.stderr and len(starts) == 1, proc.stderr[-2000:]
  # A run that fails on its data, after the start: restarted first (same process), unless opted out.
  for keep in (False, True):
    env = dict(CXRJAX_KEEP_MALLOC='1') if keep else {}
    proc, starts = cli(f'--workdir={tmp_path / "no_data"}', '--config.data.path=/nonexistent/data.npz', **env)
    assert proc.returncode == 2 and 'data.path' in proc.stderr, proc.stderr[-2000:]
    assert len(starts) == (1 if keep else 2) and len(set(starts)) == 1, starts
  # A whole (smoke) run: restarted once, in the same process, after its flags were parsed.
  wd = tmp_path / 'run'
  proc, starts = cli(f'--workdir={wd}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(starts) == 2 and starts[0] == starts[1], starts
  run = json.loads((wd / 'metrics.json').read_text())['run']
  recorded = run['backend']['process']
  assert run['backend']['kernels'] == 'cpu'
  assert recorded['malloc'].startswith('glibc') and recorded['malloc'].endswith(BLOCK_CACHE_MALLOC), recorded
  assert recorded['xla_flags'] == run['xla_flags'] and all(f in recorded['xla_flags'] for f in process.CPU_FLAGS)
  assert recorded['xla_cpu_pool'] == 'one XLA thread (NPROC=1)'  # the baseline is a ResNet-18
