r"""Training and sampling throughput of cxrjax's real JAX steps against the same networks in PyTorch.

Usage:

  python -m cxrjax.bench [--models resnet18_28,resnet18_64,dcgan,unet,efficientnet_v2_b0,efficientnet_v2_s,pipeline]
      [--reps 5] [--steps N] [--rep-seconds 10] [--out PATH] [--quick] [--torch-threads 2,1]
      [--no-torch-compile | --torch-compile]

What is timed (batch sizes and shapes are in each row; `--quick` shrinks every model and batch, tries 1
PyTorch thread only and skips torch.compile unless `--torch-compile`, for tests):

- resnet18_28 / resnet18_64: ResNet-18 (CIFAR stem, width 64, 1 channel, 2 classes), batch 128, Adam 1e-3.
  JAX: `cxrjax.trainers.classifier.make_train_step` (uint8 -> [-1, 1] on device, weighted cross-entropy,
  accuracy and gradient norm), jitted with the state donated, as the trainer does.
- dcgan: 64-px DCGAN G + D (ngf = ndf = 64, 1 channel), batch 128, Adam 2e-4 (b1 0.5), non-saturating loss.
  JAX: `cxrjax.trainers.gan.make_gan_step` (D with BatchNorm, the config's default upsampling, EMA of G).
  PyTorch does what that step does: G forward without gradient, D update on the real and the fake batch,
  G forward again and a G update through the updated D (gradients of G only), EMA of G.
- unet: the latent UNet denoiser (base 64, mults (1, 2), 2 residual blocks, attention at the lowest level,
  4 heads) on random 14x14x4 latents, batch 128, Adam 2e-4. JAX: `cxrjax.trainers.ldm.make_diffusion_step`
  with an identity encoder in place of the autoencoder (eps loss, 10% label dropout, EMA).
- efficientnet_v2_b0 / efficientnet_v2_s: 64 px, 1 channel, 2 classes, stride-1 stem (what `stem='auto'`
  picks at 64 px), stochastic depth 0.2, batch 32 (a batch of 128 at this resolution takes tens of seconds
  per step on a 2-core CPU).
- Sampling, after dcgan and unet: the generator in eval mode at batch 256 (JAX: `gan.make_sampler`, to uint8),
  and DDIM-50 with classifier-free guidance 2.0 over latents at batch 64 (JAX: `cxrjax.diffusion.ddim_sample`,
  one `lax.scan`; PyTorch: the same loop in eager mode, cond + uncond in one batched call).
- pipeline: the Grain training pipeline (`cxrjax.data.pipeline`) over PneumoniaMNIST from
  `$CXRJAX_DATA_DIR/pneumoniamnist.npz` (default: ../shared/data beside the checkout), the config's default
  augmentation, batch 128, with 1 and 2 threads; host only, no model.

Method. Inputs are fixed random batches made once (no input pipeline in the model rows). JAX training
steps run as the trainers run them, on a data-parallel mesh of every local device (one CPU device unless
XLA_FLAGS sets `--xla_force_host_platform_device_count`); sampling runs on one device. Each model runs in
a fresh worker process, which runs the JAX variant itself and starts, per case, a second process for the
PyTorch variants (`TorchProcess`; the worker never imports PyTorch), so each framework has its own malloc
heap and resident set (in one process, JAX's first block after a PyTorch block ran up to 40% slower).
The variants are interleaved, one process running at a time: repetition r runs a block of N steps of each
variant in turn (JAX; PyTorch eager in NCHW and channels_last memory formats, each with 2 and 1 intra-op
threads; torch.compile), the order rotated by one each repetition, so all see the same load. A PyTorch
block is timed inside its process (the pipe's round trip is not counted). One untimed round of blocks
runs first (`WARMUP_ROUNDS`), since a process's first blocks after the other's run slower. JAX blocks can
still hit a storm of page faults later (its heap growing by a fresh XLA scratch buffer; BUILD_NOTES,
issue 8): the rows record each block's minor faults, so such blocks can be told from the rest.
Two warm-up steps per variant are not timed. images/s = batch / median over repetitions of the mean step
time of a block; N is `--steps`, or chosen so a block of the slowest variant lasts about `--rep-seconds`
(at least one step). An eager variant more than 3x slower than the fastest one in its warm-up step is not
timed further (the row says so, with its warm-up speed). One thread is tried beside `torch.set_num_threads(2)`
because OpenMP waits at every barrier for a thread that another process has descheduled: on this 2-core
machine under load, 1 thread trained ResNet-18 3x faster than 2. PyTorch's Adam is `fused=True`, its fastest
CPU implementation. The fastest eager variant is reported with its name (`torch_setting`), and torch.compile
(default mode, with the format and threads of the fastest eager variant in warm-up) beside it; if it fails,
the row says 'n/a' and why.
If a variant kills its process (a native crash cannot be caught in-process; a PyTorch process that dies
stops its worker), the model is measured again without the variant that was running, and the row names it
with the crash. `CXRJAX_BENCH_ABORT_VARIANT=<variant name>` makes the PyTorch process abort when it builds
that variant (the tests use it to exercise this path).

JAX compile time (`compile_s`) is the wall time of `jax.jit(step, in_shardings=..., out_shardings=...,
donate_argnums=0).lower(...).compile()` on that mesh, measured
before any step runs; `jax_first_step_s` is the first execution after it. `torch_compile_s` is the wall time of
the first torch.compile step (compilation of forward and backward included).

Peak memory is approximate on CPU, where `jax.devices()[0].memory_stats()` returns None: for each variant, the
growth of its process's resident set (the JAX worker's or the PyTorch process's; Linux: VmHWM after
resetting it through /proc/self/clear_refs, relative to VmRSS at the start; elsewhere the growth of
getrusage's ru_maxrss, which misses peaks below an earlier one) from just before its parameters are created
until the end of its warm-up steps, after `malloc_trim`. So it
counts parameters, optimizer state, gradients, activations and temporaries, but not compiler memory (JAX's
step is compiled before) nor the runtimes themselves. On N forced CPU devices the replicated state is held N
times in host memory, so peak memory is comparable only between rows with the same `jax_mesh_devices`.

Results: `--out PATH` writes PATH, a JSON list of rows, and the same table as Markdown to PATH with the suffix
.md (with the machine description). Every row has `model, kind ('train' | 'sample' | 'input'),
jax_images_per_s, torch_images_per_s (fastest eager setting), ratio (JAX / PyTorch), compile_s, peak_mem_mb (JAX),
jax_mesh_devices and jax_batch_split (devices of the JAX step's batch sharding as compiled, and whether the
batch is split over them; None for sampling and failed steps), jax_convolution (what the JAX convolutions ran
on: oneDNN or XLA, from `cxrjax.ops.onednn.resolve` and `--convolution`), jax_compiler_options (the XLA
options the JAX step was compiled with on top of the process's flags, as the trainer compiles it:
`cxrjax._xla_env.compiler_options`; None for none), jax_cpu_pool (XLA's CPU thread pool in the worker, as
the experiment's command line sizes it: `cxrjax._xla_env.use_one_pool_thread`), torch_setting, torch_threads,
torch_contiguous_images_per_s, torch_channels_last_images_per_s (the faster thread count of each format),
torch_variants (every eager variant: images/s, or why not timed),
torch_compile_images_per_s (None when not measured), torch_compile ('ok' or 'n/a: reason'),
torch_compile_setting, torch_compile_s, torch_peak_mem_mb, jax_first_step_s, jax_images_per_s_range and
torch_images_per_s_range ([slowest, fastest] repetition), batch, image_size (side of the input: pixels, or
latent size), input_shape, params_jax, params_torch, steps_per_rep, reps, mem_method, load_avg, notes`, and
`errors` when the JAX variant or the worker failed, `torch_in_jax_process` (False: PyTorch ran in its own
process), `warmup_rounds`, and `jax_minor_faults_per_rep` / `torch_minor_faults_per_rep` (minor page faults
of each timed block, in the process that ran it: a growing heap shows here). Input rows have `images_per_s`
and `num_threads`; their JAX/PyTorch fields are None. The table and a machine description (CPU, cores, versions, XLA_FLAGS, malloc, load)
are printed too. On a shared machine the numbers move with the load; compare within a row (same run,
interleaved), not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import cxrjax  # noqa: F401 - sets XLA flags before the JAX backend starts
from cxrjax import _xla_env, config_lib, diffusion
from cxrjax import mesh as mesh_lib
from cxrjax.data import pipeline, rebalance, sources
from cxrjax.data.augment import AugmentParams
from cxrjax.errors import UserError
from cxrjax.models import ONE_POOL_THREAD, build_classifier, classifier_step_options
from cxrjax.ops import onednn
from cxrjax.trainers import classifier, gan, ldm

MODELS = ('resnet18_28', 'resnet18_64', 'dcgan', 'unet', 'efficientnet_v2_b0', 'efficientnet_v2_s')
EXTRAS = ('pipeline',)
# 2 = the cores; 1 because OpenMP's barriers stall when another process holds a core (3x slower here).
TORCH_THREADS = (2, 1)
TORCH_FORMATS = ('contiguous', 'channels_last')
# An eager variant slower than this times the fastest one in its warm-up step is not timed further. Generous:
# which thread count wins flips with the load of the machine (2x either way here), so only pathological
# variants (OpenMP stalling on tiny operations: 100x) are dropped.
PRUNE_FACTOR = 3.0
# Untimed interleaved rounds (a block of every variant) before the timed repetitions.
WARMUP_ROUNDS = 1

# Full and --quick settings per model. EfficientNetV2 runs at batch 32 (see the module docstring).
FULL = dict(
  resnet18_28=dict(batch=128, image_size=28, width=64),
  resnet18_64=dict(batch=128, image_size=64, width=64),
  dcgan=dict(batch=128, image_size=64, width=64, sample_batch=256),
  unet=dict(batch=128, latent_size=14, base=64, heads=4, sample_batch=64, sample_steps=50),
  efficientnet_v2_b0=dict(batch=32, image_size=64, width=1.0, depth=1.0),
  efficientnet_v2_s=dict(batch=32, image_size=64, width=1.0, depth=1.0),
  pipeline=dict(batch=128, batches=24),
)
QUICK = dict(
  # Width 16, not 8: PyTorch 2.13 corrupts the heap in the backward pass of a channels_last 1x1 stride-2
  # convolution with 8 input channels on 64x64 maps (ResNet-18's first projection at width 8).
  resnet18_28=dict(batch=8, image_size=28, width=16),
  resnet18_64=dict(batch=4, image_size=64, width=16),
  dcgan=dict(batch=8, image_size=64, width=8, sample_batch=16),
  unet=dict(batch=8, latent_size=14, base=16, heads=2, sample_batch=4, sample_steps=5),
  efficientnet_v2_b0=dict(batch=4, image_size=64, width=0.25, depth=0.25),
  efficientnet_v2_s=dict(batch=4, image_size=64, width=0.25, depth=0.25),
  pipeline=dict(batch=32, batches=4),
)

REQUIRED_KEYS = ('model', 'jax_images_per_s', 'torch_images_per_s', 'ratio', 'compile_s', 'peak_mem_mb')


# ----------------------------------------------------------------------------- memory


def _malloc_trim() -> None:
  # Returns freed heap pages to the OS, so the next variant's growth is not hidden by reused pages.
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL('libc.so.6').malloc_trim(0)


def _status_kb(field: str) -> int | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_hwm() -> bool:
  """Resets the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return _status_kb('VmHWM') is not None
  except OSError:
    return False


