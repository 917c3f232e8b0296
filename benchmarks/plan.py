"""Which variants of a case the benchmark runs, from the platforms JAX and PyTorch run on.

`plan_variants` is pure (no JAX, no PyTorch, no device is probed): the worker asks
JAX for its platform and the PyTorch process for its device, then plans.

- CPU (JAX on 'cpu', PyTorch on 'cpu'): JAX in float32; PyTorch eager in the
  contiguous (NCHW) and channels_last memory formats, each with every thread count
  of `--torch-threads`; torch.compile for training cases. A CPU with native
  bfloat16 arithmetic (`cpu_bf16`: AVX512-BF16 or AMX) adds JAX in bfloat16 and
  PyTorch eager under `torch.autocast('cpu', dtype=torch.bfloat16)`.
- GPU (JAX on 'gpu', PyTorch on 'cuda'): JAX in float32 and in bfloat16 (the
  trainer's program built with `config.model.dtype='bfloat16'`, which the
  classifiers, the DCGAN and the latent UNet all read); PyTorch eager in both memory
  formats, the same under `torch.autocast('cuda', dtype=torch.bfloat16)` (AMP), and
  torch.compile for training cases. No thread counts: the device does the work.

The GPU plan is tested as a plan only: it has not run on a GPU (none was available
where the benchmark was written).
"""

from __future__ import annotations

import dataclasses

FORMATS = ('contiguous', 'channels_last')
# 2 = the cores of the machine the defaults were chosen on; 1 because OpenMP's barriers stall when
# another process holds a core (BUILD_NOTES.md).
TORCH_THREADS = (2, 1)
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of running a case's step: the framework and its settings.

  Attributes:
    framework: 'jax' or 'torch'.
    dtype: JAX: `config.model.dtype` of the program. PyTorch: 'float32', or 'bfloat16' for float32
      weights with the forward pass under `torch.autocast(device, dtype=torch.bfloat16)` (AMP).
    memory_format: PyTorch: 'contiguous' or 'channels_last'; None for a torch.compile variant not yet
      resolved (it takes the format and threads of the fastest eager float32 variant in warm-up).
    threads: PyTorch on CPU: `torch.set_num_threads`; None on CUDA.
    compiled: PyTorch: `torch.compile` of the model (default mode).
    device: PyTorch: 'cpu' or 'cuda'.
  """

  framework: str
  dtype: str = 'float32'
  memory_format: str | None = None
  threads: int | None = None
  compiled: bool = False
  device: str = 'cpu'

  @property
  def name(self) -> str:
    """'jax', 'jax bfloat16', 'contiguous, 2 threads', 'channels_last, cuda, amp bf16', 'torch.compile ...'."""
    if self.framework == 'jax':
      return 'jax' if self.dtype == 'float32' else f'jax {self.dtype}'
    if self.memory_format is None:
      return 'torch.compile (fastest eager setting)'
    parts = [self.memory_format]
    if self.threads is not None:
      parts.append(f'{self.threads} thread' + ('' if self.threads == 1 else 's'))
    if self.device != 'cpu':
      parts.append(self.device)
    if self.dtype == 'bfloat16':
      parts.append('amp bf16')
    return ('torch.compile ' if self.compiled else '') + ', '.join(parts)

  @property
  def eager(self) -> bool:
    return self.framework == 'torch' and not self.compiled

  def like(self, other: Variant) -> Variant:
    """This torch.compile variant with the memory format and threads of `other` (an eager variant)."""
    return dataclasses.replace(self, memory_format=other.memory_format, threads=other.threads)


def has_bf16(platform: str, cpu_bf16: bool) -> bool:
  """Whether bfloat16 variants are planned on `platform` (a JAX platform or a PyTorch device type)."""
  return platform != 'cpu' or cpu_bf16


def plan_variants(
  jax_platform: str,
  torch_device: str | None,
  *,
  kind: str = 'train',
  torch_threads: tuple[int, ...] = TORCH_THREADS,
  compile_torch: bool = True,
  cpu_bf16: bool = False,
  dtypes: tuple[str, ...] = DTYPES,
) -> list[Variant]:
  """The variants of one case, in the order they are built (see the module docstring).

  Args:
    jax_platform: `jax.devices()[0].platform` in the worker ('cpu', 'gpu', 'tpu').
    torch_device: the PyTorch process's device type ('cpu', 'cuda'), or None without PyTorch.
    kind: the case's kind; torch.compile is planned for 'train' cases only.
    torch_threads: PyTorch thread counts to try on CPU.
    compile_torch: plan torch.compile (off for `--quick` and `--no-torch-compile`).
    cpu_bf16: the CPU computes in bfloat16 natively.
    dtypes: the formats asked for (`--dtypes`); a bfloat16 variant needs both this and the platform.
      With float32 alone, no bfloat16 program shares the worker's process (and its heap) with the
      float32 one, which a before/after comparison of float32 rows wants.

  Returns:
    JAX variants first, then PyTorch's eager variants (float32 before bfloat16; per thread count, both
    memory formats), then the torch.compile variant, unresolved (`Variant.like` resolves it).
  """

  def planned(dtype: str, platform: str) -> bool:
    return dtype in dtypes and (dtype == 'float32' or has_bf16(platform, cpu_bf16))

  variants = [Variant('jax', dtype) for dtype in DTYPES if planned(dtype, jax_platform)]
  if torch_device is None:
    return variants
  threads = tuple(torch_threads) if torch_device == 'cpu' else (None,)
  for dtype in DTYPES:
    if planned(dtype, torch_device):
      variants += [Variant('torch', dtype, fmt, t, device=torch_device) for t in threads for fmt in FORMATS]
  if compile_torch and kind == 'train':
    variants.append(Variant('torch', compiled=True, device=torch_device))
  return variants
