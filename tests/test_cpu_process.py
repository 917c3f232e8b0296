"""What importing cxrjax sets up for speed: XLA flags and malloc reuse of freed buffers."""

import json
import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.models import dcgan

from conftest import normal

# Run in a fresh interpreter (malloc must be configured before JAX's CPU client starts):
# a jitted function with a 256 MB scratch buffer, which XLA's runtime allocates and frees
# on every call; prints the minor page faults of calls 3 to 10.
# JAX_FIRST=1 starts JAX's backend before cxrjax is imported.
_FAULTS_OF_A_REPEATED_CALL = """
import json, os, resource
if os.environ.get('JAX_FIRST'):
  import jax
  jax.numpy.zeros(1).block_until_ready()
import cxrjax, jax, jax.numpy as jnp
from cxrjax import _xla_env
x = jnp.zeros((64, 1024, 1024), jnp.float32)
# The barrier keeps x + 1 whole in XLA's scratch buffer, as a training step's activations are.
f = jax.jit(lambda x: jax.lax.optimization_barrier(x + 1.0)[:, 0, 0])
faults = []
for call in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(faults=faults[2:], setting=_xla_env.malloc_setting)))
"""

# Also in a fresh interpreter, so that the caller's CXRJAX_KEEP_* variables cannot leak in.
_RECORDED = """
import json
from cxrjax import _xla_env
from cxrjax.bench import harness
m = harness.machine_description()
print(json.dumps(dict(flags=_xla_env.CPU_FLAGS, xla_flags=m['xla_flags'], malloc=m['malloc'],
                      setting=_xla_env.malloc_setting)))
"""


def _run(script: str, **env_extra: str) -> dict:
  drop = ('XLA_FLAGS', 'LD_PRELOAD', 'NPROC', 'PJRT_NPROC')
  env = {k: v for k, v in os.environ.items() if not k.startswith('CXRJAX_KEEP_') and k not in drop}
  env.update(env_extra)
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='the malloc settings are for glibc only')
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
  # Imported after JAX started: the threads already have their arenas; recorded as no effect.
  assert late['setting'].startswith('unchanged (glibc') and 'JAX had started' in late['setting'], late


def test_xla_flags_and_malloc_setting_are_set_on_import_and_recorded():
  r = _run(_RECORDED)
  for flag in r['flags']:
    assert flag in r['xla_flags']
  assert r['malloc'] == r['setting']
  if platform.libc_ver()[0] == 'glibc':
    assert r['setting'].startswith('glibc')


# In a fresh interpreter: asks for one XLA pool thread, starts JAX, runs a program and counts
# XLA's pool threads (named tf_XLAEigen...). JAX_FIRST=1 starts JAX's backend before the request.
_POOL_THREADS = """
import json, os
if os.environ.get('JAX_FIRST'):
  import jax
  jax.numpy.zeros(1).block_until_ready()
from cxrjax import _xla_env
if os.environ.get('ASK'):
  _xla_env.use_one_pool_thread()
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024))
jax.jit(lambda x: jnp.tanh(x @ x).sum())(x).block_until_ready()
names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]
print(json.dumps(dict(threads=sum(n.startswith('tf_XLAEigen') for n in names), setting=_xla_env.pool_setting)))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='counts threads in /proc')
def test_one_pool_thread_sizes_xla_cpu_pool_before_jax_starts():
  cores = len(os.sched_getaffinity(0))
  default = _run(_POOL_THREADS)
  assert default['setting'] == 'default (one XLA thread per core)'
  assert default['threads'] == cores  # one pool thread per core unless asked
  one = _run(_POOL_THREADS, ASK='1')
  assert one == dict(threads=1, setting='one XLA thread (NPROC=1, set by cxrjax)')
  # Not applied, and said why: the user's NPROC rules; a started backend keeps its pool; so do
  # several forced devices (their data-parallel programs use XLA's convolutions, not oneDNN's).
  user = _run(_POOL_THREADS, ASK='1', NPROC=str(cores + 1))
  assert user['threads'] == cores + 1 and user['setting'].endswith(f'not set: NPROC={cores + 1} set by the user)')
  late = _run(_POOL_THREADS, ASK='1', JAX_FIRST='1')
  assert late['threads'] == cores and late['setting'].endswith('not set: JAX had already started)')
  forced = _run(_POOL_THREADS, ASK='1', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert 'NPROC' not in forced['setting'] and forced['setting'].endswith('not set: 2 forced CPU devices)')


def _groupnorm_silu_grads():
  """A GroupNorm + SiLU + Dense loss and its gradients (the kind of step `fuse_elementwise=False` is for)."""
  from cxrjax.models.norm import GroupNorm  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.silu(GroupNorm(num_groups=4, impl='onednn')(x))
      return nn.Dense(8)(h * jax.nn.sigmoid(h) + 1.0).mean()

  x = normal(0, (16, 14, 14, 32))
  params = Net().init(jax.random.key(1), x)
  return jax.jit(jax.value_and_grad(lambda p, x: Net().apply(p, x))).lower(params, x), (params, x)


def test_compiler_options_turn_off_ynn_elementwise_fusion_without_changing_results(monkeypatch):
  monkeypatch.delenv('CXRJAX_KEEP_XLA_FLAGS', raising=False)
  from cxrjax import _xla_env  # noqa: PLC0415

  assert _xla_env.compiler_options(fuse_elementwise=True) is None
  options = _xla_env.compiler_options(fuse_elementwise=False)
  assert options == _xla_env.NO_ELEMENTWISE_YNN
  lowered, args = _groupnorm_silu_grads()
  default, without = lowered.compile(), lowered.compile(compiler_options=options)
  # The process's flags fuse the elementwise ops into YNN fusions; the override leaves them to XLA's own fusions.
  assert default.as_text().count('__ynn_fusion') > without.as_text().count('__ynn_fusion')
  (loss_a, grads_a), (loss_b, grads_b) = default(*args), without(*args)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
  monkeypatch.setenv('CXRJAX_KEEP_XLA_FLAGS', '1')
  assert _xla_env.compiler_options(fuse_elementwise=False) is None  # the user's XLA_FLAGS rule


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
  from cxrjax import _xla_env  # noqa: PLC0415

  options = _xla_env.init_compiler_options()
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
  monkeypatch.setenv('CXRJAX_KEEP_XLA_FLAGS', '1')
  assert _xla_env.init_compiler_options() is None  # the user's XLA_FLAGS rule
