r"""Training and sampling throughput of cxrjax's real JAX programs against the same networks in PyTorch.

Usage, from the repository root (`benchmarks/` is not part of the installed package):

  python -m benchmarks [--models resnet18_28,resnet18_64,dcgan,unet,efficientnet_v2_b0,efficientnet_v2_s,pipeline]
      [--reps 5] [--steps N] [--rep-seconds 10] [--out PATH] [--quick] [--torch-threads 2,1]
      [--no-torch-compile | --torch-compile] [--kernels auto|stock|cpu] [--dtypes float32[,bfloat16]]

(`./dev bench ARGS` installs what it needs and runs this.) What is timed is in `benchmarks.cases`:
each JAX row is a trainer's program from its factory, on the backend `--kernels` selects
(`cxrjax.backends.select`, as `config.kernels` does for a run). `--quick` shrinks every model and
batch, tries 1 PyTorch thread only and skips torch.compile unless `--torch-compile`, for tests.

Processes. Each model runs in a fresh worker process (`--worker`), which selects the backend and
calls `entry.configure(kernels, <the model's program>)` before JAX starts, as the experiment's entry
point does (the CPU backend restarts the worker once with its block cache, sets XLA's CPU flags,
malloc, and one XLA pool thread for the programs that want it). The worker runs the JAX variants
itself and starts, per case, a second process for the PyTorch variants (`benchmarks.torch_process`;
the worker never imports PyTorch), so each framework has its own heap and resident set.

Variants (`benchmarks.plan`). On CPU: JAX float32; PyTorch eager in the NCHW and channels_last memory
formats, each with every `--torch-threads` count (one thread is tried because OpenMP waits at every
barrier for a thread that another process has descheduled: on a loaded machine one thread can win,
see BUILD_NOTES.md); torch.compile (default mode) with the format and threads of the fastest eager
variant in warm-up. On a GPU: JAX float32 and bfloat16, PyTorch eager in both formats, the same under
AMP (`torch.autocast('cuda', dtype=torch.bfloat16)`), and torch.compile. The GPU path has not run:
it was written on a machine without a GPU, and only its plan is tested. On a machine with several
GPUs, JAX's step spans every device (as the trainer's) while PyTorch runs on one: set
CUDA_VISIBLE_DEVICES to one device to compare like with like. Both processes share the GPU, so the
worker turns off JAX's preallocation (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless set).

Method (`benchmarks.timing`). Inputs are fixed random batches made once (no input pipeline in the model
rows). JAX training steps run as `loop.run` compiles them, on a data-parallel mesh of every local
device (one CPU device unless XLA_FLAGS sets `--xla_force_host_platform_device_count`); sampling runs
on one device. The variants are interleaved, one process running at a time: repetition r runs a block
of N steps of each variant in turn, the order rotated by one each repetition, so all see the same
load. A PyTorch block is timed inside its process (the pipe's round trip is not counted; on CUDA it
ends with `torch.cuda.synchronize()`). One untimed round of blocks runs first. JAX blocks can still
hit a storm of page faults later (its heap growing by a fresh XLA scratch buffer; BUILD_NOTES.md): the
rows record each block's minor faults, so such blocks can be told from the rest. Two warm-up steps
per variant are not timed. images/s = batch / median over repetitions of the mean step time of a
block; N is `--steps`, or chosen so a block of the slowest variant lasts about `--rep-seconds` (at
least one step). An eager variant more than 3x slower than the fastest one of its dtype in its
warm-up step is not timed further (the row says so, with its warm-up speed). PyTorch's Adam is
`fused=True`. If torch.compile fails, the row says 'n/a' and why.

If a variant kills its process (a native crash cannot be caught in-process; a PyTorch process that
dies stops its worker), the model is measured again without the variant that was running, and the
row names it with the crash. `CXRJAX_BENCH_ABORT_VARIANT=<variant name>` makes the PyTorch process
abort when it builds that variant (the tests use it to exercise this path).

JAX compile time (`compile_s`) is the wall time of `jax.jit(program.step, in_shardings=...,
out_shardings=..., donate_argnums=0, compiler_options=program.step_options).lower(...).compile()`,
measured before any step runs; `jax_first_step_s` is the first execution after it.
`torch_compile_s` is the wall time of the first torch.compile step (compilation of forward and
backward included).

Peak memory, per variant, from just before its parameters are created until the end of its warm-up
steps: on a device that keeps statistics, the growth of its peak allocation (JAX:
`jax.devices()[0].memory_stats()`; PyTorch on CUDA: `torch.cuda.max_memory_allocated()`); on CPU,
where JAX's `memory_stats()` is None, the growth of the process's resident set (the JAX worker's or
the PyTorch process's; see `timing.RssMeter`), after `malloc_trim`. So it counts parameters, optimizer
state, gradients, activations and temporaries, but not compiler memory (JAX's step is compiled
before) nor the runtimes themselves. On N forced CPU devices the replicated state is held N times in
host memory, so peak memory is comparable only between rows with the same `jax_mesh_devices`.

Results: `--out PATH` writes PATH, a JSON list of rows (fields: `benchmarks.report`), and the same
table as Markdown to PATH with the suffix .md, with the machine description; the table is printed
too. On a shared machine the numbers move with the load; compare within a row (same run,
interleaved), not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks import cases, plan, report, timing, torch_process
from cxrjax import backends, entry
from cxrjax.config_lib import KERNELS
from cxrjax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the repository: the workers run `python -m benchmarks` from here


def _parser() -> argparse.ArgumentParser:
  names = ', '.join(cases.MODELS + cases.EXTRAS)
  parser = argparse.ArgumentParser(prog='python -m benchmarks', description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(cases.MODELS + cases.EXTRAS), help=f'comma-separated, from {names}')
  parser.add_argument('--reps', type=int, default=5, help='timed repetitions per variant (median reported)')
  parser.add_argument('--steps', type=int, default=None, help='steps per repetition (default: from --rep-seconds)')
  parser.add_argument('--rep-seconds', type=float, default=10.0, help='target length of a block without --steps')
  parser.add_argument('--out', default=None, help='write the rows to this JSON file and a Markdown table beside it')
  parser.add_argument('--quick', action='store_true', help='tiny models and batches (for tests); no torch.compile')
  parser.add_argument('--no-torch-compile', action='store_true', help='skip the torch.compile variant')
  parser.add_argument('--torch-compile', action='store_true', help='measure torch.compile even with --quick')
  parser.add_argument('--torch-threads', default=None,
                      help='PyTorch thread counts to try on CPU, comma-separated (default 2,1; 1 with --quick)')  # fmt: skip
  parser.add_argument('--dtypes', default=','.join(plan.DTYPES),
                      help='formats to measure where the platform computes them (float32 always: it is the '
                           'reference of the speed-ups and of torch.compile); --dtypes=float32 for float32 rows '
                           'with no bfloat16 program in the same processes')  # fmt: skip
  parser.add_argument('--kernels', default='auto', choices=KERNELS,
                      help="the JAX side's backend, as config.kernels: 'auto' (the CPU backend on one CPU device"
                      " when it can be built, else stock), 'stock' (Flax, optax, XLA) or 'cpu' (insist)")  # fmt: skip
  # Internal: one model in a worker process (see `run_model`).
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-result', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-exclude', default='{}', help=argparse.SUPPRESS)
  # Internal: the PyTorch variants of one case, in their own process (see `benchmarks.torch_process`).
  parser.add_argument('--torch-server', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--torch-case', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--torch-fds', default=None, help=argparse.SUPPRESS)
  return parser


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs the benchmark from the command line (or one of its worker processes); returns the rows."""
  parser = _parser()
  args = parser.parse_args(argv)
  names = [m for m in args.models.split(',') if m]
  for m in names:
    if m not in cases.MODELS + cases.EXTRAS:
      parser.error(f'unknown model {m!r}; choose from {", ".join(cases.MODELS + cases.EXTRAS)}')
  if args.reps < 1 or (args.steps is not None and args.steps < 1):
    parser.error('--reps and --steps must be positive')
  try:
    torch_threads = tuple(int(t) for t in (args.torch_threads or ('1' if args.quick else '2,1')).split(','))
  except ValueError:
    parser.error(f'--torch-threads: expected comma-separated integers, got {args.torch_threads!r}')
  if not torch_threads or min(torch_threads) < 1:
    parser.error('--torch-threads must be positive')
  dtypes = tuple(d for d in args.dtypes.split(',') if d)
  if 'float32' not in dtypes or not set(dtypes) <= set(plan.DTYPES):
    parser.error(f'--dtypes: expected float32, optionally with bfloat16 (from {",".join(plan.DTYPES)}), '
                 f'got {args.dtypes!r}')  # fmt: skip
  args.dtypes = dtypes
  if args.torch_server:
    _torch_server(args)
    return []
  if args.worker:
    worker(args, torch_threads)
    return []

  try:  # fails here, once, when the backend asked for cannot be had; the workers select the same one
    kernels = backends.select(args.kernels).describe()
  except UserError as e:
    parser.error(str(e))
  command = 'python -m benchmarks ' + ' '.join(sys.argv[1:] if argv is None else argv)
  machine = report.machine_description(torch_threads, kernels)
  if not torch_process.torch_installed():
    log('PyTorch is not installed: JAX only (pip install .[bench] for the baselines)')
  forward = [f'--reps={args.reps}', f'--rep-seconds={args.rep_seconds}',
             f'--torch-threads={",".join(map(str, torch_threads))}', f'--kernels={args.kernels}',
             f'--dtypes={",".join(args.dtypes)}']  # fmt: skip
  forward += [f'--steps={args.steps}'] if args.steps else []
  forward += [flag for flag, on in (('--quick', args.quick), ('--no-torch-compile', args.no_torch_compile),
                                    ('--torch-compile', args.torch_compile)) if on]  # fmt: skip
  rows: list[dict] = []
  for name in names:
    rows += run_model(name, forward)
    if args.out:  # partial results survive an interrupted run
      report.write(args.out, rows, report.markdown(rows, machine, command))
  machine['load_avg_end'] = [round(x, 2) for x in os.getloadavg()]
  md = report.markdown(rows, machine, command)
  print(md, flush=True)
  if args.out:
    report.write(args.out, rows, md)
  return rows


