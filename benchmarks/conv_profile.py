"""Per-layer profile of the ResNet-18 (CIFAR stem) training step: JAX against PyTorch.

For every distinct convolution of the network (input size, channels, kernel,
stride) it times the forward pass, the input gradient and the weight gradient in
JAX and in PyTorch eager (channels_last and contiguous, the faster reported);
multiplied by how often each layer occurs, this says how much of a full step the
convolutions take and which side is faster where. The JAX convolutions are the
ones the ResNet uses (`--convolution`, resolved as the trainers do: cxrjax's
oneDNN custom call on one CPU device, else XLA's, with the custom-VJP strided
convolution for stride 2; an XLA run adds a table of what XLA's autodiff alone
gives for those). PyTorch's gradients are `aten::convolution_backward` asked for
one output each. `--statistic min` (the fastest repetition) resists a noisy
host's bursts better than the median.

  python -m cxrjax.bench.conv_profile --image-size 28 --batch 128 --width 64
  python -m cxrjax.bench.conv_profile --convolution onednn --statistic min --reps 15 --no-step

Then it times the whole training step of both (as `python -m cxrjax.bench` does,
interleaved; PyTorch channels_last with the same threads) and prints what is left
outside the convolutions: step time minus the summed convolution times.
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

from cxrjax import _xla_env
from cxrjax.models import strided_conv
from cxrjax.ops import onednn


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


def jax_conv_times(
  batch, h, cin, cout, k, stride, reps, autodiff: bool = False, impl: str = 'xla', statistic: str = 'median'
) -> dict[str, float]:
  """ms of forward, input gradient and weight gradient.

  Args:
    impl: 'xla' (XLA's convolutions; stride 2 through `strided_conv`, as the ResNet) or 'onednn'
      (`cxrjax.ops.onednn.conv` for every layer, as the ResNet on one CPU device).
    autodiff: with 'xla', XLA's own gradients for stride 2 too.
    statistic: 'median' or 'min' of the `reps` timings.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
  pad = [((k - 1) // 2, k // 2)] * 2  # as cxrjax's ResNet and PyTorch's padding=k // 2 (odd k)

  def conv(x, w):
    if impl == 'onednn':
      return onednn.conv(x, w, (stride, stride), pad)
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
  batch: int, size: int, width: int, reps: int, torch_threads: int, impl: str = 'xla', statistic: str = 'median'
) -> tuple[float, float]:
  """ms per ResNet-18 training step: (JAX, PyTorch eager channels_last), interleaved repetitions.

  `impl` is the JAX convolutions' ('xla' or 'onednn'), as in the per-layer tables the step is compared with.
  """
  from cxrjax.bench import harness  # noqa: PLC0415 - imports the trainers

  case = harness.classifier_case(f'resnet18_{size}', dict(batch=batch, image_size=size, width=width), impl)
  jax_runner = case.make_jax()
  torch_runner = harness.torch_runner(case.torch_build, harness.TorchSetting('channels_last', torch_threads))
  times = {'jax': [], 'torch': []}
  runners = [('jax', jax_runner), ('torch', torch_runner)]
  for rep in range(reps):
    for name, runner in runners[rep % 2 :] + runners[: rep % 2]:  # alternate which side runs first
      t = time.perf_counter()
      runner.run(2)
      times[name].append((time.perf_counter() - t) / 2)
  stat = STATISTICS[statistic]
  return 1e3 * stat(times['jax']), 1e3 * stat(times['torch'])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--image-size', type=int, default=28)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--torch-threads', type=int, default=2)
  p.add_argument('--no-step', action='store_true', help='skip timing the whole training step')
  p.add_argument('--convolution', choices=onednn.CHOICES, default='auto',
                 help="JAX's convolutions, resolved as the trainers do ('auto': oneDNN on one CPU device)")  # fmt: skip
  p.add_argument('--statistic', choices=tuple(STATISTICS), default='median', help='of the repetitions')
  args = p.parse_args()
  impl, impl_note = onednn.resolve(args.convolution)
  import torch  # noqa: PLC0415 - the bench extra

  torch.set_num_threads(args.torch_threads)
  rows, autodiff_rows, totals = [], [], Counter()
  for (h, cin, cout, k, stride), n in sorted(resnet18_convs(args.image_size, args.width).items()):
    j = jax_conv_times(args.batch, h, cin, cout, k, stride, args.reps, impl=impl, statistic=args.statistic)
    t_cl = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, True, args.statistic)
    t_cf = torch_conv_times(torch, args.batch, h, cin, cout, k, stride, args.reps, False, args.statistic)
    t = {key: min(t_cl[key], t_cf[key]) for key in j}
    rows.append(((h, cin, cout, k, stride), n, j, t))
    if stride == 2 and impl == 'xla':  # what autodiff alone gives, for comparison (not in the sums)
      plain = jax_conv_times(args.batch, h, cin, cout, k, stride, args.reps, True, statistic=args.statistic)
      autodiff_rows.append(((h, cin, cout, k, stride), n, plain))
    for key in j:
      totals[f'jax_{key}'] += n * j[key]
      totals[f'torch_{key}'] += n * t[key]
  print(f'ResNet-18 CIFAR stem, {args.image_size}px, width {args.width}, batch {args.batch}; {args.statistic} ms'
        f' per call of {args.reps}; JAX: {impl_note}; PyTorch {torch.__version__}'
        f' ({torch_onednn_version(torch)}):'
        f' the faster of channels_last/contiguous, {args.torch_threads} threads')  # fmt: skip
  print('| conv (H, Cin->Cout, k, stride) | count | JAX fwd | PT fwd | JAX dgrad | PT dgrad | JAX wgrad | PT wgrad |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for (h, cin, cout, k, stride), n, j, t in rows:
    print(f'| {h}, {cin}->{cout}, {k}x{k}, s{stride} | {n} | {j["fwd"]:.1f} | {t["fwd"]:.1f} | {j["dgrad"]:.1f} |'
          f' {t["dgrad"]:.1f} | {j["wgrad"]:.1f} | {t["wgrad"]:.1f} |')  # fmt: skip
  print(f'| **sum x count** | | {totals["jax_fwd"]:.0f} | {totals["torch_fwd"]:.0f} | {totals["jax_dgrad"]:.0f} |'
        f' {totals["torch_dgrad"]:.0f} | {totals["jax_wgrad"]:.0f} | {totals["torch_wgrad"]:.0f} |')  # fmt: skip
  if autodiff_rows:
    print('\nStride-2 layers with JAX autodiff alone (nn.Conv; cxrjax uses strided_conv.StridedConv):')
    print('| conv | JAX fwd | JAX dgrad | JAX wgrad |')
    print('|---|---:|---:|---:|')
    for (h, cin, cout, k, stride), _, j in autodiff_rows:
      print(f'| {h}, {cin}->{cout}, {k}x{k}, s{stride} | {j["fwd"]:.1f} | {j["dgrad"]:.1f} | {j["wgrad"]:.1f} |')

  if args.no_step:
    return
  step_jax, step_torch = whole_step_ms(
    args.batch, args.image_size, args.width, args.reps, args.torch_threads, impl, args.statistic
  )
  conv_jax = totals['jax_fwd'] + totals['jax_dgrad'] + totals['jax_wgrad']
  conv_torch = totals['torch_fwd'] + totals['torch_dgrad'] + totals['torch_wgrad']
  print('\n| ms per training step | JAX | PyTorch (channels_last) |')
  print('|---|---:|---:|')
  print(f'| whole step (measured) | {step_jax:.0f} | {step_torch:.0f} |')
  print(f'| convolutions (sum above) | {conv_jax:.0f} | {conv_torch:.0f} |')
  print(f'| everything else (difference) | {step_jax - conv_jax:.0f} | {step_torch - conv_torch:.0f} |')


if __name__ == '__main__':
  # As `python -m cxrjax.bench`: the whole-step timing runs with the block cache the commands use.
  _xla_env.reexec_with_block_cache()
  main()
