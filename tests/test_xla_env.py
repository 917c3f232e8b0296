"""What importing cxrjax sets up for speed: XLA flags and malloc reuse of freed buffers."""

import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter (malloc must be configured before JAX's CPU client starts):
# a jitted function whose 256 MB output is allocated by XLA's runtime and freed once
# dropped, called three times; prints the minor page faults of the third call.
_FAULTS_OF_A_REPEATED_CALL = """
import resource, cxrjax, jax, jax.numpy as jnp
from cxrjax import _xla_env
x = jnp.zeros((64, 1024, 1024), jnp.float32)
f = jax.jit(lambda x: x + 1.0)
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, _xla_env.malloc_setting, sep='|')
"""


def _faults(keep_malloc: bool) -> tuple[int, str]:
  env = {k: v for k, v in os.environ.items() if k != 'CXRJAX_KEEP_MALLOC'}
  if keep_malloc:
    env['CXRJAX_KEEP_MALLOC'] = '1'
  out = subprocess.run([sys.executable, '-c', _FAULTS_OF_A_REPEATED_CALL], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
  faults, setting = out.split('|')
  return int(faults), setting


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the malloc settings are glibc (Linux) only')
def test_freed_xla_buffers_are_reused_without_page_faults():
  # 256 MB is 65,536 pages of 4 KB: glibc's default mmaps such a block on every call (or a
  # few hundred 2 MB pages with transparent huge pages); reused heap memory faults no page.
  tuned, setting = _faults(keep_malloc=False)
  untuned, untouched = _faults(keep_malloc=True)
  assert setting.startswith('glibc') and 'arena_max=1, mmap_max=0, trim_threshold=off' in setting
  assert untouched == 'unchanged (CXRJAX_KEEP_MALLOC)'
  assert untuned > 100, untuned
  assert tuned < 0.1 * untuned, (tuned, untuned)


def test_xla_flags_and_malloc_setting_are_set_on_import_and_recorded():
  from cxrjax import _xla_env  # noqa: PLC0415
  from cxrjax.bench import harness  # noqa: PLC0415

  machine = harness.machine_description()
  for flag in _xla_env.CPU_FLAGS:
    assert flag in os.environ['XLA_FLAGS']
    assert flag in machine['xla_flags']
  assert machine['malloc'] == _xla_env.malloc_setting != 'unchanged'