class RssMeter:
  """Growth of the process's peak resident set between `start()` and `stop()`, in MB (method in `method`)."""

  def __init__(self):
    self.method = ''
    self.base = 0

  def start(self) -> RssMeter:
    gc.collect()
    _malloc_trim()
    if _reset_hwm():
      self.method = 'rss_hwm'
      self.base = _status_kb('VmRSS') or 0
    else:
      self.method = 'ru_maxrss_delta'
      self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return self

  def stop(self) -> float:
    if self.method == 'rss_hwm':
      peak = _status_kb('VmHWM') or 0
    else:
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak - self.base) / 1024.0


# ----------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
  """One variant of a step: `run(n)` runs n steps and returns once they are finished."""

  name: str
  run: Callable[[int], Any] | None
  compile_s: float | None = None  # JAX: lower + compile of the step
  first_s: float | None = None  # first warm-up step (torch.compile: compiles there)
  warm_s: float | None = None  # last warm-up step
  peak_mem_mb: float | None = None
  mem_method: str = ''
  error: str | None = None
  setting: Any = None  # TorchSetting of a PyTorch variant
  pruned: bool = False  # not timed: much slower than the fastest eager variant in warm-up
  per_step: list[float] = dataclasses.field(default_factory=list)
  mesh_devices: int | None = None  # JAX step: devices of the compiled batch sharding
  batch_split: bool | None = None  # JAX step: whether that sharding splits the batch
  remote: bool = False  # runs in the PyTorch process: `run` returns (seconds, minor faults) measured there
  faults: list[int] = dataclasses.field(default_factory=list)  # minor page faults per timed block

  def timed_run(self, n: int) -> tuple[float, int]:
    """Runs n steps; (seconds, minor page faults) of the block, measured in the process that ran it."""
    if self.remote:
      return self.run(n)
    f = _minor_faults()
    t = time.perf_counter()
    self.run(n)
    return time.perf_counter() - t, _minor_faults() - f

  def images_per_s(self, batch: int) -> float | None:
    if self.error or not self.per_step:
      return None
    return batch / statistics.median(self.per_step)


def _warm_up(runner: Runner, meter: RssMeter, steps: int = 2) -> Runner:
  t = time.perf_counter()
  runner.run(1)
  runner.first_s = time.perf_counter() - t
  for _ in range(steps - 1):
    t = time.perf_counter()
    runner.run(1)
    runner.warm_s = time.perf_counter() - t
  if runner.warm_s is None:
    runner.warm_s = runner.first_s
  runner.peak_mem_mb = meter.stop()
  runner.mem_method = meter.method
  return runner


def jax_step_runner(step_fn, init_fn, batch, name: str = 'jax', compiler_options: dict | None = None) -> Runner:
  """A jitted `step_fn(state, batch, rng) -> (state, metrics)` with the state donated, as the trainers jit it.

  As in the trainers, the step runs on a data-parallel mesh of every local device: state
  replicated, batch split along its first axis, explicit in and out shardings. On one
  device that is a plain jit; with `--xla_force_host_platform_device_count=N` in XLA_FLAGS
  it times the data-parallel program on N CPU devices.

  Args:
    step_fn: the trainer's pure step.
    init_fn: `() -> state` (jitted and compiled before memory is measured).
    batch: a dict of host or device arrays (first axis divisible by the device count).
    name: the runner's name.
    compiler_options: XLA options for the step's compilation, as the trainer passes them.

  Returns:
    A warmed-up `Runner`.
  """
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  rows = len(next(iter(batch.values())))
  if rows % mesh.devices.size:
    raise ValueError(f'batch of {rows} is not a multiple of the {mesh.devices.size} devices of the mesh')
  rep, split = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  batch = jax.device_put(batch, split)
  rng = jax.device_put(jax.random.key(1), rep)
  init_c = jax.jit(init_fn, out_shardings=rep, compiler_options=_xla_env.init_compiler_options()).lower().compile()
  abstract = jax.eval_shape(init_fn)
  t = time.perf_counter()
  step_c = (
    jax.jit(step_fn, in_shardings=(rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0,))
    .lower(abstract, batch, rng)
    .compile(compiler_options=compiler_options)
  )
  compile_s = time.perf_counter() - t
  meter = RssMeter().start()
  holder = [init_c()]

  def run(n: int):
    out = None
    for _ in range(n):
      holder[0], out = step_c(holder[0], batch, rng)
    jax.block_until_ready((holder[0], out))

  # What the compiled step really takes, not what was asked for: (args, kwargs) -> args[1] is the batch.
  batch_in = jax.tree.leaves(step_c.input_shardings[0][1])[0]
  runner = Runner(name, run, compile_s=compile_s, mesh_devices=len(batch_in.device_set),
                  batch_split=not batch_in.is_fully_replicated)  # fmt: skip
  return _warm_up(runner, meter)


