r"""Training-step throughput of the DCGAN with each way of upsampling, and PyTorch's.

  python -m cxrjax.bench.dcgan_upsampling [--sizes=64,28] [--batch=128] [--reps=5]
      [--variants=plain,transpose,resize,transpose_xla_d] [--no-torch]

One step is DCGAN's (the PyTorch tutorial's): one generator forward pass, a
discriminator update on a real and the (detached) fake batch, then a
generator update through the updated discriminator; non-saturating loss,
Adam(2e-4, b1=0.5) for both, BatchNorm in training mode. Real images are a
fixed random batch (no input pipeline is timed). Channels 1, ngf = ndf = 64
by default.

Variants (generator upsampling / discriminator downsampling):
  plain            nn.ConvTranspose / nn.Conv (stock Flax; XLA emits lhs-dilated convolutions)
  transpose        ConvTranspose2x / Conv2x (custom VJPs of cxrjax.models.upsample)
  resize           nearest 2x + 3x3 conv / Conv2x
  transpose_xla_d  ConvTranspose2x / nn.Conv (isolates the discriminator's share)

Compile time is `jit(step).lower(...).compile()`; a warm-up step follows and
is not timed; then `--reps` timed repetitions of enough steps to last about
`--rep_seconds` each; images/s is batch / median step time. PyTorch (eager,
same architecture and step, NCHW and channels_last, the fastest marked)
runs when torch is installed, with all threads and with one (OpenMP stalls at every
barrier when another process holds a core). On a shared machine the numbers move with the
load: the load average is printed before and after, and repeating the run is
the way to tell noise from differences.

Measured (2 shared x86 cores, another training run on and off; median
images/s of 5 runs of this script, each the median of 5 repetitions; the
range over runs in brackets):

  px  plain            transpose          resize            transpose_xla_d    torch (best: NHWC, 1 thread)
  64  8.2 [7.9-8.5]    51.7 [32.8-83.3]   39.0 [26.9-41.8]  47.7 [30.3-75.4]   69.8 [69.1-73.6]
  28  193 [173-331]    690 [567-1037]     513 [419-786]     701 [587-1141]     977 [943-1104]

Compile times (median): 3.5, 4.3, 3.2, 4.2 s at 64 px; 2.0, 2.1, 1.8, 2.0 s
at 28 px. PyTorch with both threads ranged from 18 to 1693 images/s with the
load (27 and 82 typical), far below its single-thread rate when a core is
busy, and above JAX when both cores were free (28 px: 1664-1693).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cxrjax  # noqa: F401 - sets XLA flags before JAX starts
from cxrjax.models import dcgan

try:  # PyTorch is the optional reference (`pip install .[bench]`); cxrjax itself never needs it.
  import torch
except ImportError:  # pragma: no cover - depends on the environment
  torch = None

VARIANTS = {
  'plain': ('transpose_xla', 'xla'),
  'transpose': ('transpose', 'fast'),
  'resize': ('resize', 'fast'),
  'transpose_xla_d': ('transpose', 'xla'),
}
LATENT = 100


def _timed_reps(run_steps, step_seconds: float, reps: int, rep_seconds: float) -> list[float]:
  """Seconds per step of `reps` repetitions of n steps, n chosen from a warm-up step time."""
  n = max(1, round(rep_seconds / max(step_seconds, 1e-6)))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    run_steps(n)
    out.append((time.perf_counter() - t) / n)
  return out


def jax_train_step(g: dcgan.Generator, d: dcgan.Discriminator, tx):
  """DCGAN step on state (g_params, g_stats, d_params, d_stats, g_opt, d_opt)."""

  def step(state, real, key):
    gp, gs, dp, ds, go, do = state
    z = jax.random.normal(key, (real.shape[0], LATENT))

    def g_forward(gp):
      fake, upd = g.apply({'params': gp, 'batch_stats': gs}, z, train=True, mutable=['batch_stats'])
      return fake, upd['batch_stats']

    # One generator forward pass serves both updates, as in PyTorch (`fake` is reused).
    fake, g_vjp, gs = jax.vjp(g_forward, gp, has_aux=True)

    def d_loss(dp, ds):
      lr, upd = d.apply({'params': dp, 'batch_stats': ds}, real, train=True, mutable=['batch_stats'])
      lf, upd = d.apply({'params': dp, 'batch_stats': upd['batch_stats']}, jax.lax.stop_gradient(fake), train=True,
                        mutable=['batch_stats'])  # fmt: skip
      return jnp.mean(jax.nn.softplus(-lr)) + jnp.mean(jax.nn.softplus(lf)), upd['batch_stats']

    (dl, ds), dgrad = jax.value_and_grad(d_loss, has_aux=True)(dp, ds)
    upd, do = tx.update(dgrad, do, dp)
    dp = optax.apply_updates(dp, upd)

    def g_loss(fake):
      lf, upd = d.apply({'params': dp, 'batch_stats': ds}, fake, train=True, mutable=['batch_stats'])
      return jnp.mean(jax.nn.softplus(-lf)), upd['batch_stats']

    (gl, ds), dfake = jax.value_and_grad(g_loss, has_aux=True)(fake)
    (ggrad,) = g_vjp(dfake)
    upd, go = tx.update(ggrad, go, gp)
    gp = optax.apply_updates(gp, upd)
    return (gp, gs, dp, ds, go, do), (dl, gl)

  return step


def bench_jax(variant: str, size: int, batch: int, channels: int, width: int, reps: int, rep_seconds: float):
  up, down = VARIANTS[variant]
  g = dcgan.Generator(size, channels, LATENT, width, upsample=up)
  d = dcgan.Discriminator(size, channels, width, downsample=down)
  tx = optax.adam(2e-4, b1=0.5)
  kg, kd, kx = jax.random.split(jax.random.key(0), 3)
  gv = g.init(kg, jnp.zeros((2, LATENT)), train=False)
  dv = d.init(kd, jnp.zeros((2, size, size, channels)), train=False)
  state = (gv['params'], gv['batch_stats'], dv['params'], dv['batch_stats'],
           tx.init(gv['params']), tx.init(dv['params']))  # fmt: skip
  real = jnp.clip(jax.random.normal(kx, (batch, size, size, channels)) * 0.5, -1, 1)
  t = time.perf_counter()
  compiled = jax.jit(jax_train_step(g, d, tx), donate_argnums=0).lower(state, real, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t
  keys = iter(jax.random.split(jax.random.key(2), 100_000))
  holder = [state]

  def run_steps(n):
    for _ in range(n):
      holder[0], losses = compiled(holder[0], real, next(keys))
    jax.block_until_ready(losses)
    return losses

  t = time.perf_counter()
  losses = run_steps(1)
  warm = time.perf_counter() - t
  assert np.all(np.isfinite(np.asarray(losses))), losses
  return compile_s, _timed_reps(run_steps, warm, reps, rep_seconds)


def torch_models(size: int, channels: int, width: int):
  """The PyTorch tutorial's DCGAN generalised to 4x4 / 7x7 starts, as `cxrjax.models.dcgan` builds it."""
  nn = torch.nn
  start, n = dcgan.resolution_plan(size)
  w = width * 2 ** (n - 1)
  layers = [nn.ConvTranspose2d(LATENT, w, start, 1, 0, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)]
  for i in range(1, n + 1):
    out = channels if i == n else w // 2
    layers.append(nn.ConvTranspose2d(w, out, 4, 2, 1, bias=False))
    layers += [nn.Tanh()] if i == n else [nn.BatchNorm2d(out), nn.ReLU(True)]
    w = out
  gen = nn.Sequential(*layers)
  layers, c = [], channels
  for i in range(n):
    layers.append(nn.Conv2d(c, width * 2**i, 4, 2, 1, bias=False))
    c = width * 2**i
    layers += ([nn.BatchNorm2d(c)] if i > 0 else []) + [nn.LeakyReLU(0.2, inplace=True)]
  layers.append(nn.Conv2d(c, 1, start, 1, 0, bias=False))
  return gen, nn.Sequential(*layers)


