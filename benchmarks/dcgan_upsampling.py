r"""Training-step throughput of the DCGAN per upsampling and kernels, and PyTorch's.

  python -m benchmarks.dcgan_upsampling [--sizes=64,28] [--batch=128] [--reps=5]
      [--upsample=transpose,resize] [--kernels=stock,cpu] [--no-torch]

JAX: the GAN trainer's program (`gan.program`: D then G in one step,
non-saturating loss, Adam(2e-4, b1=0.5), EMA of G) for each generator upsampling
(`config.gan.upsample`: 'transpose', 4x4 stride-2 transposed convolutions, or
'resize', nearest 2x then a 3x3 convolution) and each backend (`--kernels`:
'stock', Flax layers and optax's Adam; 'cpu', the CPU backend's oneDNN layers and
fused Adam). Both backends run in this one process, configured by the CPU backend
when it is among `--kernels` (XLA's CPU flags, malloc, the block cache): the
comparison isolates the layers, the Adam update and the per-program compile
options. PyTorch: the twin networks in the same step (the benchmark's dcgan case),
eager, NCHW and channels_last, with all threads and with one (OpenMP stalls at
every barrier when another process holds a core), the fastest marked. Real images
are a fixed random batch (no input pipeline is timed). Channels 1, ngf = ndf = 64
by default.

Compile time is the step's `lower(...).compile()`; two warm-up steps follow and
are not timed; then `--reps` interleaved repetitions of enough steps to last
about `--rep_seconds` each; images/s is batch / median step time. On a shared
machine the numbers move with the load: the load average is printed before and
after, and repeating the run is the way to tell noise from differences.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax

from benchmarks import cases, timing, torch_process
from benchmarks.plan import FORMATS, Variant
from cxrjax import backends, entry
from cxrjax.errors import UserError
from cxrjax.models.dcgan import UPSAMPLE_MODES


def _row(size: int, name: str, batch: int, runner: timing.Runner) -> None:
  if runner.error or not runner.per_step:
    print(f'{size:4d}  {name:44s} {runner.error or "not timed"}', flush=True)
    return
  per_step = runner.per_step
  med = statistics.median(per_step)
  lo, hi = batch / max(per_step), batch / min(per_step)
  comp = f'{runner.compile_s:9.1f}' if runner.compile_s is not None else f'{"-":>9}'
  print(f'{size:4d}  {name:44s} {batch / med:9.1f}  [{lo:6.1f}-{hi:6.1f}]  {med * 1e3:9.1f}  {comp}', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='64,28')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--channels', type=int, default=1)
  parser.add_argument('--width', type=int, default=64, help='ngf = ndf')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--rep_seconds', type=float, default=3.0)
  parser.add_argument('--upsample', default=','.join(UPSAMPLE_MODES), help='config.gan.upsample values')
  parser.add_argument('--kernels', default='stock,cpu', help='backends: stock, cpu')
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  args = parser.parse_args(argv)
  upsample, kernels = args.upsample.split(','), args.kernels.split(',')
  for u in upsample:
    if u not in UPSAMPLE_MODES:
      parser.error(f'unknown upsample {u!r}; choose from {", ".join(UPSAMPLE_MODES)}')
  for k in kernels:
    if k not in ('stock', 'cpu'):
      parser.error(f'unknown kernels {k!r}; choose from stock, cpu')
  try:  # the CPU backend's process settings before JAX starts (it may restart this process once)
    chosen = {k: entry.configure(k, 'dcgan') if k == 'cpu' else backends.select(k) for k in kernels}
  except UserError as e:
    parser.error(str(e))
  with_torch = args.torch and torch_process.torch_installed()
  if with_torch:
    import torch  # noqa: PLC0415 - the bench extra, after the process is configured

    threads = sorted({torch.get_num_threads(), 1}, reverse=True)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average {os.getloadavg()[0]:.1f}')  # fmt: skip
  print(f'batch {args.batch}, channels {args.channels}, ngf=ndf={args.width}, {args.reps} timed repetitions (median)')
  print(f'{"px":>4}  {"variant":44s} {"images/s":>9}  {"[min-max]":>15}  {"ms/step":>9}  {"compile s":>9}')
  for size in (int(s) for s in args.sizes.split(',')):
    s = dict(batch=args.batch, image_size=size, width=args.width, channels=args.channels, sample_batch=1)
    named = []
    for u in upsample:
      for k in kernels:
        (case, _) = cases.dcgan_cases(s, chosen[k], upsample=u)
        named.append((f'jax {u}, {k}', case.jax_runner(Variant('jax'))))
      if with_torch:
        case = cases.dcgan_cases(s, chosen[kernels[0]], upsample=u)[0]  # the PyTorch twin's layers are its own
        for t in threads:
          for fmt in FORMATS:
            variant = Variant('torch', memory_format=fmt, threads=t)
            named.append((f'torch {u}, {variant.name}', torch_process.torch_runner(case.torch_build, variant)))
    runners = [r for _, r in named]
    steps = timing.steps_per_block(runners, None, args.rep_seconds)
    timing.interleave(runners, args.reps, steps, lambda msg: None, batch=args.batch)
    for u in upsample:
      torch_named = [(n, r) for n, r in named if n.startswith(f'torch {u},') and r.per_step]
      best = min(torch_named, key=lambda nr: statistics.median(nr[1].per_step))[0] if torch_named else None
      for name, runner in named:
        if name.startswith((f'jax {u},', f'torch {u},')):
          _row(size, name + (' *' if name == best else ''), args.batch, runner)
  if args.torch and not with_torch:
    print('PyTorch not installed: no reference row (pip install .[bench]).')
  elif with_torch:
    print(
      f'torch {torch.__version__} eager; * = fastest of memory format x threads per upsampling (OpenMP with all'
      ' threads stalls when the cores are shared)'
    )
  print(f'load average after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