def jax_call_runner(fn, init_fn, args: tuple, name: str = 'jax') -> Runner:
  """A jitted `fn(variables, *args)` (sampling), variables from `init_fn()`, nothing donated."""
  init_c = jax.jit(init_fn, compiler_options=_xla_env.init_compiler_options()).lower().compile()
  abstract = jax.eval_shape(init_fn)
  t = time.perf_counter()
  fn_c = jax.jit(fn).lower(abstract, *args).compile()
  compile_s = time.perf_counter() - t
  meter = RssMeter().start()
  variables = init_c()

  def run(n: int):
    out = None
    for _ in range(n):
      out = fn_c(variables, *args)
    jax.block_until_ready(out)

  return _warm_up(Runner(name, run, compile_s=compile_s), meter)


def torch_installed() -> bool:
  """Whether PyTorch is importable, found without importing it (the JAX worker never imports it)."""
  return importlib.util.find_spec('torch') is not None


def _torch():
  try:
    import torch  # noqa: PLC0415 - PyTorch is the optional `bench` extra; cxrjax never needs it
  except ImportError:
    return None
  return torch


@dataclasses.dataclass(frozen=True)
class TorchSetting:
  """How a PyTorch variant runs: memory format, intra-op threads, eager or torch.compile."""

  memory_format: str  # 'contiguous' (NCHW) or 'channels_last'
  threads: int
  compiled: bool = False

  @property
  def name(self) -> str:
    threads = f'{self.threads} thread' + ('' if self.threads == 1 else 's')
    return ('torch.compile ' if self.compiled else '') + f'{self.memory_format}, {threads}'


def torch_runner(build: Callable[[TorchSetting], Callable[[], Any]], setting: TorchSetting) -> Runner:
  """Builds a PyTorch variant: `build(setting)` makes the model and optimizer and returns a one-step closure."""
  torch = _torch()
  torch.manual_seed(0)
  torch.set_num_threads(setting.threads)
  meter = RssMeter().start()
  step = build(setting)

  def run(n: int):
    torch.set_num_threads(setting.threads)  # a process-wide setting; the variants take turns
    for _ in range(n):
      step()

  return _warm_up(Runner(setting.name, run, setting=setting), meter)


def _adam(torch, params, lr: float, betas=(0.9, 0.999)):
  try:
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
  except (RuntimeError, ValueError, TypeError):  # older builds without the fused CPU kernel
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def _memory_format(torch, setting: TorchSetting):
  return torch.channels_last if setting.memory_format == 'channels_last' else torch.contiguous_format


def _prepare(torch, module, setting: TorchSetting):
  """(module in the setting's memory format, callable to run: compiled or the module)."""
  module = module.to(memory_format=_memory_format(torch, setting))
  return module, (torch.compile(module) if setting.compiled else module)


def _nchw(torch, nhwc: np.ndarray, setting: TorchSetting):
  """A NHWC array as an NCHW tensor in the setting's memory format.

  Transposed on the host first: a permuted view of a 1-channel NHWC array has NHWC strides and would make
  PyTorch pick channels_last kernels in the 'contiguous' variant.
  """
  x = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
  return x.contiguous(memory_format=_memory_format(torch, setting))


def _ema_(torch, ema: list, live: list, step: int, decay: float) -> None:
  # The trainers' EMA with TF-style warm-up of the decay.
  d = min(decay, (1.0 + step) / (10.0 + step))
  with torch.no_grad():
    torch._foreach_lerp_(ema, live, 1.0 - d)


# ----------------------------------------------------------------------------- the PyTorch process


class TorchProcessDied(Exception):
  """The PyTorch process of a case exited while the JAX worker waited for its reply."""


class RemoteError(Exception):
  """A PyTorch variant failed in the PyTorch process; the message is that process's `_error` text."""


class TorchProcess:
  """A child process that builds and runs the PyTorch variants of one case when the JAX worker says so.

  Why a second process: in one process the two frameworks share one malloc heap (with cxrjax's malloc
  setting, which keeps freed memory in it), and JAX's first block after a PyTorch block ran up to 40%
  slower (BUILD_NOTES, issue 8). Now each framework has its own heap and resident set, while the blocks
  stay interleaved, one process running at a time, so both see the same load. The PyTorch process imports
  cxrjax (the cases are defined there), so JAX is initialised in it, but it runs no JAX step.

  Protocol: one JSON object per line over two pipes; every command gets one reply. `params` -> the PyTorch
  parameter count; `build` (a `TorchSetting`) -> its warm-up times and memory, or `error`; `run` (name, n)
  -> the seconds n steps took and their minor page faults, or `error`; `close` ends the process. Its
  stdout goes to stderr (the benchmark's stdout is the table), its stderr is the worker's.
  """

  def __init__(self, model: str, case: str, quick: bool, convolution: str):
    cmd_r, cmd_w = os.pipe()
    reply_r, reply_w = os.pipe()
    argv = [sys.executable, '-m', 'cxrjax.bench', f'--torch-server={model}', f'--torch-case={case}',
            f'--torch-fds={cmd_r},{reply_w}', f'--convolution={convolution}'] + (['--quick'] if quick else [])  # fmt: skip
    self.proc = subprocess.Popen(argv, pass_fds=(cmd_r, reply_w), stdout=sys.stderr.fileno())
    os.close(cmd_r)
    os.close(reply_w)
    self._commands = os.fdopen(cmd_w, 'w')
    self._replies = os.fdopen(reply_r)

  def call(self, **command) -> dict:
    """Sends one command and waits for its reply; raises `TorchProcessDied` if the process is gone."""
    try:
      self._commands.write(json.dumps(command) + '\n')
      self._commands.flush()
      line = self._replies.readline()
    except (BrokenPipeError, ConnectionResetError):
      line = ''
    if not line:
      code = self.proc.wait()
      how = f'signal {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'
      raise TorchProcessDied(f'the PyTorch process died ({how})')
    return json.loads(line)

  def __enter__(self) -> TorchProcess:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    with contextlib.suppress(OSError):
      self._commands.write(json.dumps(dict(op='close')) + '\n')
      self._commands.close()
    with contextlib.suppress(OSError):
      self._replies.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()


def remote_torch_runner(process: TorchProcess, setting: TorchSetting) -> Runner:
  """A PyTorch variant built, warmed up and run in `process` (`torch_runner` there)."""
  reply = process.call(op='build', setting=dataclasses.asdict(setting))
  if 'error' in reply:
    return Runner(setting.name, None, error=reply['error'], setting=setting)

  def run(n: int) -> tuple[float, int]:
    answer = process.call(op='run', name=setting.name, n=n)
    if 'error' in answer:
      raise RemoteError(answer['error'])
    return answer['seconds'], answer['faults']

  return Runner(setting.name, run, first_s=reply['first_s'], warm_s=reply['warm_s'], peak_mem_mb=reply['peak_mem_mb'],
                mem_method=reply['mem_method'], setting=setting, remote=True)  # fmt: skip


def _serve(case: Case, runners: dict[str, Runner], command: dict) -> dict:
  op = command['op']
  if op == 'params':
    return dict(params=case.count_torch() if case.count_torch else None)
  if op == 'build':
    setting = TorchSetting(**command['setting'])
    if os.environ.get('CXRJAX_BENCH_ABORT_VARIANT') == setting.name:
      os.abort()  # fault injection for the tests: a native crash, as PyTorch's heap corruption once was
    r = torch_runner(case.torch_build, setting)
    runners[setting.name] = r
    return dict(first_s=r.first_s, warm_s=r.warm_s, peak_mem_mb=r.peak_mem_mb, mem_method=r.mem_method)
  if op == 'run':
    seconds, faults = runners[command['name']].timed_run(command['n'])
    return dict(seconds=seconds, faults=faults)
  raise ValueError(f'unknown command {op!r}')


