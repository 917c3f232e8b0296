"""How the benchmark times: runners, interleaved repetitions, and memory and page-fault meters.

A `Runner` is one variant of a case, built and warmed up: `run(n)` runs n steps and
returns when they are finished. JAX runners (`jax_step_runner`, `jax_call_runner`)
run in the worker process; PyTorch runners run in the case's PyTorch process
(`benchmarks.torch_process`) and are driven from here over its pipe.

`measure` builds every planned variant of a case, drops eager PyTorch variants that
are pathologically slow in warm-up, and times the rest interleaved: repetition r
runs a block of N steps of each variant in turn, the order rotated by one each
repetition, so every variant sees the same load on a shared machine. One untimed
round of blocks runs first (`WARMUP_ROUNDS`): a process's first blocks after the
other process's run slower (heap growth, cold caches), which is warm-up, not
throughput.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from benchmarks.plan import Variant
from cxrjax import config_lib
from cxrjax import mesh as mesh_lib
from cxrjax.trainers.program import Program

# An eager variant slower than this times the fastest one of its dtype in its warm-up step is not timed
# further. Generous: which thread count wins flips with the load of a shared machine, so only
# pathological variants (OpenMP stalling on tiny operations) are dropped.
PRUNE_FACTOR = 3.0
# Untimed interleaved rounds (a block of every variant) before the timed repetitions.
WARMUP_ROUNDS = 1
JAX_FLOAT32 = Variant('jax')
# Steps per block when they are derived from `rep_seconds`: at least one, at most this many.
MAX_STEPS_PER_BLOCK = 50


class ProcessDied(Exception):
  """The process that runs a variant exited while this one waited for it (a native crash)."""


class RemoteError(Exception):
  """A variant failed in the process that runs it; the message is that process's error text."""


# ----------------------------------------------------------------------------- meters


def malloc_trim() -> None:
  """Returns freed heap pages to the OS, so the next variant's growth is not hidden by reused pages."""
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


def minor_faults() -> int:
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
  """Growth of the process's peak resident set between `start()` and `stop()`, in MB (method in `method`).

  Linux: VmHWM after resetting it through /proc/self/clear_refs, relative to VmRSS at the start;
  elsewhere the growth of getrusage's ru_maxrss, which misses peaks below an earlier one.
  """

  def __init__(self):
    self.method = ''
    self.base = 0

  def start(self) -> RssMeter:
    gc.collect()
    malloc_trim()
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


class DeviceMemoryMeter:
  """Growth of a JAX device's `peak_bytes_in_use` over its `bytes_in_use` at the start, in MB.

  For devices that keep memory statistics (GPU, TPU; CPU devices return None). The peak cannot
  be reset, so a variant built after a larger one reports the earlier peak less its own start:
  an upper bound. The first variant (JAX float32) is exact.
  """

  method = 'device_peak_bytes_in_use'

  def __init__(self, device):
    self.device = device
    self.base = 0

  def start(self) -> DeviceMemoryMeter:
    gc.collect()
    self.base = self.device.memory_stats()['bytes_in_use']
    return self

  def stop(self) -> float:
    return max(0, self.device.memory_stats()['peak_bytes_in_use'] - self.base) / 2**20


def jax_memory_meter():
  """The meter for JAX variants: the device's statistics where it keeps them, else the resident set."""
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  return DeviceMemoryMeter(device) if stats and 'peak_bytes_in_use' in stats else RssMeter()


# ----------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
  """One variant of a step: `run(n)` runs n steps and returns once they are finished."""

  variant: Variant
  run: Callable[[int], Any] | None
  compile_s: float | None = None  # JAX: lower + compile of the step
  first_s: float | None = None  # first warm-up step (torch.compile: compiles there)
  warm_s: float | None = None  # last warm-up step
  peak_mem_mb: float | None = None
  mem_method: str = ''
  error: str | None = None
  pruned: bool = False  # not timed: much slower than the fastest eager variant of its dtype in warm-up
  per_step: list[float] = dataclasses.field(default_factory=list)
  mesh_devices: int | None = None  # JAX step: devices of the compiled batch sharding
  batch_split: bool | None = None  # JAX step: whether that sharding splits the batch
  remote: bool = False  # runs in the PyTorch process: `run` returns (seconds, minor faults) measured there
  faults: list[int] = dataclasses.field(default_factory=list)  # minor page faults per timed block

  @property
  def name(self) -> str:
    return self.variant.name

  def timed_run(self, n: int) -> tuple[float, int]:
    """Runs n steps; (seconds, minor page faults) of the block, measured in the process that ran it."""
    if self.remote:
      return self.run(n)
    f = minor_faults()
    t = time.perf_counter()
    self.run(n)
    return time.perf_counter() - t, minor_faults() - f

  def images_per_s(self, batch: int) -> float | None:
    if self.error or self.pruned or not self.per_step:
      return None
    return batch / statistics.median(self.per_step)


