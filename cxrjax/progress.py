"""Progress lines with ETA, and TensorBoard event files without TensorFlow."""

from __future__ import annotations

import sys
import time

import jax


def fmt_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def log(message: str) -> None:
  """One line to stderr from the first process (all processes log to their own files)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class Progress:
  """Steps done, rate, ETA and live metrics as one line per report."""

  def __init__(self, name: str, total_steps: int, start_step: int = 0):
    self.name = name
    self.total = total_steps
    self.start_step = start_step
    self.t0 = time.time()

  def line(self, step: int, **metrics) -> str:
    done = step - self.start_step
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    parts = [f'[{self.name}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)']
    for k, v in metrics.items():
      parts.append(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}')
    parts.append(f'ETA {fmt_duration(eta) if eta == eta else "?"}')
    return ' | '.join(parts)

  def report(self, step: int, **metrics) -> None:
    log(self.line(step, **metrics))


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without PyTorch.

  tensorboardX imports PyTorch at import time, if it is installed, only to accept torch
  tensors as values; cxrjax logs Python floats. With PyTorch installed (the `bench`
  extra, or a researcher's environment) that import would slow every run's start. A
  `None` entry in `sys.modules` makes its `import torch` fail as if PyTorch were absent;
  the entry is removed afterwards, so a later `import torch` works as usual.
  """
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - import only where used
  finally:
    if blocked:
      del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX, no TensorFlow), process 0 only."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = _summary_writer_class()(logdir, flush_secs=30)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for k, v in values.items():
      if v is not None and v == v:  # skip NaN
        self._writer.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