def _torch_server(args) -> None:
  """The PyTorch process (`--torch-server`): answers the JAX worker's commands until `close`."""
  cmd_fd, reply_fd = (int(x) for x in args.torch_fds.split(','))
  (case,) = [c for c in cases_for(args.torch_server, args.quick, args.convolution) if c.model == args.torch_case]
  runners: dict[str, Runner] = {}
  with os.fdopen(cmd_fd) as commands, os.fdopen(reply_fd, 'w') as replies:
    for line in commands:
      command = json.loads(line)
      if command['op'] == 'close':
        break
      try:
        reply = _serve(case, runners, command)
      except Exception as e:  # noqa: BLE001 - reported to the worker as the variant's error
        reply = dict(error=_error(e))
      replies.write(json.dumps(reply) + '\n')
      replies.flush()


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
  """One row: the JAX variant, the PyTorch builder, and what the row describes."""

  model: str
  kind: str
  batch: int
  image_size: int
  input_shape: tuple
  make_jax: Callable[[], Runner]
  torch_build: Callable[[str], Callable[[], Any]] | None
  params_jax: int | None = None
  count_torch: Callable[[], int] | None = None  # PyTorch's parameter count (imports torch: torch process only)
  compile_torch: bool = True
  notes: str = ''
  convolution: str = 'xla'  # what the JAX variant's convolutions run on (`onednn.resolve`)
  compiler_options: dict | None = None  # the JAX step's per-program XLA options, as its trainer sets them


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _random_images(batch: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def model_name(case: str) -> str:
  """The `config.model.name` (or generator) a benchmark case trains: 'resnet18' for both ResNet-18 sizes."""
  return 'resnet18' if case.startswith('resnet18') else case


def classifier_case(name: str, s: dict, convolution: str = 'auto') -> Case:
  """ResNet-18 or EfficientNetV2 training step (`classifier.make_train_step`)."""
  batch, size = s['batch'], s['image_size']
  conv_impl, conv_note = onednn.resolve(convolution)
  mc = config_lib.base_config().model
  mc.name = model_name(name)
  if mc.name == 'resnet18':
    mc.width, mc.stem = s['width'], 'cifar'
  else:
    mc.width_mult, mc.depth_mult = s['width'], s['depth']
  model = build_classifier(mc, 2, (size, size, 1), conv_impl)
  tx = onednn.adam(1e-3, impl=conv_impl)  # as the trainer: fused Adam on one CPU device
  loss_cfg = ml_collections.ConfigDict(dict(name='ce', focal_gamma=2.0, label_smoothing=0.0))
  images = _random_images(batch, size, 1)
  labels = (np.arange(batch) % 2).astype(np.int32)
  init_fn = functools.partial(classifier.create_state, model, tx, (size, size, 1), jax.random.key(0))
  params_jax = _count(jax.eval_shape(init_fn).params)
  step_options = classifier_step_options(mc.name)  # as `classifier.train_and_evaluate` compiles the step

  def make_jax():
    jbatch = dict(image=images, label=labels, weight=np.ones(batch, np.float32))
    return jax_step_runner(
      classifier.make_train_step(model, tx, loss_cfg), init_fn, jbatch, compiler_options=step_options
    )

  def torch_model():
    from cxrjax.bench import torch_models as tm  # noqa: PLC0415 - imports torch

    if name.startswith('resnet18'):
      return tm.ResNet18(2, s['width'], 'cifar', 1)
    return tm.EfficientNetV2(2, model.variant, width=s['width'], depth=s['depth'], stem_stride=model.stem_stride,
                             drop_path_rate=model.drop_path_rate, in_channels=1)  # fmt: skip

  def build(setting):
    torch = _torch()
    F = torch.nn.functional
    module, net = _prepare(torch, torch_model(), setting)
    module.train()
    opt = _adam(torch, module.parameters(), 1e-3)
    x = _nchw(torch, images, setting)
    y = torch.from_numpy(labels).long()
    w = torch.ones(batch)

    def step():
      logits = net(x.float() / 127.5 - 1.0)
      loss = (F.cross_entropy(logits, y, reduction='none') * w).sum() / w.sum().clamp_min(1e-12)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

    return step

  what = f'ResNet-18 CIFAR stem, width {s["width"]}' if name.startswith('resnet18') else (
    f'EfficientNetV2-{model.variant.upper()}, stem stride {model.stem_stride}, width x{s["width"]}, depth x{s["depth"]}'
  )  # fmt: skip
  return Case(name, 'train', batch, size, (size, size, 1), make_jax, build, params_jax,
              lambda: _count_torch(torch_model()), notes=f'{what}, 1 channel, 2 classes, Adam 1e-3', convolution=conv_note,
              compiler_options=step_options)  # fmt: skip


def _count_torch(*modules) -> int:
  from cxrjax.bench import torch_models as tm  # noqa: PLC0415 - imports torch

  return sum(tm.count_params(m) for m in modules)


def _gan_config(s: dict) -> ml_collections.ConfigDict:
  cfg = config_lib.base_config()
  cfg.data.image_size = s['image_size']
  cfg.gan.g_width = cfg.gan.d_width = s['width']
  cfg.gan.batch_size = s['batch']
  cfg.gan.conditional = False
  cfg.gan.d_norm = 'batch'
  return cfg


def dcgan_cases(s: dict, convolution: str = 'auto') -> list[Case]:
  """The DCGAN training step (`gan.make_gan_step`) and G sampling in eval mode."""
  cfg = _gan_config(s)
  cfg.convolution = convolution
  impl, conv_note = onednn.resolve(convolution)
  g = cfg.gan
  batch, size, latent = s['batch'], s['image_size'], g.latent_dim
  gen, disc = gan.build(cfg, 1, 2)
  g_tx = onednn.adam(g.lr_g, b1=g.b1, b2=g.b2, impl=impl)
  d_tx = onednn.adam(g.lr_d, b1=g.b1, b2=g.b2, impl=impl)

  def init_state():
    kg, kd = jax.random.split(jax.random.key(0))
    gv = gen.init(kg, jnp.zeros((2, latent)), None, train=False)
    dv = disc.init(kd, jnp.zeros((2, size, size, 1)), None, train=False)
    return gan.GANState(
      step=jnp.zeros((), jnp.int32), g_params=gv['params'], g_stats=gv['batch_stats'], d_params=dv['params'],
      d_stats=dv.get('batch_stats', {}), g_opt=g_tx.init(gv['params']), d_opt=d_tx.init(dv['params']),
      g_ema={'params': gv['params'], 'batch_stats': gv['batch_stats']},
    )  # fmt: skip

  abstract = jax.eval_shape(init_state)
  params_g, params_d = _count(abstract.g_params), _count(abstract.d_params)
  step_options = _xla_env.compiler_options(fuse_elementwise=False)  # as `gan._train_one` compiles the step
  images = _random_images(batch, size, 1, seed=1)

  def make_jax():
    jbatch = dict(image=images, label=np.zeros(batch, np.int32))
    return jax_step_runner(gan.make_gan_step(gen, disc, g_tx, d_tx, cfg, 2), init_state, jbatch,
                           compiler_options=step_options)  # fmt: skip

  def torch_nets():
    from cxrjax.bench import torch_models as tm  # noqa: PLC0415 - imports torch

    up = 'resize' if g.upsample == 'resize' else 'transpose'
    return tm.Generator(size, 1, latent, g.g_width, 0, up), tm.Discriminator(size, 1, g.d_width, 0, g.d_norm)

  def build(setting):
    torch = _torch()
    F = torch.nn.functional
    g_net, d_net = torch_nets()
    g_mod, g_run = _prepare(torch, g_net, setting)
    d_mod, d_run = _prepare(torch, d_net, setting)
    g_mod.train()
    d_mod.train()
    g_params, d_params = list(g_mod.parameters()), list(d_mod.parameters())
    opt_g = _adam(torch, g_params, g.lr_g, (g.b1, g.b2))
    opt_d = _adam(torch, d_params, g.lr_d, (g.b1, g.b2))
    live = g_params + [b for b in g_mod.buffers() if b.is_floating_point()]
    ema = [t.detach().clone() for t in live]
    real = _nchw(torch, images.astype(np.float32) / 127.5 - 1.0, setting)
    count = [0]

    def step():
      z = torch.randn(batch, latent)
      with torch.no_grad():
        fake = g_run(z)
      loss_d = F.softplus(-d_run(real)).mean() + F.softplus(d_run(fake)).mean()
      opt_d.zero_grad(set_to_none=True)
      loss_d.backward()
      opt_d.step()
      loss_g = F.softplus(-d_run(g_run(z))).mean()  # non-saturating
      grads = torch.autograd.grad(loss_g, g_params)  # G's gradients only, as the JAX step
      for p, gr in zip(g_params, grads):
        p.grad = gr
      opt_g.step()
      _ema_(torch, ema, live, count[0], g.ema_decay)
      count[0] += 1

    return step

  train = Case('dcgan', 'train', batch, size, (size, size, 1), make_jax, build, params_g + params_d,
               lambda: _count_torch(*torch_nets()),
               notes=f'64-px DCGAN G+D step (ngf=ndf={g.g_width}, upsample {g.upsample!r}, D norm {g.d_norm!r}),'
               f' G {params_g:,} + D {params_d:,} params, Adam 2e-4 b1 0.5, non-saturating loss, EMA of G',
               convolution=conv_note, compiler_options=step_options)  # fmt: skip

  sb = s['sample_batch']
  z = np.random.default_rng(2).standard_normal((sb, latent)).astype(np.float32)

  def make_jax_sample():
    sampler = gan.make_sampler(gen, 0)
    return jax_call_runner(lambda ema, z: sampler(ema, z, None), lambda: init_state().g_ema, (jnp.asarray(z),))

  def build_sample(setting):
    torch = _torch()
    g_mod, g_run = _prepare(torch, torch_nets()[0], setting)
    g_mod.eval()
    zt = torch.from_numpy(z)

    def step():
      with torch.inference_mode():
        out = g_run(zt)
        ((out + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    return step

  sample = Case('dcgan_sample', 'sample', sb, size, (size, size, 1), make_jax_sample, build_sample, params_g,
                lambda: _count_torch(torch_nets()[0]), compile_torch=False,
                notes='DCGAN G forward in eval mode (EMA variables), to uint8', convolution=conv_note)  # fmt: skip
  return [train, sample]


def _ldm_config(s: dict) -> ml_collections.ConfigDict:
  cfg = config_lib.base_config()
  cfg.ldm.unet.base_channels = s['base']
  cfg.ldm.unet.num_heads = s['heads']
  cfg.ldm.unet.batch_size = s['batch']
  cfg.ldm.sample_steps = s['sample_steps']
  return cfg


def unet_cases(s: dict, convolution: str = 'auto') -> list[Case]:
  """The latent denoiser step (`ldm.make_diffusion_step`, no autoencoder) and DDIM sampling."""
  cfg = _ldm_config(s)
  cfg.convolution = convolution
  impl, conv_note = onednn.resolve(convolution)
  u, lc = cfg.ldm.unet, cfg.ldm
  num_classes, batch, hw = 2, s['batch'], s['latent_size']
  ch = cfg.ldm.ae.latent_channels
  unet = ldm.build_unet(cfg, num_classes)
  tx = onednn.adam(u.lr, impl=impl)
  schedule = diffusion.make_schedule(lc.schedule, lc.num_timesteps)

  def init_params():
    return unet.init(jax.random.key(0), jnp.zeros((1, hw, hw, ch)), jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1,), jnp.int32))['params']  # fmt: skip

  def init_state():
    params = init_params()
    return ldm.DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)

  params_jax = _count(jax.eval_shape(init_params))
  step_options = _xla_env.compiler_options(fuse_elementwise=False)  # as `ldm.train` compiles the diffusion step
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((batch, hw, hw, ch)).astype(np.float32)
  labels = (np.arange(batch) % num_classes).astype(np.int32)

  def make_jax():
    # `make_diffusion_step` maps batch['image'] through `to_unit` (x / 127.5 - 1) and the encoder; with an
    # identity encoder and scale 1, this 'image' arrives as the unit-variance latents above.
    jbatch = dict(image=(latents + 1.0) * 127.5, label=labels)
    step = ldm.make_diffusion_step(unet, lambda x, rng: x, tx, schedule, cfg, 1.0, num_classes)
    return jax_step_runner(step, init_state, jbatch, compiler_options=step_options)

  def torch_unet():
    from cxrjax.bench import torch_models as tm  # noqa: PLC0415 - imports torch

    return tm.UNet(ch, num_classes, u.base_channels, tuple(u.channel_mults), u.num_res_blocks,
                   tuple(u.attention_levels), u.num_heads, u.dropout)  # fmt: skip

  sqrt_ab = np.array(schedule.sqrt_alphas_cumprod)  # writable copies: torch.from_numpy warns on read-only
  sqrt_1mab = np.array(schedule.sqrt_one_minus_alphas_cumprod)

  def build(setting):
    torch = _torch()
    F = torch.nn.functional
    module, net = _prepare(torch, torch_unet(), setting)
    module.train()
    params = list(module.parameters())
    opt = _adam(torch, params, u.lr)
    ema = [p.detach().clone() for p in params]
    x0 = _nchw(torch, latents, setting)
    y = torch.from_numpy(labels).long()
    sa, s1a = torch.from_numpy(sqrt_ab), torch.from_numpy(sqrt_1mab)
    count = [0]

    def step():
      t = torch.randint(0, lc.num_timesteps, (batch,))
      noise = torch.randn_like(x0)
      x_t = sa[t].view(-1, 1, 1, 1) * x0 + s1a[t].view(-1, 1, 1, 1) * noise
      labels_t = torch.where(torch.rand(batch) < lc.label_dropout, torch.full_like(y, num_classes), y)
      loss = F.mse_loss(net(x_t, t, labels_t), noise)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      _ema_(torch, ema, params, count[0], u.ema_decay)
      count[0] += 1

    return step

  count_torch = lambda: _count_torch(torch_unet())  # noqa: E731
  train = Case('unet', 'train', batch, hw, (hw, hw, ch), make_jax, build, params_jax, count_torch,
               notes=f'latent UNet denoiser step, base {u.base_channels}, mults {tuple(u.channel_mults)},'
               f' {u.num_res_blocks} res blocks, attention at {tuple(u.attention_levels)}, {u.num_heads} heads,'
               f' random {hw}x{hw}x{ch} latents (no autoencoder), Adam {u.lr:g}, label dropout'
               f' {lc.label_dropout}, EMA', convolution=conv_note, compiler_options=step_options)  # fmt: skip

  sb, steps = s['sample_batch'], lc.sample_steps
  sample_labels = (np.arange(sb) % num_classes).astype(np.int32)

  def make_jax_sample():
    def sample(params, labels, key):
      apply = lambda x_t, t, y: unet.apply({'params': params}, x_t, t, y)  # noqa: E731
      return diffusion.ddim_sample(apply, schedule, (labels.shape[0], hw, hw, ch), labels, key, num_steps=steps,
                                   eta=0.0, guidance_scale=lc.guidance_scale, prediction=lc.prediction,
                                   null_label=num_classes)  # fmt: skip

    return jax_call_runner(sample, init_params, (jnp.asarray(sample_labels), jax.random.key(4)))

  ts = diffusion.ddim_timesteps(lc.num_timesteps, steps)
  ts_prev = np.append(ts[1:], -1)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)

  def build_sample(setting):
    torch = _torch()
    module, net = _prepare(torch, torch_unet(), setting)
    module.eval()
    fmt = _memory_format(torch, setting)
    y = torch.from_numpy(sample_labels).long()
    y2 = torch.cat([y, torch.full_like(y, num_classes)])
    gscale = lc.guidance_scale

    def step():
      with torch.inference_mode():
        x = torch.randn(sb, ch, hw, hw).contiguous(memory_format=fmt)
        for t, tp in zip(ts, ts_prev):
          a_t, a_p = abar[t], (abar[tp] if tp >= 0 else 1.0)
          out = net(torch.cat([x, x]), torch.full((2 * sb,), int(t), dtype=torch.long), y2)
          eps = out[sb:] + gscale * (out[:sb] - out[sb:])
          x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
          x = math.sqrt(a_p) * x0 + math.sqrt(1.0 - a_p) * eps
      return x

    return step

  sample = Case(f'ldm_ddim{steps}_sample', 'sample', sb, hw, (hw, hw, ch), make_jax_sample, build_sample, params_jax,
                count_torch, compile_torch=False,
                notes=f'DDIM-{steps} (eta 0) over {hw}x{hw}x{ch} latents with guidance {lc.guidance_scale:g}'
                ' (cond + uncond in one call per step); latents only, no decoder', convolution=conv_note)  # fmt: skip
  return [train, sample]


