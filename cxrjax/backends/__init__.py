"""The one seam between cxrjax and platform kernels: `select(config.kernels)` -> a `Backend`.

- 'stock': plain Flax, optax and XLA's defaults (`Backend`): GPU, TPU, several
  devices, and any machine without the CPU extension.
- 'cpu': oneDNN kernels, a fused Adam and CPU process settings (`cxrjax.backends.cpu`),
  for a run on one CPU device.
- 'auto': 'cpu' when the run will be on one CPU device and the extension can be
  built, else 'stock'. Decided from the environment before JAX starts (no device
  is probed): the platform JAX is told to use (`JAX_PLATFORMS`), or, when it is
  not told, whether an accelerator plugin for JAX is installed; a forced CPU
  device count above one; a multi-process (distributed) run.

The entry point (`cxrjax.main`) selects once, lets the backend configure the
process, and passes it to the trainers; library code never selects.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

from cxrjax.backends import cpu
from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import process
from cxrjax.config_lib import KERNELS
from cxrjax.errors import UserError

# Python modules that JAX's GPU and TPU plugins install; with one of them present and no
# JAX_PLATFORMS, JAX picks the accelerator.
ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def stock(why: str = '') -> Backend:
  return Backend(why)


def not_one_cpu_device(env: Mapping[str, str], distributed: bool) -> str | None:
  """Why a run in this environment will not be on exactly one CPU device, or None when it will."""
  platforms = (env.get('JAX_PLATFORMS') or env.get('JAX_PLATFORM_NAME') or '').strip()
  if platforms:
    first = platforms.split(',')[0].strip().lower()
    if first != 'cpu':
      return f'JAX_PLATFORMS={platforms}'
  else:
    plugins = [p for p in ACCELERATOR_PLUGINS if importlib.util.find_spec(p) is not None]
    if plugins:
      return f'an accelerator plugin for JAX is installed ({", ".join(plugins)})'
  if distributed:
    return 'a multi-process (distributed) run'
  devices = process.forced_device_count(env.get('XLA_FLAGS', ''))
  if devices != 1:
    return f'{devices} forced CPU devices (a custom call is not partitioned across devices)'
  return None


def select(kernels: str, *, env: Mapping[str, str] | None = None, distributed: bool = False) -> Backend:
  """The backend for a run, chosen before JAX starts.

  Args:
    kernels: `config.kernels`: 'auto', 'stock' or 'cpu' (see the module docstring).
    env: the environment the run will start JAX in (default: this process's).
    distributed: whether the run calls `jax.distributed.initialize()`.

  Returns:
    A `Backend`; its `why` says why it was chosen where that was not asked for.

  Raises:
    UserError: `kernels` is not a choice, or 'cpu' cannot be had here (the reason is named).
  """
  if kernels not in KERNELS:
    raise UserError(f'kernels: expected one of {", ".join(KERNELS)}, got {kernels!r}')
  if kernels == 'stock':
    return stock()
  env = os.environ if env is None else env
  why = not_one_cpu_device(env, distributed) or cpu.unavailable_reason()
  if why is None:
    try:
      return cpu.CpuBackend('kernels=auto: one CPU device' if kernels == 'auto' else '')
    except (RuntimeError, OSError) as e:  # the extension did not build or load
      why = ' '.join(str(e).split())[:300]
  if kernels == 'cpu':
    raise UserError(f'kernels=cpu is not available: {why}; use kernels=auto or kernels=stock')
  return stock(f'kernels=auto: CPU kernels not used ({why})')