def warm_up(runner: Runner, meter, steps: int = 2) -> Runner:
  """Runs `steps` untimed steps (first and last step times kept) and stops the memory meter after them."""
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


def jax_step_runner(program: Program, batch: dict, variant: Variant = JAX_FLOAT32) -> Runner:
  """A trainer's program as `loop.run` compiles and feeds it, warmed up.

  On a data-parallel mesh of every local device: state sharded by `mesh_lib.state_shardings`
  (replicated with one FSDP shard), the batch split along its first axis (`mesh_lib.to_global`),
  `program.init` jitted with `program.init_options`, `program.step` with `program.step_options`,
  explicit in and out shardings and the state donated. On one device that is a plain jit; with
  `--xla_force_host_platform_device_count=N` in XLA_FLAGS it times the data-parallel program on N
  CPU devices.

  Args:
    program: the trainer's program (from its factory).
    batch: host arrays as the trainer's input pipeline yields them (first axis divisible by the
      device count).
    variant: the JAX variant (its name labels the runner).

  Returns:
    A warmed-up `Runner`; `compile_s` is the step's lower + compile, before any step runs.
  """
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  rows = len(next(iter(batch.values())))
  if rows % mesh.devices.size:
    raise ValueError(f'batch of {rows} is not a multiple of the {mesh.devices.size} devices of the mesh')
  abstract = jax.eval_shape(program.init)
  state_sh = mesh_lib.state_shardings(abstract, mesh, config_lib.base_config().mesh.fsdp_min_size)
  rep, split = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  batch = mesh_lib.to_global(batch, mesh)
  rng = jax.device_put(jax.random.key(1), rep)
  init_c = jax.jit(program.init, out_shardings=state_sh, compiler_options=program.init_options).lower().compile()
  t = time.perf_counter()
  step_c = (
    jax.jit(
      program.step,
      in_shardings=(state_sh, split, rep),
      out_shardings=(state_sh, rep),
      donate_argnums=(0,),
      compiler_options=program.step_options,
    )  # fmt: skip
    .lower(abstract, batch, rng)
    .compile()
  )
  compile_s = time.perf_counter() - t
  meter = jax_memory_meter().start()
  holder = [init_c()]

  def run(n: int):
    out = None
    for _ in range(n):
      holder[0], out = step_c(holder[0], batch, rng)
    jax.block_until_ready((holder[0], out))

  # What the compiled step really takes, not what was asked for: (args, kwargs) -> args[1] is the batch.
  batch_in = jax.tree.leaves(step_c.input_shardings[0][1])[0]
  runner = Runner(variant, run, compile_s=compile_s, mesh_devices=len(batch_in.device_set),
                  batch_split=not batch_in.is_fully_replicated)  # fmt: skip
  return warm_up(runner, meter)


def jax_call_runner(fn, init_fn, args: tuple, init_options=None, variant: Variant = JAX_FLOAT32) -> Runner:
  """A jitted `fn(variables, *args)` (a sampler), variables from `init_fn()`, nothing donated.

  The sampler is jitted with XLA's defaults, as the trainers jit theirs; `init_fn` with `init_options`.
  """
  init_c = jax.jit(init_fn, compiler_options=init_options).lower().compile()
  abstract = jax.eval_shape(init_fn)
  t = time.perf_counter()
  fn_c = jax.jit(fn).lower(abstract, *args).compile()
  compile_s = time.perf_counter() - t
  meter = jax_memory_meter().start()
  variables = init_c()

  def run(n: int):
    out = None
    for _ in range(n):
      out = fn_c(variables, *args)
    jax.block_until_ready(out)

  return warm_up(Runner(variant, run, compile_s=compile_s), meter)


# ----------------------------------------------------------------------------- measuring


def error_text(e: BaseException) -> str:
  msg = ' '.join(str(e).split())
  return msg[:400] if isinstance(e, RemoteError) else f'{type(e).__name__}: {msg[:300]}'


def _try_runner(variant: Variant, make: Callable[[], Runner]) -> Runner:
  try:
    return make()
  except ProcessDied:
    raise
  except Exception as e:  # noqa: BLE001 - a failing variant (torch.compile, often) is reported, not fatal
    return Runner(variant, None, error=error_text(e))


def _log_runner(log, r: Runner) -> None:
  if r.error:
    log(f'  {r.name}: {r.error}')
  elif r.compile_s is not None:
    log(f'  {r.name}: compile {r.compile_s:.1f} s, first step {r.first_s:.2f} s, warm step {r.warm_s:.2f} s')
  else:
    log(f'  {r.name}: first step {r.first_s:.2f} s, warm step {r.warm_s:.2f} s')