def cases_for(name: str, quick: bool, convolution: str = 'auto') -> list[Case]:
  s = (QUICK if quick else FULL)[name]
  if name in ('resnet18_28', 'resnet18_64', 'efficientnet_v2_b0', 'efficientnet_v2_s'):
    return [classifier_case(name, s, convolution)]
  if name == 'dcgan':
    return dcgan_cases(s, convolution)
  if name == 'unet':
    return unet_cases(s, convolution)
  raise ValueError(f'unknown model {name!r}')


# ----------------------------------------------------------------------------- measuring


def _error(e: BaseException) -> str:
  msg = ' '.join(str(e).split())
  return msg[:400] if isinstance(e, RemoteError) else f'{type(e).__name__}: {msg[:300]}'


def _try_runner(name: str, make: Callable[[], Runner]) -> Runner:
  try:
    return make()
  except TorchProcessDied:
    raise
  except Exception as e:  # noqa: BLE001 - a failing variant (torch.compile, often) is reported, not fatal
    return Runner(name, None, error=_error(e))


def _log_runner(log, r: Runner) -> None:
  if r.error:
    log(f'  {r.name}: {r.error}')
  elif r.compile_s is not None:
    log(f'  {r.name}: compile {r.compile_s:.1f} s, first step {r.first_s:.2f} s, warm step {r.warm_s:.2f} s')
  else:
    log(f'  {r.name}: first step {r.first_s:.2f} s, warm step {r.warm_s:.2f} s')


