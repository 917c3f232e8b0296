"""The one seam between cxrjax and platform kernels: `select(config.kernels)` -> a `Backend`.

- 'stock': plain Flax, optax and XLA's defaults (`base.Backend`): GPU, TPU, several
  devices, and any machine without the CPU extension.
- 'cpu': oneDNN kernels, a fused Adam and CPU process settings (`cxrjax.backends.cpu`),
  for a run on one CPU device.
- 'auto': 'cpu' when the run will be on one CPU device and the extension can be
  built, else 'stock'. Decided from the environment before JAX starts (no device
  is probed): the platform JAX is told to use (`JAX_PLATFORMS`), or, when it is
  not told, whether an accelerator plugin for JAX is installed; a forced CPU
  device count above one; a multi-process (distributed) run. Once JAX has started,
  `Backend.check_devices` confirms the decision.

The entry point (`cxrjax.entry`) decides once, lets the CPU backend configure the
process, and passes the backend to the trainers; library code never selects.
`decide` imports nothing heavy, so that the process can be configured before JAX,
flax and optax are imported; the backends themselves are imported when made.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
from collections.abc import Mapping

from cxrjax.backends.cpu import process
from cxrjax.config_lib import KERNELS
from cxrjax.errors import UserError

# Modules of JAX's GPU and TPU plugins that do not register under the `jax_plugins` namespace.
ACCELERATOR_MODULES = ('libtpu',)


def accelerator_plugins() -> list[str]:
  """The JAX plugins installed here (found as JAX finds them: entry points and the `jax_plugins` namespace)."""
  found = {ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')}
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    found |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  found |= {m for m in ACCELERATOR_MODULES if importlib.util.find_spec(m) is not None}
  return sorted(found)


def not_one_cpu_device(env: Mapping[str, str], distributed: bool) -> str | None:
  """Why a run in this environment will not be on exactly one CPU device, or None when it will."""
  platforms = (env.get('JAX_PLATFORMS') or env.get('JAX_PLATFORM_NAME') or '').strip()
  if platforms:
    if platforms.split(',')[0].strip().lower() != 'cpu':
      return f'JAX_PLATFORMS={platforms}'
  else:
    plugins = accelerator_plugins()
    if plugins:
      return f'an accelerator plugin for JAX is installed ({", ".join(plugins)})'
  if distributed:
    return 'a multi-process (distributed) run'
  devices = process.forced_device_count(env.get('XLA_FLAGS', ''))
  if env.get('JAX_NUM_CPU_DEVICES', '').strip() not in ('', '1', '-1'):
    devices = env['JAX_NUM_CPU_DEVICES'].strip()
  if str(devices) != '1':
    return f'{devices} forced CPU devices (a custom call is not partitioned across devices)'
  return None


def decide(kernels: str, *, env: Mapping[str, str] | None = None, distributed: bool = False) -> tuple[str, str]:
  """('stock' or 'cpu', why) for `config.kernels` in this environment; imports and starts nothing heavy.

  Raises:
    UserError: `kernels` is not a choice, or 'cpu' cannot be had here (the reason is named).
  """
  if kernels not in KERNELS:
    raise UserError(f'kernels: expected one of {", ".join(KERNELS)}, got {kernels!r}')
  if kernels == 'stock':
    return 'stock', ''
  why = not_one_cpu_device(os.environ if env is None else env, distributed) or process.extension_unavailable()
  if why is None:
    return 'cpu', 'kernels=auto: one CPU device' if kernels == 'auto' else ''
  if kernels == 'cpu':
    raise UserError(f'kernels=cpu is not available: {why}; use kernels=auto or kernels=stock')
  return 'stock', f'kernels=auto: CPU kernels not used ({why})'


def make(name: str, why: str = '', *, insist: bool = False):
  """The backend `decide` named; a CPU extension that fails to build gives stock (or UserError when insisted on)."""
  from cxrjax.backends.base import Backend  # noqa: PLC0415 - heavy (optax, flax): only once decided

  if name == 'stock':
    return Backend(why)
  from cxrjax.backends.cpu.backend import CpuBackend  # noqa: PLC0415 - JAX and the extension: only when chosen

  try:
    return CpuBackend(why)
  except (RuntimeError, OSError) as e:  # the extension did not build or load
    reason = ' '.join(str(e).split())[:300]
    if insist:
      raise UserError(f'kernels=cpu is not available: {reason}; use kernels=auto or kernels=stock') from e
    return Backend(f'kernels=auto: CPU kernels not used ({reason})')


def select(kernels: str, *, env: Mapping[str, str] | None = None, distributed: bool = False):
  """The backend for a run: `make(*decide(...))` (see there). The process is not configured here."""
  name, why = decide(kernels, env=env, distributed=distributed)
  return make(name, why, insist=kernels == 'cpu')


def stock(why: str = ''):
  return make('stock', why)
