"""Per-layer profile of the ResNet-18 (CIFAR stem) training step: JAX against PyTorch.

For every distinct convolution of the network (input size, channels, kernel,
stride) it times the forward pass, the input gradient and the weight gradient in
JAX and in PyTorch eager (channels_last and contiguous, the faster reported);
multiplied by how often each layer occurs, this says how much of a full step the
convolutions take and which side is faster where. The JAX convolutions are the
ResNet's own: its backend's `layers.conv` (`--kernels`, selected as
`config.kernels` is: the CPU backend's oneDNN convolutions on one CPU device, or
stock XLA convolutions and their autodiff). PyTorch's gradients are
`aten::convolution_backward` asked for one output each. `--statistic min` (the
fastest repetition) resists a noisy host's bursts better than the median.

  python -m benchmarks.conv_profile --image-size 28 --batch 128 --width 64
  python -m benchmarks.conv_profile --kernels cpu --statistic min --reps 15 --no-step

Then it times the whole training step of both (the benchmark's resnet18 case:
the classifier trainer's program, and PyTorch channels_last with the same
threads, interleaved, in this one process) and prints what is left outside the
convolutions: step time minus the summed convolution times.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases, timing, torch_process
from benchmarks.plan import Variant
from cxrjax import entry
from cxrjax.config_lib import KERNELS
from cxrjax.errors import UserError
from cxrjax.models.layers import Layers


def resnet18_convs(size: int, width: int) -> Counter:
  """(H_in, C_in, C_out, kernel, stride) -> count, for ResNet-18 with the CIFAR stem."""
  convs = Counter({(size, 1, width, 3, 1): 1})
  h, c = size, width
  for stage, mult in enumerate((1, 2, 4, 8)):
    out = width * mult
    stride = 1 if stage == 0 else 2
    convs[(h, c, out, 3, stride)] += 1
    if stride != 1 or c != out:
      convs[(h, c, out, 1, stride)] += 1
    h = -(-h // stride)
    convs[(h, out, out, 3, 1)] += 3
    c = out
  return convs


STATISTICS = {'median': statistics.median, 'min': min}


def _time_ms(fn, reps: int, statistic: str = 'median') -> float:
  fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * STATISTICS[statistic](ts)


def jax_conv_times(batch, h, cin, cout, k, stride, reps, layers: Layers, statistic: str = 'median') -> dict[str, float]:
  """ms of forward, input gradient and weight gradient of one bias-free `layers.conv`, as the ResNet builds it.

  Args:
    layers: the backend's layers (`backend.layers`).
    statistic: 'median' or 'min' of the `reps` timings.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
  layer = layers.conv(cout, (k, k), (stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False)

  def conv(x, w):
    return layer.apply({'params': {'kernel': w}}, x)

  y = conv(x, w)
  dy = jnp.ones_like(y)
  fwd = jax.jit(conv)
  dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return dict(
    fwd=_time_ms(lambda: fwd(x, w).block_until_ready(), reps, statistic),
    dgrad=_time_ms(lambda: dgrad(x, w, dy).block_until_ready(), reps, statistic) if cin > 1 else 0.0,
    wgrad=_time_ms(lambda: wgrad(x, w, dy).block_until_ready(), reps, statistic),
  )


def torch_onednn_version(torch) -> str:
  """The oneDNN release bundled into this PyTorch build, e.g. 'oneDNN v3.12.0' (from its build summary)."""
  m = re.search(r'MKL-DNN (v[0-9.]+)', torch.__config__.show())
  return f'oneDNN {m.group(1)}' if m else 'oneDNN version unknown'


def torch_conv_times(
  torch, batch, h, cin, cout, k, stride, reps, channels_last, statistic: str = 'median'
) -> dict[str, float]:
  """ms of PyTorch eager's forward, input gradient and weight gradient (each gradient alone)."""
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(batch, cin, h, h).to(memory_format=fmt)
  conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False).to(memory_format=fmt)
  with torch.no_grad():
    dy = torch.ones_like(conv(x))
  w = conv.weight.detach()

  def fwd():
    with torch.no_grad():
      conv(x)

  return dict(
    fwd=_time_ms(fwd, reps, statistic),
    dgrad=_time_ms(lambda: torch_conv_backward(torch, dy, x, w, stride, 'input'), reps, statistic) if cin > 1 else 0.0,
    wgrad=_time_ms(lambda: torch_conv_backward(torch, dy, x, w, stride, 'weight'), reps, statistic),
  )