def measure(
  case: Case,
  reps: int,
  steps: int | None,
  rep_seconds: float,
  compile_torch: bool,
  torch_threads: tuple[int, ...],
  log,
  exclude: dict[str, str] | None = None,
  progress: Callable[[str], None] | None = None,
  torch_process: Callable[[], TorchProcess] | None = None,
) -> dict:
  """Builds and warms up every variant of `case`, then times them interleaved; returns the row.

  The JAX variant runs in this process; the PyTorch variants in the one `torch_process()` starts.

  Args:
    case: what to measure.
    reps: timed repetitions per variant.
    steps: steps per repetition, or None to derive them from `rep_seconds`.
    rep_seconds: target duration of the slowest variant's block when `steps` is None.
    compile_torch: add the torch.compile variant (for cases that have one).
    torch_threads: PyTorch intra-op thread counts to try (each with both memory formats).
    log: a `str -> None` progress printer.
    exclude: variant name -> why it is not run (it crashed the process before).
    progress: called with a variant's name before it is built or run (crash attribution).
    torch_process: starts the case's PyTorch process (None: no PyTorch variants).

  Returns:
    The row (see the module docstring).

  Raises:
    TorchProcessDied: the PyTorch process exited (a native crash); `progress` last named the variant.
  """
  exclude = exclude or {}
  progress = progress or (lambda name: None)

  def make(name: str, build: Callable[[], Runner]) -> Runner:
    if name in exclude:
      r = Runner(name, None, error=exclude[name])
    else:
      progress(name)
      r = _try_runner(name, build)
    _log_runner(log, r)
    return r

  jx = make('jax', case.make_jax)
  runners, eager, comp = [jx], [], None
  compile_note = 'n/a: not measured'
  with_torch = torch_process is not None and case.torch_build is not None
  with torch_process() if with_torch else contextlib.nullcontext() as process:
    params_torch = None
    if process is not None:
      params_torch = process.call(op='params').get('params')
      for threads in torch_threads:
        for fmt in TORCH_FORMATS:
          setting = TorchSetting(fmt, threads)
          r = make(setting.name, functools.partial(remote_torch_runner, process, setting))
          r.setting = setting
          eager.append(r)
      ok = [r for r in eager if not r.error]
      fastest = min(ok, key=lambda r: r.warm_s) if ok else None
      for r in ok:
        if r.warm_s > PRUNE_FACTOR * fastest.warm_s:
          r.pruned = True
          log(f'  {r.name}: pruned ({r.warm_s / fastest.warm_s:.1f}x slower than {fastest.name} in warm-up)')
      runners += eager
      if not case.compile_torch:
        compile_note = 'n/a: not measured for sampling'
      elif not compile_torch:
        compile_note = 'n/a: skipped (--no-torch-compile or --quick)'
      elif fastest is not None:
        setting = dataclasses.replace(fastest.setting, compiled=True)
        comp = make(setting.name, functools.partial(remote_torch_runner, process, setting))
        comp.setting = setting
        runners.append(comp)
    elif not torch_installed():
      compile_note = 'n/a: PyTorch not installed (pip install .[bench])'

    timed = [r for r in runners if r.error is None and not r.pruned]
    if steps is None:
      slowest = max((r.warm_s for r in timed), default=1.0)
      # A call that already lasts a block is timed once per block: three 31-s DDIM calls per variant and
      # repetition made that row alone take 18 minutes.
      steps = max(1, min(50, math.ceil(rep_seconds / max(slowest, 1e-6))))
    # One untimed round first: each process's first blocks after the other's run are slower
    # (heap growth, cold caches), which is warm-up, not throughput.
    for rep in range(-WARMUP_ROUNDS, reps):
      k = rep % max(len(timed), 1)  # rotate the order so no variant always runs first (or after JAX)
      for r in timed[k:] + timed[:k]:
        if r.error:
          continue
        try:
          progress(r.name)
          seconds, faults = r.timed_run(steps)
          if rep >= 0:
            r.per_step.append(seconds / steps)
            r.faults.append(faults)
        except TorchProcessDied:
          raise
        except Exception as e:  # noqa: BLE001 - as in _try_runner
          r.error = _error(e)
      if rep < 0:
        log(f'  warm-up round ({steps} steps per variant) done')
        continue
      done = [f'{r.name} {case.batch / r.per_step[-1]:.1f}' for r in timed if len(r.per_step) == rep + 1]
      log(f'  rep {rep + 1}/{reps} ({steps} steps): ' + '; '.join(done) + ' images/s')

  def speed(r: Runner | None):
    return r.images_per_s(case.batch) if r is not None else None

  measured = [r for r in eager if speed(r) is not None]
  best = max(measured, key=speed) if measured else None
  per_format = {}
  for fmt in TORCH_FORMATS:
    values = [speed(r) for r in measured if r.setting.memory_format == fmt]
    per_format[fmt] = max(values) if values else None
  variants = {}
  for r in eager:
    if r.error:
      variants[r.name] = f'error: {r.error}'
    elif r.pruned:
      variants[r.name] = f'pruned after warm-up ({case.batch / r.warm_s:.1f} images/s there)'
    else:
      variants[r.name] = _round(speed(r))
  if comp is not None:
    compile_note = f'n/a: {comp.error}' if comp.error else 'ok'
  jax_ips, torch_ips = speed(jx), speed(best)
  row = dict(
    model=case.model,
    kind=case.kind,
    jax_images_per_s=_round(jax_ips),
    torch_images_per_s=_round(torch_ips),
    ratio=_round(jax_ips / torch_ips, 3) if jax_ips and torch_ips else None,
    compile_s=_round(jx.compile_s, 2),
    peak_mem_mb=_round(jx.peak_mem_mb, 1),
    jax_mesh_devices=jx.mesh_devices,
    jax_batch_split=jx.batch_split,
    jax_convolution=case.convolution,
    jax_compiler_options=case.compiler_options,
    jax_cpu_pool=_xla_env.pool_setting,
    torch_setting=best.name if best else None,
    torch_threads=best.setting.threads if best else None,
    torch_contiguous_images_per_s=_round(per_format['contiguous']),
    torch_channels_last_images_per_s=_round(per_format['channels_last']),
    torch_variants=variants,
    torch_compile_images_per_s=_round(speed(comp)),
    torch_compile=compile_note,
    torch_compile_setting=comp.setting.name if comp is not None else None,
    torch_compile_s=_round(comp.first_s, 1) if comp is not None and comp.first_s is not None else None,
    torch_peak_mem_mb=_round(best.peak_mem_mb, 1) if best else None,
    jax_first_step_s=_round(jx.first_s, 3),
    jax_images_per_s_range=_range(jx, case.batch),
    jax_minor_faults_per_rep=jx.faults or None,
    torch_minor_faults_per_rep=best.faults if best else None,
    warmup_rounds=WARMUP_ROUNDS,
    torch_images_per_s_range=_range(best, case.batch) if best else None,
    batch=case.batch,
    image_size=case.image_size,
    input_shape=list(case.input_shape),
    params_jax=case.params_jax,
    params_torch=params_torch,
    steps_per_rep=steps,
    reps=reps,
    mem_method=jx.mem_method,
    load_avg=_round(os.getloadavg()[0], 2),
    notes=case.notes,
    torch_in_jax_process='torch' in sys.modules,  # False: PyTorch ran in its own process (TorchProcess)
  )
  if jx.error:
    row['errors'] = {'jax': jx.error}
  return row