def bench_torch(
  size: int, batch: int, channels: int, width: int, reps: int, rep_seconds: float, channels_last: bool, threads: int
):
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  gen, disc = torch_models(size, channels, width)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  gen, disc = gen.to(memory_format=fmt), disc.to(memory_format=fmt)
  opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
  bce = torch.nn.BCEWithLogitsLoss()
  real = (torch.randn(batch, channels, size, size) * 0.5).clamp(-1, 1).contiguous(memory_format=fmt)
  ones, zeros = torch.ones(batch), torch.zeros(batch)

  def run_steps(n):
    for _ in range(n):
      z = torch.randn(batch, LATENT, 1, 1)
      fake = gen(z)
      opt_d.zero_grad(set_to_none=True)
      loss_d = bce(disc(real).view(-1), ones) + bce(disc(fake.detach()).view(-1), zeros)
      loss_d.backward()
      opt_d.step()
      opt_g.zero_grad(set_to_none=True)
      loss_g = bce(disc(fake).view(-1), ones)
      loss_g.backward()
      opt_g.step()

  t = time.perf_counter()
  run_steps(1)
  warm = time.perf_counter() - t
  return _timed_reps(run_steps, warm, reps, rep_seconds)


def _row(size, name, batch, per_step, compile_s=None):
  med = statistics.median(per_step)
  lo, hi = batch / max(per_step), batch / min(per_step)
  comp = f'{compile_s:9.1f}' if compile_s is not None else f'{"-":>9}'
  print(f'{size:4d}  {name:22s} {batch / med:9.1f}  [{lo:6.1f}-{hi:6.1f}]  {med * 1e3:9.1f}  {comp}', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='64,28')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--channels', type=int, default=1)
  parser.add_argument('--width', type=int, default=64, help='ngf = ndf')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--rep_seconds', type=float, default=3.0)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  args = parser.parse_args(argv)
  variants = args.variants.split(',')
  for v in variants:
    if v not in VARIANTS:
      parser.error(f'unknown variant {v!r}; choose from {", ".join(VARIANTS)}')
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average {os.getloadavg()[0]:.1f}')  # fmt: skip
  print(f'batch {args.batch}, channels {args.channels}, ngf=ndf={args.width}, {args.reps} timed repetitions (median)')
  torch_threads = torch.get_num_threads() if torch is not None else 0
  print(f'{"px":>4}  {"variant":22s} {"images/s":>9}  {"[min-max]":>15}  {"ms/step":>9}  {"compile s":>9}')
  for size in (int(s) for s in args.sizes.split(',')):
    for v in variants:
      compile_s, per_step = bench_jax(v, size, args.batch, args.channels, args.width, args.reps, args.rep_seconds)
      _row(size, f'jax {v}', args.batch, per_step, compile_s)
    if args.torch and torch is not None:
      results = {}
      for threads in sorted({torch_threads, 1}, reverse=True):
        for cl in (False, True):
          results[threads, cl] = bench_torch(
            size, args.batch, args.channels, args.width, args.reps, args.rep_seconds, cl, threads
          )
      best = min(results, key=lambda k: statistics.median(results[k]))
      for (threads, cl), per_step in results.items():
        mark = ' *' if (threads, cl) == best else ''
        _row(size, f'torch {"NHWC" if cl else "NCHW"} {threads} thr{mark}', args.batch, per_step)
  if args.torch and torch is None:
    print('PyTorch not installed: no reference row (pip install .[bench]).')
  elif args.torch:
    print(
      f'torch {torch.__version__} eager; * = fastest of memory format x threads (OpenMP with all threads stalls when the cores are shared)'
    )
  print(f'load average after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