def steps_per_block(runners: list[Runner], steps: int | None, rep_seconds: float) -> int:
  """`steps`, or enough steps for the slowest runner's block to last about `rep_seconds`.

  A call that already lasts a block is timed once per block (a long sampling call would otherwise
  make its row take many minutes).
  """
  if steps is not None:
    return steps
  slowest = max((r.warm_s for r in runners if r.error is None and not r.pruned), default=1.0)
  return max(1, min(MAX_STEPS_PER_BLOCK, math.ceil(rep_seconds / max(slowest, 1e-6))))


def interleave(runners: list[Runner], reps: int, steps: int, log, progress=None, batch: int = 0) -> None:
  """Times `reps` blocks of `steps` steps per runner, interleaved, after `WARMUP_ROUNDS` untimed rounds.

  Fills each runner's `per_step` and `faults`; a runner that raises gets its `error` and is skipped
  from then on (a dead PyTorch process raises `ProcessDied` out of here).
  """
  progress = progress or (lambda name: None)
  timed = [r for r in runners if r.error is None and not r.pruned]
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
      except ProcessDied:
        raise
      except Exception as e:  # noqa: BLE001 - as in _try_runner
        r.error = error_text(e)
    if rep < 0:
      log(f'  warm-up round ({steps} steps per variant) done')
      continue
    done = [f'{r.name} {batch / r.per_step[-1]:.1f}' for r in timed if len(r.per_step) == rep + 1]
    log(f'  rep {rep + 1}/{reps} ({steps} steps): ' + '; '.join(done) + ' images/s')


@dataclasses.dataclass
class Measured:
  """What `measure` found: every runner (in plan order, torch.compile resolved) and the block length."""

  runners: list[Runner]
  steps: int

  def jax(self, dtype: str = 'float32') -> Runner | None:
    return next((r for r in self.runners if r.variant == Variant('jax', dtype)), None)

  def eager(self, dtype: str = 'float32') -> list[Runner]:
    return [r for r in self.runners if r.variant.eager and r.variant.dtype == dtype]

  def compiled(self) -> Runner | None:
    return next((r for r in self.runners if r.variant.compiled), None)


def measure(
  case,
  variants: list[Variant],
  reps: int,
  steps: int | None,
  rep_seconds: float,
  log,
  exclude: dict[str, str] | None = None,
  progress: Callable[[str], None] | None = None,
  torch_runner: Callable[[Variant], Runner] | None = None,
) -> Measured:
  """Builds and warms up every variant of `case`, then times them interleaved.

  JAX variants run in this process (`case.jax_runner(variant)`); PyTorch variants wherever
  `torch_runner` builds them (the case's PyTorch process: `torch_process.remote_torch_runner`).

  Args:
    case: what to measure (`benchmarks.cases.Case`).
    variants: from `plan_variants`, in build order.
    reps: timed repetitions per variant.
    steps: steps per repetition, or None to derive them from `rep_seconds`.
    rep_seconds: target duration of the slowest variant's block when `steps` is None.
    log: a `str -> None` progress printer.
    exclude: variant name -> why it is not run (it crashed the process before).
    progress: called with a variant's name before it is built or run (crash attribution).
    torch_runner: builds a PyTorch variant (None: PyTorch variants are not run).

  Returns:
    The runners and the block length.

  Raises:
    ProcessDied: the PyTorch process exited (a native crash); `progress` last named the variant.
  """
  exclude = exclude or {}
  progress = progress or (lambda name: None)

  def make(variant: Variant, build: Callable[[], Runner]) -> Runner:
    if variant.name in exclude:
      r = Runner(variant, None, error=exclude[variant.name])
    else:
      progress(variant.name)
      r = _try_runner(variant, build)
    _log_runner(log, r)
    return r

  runners = []
  for v in variants:
    if v.framework == 'jax':
      runners.append(make(v, functools.partial(case.jax_runner, v)))
    elif torch_runner is not None and v.eager:
      runners.append(make(v, functools.partial(torch_runner, v)))
  for dtype in {r.variant.dtype for r in runners if r.variant.eager}:
    ok = [r for r in runners if r.variant.eager and r.variant.dtype == dtype and not r.error]
    fastest = min(ok, key=lambda r: r.warm_s, default=None)
    for r in ok:
      if r.warm_s > PRUNE_FACTOR * fastest.warm_s:
        r.pruned = True
        log(f'  {r.name}: pruned ({r.warm_s / fastest.warm_s:.1f}x slower than {fastest.name} in warm-up)')
  compile_plan = next((v for v in variants if v.compiled), None)
  eager32 = [r for r in runners if r.variant.eager and r.variant.dtype == 'float32' and not r.error]
  if torch_runner is not None and compile_plan is not None and eager32:
    v = compile_plan.like(min(eager32, key=lambda r: r.warm_s).variant)
    runners.append(make(v, functools.partial(torch_runner, v)))
  n = steps_per_block(runners, steps, rep_seconds)
  interleave(runners, reps, n, log, progress, case.batch)
  return Measured(runners, n)