def _round(x, nd: int = 1):
  return None if x is None else round(float(x), nd)


def _range(r: Runner, batch: int):
  if r.error or not r.per_step:
    return None
  return [round(batch / max(r.per_step), 1), round(batch / min(r.per_step), 1)]


def data_dir() -> Path:
  """$CXRJAX_DATA_DIR, else ../shared/data beside the checkout (as the tests)."""
  env = os.environ.get('CXRJAX_DATA_DIR')
  return Path(env) if env else Path(__file__).resolve().parents[2].parent / 'shared' / 'data'


def measure_pipeline(s: dict, reps: int, log) -> list[dict]:
  """Images/s of the Grain training pipeline on PneumoniaMNIST with 1 and 2 threads."""
  path = data_dir() / 'pneumoniamnist.npz'
  base = dict(model='grain_pipeline', kind='input', jax_images_per_s=None, torch_images_per_s=None, ratio=None,
              compile_s=None, peak_mem_mb=None, batch=s['batch'], image_size=28, input_shape=[28, 28, 1])  # fmt: skip
  if not path.is_file():
    return [dict(base, images_per_s=None, notes=f'{path} not found: set CXRJAX_DATA_DIR')]
  cfg = config_lib.base_config()
  ds = sources.load_npz(str(path), 28, 1, 0)
  ts = rebalance.build_training_set(ds.splits['train'], ds.num_classes, cfg.rebalance, cfg.seed)
  augment = AugmentParams.from_config(cfg.data.augment)
  batch, n = s['batch'], s['batches']
  warm = cfg.data.prefetch + 2
  spe = pipeline.steps_per_epoch(ts, batch)
  epochs = math.ceil((warm + reps * n) / spe) + 1
  rows = []
  for threads in (1, 2):
    tds = pipeline.make_train_dataset(ts, global_batch=batch, num_epochs=epochs, seed=cfg.seed, augment=augment)
    it = pipeline.train_iterator(tds, 0, num_threads=threads, prefetch=cfg.data.prefetch)
    for _ in range(warm):  # more than the prefetch buffer, so the timed batches are produced while timed
      next(it)
    per_batch = []
    for _ in range(reps):
      t = time.perf_counter()
      for _ in range(n):
        next(it)
      per_batch.append((time.perf_counter() - t) / n)
    ips = batch / statistics.median(per_batch)
    log(f'  grain pipeline, {threads} thread(s): {ips:.0f} images/s')
    rows.append(dict(base, model=f'grain_pipeline_threads{threads}', images_per_s=round(ips, 1), num_threads=threads,
                     images_per_s_range=[round(batch / max(per_batch), 1), round(batch / min(per_batch), 1)],
                     steps_per_rep=n, reps=reps, load_avg=_round(os.getloadavg()[0], 2),
                     notes=f'PneumoniaMNIST train split ({len(ts.plan)} images), default augmentation,'
                     f' prefetch {cfg.data.prefetch}'))  # fmt: skip
  return rows


# ----------------------------------------------------------------------------- reporting


def _version(name: str) -> str:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return 'not installed'


def machine_description(torch_threads: tuple[int, ...] = TORCH_THREADS) -> dict:
  cpu = platform.processor() or 'unknown'
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return dict(
    cpu=cpu,
    logical_cores=os.cpu_count(),
    usable_cores=usable,
    load_avg=[round(x, 2) for x in os.getloadavg()],
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=_version('jaxlib'),
    flax=_version('flax'),
    optax=_version('optax'),
    grain=_version('grain'),
    torch=_version('torch'),
    torch_threads=list(torch_threads),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    malloc=_xla_env.malloc_setting,
    jax_devices=[str(d) for d in jax.devices()],
  )


def _fmt(x, nd: int = 1) -> str:
  if x is None:
    return '-'
  return f'{x:,.{nd}f}'


def markdown(rows: list[dict], machine: dict, command: str) -> str:
  """The rows as Markdown tables (models, then input pipeline), with the machine description."""
  lines = [
    '| model | kind | batch | input | JAX img/s | PyTorch eager img/s | PyTorch setting | JAX / PyTorch |'
    ' torch.compile img/s | JAX compile s | JAX peak MB | PyTorch peak MB | params (JAX = PyTorch) |',
    '|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|',
  ]
  notes = []
  for r in rows:
    if r['kind'] == 'input':
      continue
    comp = r.get('torch_compile', '')
    if r.get('torch_compile_images_per_s') is not None:
      comp_cell = _fmt(r['torch_compile_images_per_s'])
    else:
      comp_cell = 'n/a'
      if comp and comp != 'n/a: not measured for sampling':
        notes.append(f'- {r["model"]}: torch.compile {comp}')
    if r.get('errors'):
      notes.append(f'- {r["model"]}: {r["errors"]}')
    if r.get('torch_variants'):
      parts = [f'{k} {_fmt(v) if isinstance(v, float) else v}' for k, v in r['torch_variants'].items()]
      notes.append(f'- {r["model"]} PyTorch eager variants (images/s): ' + '; '.join(parts))
    pj, pt = r.get('params_jax'), r.get('params_torch')
    params = '-' if pj is None else f'{pj:,}' + ('' if pt in (None, pj) else f' != {pt:,}')
    shape = 'x'.join(str(d) for d in r['input_shape'])
    ratio = '-' if r['ratio'] is None else f'{r["ratio"]:.2f}'
    lines.append(
      f'| {r["model"]} | {r["kind"]} | {r["batch"]} | {shape} | {_fmt(r["jax_images_per_s"])} |'
      f' {_fmt(r["torch_images_per_s"])} | {r.get("torch_setting") or "-"} | {ratio} | {comp_cell} |'
      f' {_fmt(r["compile_s"])} | {_fmt(r["peak_mem_mb"], 0)} | {_fmt(r.get("torch_peak_mem_mb"), 0)} | {params} |'
    )
  inputs = [r for r in rows if r['kind'] == 'input']
  if inputs:
    lines += ['', '| input pipeline | threads | batch | images/s | [min-max] |', '|---|---:|---:|---:|---|']
    for r in inputs:
      rng = r.get('images_per_s_range')
      lines.append(f'| {r["model"]} | {r.get("num_threads", "-")} | {r["batch"]} | {_fmt(r.get("images_per_s"))} |'
                   f' {f"{rng[0]:,.0f}-{rng[1]:,.0f}" if rng else r.get("notes", "")} |')  # fmt: skip
  if notes:
    lines += ['', *notes]
  m = machine
  lines += [
    '',
    f'Machine: {m["cpu"]}, {m["logical_cores"]} logical cores ({m["usable_cores"]} usable), load average'
    f' {m["load_avg"][0]} at the start; python {m["python"]}, jax {m["jax"]}, jaxlib {m["jaxlib"]}, flax {m["flax"]},'
    f' optax {m["optax"]}, grain {m["grain"]}, torch {m["torch"]} (threads tried: {m["torch_threads"]});'
    f' XLA_FLAGS={m["xla_flags"]!r}; malloc: {m.get("malloc", "unrecorded")};'
    f' convolutions (ResNet-18, EfficientNetV2, DCGAN, UNet): {m.get("convolution", "xla")}.',
    f'Command: `{command}`',
  ]
  return '\n'.join(lines) + '\n'


