"""The CPU backend: oneDNN convolutions and BatchNorm, a fused Adam, and the process settings they want.

Everything CPU-specific in cxrjax lives in this package and nowhere else: the
oneDNN custom calls and their C++ source (`onednn.py`, `onednn_conv.cc`), layers
built on them and on CPU-friendly XLA formulations (`layers.py`,
`strided_conv.py`, `subpixel_conv.py`), and the process settings (`process.py`:
XLA CPU flags, glibc malloc, XLA's pool size, the block cache and its restart).
Deleting this package costs CPU speed only: `cxrjax.backends.select` then picks
the stock backend.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from typing import Any

from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import layers, onednn, process

# Programs whose steps ran faster without YNN's elementwise fusion: many small
# elementwise ops (SiLU, squeeze-excitation, GroupNorm, LeakyReLU, embeddings), which
# XLA's own loop fusions run better. ResNet-18's step keeps it (a few large ReLU /
# residual maps around oneDNN's kernels). Measurements: BUILD_NOTES.md.
_WITHOUT_ELEMENTWISE_FUSION = frozenset({'efficientnet_v2_b0', 'efficientnet_v2_s', 'dcgan', 'unet'})

# Experiments whose steps are nearly all oneDNN calls, which ran faster with one XLA pool thread;
# the UNet's and EfficientNetV2-S's steps, with more XLA work of their own, ran slower.
_ONE_POOL_THREAD = frozenset({'dcgan', 'efficientnet_v2_b0', 'resnet18'})


def unavailable_reason() -> str | None:
  """Why the CPU backend cannot be had here (no oneDNN wheel, no C++ compiler), or None; starts nothing."""
  if not os.environ.get('CXRJAX_ONEDNN_LIB'):
    try:
      importlib.metadata.distribution('onednn-cpu-gomp')
    except importlib.metadata.PackageNotFoundError:
      return 'the onednn-cpu-gomp wheel is not installed (pip install cxrjax[onednn])'
  if shutil.which(os.environ.get('CXX', 'g++')) is None:
    return f'no C++ compiler ({os.environ.get("CXX", "g++")}) to build the oneDNN extension'
  return None


class CpuBackend(Backend):
  """oneDNN kernels and CPU process settings, for runs on one CPU device (see the package docstring)."""

  name = 'cpu'

  def __init__(self, why: str = ''):
    super().__init__(why)
    self.kernels = onednn.load()  # builds (g++, once per machine) and registers the extension

  @property
  def layers(self):
    return layers.LAYERS

  def scale_by_adam(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    return onednn.scale_by_adam(b1, b2, eps)

  def compile_options(self, program: str) -> dict[str, Any] | None:
    if process.keep_xla_flags():
      return None  # the user's XLA flags rule
    if program == 'init':
      return dict(process.INIT_OPTIONS)
    return dict(process.NO_ELEMENTWISE_YNN) if program in _WITHOUT_ELEMENTWISE_FUSION else None

  def configure_process(self, program: str | None) -> dict[str, Any]:
    """Restarts with the block cache once, then sets XLA's CPU flags, malloc and (per program) the pool size."""
    no_cache = process.reexec_with_block_cache()  # returns only when no restart was needed or possible
    self.process['xla_flags'] = process.set_xla_flags()
    self.process['malloc'] = process.configure_malloc() + (f'; {no_cache}' if no_cache else '')
    if program in _ONE_POOL_THREAD:
      self.process['xla_cpu_pool'] = process.use_one_pool_thread()
    return self.process

  def describe(self) -> str:
    return f'cpu ({self.kernels}; fused Adam)' + (f'; {self.why}' if self.why else '')