def torch_conv_backward(torch, dy, x, w, stride: int, wrt: str):
  """One gradient of a bias-free convolution with padding k // 2: the op autograd calls, asked for that one only."""
  k = w.shape[-1]
  mask = [wrt == 'input', wrt == 'weight', False]
  grads = torch.ops.aten.convolution_backward(
    dy, x, w, None, [stride] * 2, [k // 2] * 2, [1, 1], False, [0, 0], 1, mask
  )
  return grads[0] if wrt == 'input' else grads[1]


def whole_step_ms(
  batch: int, size: int, width: int, reps: int, torch_threads: int, backend, statistic: str = 'median'
) -> tuple[float, float]:
  """ms per ResNet-18 training step: (JAX on `backend`, PyTorch eager channels_last), interleaved repetitions."""
  case = cases.classifier_case(f'resnet18_{size}', dict(batch=batch, image_size=size, width=width), backend)
  runners = [
    case.jax_runner(Variant('jax')),
    torch_process.torch_runner(
      case.torch_build, Variant('torch', memory_format='channels_last', threads=torch_threads)
    ),
  ]
  timing.interleave(runners, reps, 2, lambda msg: None)
  stat = STATISTICS[statistic]
  return 1e3 * stat(runners[0].per_step), 1e3 * stat(runners[1].per_step)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--image-size', type=int, default=28)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--no-step', action='store_true', help='skip timing the whole training step')
  p.add_argument('--kernels', choices=KERNELS, default='auto',
                 help="JAX's backend, selected as config.kernels is ('auto': the CPU backend on one CPU device)")  # fmt: skip
  p.add_argument('--statistic', choices=tuple(STATISTICS), default='median', help='of the repetitions')
  args = p.parse_args()
  try:  # before JAX starts, as a ResNet-18 run's (may restart this process once)
    backend = entry.configure(args.kernels, 'resnet18')
  except UserError as e:
    p.error(str(e))
  import torch  # noqa: PLC0415 - the bench extra, after the process is configured

  torch.set_num_threads(args.torch_threads)
  rows, totals = [], Counter()
  for (h, cin, cout, k, stride), n in sorted(resnet18_convs(args.image_size, args.width).items()):
    j = jax_conv_times(args.batch, h, cin, cout, k, stride, args.reps, backend.layers, args.statistic)
    t_cl = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, True, args.statistic)
    t_cf = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, False, args.statistic)
    t = {key: min(t_cl[key], t_cf[key]) for key in j}
    rows.append(((h, cin, cout, k, stride), n, j, t))
    for key in j:
      totals[f'jax_{key}'] += n * j[key]
      totals[f'torch_{key}'] += n * t[key]
  print(f'ResNet-18 CIFAR stem, {args.image_size}px, width {args.width}, batch {args.batch}; {args.statistic} ms'
        f' per call of {args.reps}; JAX: {backend.describe()}; PyTorch {torch.__version__}'
        f' ({torch_onednn_version(torch)}):'
        f' the faster of channels_last/contiguous, {args.torch_threads} threads')  # fmt: skip
  print('| conv (H, Cin->Cout, k, stride) | count | JAX fwd | PT fwd | JAX dgrad | PT dgrad | JAX wgrad | PT wgrad |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for (h, cin, cout, k, stride), n, j, t in rows:
    print(f'| {h}, {cin}->{cout}, {k}x{k}, s{stride} | {n} | {j["fwd"]:.1f} | {t["fwd"]:.1f} | {j["dgrad"]:.1f} |'
          f' {t["dgrad"]:.1f} | {j["wgrad"]:.1f} | {t["wgrad"]:.1f} |')  # fmt: skip
  print(f'| **sum x count** | | {totals["jax_fwd"]:.0f} | {totals["torch_fwd"]:.0f} | {totals["jax_dgrad"]:.0f} |'
        f' {totals["torch_dgrad"]:.0f} | {totals["jax_wgrad"]:.0f} | {totals["torch_wgrad"]:.0f} |')  # fmt: skip

  if args.no_step:
    return
  step_jax, step_torch = whole_step_ms(
    args.batch, args.image_size, args.width, args.reps, args.torch_threads, backend, args.statistic
  )
  conv_jax = totals['jax_fwd'] + totals['jax_dgrad'] + totals['jax_wgrad']
  conv_torch = totals['torch_fwd'] + totals['torch_dgrad'] + totals['torch_wgrad']
  print('\n| ms per training step | JAX | PyTorch (channels_last) |')
  print('|---|---:|---:|')
  print(f'| whole step (measured) | {step_jax:.0f} | {step_torch:.0f} |')
  print(f'| convolutions (sum above) | {conv_jax:.0f} | {conv_torch:.0f} |')
  print(f'| everything else (difference) | {step_jax - conv_jax:.0f} | {step_torch - conv_torch:.0f} |')


if __name__ == '__main__':
  main()