def _write(out: str, rows: list[dict], md: str) -> None:
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(rows, indent=1) + '\n')
  os.replace(tmp, path)
  path.with_suffix('.md').write_text(md)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m cxrjax.bench', description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(MODELS + EXTRAS),
                      help=f'comma-separated, from {", ".join(MODELS + EXTRAS)}')  # fmt: skip
  parser.add_argument('--reps', type=int, default=5, help='timed repetitions per variant (median reported)')
  parser.add_argument('--steps', type=int, default=None, help='steps per repetition (default: from --rep-seconds)')
  parser.add_argument('--rep-seconds', type=float, default=10.0, help='target length of a block without --steps')
  parser.add_argument('--out', default=None, help='write the rows to this JSON file and a Markdown table beside it')
  parser.add_argument('--quick', action='store_true', help='tiny models and batches (for tests); no torch.compile')
  parser.add_argument('--no-torch-compile', action='store_true', help='skip the torch.compile variant')
  parser.add_argument('--torch-compile', action='store_true', help='measure torch.compile even with --quick')
  parser.add_argument('--torch-threads', default=None,
                      help='PyTorch thread counts to try, comma-separated (default 2,1; 1 with --quick)')  # fmt: skip
  parser.add_argument('--convolution', default='auto', choices=onednn.CHOICES,
                      help="JAX convolutions (ResNet-18, EfficientNetV2, DCGAN, UNet rows): 'auto' (oneDNN on one CPU device when built), 'onednn', 'xla'")  # fmt: skip
  # Internal: one model in a worker process (see `_run_model`).
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-result', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-exclude', default='{}', help=argparse.SUPPRESS)
  # Internal: the PyTorch variants of one case, in their own process (see `TorchProcess`).
  parser.add_argument('--torch-server', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--torch-case', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--torch-fds', default=None, help=argparse.SUPPRESS)
  return parser


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs the benchmark from the command line; returns the rows."""
  parser = _parser()
  args = parser.parse_args(argv)
  names = [m for m in args.models.split(',') if m]
  for m in names:
    if m not in MODELS + EXTRAS:
      parser.error(f'unknown model {m!r}; choose from {", ".join(MODELS + EXTRAS)}')
  if args.reps < 1 or (args.steps is not None and args.steps < 1):
    parser.error('--reps and --steps must be positive')
  try:
    torch_threads = tuple(int(t) for t in (args.torch_threads or ('1' if args.quick else '2,1')).split(','))
  except ValueError:
    parser.error(f'--torch-threads: expected comma-separated integers, got {args.torch_threads!r}')
  if not torch_threads or min(torch_threads) < 1:
    parser.error('--torch-threads must be positive')
  if args.torch_server:
    _torch_server(args)
    return []
  if args.worker:
    _worker(args, torch_threads)
    return []

  command = 'python -m cxrjax.bench ' + ' '.join(sys.argv[1:] if argv is None else argv)
  machine = machine_description(torch_threads)
  try:
    machine['convolution'] = onednn.resolve(args.convolution)[1]
  except UserError as e:
    parser.error(str(e))
  if not torch_installed():
    _log('PyTorch is not installed: JAX only (pip install .[bench] for the baselines)')
  forward = [f'--reps={args.reps}', f'--rep-seconds={args.rep_seconds}',
             f'--torch-threads={",".join(map(str, torch_threads))}']  # fmt: skip
  forward += [f'--steps={args.steps}'] if args.steps else []
  forward += [f'--convolution={args.convolution}']
  forward += [flag for flag, on in (('--quick', args.quick), ('--no-torch-compile', args.no_torch_compile),
                                    ('--torch-compile', args.torch_compile)) if on]  # fmt: skip
  rows: list[dict] = []
  for name in names:
    rows += _run_model(name, forward)
    if args.out:  # partial results survive an interrupted run
      _write(args.out, rows, markdown(rows, machine, command))
  machine['load_avg_end'] = [round(x, 2) for x in os.getloadavg()]
  md = markdown(rows, machine, command)
  print(md, flush=True)
  if args.out:
    _write(args.out, rows, md)
  return rows


def _run_model(name: str, forward: list[str], max_attempts: int = 6) -> list[dict]:
  """Measures one model in a worker process, re-running it without a variant that crashed the process.

  A crash of native code (PyTorch 2.13's oneDNN convolution backward corrupted the heap with channels_last,
  2 threads and 8-channel 64x64 maps here) cannot be caught in-process. The worker records which variant it
  is running, so the parent can exclude that one, report why, and measure the rest again, interleaved.
  """
  exclude: dict[str, dict[str, str]] = {}
  rows: dict[str, dict] = {}
  with tempfile.TemporaryDirectory(prefix='cxrjax-bench-') as tmp:
    for attempt in range(max_attempts):
      result = os.path.join(tmp, f'rows{attempt}.jsonl')
      cmd = [sys.executable, '-m', 'cxrjax.bench', *forward, f'--worker={name}', f'--worker-result={result}',
             f'--worker-exclude={json.dumps(exclude)}']  # fmt: skip
      proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors='replace')
      tail: list[str] = []
      for line in proc.stderr:  # pass the worker's log through, keep its end for the crash report
        sys.stderr.write(line)
        sys.stderr.flush()
        tail = (tail + [line.strip()])[-5:]
      code = proc.wait()
      done = _read_jsonl(result)
      for row in done:
        rows[row['model']] = row
      if code == 0:
        break
      progress = _read_progress(result + '.progress')
      how = f'signal {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'
      with contextlib.suppress(OSError):
        how = Path(result + '.died').read_text()  # the worker's PyTorch process died, not the worker
      reason = f'crashed the process ({how}; {" | ".join(t for t in tail if t)[-300:]})'
      if progress is None or progress[1] in exclude.get(progress[0], {}):
        rows[f'{name}?'] = _failed_row(name, f'worker {reason}')
        break
      _log(f'[{progress[0]}] {progress[1]} {reason}: measuring again without it')
      exclude.setdefault(progress[0], {})[progress[1]] = reason
  return list(rows.values())


def _failed_row(model: str, error: str) -> dict:
  row = dict.fromkeys(REQUIRED_KEYS)
  return dict(row, model=model, kind='train', batch=None, input_shape=[], errors={'worker': error})


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _read_progress(path: str) -> tuple[str, str] | None:
  try:
    with open(path) as f:
      model, variant = f.read().rstrip('\n').split('\t', 1)
  except (OSError, ValueError):
    return None
  return model, variant


def _worker(args, torch_threads: tuple[int, ...]) -> None:
  """Measures the cases of one model (`--worker`) and appends their rows to `--worker-result`."""
  exclude = json.loads(args.worker_exclude)
  compile_torch = not args.no_torch_compile and (args.torch_compile or not args.quick)
  settings = QUICK if args.quick else FULL
  result = args.worker_result

  def emit(row: dict) -> None:
    with open(result, 'a') as f:
      f.write(json.dumps(row) + '\n')

  if model_name(args.worker) in ONE_POOL_THREAD:  # as the experiment's command line runs it (`main.py`)
    _xla_env.use_one_pool_thread()
  if args.worker == 'pipeline':
    _log('[pipeline]')
    for row in measure_pipeline(settings['pipeline'], args.reps, _log):
      emit(row)
    return
  done = {row['model'] for row in _read_jsonl(result)}
  for case in cases_for(args.worker, args.quick, args.convolution):
    if case.model in done:
      continue
    _log(f'[{case.model}] batch {case.batch}, input {case.input_shape}, load average {os.getloadavg()[0]:.1f}')

    def progress(variant: str, model=case.model) -> None:
      with open(result + '.progress', 'w') as f:
        f.write(f'{model}\t{variant}\n')

    torch_process = None
    if torch_installed():
      torch_process = functools.partial(TorchProcess, args.worker, case.model, args.quick, args.convolution)
    try:
      row = measure(case, args.reps, args.steps, args.rep_seconds, compile_torch, torch_threads, _log,
                    exclude=exclude.get(case.model, {}), progress=progress, torch_process=torch_process)  # fmt: skip
    except TorchProcessDied as e:
      _log(f'[{case.model}] {e}')
      Path(result + '.died').write_text(str(e))
      sys.exit(3)  # `_run_model` reads the progress file, excludes that variant and measures again
    emit(row)
    _cleanup()


def _cleanup() -> None:
  jax.clear_caches()
  gc.collect()
  _malloc_trim()
