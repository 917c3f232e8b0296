"""Per-layer profile of the ResNet-18 (CIFAR stem) training step: JAX against PyTorch.

For every distinct convolution of the network (input size, channels, kernel,
stride) it times the forward pass, the input gradient and the weight gradient in
JAX (XLA CPU, cxrjax's flags) and in PyTorch eager (channels_last and contiguous,
the faster reported); multiplied by how often each layer occurs, this says how
much of a full step the convolutions take and which side is faster where.
Stride-2 layers use cxrjax's custom-VJP convolution, as the ResNet does; a second
table shows what XLA's autodiff alone gives for them.

  python -m cxrjax.bench.conv_profile --image-size 28 --batch 128 --width 64

Then it times the whole training step of both (as `python -m cxrjax.bench` does,
interleaved; PyTorch channels_last with the same threads) and prints what is left
outside the convolutions: step time minus the summed convolution times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models import strided_conv


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


def _median_ms(fn, reps: int) -> float:
  fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * statistics.median(ts)


def jax_conv_times(batch, h, cin, cout, k, stride, reps, autodiff: bool = False) -> dict[str, float]:
  """Median ms of forward, input gradient and weight gradient; `autodiff`: XLA's own gradients for stride 2 too."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
  pad = [((k - 1) // 2, k // 2)] * 2  # as cxrjax's ResNet and PyTorch's padding=k // 2 (odd k)

  def conv(x, w):
    # As cxrjax's ResNet: the custom-VJP convolution (XLA's forward pass) for stride 2.
    if stride == 2 and not autodiff:
      return strided_conv.strided_conv(x, w)
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  y = conv(x, w)
  dy = jnp.ones_like(y)
  fwd = jax.jit(conv)
  dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return dict(
    fwd=_median_ms(lambda: fwd(x, w).block_until_ready(), reps),
    dgrad=_median_ms(lambda: dgrad(x, w, dy).block_until_ready(), reps) if cin > 1 else 0.0,
    wgrad=_median_ms(lambda: wgrad(x, w, dy).block_until_ready(), reps),
  )


def torch_conv_times(torch, batch, h, cin, cout, k, stride, reps, channels_last) -> dict[str, float]:
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.randn(batch, cin, h, h).to(memory_format=fmt).requires_grad_(cin > 1)
  conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False).to(memory_format=fmt)
  y = conv(x)
  dy = torch.ones_like(y)

  def fwd():
    with torch.no_grad():
      conv(x)

  def dgrad():
    torch.autograd.grad(conv(x), x, dy)

  def wgrad():
    torch.autograd.grad(conv(x), conv.weight, dy)

  f = _median_ms(fwd, reps)
  # Backward times include a forward; subtract it to isolate each gradient.
  return dict(
    fwd=f,
    dgrad=max(_median_ms(dgrad, reps) - f, 0.0) if cin > 1 else 0.0,
    wgrad=max(_median_ms(wgrad, reps) - f, 0.0),
  )


def whole_step_ms(batch: int, size: int, width: int, reps: int, torch_threads: int) -> tuple[float, float]:
  """Median ms per ResNet-18 training step: (JAX, PyTorch eager channels_last), interleaved repetitions."""
  from cxrjax.bench import harness  # noqa: PLC0415 - imports the trainers

  # XLA's convolutions, as in the per-layer tables this step is compared with (oneDNN's: `python -m cxrjax.bench`).
  case = harness.classifier_case(f'resnet18_{size}', dict(batch=batch, image_size=size, width=width), 'xla')
  jax_runner = case.make_jax()
  torch_runner = harness.torch_runner(case.torch_build, harness.TorchSetting('channels_last', torch_threads))
  times = {'jax': [], 'torch': []}
  runners = [('jax', jax_runner), ('torch', torch_runner)]
  for rep in range(reps):
    for name, runner in runners[rep % 2 :] + runners[: rep % 2]:  # alternate which side runs first
      t = time.perf_counter()
      runner.run(2)
      times[name].append((time.perf_counter() - t) / 2)
  return 1e3 * statistics.median(times['jax']), 1e3 * statistics.median(times['torch'])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--image-size', type=int, default=28)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--no-step', action='store_true', help='skip timing the whole training step')
  args = p.parse_args()
  import torch  # noqa: PLC0415 - the bench extra

  torch.set_num_threads(args.torch_threads)
  rows, autodiff_rows, totals = [], [], Counter()
  for (h, cin, cout, k, stride), n in sorted(resnet18_convs(args.image_size, args.width).items()):
    j = jax_conv_times(args.batch, h, cin, cout, k, stride, args.reps)
    t_cl = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, True)
    t_cf = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, False)
    t = {key: min(t_cl[key], t_cf[key]) for key in j}
    rows.append(((h, cin, cout, k, stride), n, j, t))
    if stride == 2:  # what autodiff alone gives, for comparison (not in the sums)
      plain = jax_conv_times(args.batch, h, cin, cout, k, stride, args.reps, autodiff=True)
      autodiff_rows.append(((h, cin, cout, k, stride), n, plain))
    for key in j:
      totals[f'jax_{key}'] += n * j[key]
      totals[f'torch_{key}'] += n * t[key]
  print(f'ResNet-18 CIFAR stem, {args.image_size}px, width {args.width}, batch {args.batch}; ms per call'
        f' (PyTorch: the faster of channels_last/contiguous, {args.torch_threads} threads)')  # fmt: skip
  print('| conv (H, Cin->Cout, k, stride) | count | JAX fwd | PT fwd | JAX dgrad | PT dgrad | JAX wgrad | PT wgrad |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for (h, cin, cout, k, stride), n, j, t in rows:
    print(f'| {h}, {cin}->{cout}, {k}x{k}, s{stride} | {n} | {j["fwd"]:.1f} | {t["fwd"]:.1f} | {j["dgrad"]:.1f} |'
          f' {t["dgrad"]:.1f} | {j["wgrad"]:.1f} | {t["wgrad"]:.1f} |')  # fmt: skip
  print(f'| **sum x count** | | {totals["jax_fwd"]:.0f} | {totals["torch_fwd"]:.0f} | {totals["jax_dgrad"]:.0f} |'
        f' {totals["torch_dgrad"]:.0f} | {totals["jax_wgrad"]:.0f} | {totals["torch_wgrad"]:.0f} |')  # fmt: skip
  print('\nStride-2 layers with JAX autodiff alone (nn.Conv; cxrjax uses strided_conv.StridedConv):')
  print('| conv | JAX fwd | JAX dgrad | JAX wgrad |')
  print('|---|---:|---:|---:|')
  for (h, cin, cout, k, stride), _, j in autodiff_rows:
    print(f'| {h}, {cin}->{cout}, {k}x{k}, s{stride} | {j["fwd"]:.1f} | {j["dgrad"]:.1f} | {j["wgrad"]:.1f} |')

  if args.no_step:
    return
  step_jax, step_torch = whole_step_ms(args.batch, args.image_size, args.width, args.reps, args.torch_threads)
  conv_jax = totals['jax_fwd'] + totals['jax_dgrad'] + totals['jax_wgrad']
  conv_torch = totals['torch_fwd'] + totals['torch_dgrad'] + totals['torch_wgrad']
  print('\n| ms per training step | JAX | PyTorch (channels_last) |')
  print('|---|---:|---:|')
  print(f'| whole step (measured) | {step_jax:.0f} | {step_torch:.0f} |')
  print(f'| convolutions (sum above) | {conv_jax:.0f} | {conv_torch:.0f} |')
  print(f'| everything else (difference) | {step_jax - conv_jax:.0f} | {step_torch - conv_torch:.0f} |')


if __name__ == '__main__':
  main()
