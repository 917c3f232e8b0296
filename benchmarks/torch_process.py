"""The PyTorch process of a case: a child of the JAX worker that builds and runs the PyTorch variants.

Why a second process: in one process the two frameworks share one malloc heap and
one resident set, and JAX's blocks ran slower after PyTorch's (BUILD_NOTES.md).
Here each framework has its own heap and resident set, while the blocks stay
interleaved, one process running at a time, so both see the same load. The JAX
worker never imports PyTorch; this process imports cxrjax to build the case (its
configs, shapes and random inputs) with the stock backend and with JAX on the CPU
(`JAX_PLATFORMS=cpu`, so it takes no accelerator memory), and runs no JAX step.
It inherits the worker's environment (the block cache's LD_PRELOAD included) but
not its in-process settings (malloc, XLA's pool).

Protocol: one JSON object per line over two pipes; every command gets one reply.
`describe` -> the PyTorch parameter count and the device ('cuda' when PyTorch
sees a GPU, else 'cpu'); `build` (a `Variant`) -> its warm-up times and memory,
or `error`; `run` (name, n) -> the seconds n steps took and their minor page
faults, or `error`; `close` ends the process. Its stdout goes to stderr (the
benchmark's stdout is the table), its stderr is the worker's.

On CUDA (written for GPU machines, not run here: none was available): models and
inputs live on the device, every block ends with `torch.cuda.synchronize()`, and
peak memory is `torch.cuda.max_memory_allocated()` over the allocation at the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import timing
from benchmarks.plan import Variant
from benchmarks.timing import ProcessDied, RemoteError, Runner

ROOT = Path(__file__).resolve().parents[1]  # the repository: `python -m benchmarks` runs from here
ABORT_VARIANT = 'CXRJAX_BENCH_ABORT_VARIANT'  # fault injection for the tests (see `serve`)


def torch_installed() -> bool:
  """Whether PyTorch is importable, found without importing it (the JAX worker never imports it)."""
  return importlib.util.find_spec('torch') is not None


class TorchProcessDied(ProcessDied):
  """The PyTorch process of a case exited while the JAX worker waited for its reply."""


class TorchProcess:
  """The client side: starts `python -m benchmarks --torch-server=MODEL --torch-case=CASE` and talks to it."""

  def __init__(self, model: str, case: str, quick: bool):
    cmd_r, cmd_w = os.pipe()
    reply_r, reply_w = os.pipe()
    argv = [sys.executable, '-m', 'benchmarks', f'--torch-server={model}', f'--torch-case={case}',
            f'--torch-fds={cmd_r},{reply_w}'] + (['--quick'] if quick else [])  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    self.proc = subprocess.Popen(argv, pass_fds=(cmd_r, reply_w), stdout=sys.stderr.fileno(), cwd=ROOT, env=env)
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


def remote_torch_runner(process: TorchProcess, variant: Variant) -> Runner:
  """A PyTorch variant built, warmed up and run in `process` (`torch_runner` there)."""
  reply = process.call(op='build', variant=dataclasses.asdict(variant))
  if 'error' in reply:
    return Runner(variant, None, error=reply['error'])

  def run(n: int) -> tuple[float, int]:
    answer = process.call(op='run', name=variant.name, n=n)
    if 'error' in answer:
      raise RemoteError(answer['error'])
    return answer['seconds'], answer['faults']

  return Runner(variant, run, first_s=reply['first_s'], warm_s=reply['warm_s'], peak_mem_mb=reply['peak_mem_mb'],
                mem_method=reply['mem_method'], remote=True)  # fmt: skip


# ----------------------------------------------------------------------------- the PyTorch side


def device() -> str:
  """The device type PyTorch runs on here: 'cuda' when it sees a GPU, else 'cpu'."""
  import torch  # noqa: PLC0415 - the PyTorch process only

  return 'cuda' if torch.cuda.is_available() else 'cpu'


class CudaMemoryMeter:
  """Growth of `torch.cuda.max_memory_allocated()` over the allocation at `start()`, in MB."""

  method = 'cuda_max_memory_allocated'

  def __init__(self):
    self.base = 0

  def start(self) -> CudaMemoryMeter:
    import torch  # noqa: PLC0415 - the PyTorch process only

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    self.base = torch.cuda.memory_allocated()
    return self

  def stop(self) -> float:
    import torch  # noqa: PLC0415

    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - self.base) / 2**20


def torch_runner(build: Callable[[Variant], Callable[[], Any]], variant: Variant) -> Runner:
  """Builds a PyTorch variant in this process: `build(variant)` makes the model and optimizer, returns one step.

  Memory: the growth of the process's resident set on CPU, of CUDA's allocation on CUDA, from just
  before the model is made until the end of its warm-up steps.
  """
  import torch  # noqa: PLC0415 - the PyTorch process (and the in-process profiles) only

  torch.manual_seed(0)
  if variant.threads is not None:
    torch.set_num_threads(variant.threads)
  cuda = variant.device == 'cuda'
  meter = CudaMemoryMeter().start() if cuda else timing.RssMeter().start()
  step = build(variant)

  def run(n: int):
    if variant.threads is not None:
      torch.set_num_threads(variant.threads)  # a process-wide setting; the variants take turns
    for _ in range(n):
      step()
    if cuda:
      torch.cuda.synchronize()  # the block ends when the device has finished it

  return timing.warm_up(Runner(variant, run), meter)


def serve(case, runners: dict[str, Runner], command: dict) -> dict:
  """One command of the protocol (see the module docstring) for `case`."""
  op = command['op']
  if op == 'describe':
    return dict(params=case.count_torch() if case.count_torch else None, device=device())
  if op == 'build':
    variant = Variant(**command['variant'])
    if os.environ.get(ABORT_VARIANT) == variant.name:
      os.abort()  # fault injection for the tests: a native crash, as a heap corruption in PyTorch once was
    r = torch_runner(case.torch_build, variant)
    runners[variant.name] = r
    return dict(first_s=r.first_s, warm_s=r.warm_s, peak_mem_mb=r.peak_mem_mb, mem_method=r.mem_method)
  if op == 'run':
    seconds, faults = runners[command['name']].timed_run(command['n'])
    return dict(seconds=seconds, faults=faults)
  raise ValueError(f'unknown command {op!r}')


def torch_server(case, fds: str) -> None:
  """The PyTorch process's loop: answers the JAX worker's commands on the pipes `fds` until `close`."""
  cmd_fd, reply_fd = (int(x) for x in fds.split(','))
  runners: dict[str, Runner] = {}
  with os.fdopen(cmd_fd) as commands, os.fdopen(reply_fd, 'w') as replies:
    for line in commands:
      command = json.loads(line)
      if command['op'] == 'close':
        break
      try:
        reply = serve(case, runners, command)
      except Exception as e:  # noqa: BLE001 - reported to the worker as the variant's error
        reply = dict(error=timing.error_text(e))
      replies.write(json.dumps(reply) + '\n')
      replies.flush()