def run_model(name: str, forward: list[str], max_attempts: int = 6) -> list[dict]:
  """Measures one model in a worker process, re-running it without a variant that crashed the process.

  A crash of native code (PyTorch 2.13's oneDNN convolution backward once corrupted the heap with
  channels_last, 2 threads and 8-channel 64x64 maps) cannot be caught in-process. The worker records
  which variant it is running, so the parent can exclude that one, report why, and measure the rest
  again, interleaved.
  """
  exclude: dict[str, dict[str, str]] = {}
  rows: dict[str, dict] = {}
  with tempfile.TemporaryDirectory(prefix='cxrjax-bench-') as tmp:
    for attempt in range(max_attempts):
      result = os.path.join(tmp, f'rows{attempt}.jsonl')
      cmd = [sys.executable, '-m', 'benchmarks', *forward, f'--worker={name}', f'--worker-result={result}',
             f'--worker-exclude={json.dumps(exclude)}']  # fmt: skip
      proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors='replace', cwd=ROOT)
      tail: list[str] = []
      for line in proc.stderr:  # pass the worker's log through, keep its end for the crash report
        sys.stderr.write(line)
        sys.stderr.flush()
        tail = (tail + [line.strip()])[-5:]
      code = proc.wait()
      for row in read_jsonl(result):
        rows[row['model']] = row
      if code == 0:
        break
      progress = _read_progress(result + '.progress')
      how = f'signal {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'
      with contextlib.suppress(OSError):
        how = Path(result + '.died').read_text()  # the worker's PyTorch process died, not the worker
      reason = f'crashed the process ({how}; {" | ".join(t for t in tail if t)[-300:]})'
      if progress is None or progress[1] in exclude.get(progress[0], {}):
        rows[f'{name}?'] = report.failed_row(name, f'worker {reason}')
        break
      log(f'[{progress[0]}] {progress[1]} {reason}: measuring again without it')
      exclude.setdefault(progress[0], {})[progress[1]] = reason
  return list(rows.values())


