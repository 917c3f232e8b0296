"""The block cache (`cxrjax/block_cache.c`, preloaded): large blocks kept whole and reused, all else glibc's."""

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from cxrjax import _xla_env

pytestmark = pytest.mark.skipif(
  platform.libc_ver()[0] != 'glibc' or not (shutil.which('cc') or shutil.which('gcc')),
  reason='the block cache is a glibc preload built with the C compiler',
)

MB = 1 << 20

# Runs in a fresh interpreter with the cache preloaded (threshold 8 MB, at most 40 MB idle),
# calling the C allocator directly through ctypes; prints what it saw as JSON.
_ALLOCATOR_CALLS = """
import ctypes, json, resource
from cxrjax import _xla_env
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
stats = _xla_env.block_cache_stats
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

out['active'] = _xla_env.block_cache_active()
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
import cxrjax, jax, jax.numpy as jnp, numpy as np
from cxrjax import _xla_env
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
active = _xla_env.block_cache_active()
print(json.dumps(dict(digest=digest, active=active, stats=_xla_env.block_cache_stats() if active else None)))
"""


def _run(script: str, preload: bool, **env_extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'CXRJAX_KEEP_MALLOC')}
  if preload:
    env['LD_PRELOAD'] = str(_xla_env.block_cache_library())
  env.update(env_extra)
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_blocks_are_kept_and_reused_small_ones_left_to_glibc():
  r = _run(_ALLOCATOR_CALLS, True, CXRJAX_BLOCK_CACHE_MB='8', CXRJAX_BLOCK_CACHE_IDLE_MB='40')
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


def test_training_gives_identical_bits_with_and_without_the_cache():
  # With a 1 MB threshold XLA's scratch buffer for this step comes from the cache.
  cached = _run(_TRAINING, True, CXRJAX_BLOCK_CACHE_MB='1')
  plain = _run(_TRAINING, False)
  assert cached['active'] and not plain['active']
  assert cached['stats']['reused'] > 0, cached
  assert cached['digest'] == plain['digest']


def test_the_command_line_restarts_itself_with_the_cache_once(tmp_path):
  # `reexec_with_block_cache` in a script run as a command: the restart keeps the PID and the
  # arguments; CXRJAX_KEEP_MALLOC=1 opts out.
  script = tmp_path / 'entry.py'
  script.write_text(
    'import json, os, sys\n'
    'from cxrjax import _xla_env\n'
    'print("start", os.getpid(), flush=True)\n'
    '_xla_env.reexec_with_block_cache()\n'
    'print(json.dumps(dict(pid=os.getpid(), argv=sys.argv[1:], active=_xla_env.block_cache_active(),'
    ' malloc=_xla_env.malloc_setting)))\n'
  )
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'CXRJAX_KEEP_MALLOC')}
  for keep in (False, True):
    run_env = dict(env, CXRJAX_KEEP_MALLOC='1') if keep else env
    proc = subprocess.run([sys.executable, str(script), 'a b', '--x=1'], env=run_env, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    starts = [line for line in lines if line.startswith('start')]
    assert r['argv'] == ['a b', '--x=1']
    if keep:
      assert len(starts) == 1 and not r['active'] and r['malloc'] == 'unchanged (CXRJAX_KEEP_MALLOC)'
    else:
      assert len(starts) == 2 and starts[0] == starts[1] == f'start {r["pid"]}', lines  # once, same process
      assert r['active'] and r['malloc'].endswith("blocks >= 64 MB from cxrjax's block cache (LD_PRELOAD)"), r
