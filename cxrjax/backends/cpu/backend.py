"""`CpuBackend`: the stock backend with oneDNN layers, a fused Adam and CPU process settings."""

from __future__ import annotations

from typing import Any

from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import layers, onednn, process
from cxrjax.errors import UserError


class CpuBackend(Backend):
  """oneDNN kernels and CPU process settings, for runs on one CPU device (see the package docstring)."""

  name = 'cpu'

  def __init__(self, why: str = ''):
    super().__init__(why)
    self.kernels = onednn.load()  # builds (g++, once per machine) and registers the extension

  def check_devices(self) -> None:
    """Raises UserError unless JAX runs on exactly one CPU device (custom calls are not partitioned)."""
    import jax  # noqa: PLC0415 - starts JAX's backend: only once the process is configured

    if jax.default_backend() != 'cpu' or jax.device_count() != 1:
      devices = f'{jax.device_count()} {jax.default_backend()} device(s)'
      raise UserError(f'kernels=cpu needs one CPU device, and JAX has {devices}; use kernels=stock (or auto)')

  @property
  def layers(self):
    return layers.LAYERS

  def scale_by_adam(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    return onednn.scale_by_adam(b1, b2, eps)

  def compile_options(self, program: str) -> dict[str, Any] | None:
    return process.compile_options(program)

  def configure_process(self, program: str | None) -> dict[str, Any]:
    """`process.configure(program)`, recorded (see there)."""
    self.process.update(process.configure(program))
    return self.process

  def describe(self) -> str:
    return f'cpu ({self.kernels}; fused Adam)' + (f'; {self.why}' if self.why else '')