def read_jsonl(path: str) -> list[dict]:
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


def cpu_has_bf16() -> bool:
  """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo's flags."""
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('flags'):
        return bool({'avx512_bf16', 'amx_bf16'} & set(line.split(':', 1)[1].split()))
  return False


def plan_case(case, jax_platform: str, torch_device: str | None, torch_threads, compile_torch: bool, cpu_bf16: bool,
              dtypes: tuple[str, ...] = plan.DTYPES):  # fmt: skip
  """The variants of `case` the worker runs, and why torch.compile is not among them (if it is not)."""
  variants = plan.plan_variants(jax_platform, torch_device, kind=case.kind, torch_threads=torch_threads,
                                compile_torch=compile_torch, cpu_bf16=cpu_bf16, dtypes=dtypes)  # fmt: skip
  if case.kind != 'train':
    note = 'n/a: not measured for sampling'
  elif torch_device is None:
    note = 'n/a: PyTorch not installed (pip install .[bench])'
  elif not compile_torch:
    note = 'n/a: skipped (--no-torch-compile or --quick)'
  else:
    note = 'n/a: no eager variant ran'
  return variants, note


def worker(args, torch_threads: tuple[int, ...]) -> None:
  """Measures the cases of one model (`--worker`) and appends their rows to `--worker-result`."""
  # Before JAX starts: the backend's process settings (the CPU backend may restart this process here,
  # once), and no preallocation of an accelerator's memory, which the PyTorch process shares.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  backend = entry.configure(args.kernels, cases.program_name(args.worker))
  exclude = json.loads(args.worker_exclude)
  compile_torch = not args.no_torch_compile and (args.torch_compile or not args.quick)
  settings = cases.QUICK if args.quick else cases.FULL
  result = args.worker_result

  def emit(row: dict) -> None:
    with open(result, 'a') as f:
      f.write(json.dumps(row) + '\n')

  if args.worker == 'pipeline':
    log('[pipeline]')
    for row in cases.measure_pipeline(settings['pipeline'], args.reps, log):
      emit(row)
    return
  jax_platform = jax.devices()[0].platform
  jax_devices = [str(d) for d in jax.devices()]
  cpu_bf16 = cpu_has_bf16()
  done = {row['model'] for row in read_jsonl(result)}
  for case in cases.cases_for(args.worker, args.quick, backend):
    if case.model in done:
      continue
    log(f'[{case.model}] batch {case.batch}, input {case.input_shape}, load average {os.getloadavg()[0]:.1f}')

    def progress(variant: str, model=case.model) -> None:
      with open(result + '.progress', 'w') as f:
        f.write(f'{model}\t{variant}\n')

    process = (
      torch_process.TorchProcess(args.worker, case.model, args.quick) if torch_process.torch_installed() else None
    )
    try:
      with process or contextlib.nullcontext():
        info = process.call(op='describe') if process else {}
        variants, compile_note = plan_case(case, jax_platform, info.get('device'), torch_threads, compile_torch,
                                           cpu_bf16, args.dtypes)  # fmt: skip
        runner = functools.partial(torch_process.remote_torch_runner, process) if process else None
        measured = timing.measure(case, variants, args.reps, args.steps, args.rep_seconds, log,
                                  exclude=exclude.get(case.model, {}), progress=progress, torch_runner=runner)  # fmt: skip
    except torch_process.TorchProcessDied as e:
      log(f'[{case.model}] {e}')
      Path(result + '.died').write_text(str(e))
      sys.exit(3)  # `run_model` reads the progress file, excludes that variant and measures again
    emit(report.case_row(
      case, measured, args.reps, params_torch=info.get('params'), compile_note=compile_note,
      params_jax=case.num_params(), jax_backend=backend.record([case.program.name] if case.kind == 'train' else []),
      jax_platform=jax_platform, jax_devices=jax_devices, torch_device=info.get('device'), dtypes=list(args.dtypes),
    ))  # fmt: skip
    jax.clear_caches()
    gc.collect()
    timing.malloc_trim()


def _torch_server(args) -> None:
  """The PyTorch process (`--torch-server`): builds its case with the stock backend, then serves the worker."""
  (case,) = [c for c in cases.cases_for(args.torch_server, args.quick, backends.stock()) if c.model == args.torch_case]
  torch_process.torch_server(case, args.torch_fds)
