"""`Backend`: what a run takes from its platform, and its stock form (plain Flax, optax, XLA's defaults)."""

from __future__ import annotations

from typing import Any

import optax

from cxrjax.models.layers import STOCK, Layers


class Backend:
  """The one seam between cxrjax and platform kernels; this base class is the stock backend.

  A backend is chosen once, by the entry point (`cxrjax.backends.select`), and passed
  to the trainers. It gives:

  - `layers`: the layer constructors every model is built from (`cxrjax.models.layers`);
  - `scale_by_adam` / `adam`: Adam's update as an `optax.GradientTransformation` with
    optax's state tree, so it composes with any other optax transformation;
  - `compile_options(program)`: XLA options for one jitted program ('init' for
    parameter initialisation, else the name of the model whose step it is);
  - `configure_process(program)`: process settings that must precede JAX's start, for a
    process whose time goes mostly to `program` (None: several kinds of program);
  - `check_devices()`: once JAX has started, that its devices fit the backend;
  - `describe()` and `record()`: a line for the banner, a dict for `metrics.json`.

  Stock is plain Flax, optax and XLA's defaults: what GPU and TPU users run, and
  what any platform runs when no other backend applies.
  """

  name = 'stock'

  def __init__(self, why: str = ''):
    self.why = why  # why this backend was chosen (by `select`)
    self.process: dict[str, Any] = {}  # what `configure_process` did

  @property
  def layers(self) -> Layers:
    return STOCK

  def scale_by_adam(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1, b2, eps)

  def adam(self, learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.adam` (the same chain, so the same state tree) on this backend's `scale_by_adam`."""
    return optax.chain(self.scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))

  def compile_options(self, program: str) -> dict[str, Any] | None:
    """XLA options for one jitted program (`jax.jit(..., compiler_options=...)`); None keeps the defaults."""
    del program
    return None

  def configure_process(self, program: str | None) -> dict[str, Any]:
    """Settles what must be set before JAX starts (environment, allocator); stock sets nothing.

    Args:
      program: what the process will mostly run (`main_program(config)`), or None for a
        process that runs several kinds of program (a sweep).

    Returns:
      What was done (also kept in `self.process`, for the banner and `metrics.json`).
    """
    del program
    return self.process

  def check_devices(self) -> None:
    """Confirms, once JAX has started, that its devices fit this backend (stock fits any)."""

  def describe(self) -> str:
    """One line for the banner."""
    return f'{self.name} (Flax, optax, XLA defaults)' + (f'; {self.why}' if self.why else '')

  def record(self, programs=()) -> dict[str, Any]:
    """What `metrics.json` and benchmark rows keep of the backend, with the compile options of `programs`."""
    return dict(
      kernels=self.name,
      description=self.describe(),
      process=dict(self.process),
      compile_options={p: self.compile_options(p) for p in programs},
    )
