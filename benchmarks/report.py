"""The benchmark's results: one row (a dict) per case, a Markdown table, and the machine it ran on.

Every model row has `model, kind ('train' | 'sample'), jax_images_per_s (JAX float32),
torch_images_per_s (the fastest PyTorch eager float32 variant), ratio (JAX / PyTorch), compile_s,
peak_mem_mb (JAX float32)`, and:

- the JAX side: `jax_backend` (`Backend.record([program])`: kernels, description, what
  `configure_process` did in the worker (XLA flags, malloc, XLA's CPU pool), and the compile
  options of the row's program; a sampler's row names no program, since samplers are jitted
  with XLA's defaults), `jax_platform`, `jax_devices`, `jax_mesh_devices` and `jax_batch_split`
  (devices of the step's batch sharding as compiled, and whether the batch is split over them;
  None for sampling and failed steps), `jax_first_step_s`, `jax_images_per_s_range` ([slowest,
  fastest] repetition), `jax_minor_faults_per_rep` (minor page faults of each timed block: a
  growing heap shows here), `mem_method`, `jax_variants` (every JAX variant: images/s, or why not
  timed), `jax_bfloat16_images_per_s` and `ratio_bfloat16` (JAX bfloat16 / PyTorch AMP bf16;
  None where bfloat16 is not planned), `dtypes` (the formats asked for, `--dtypes`);
- the PyTorch side: `torch_device`, `torch_setting` and `torch_threads` (the fastest eager
  float32 variant), `torch_contiguous_images_per_s` and `torch_channels_last_images_per_s`
  (the faster thread count of each format), `torch_variants` (every eager variant: images/s, or
  why not timed), `torch_amp_bf16_images_per_s` and `torch_amp_bf16_setting`,
  `torch_compile_images_per_s` (None when not measured), `torch_compile` ('ok' or 'n/a:
  reason'), `torch_compile_setting`, `torch_compile_s` (the first torch.compile step, compilation
  included), `torch_peak_mem_mb`, `torch_mem_method`, `torch_images_per_s_range`,
  `torch_minor_faults_per_rep`, `torch_in_jax_process` (False: PyTorch ran in its own process);
- the case: `batch, image_size, input_shape, params_jax, params_torch, steps_per_rep, reps,
  warmup_rounds, load_avg, notes`, and `errors` when the JAX variant or the worker failed.

Input-pipeline rows (kind 'input') have `images_per_s` and `num_threads`; their JAX/PyTorch
fields are None.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.timing import WARMUP_ROUNDS, Measured, Runner

REQUIRED_KEYS = ('model', 'jax_images_per_s', 'torch_images_per_s', 'ratio', 'compile_s', 'peak_mem_mb')


def _round(x, nd: int = 1):
  return None if x is None else round(float(x), nd)


def _range(r: Runner | None, batch: int):
  if r is None or r.error or not r.per_step:
    return None
  return [round(batch / max(r.per_step), 1), round(batch / min(r.per_step), 1)]


def _outcome(r: Runner, batch: int):
  """A variant's images/s, or why it has none."""
  if r.error:
    return f'error: {r.error}'
  if r.pruned:
    return f'pruned after warm-up ({batch / r.warm_s:.1f} images/s there)'
  return _round(r.images_per_s(batch))


def case_row(case, measured: Measured, reps: int, *, params_torch, compile_note: str, **extra) -> dict:
  """The row of one measured case (see the module docstring); `extra` adds the worker's fields.

  Args:
    case: the case (`benchmarks.cases.Case`).
    measured: what `timing.measure` returned.
    reps: timed repetitions per variant.
    params_torch: the PyTorch twin's parameter count (None without PyTorch).
    compile_note: why there is no torch.compile variant, when there is none.
    **extra: `jax_backend`, `jax_platform`, `jax_devices`, `torch_device`, ...
  """
  batch = case.batch

  def speed(r: Runner | None):
    return r.images_per_s(batch) if r is not None else None

  def fastest(runners: list[Runner]) -> Runner | None:
    timed = [r for r in runners if speed(r) is not None]
    return max(timed, key=speed) if timed else None

  jx, jb = measured.jax('float32'), measured.jax('bfloat16')
  eager, amp = measured.eager('float32'), measured.eager('bfloat16')
  best, best_amp, comp = fastest(eager), fastest(amp), measured.compiled()
  per_format = {}
  for fmt in ('contiguous', 'channels_last'):
    values = [speed(r) for r in eager if r.variant.memory_format == fmt and speed(r) is not None]
    per_format[fmt] = max(values) if values else None
  if comp is not None:
    compile_note = f'n/a: {comp.error}' if comp.error else 'ok'
  jax_ips, torch_ips = speed(jx), speed(best)
  jb_ips, amp_ips = speed(jb), speed(best_amp)
  row = dict(
    model=case.model,
    kind=case.kind,
    jax_images_per_s=_round(jax_ips),
    torch_images_per_s=_round(torch_ips),
    ratio=_round(jax_ips / torch_ips, 3) if jax_ips and torch_ips else None,
    compile_s=_round(jx.compile_s, 2) if jx else None,
    peak_mem_mb=_round(jx.peak_mem_mb, 1) if jx else None,
    jax_mesh_devices=jx.mesh_devices if jx else None,
    jax_batch_split=jx.batch_split if jx else None,
    jax_variants={r.name: _outcome(r, batch) for r in measured.runners if r.variant.framework == 'jax'},
    jax_bfloat16_images_per_s=_round(jb_ips),
    ratio_bfloat16=_round(jb_ips / amp_ips, 3) if jb_ips and amp_ips else None,
    torch_setting=best.name if best else None,
    torch_threads=best.variant.threads if best else None,
    torch_contiguous_images_per_s=_round(per_format['contiguous']),
    torch_channels_last_images_per_s=_round(per_format['channels_last']),
    torch_variants={r.name: _outcome(r, batch) for r in eager + amp},
    torch_amp_bf16_images_per_s=_round(amp_ips),
    torch_amp_bf16_setting=best_amp.name if best_amp else None,
    torch_compile_images_per_s=_round(speed(comp)),
    torch_compile=compile_note,
    torch_compile_setting=comp.name if comp is not None else None,
    torch_compile_s=_round(comp.first_s, 1) if comp is not None and comp.first_s is not None else None,
    torch_peak_mem_mb=_round(best.peak_mem_mb, 1) if best else None,
    torch_mem_method=best.mem_method if best else None,
    jax_first_step_s=_round(jx.first_s, 3) if jx else None,
    jax_images_per_s_range=_range(jx, batch),
    jax_minor_faults_per_rep=(jx.faults or None) if jx else None,
    torch_minor_faults_per_rep=best.faults if best else None,
    warmup_rounds=WARMUP_ROUNDS,
    torch_images_per_s_range=_range(best, batch),
    batch=batch,
    image_size=case.image_size,
    input_shape=list(case.input_shape),
    params_torch=params_torch,
    steps_per_rep=measured.steps,
    reps=reps,
    mem_method=jx.mem_method if jx else None,
    load_avg=_round(os.getloadavg()[0], 2),
    notes=case.notes,
    torch_in_jax_process='torch' in sys.modules,  # False: PyTorch ran in its own process (torch_process)
  )
  row.update(extra)
  if jx is not None and jx.error:
    row['errors'] = {'jax': jx.error}
  return row


def failed_row(model: str, error: str) -> dict:
  row = dict.fromkeys(REQUIRED_KEYS)
  return dict(row, model=model, kind='train', batch=None, input_shape=[], errors={'worker': error})


# ----------------------------------------------------------------------------- machine and table


def _version(name: str) -> str:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return 'not installed'


def machine_description(torch_threads: tuple[int, ...], kernels: str = '') -> dict:
  """The host, the versions and the user's XLA_FLAGS; starts no JAX backend (the workers report devices)."""
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
    jax=_version('jax'),
    jaxlib=_version('jaxlib'),
    flax=_version('flax'),
    optax=_version('optax'),
    grain=_version('grain'),
    torch=_version('torch'),
    torch_threads=list(torch_threads),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    kernels=kernels,
  )


def _fmt(x, nd: int = 1) -> str:
  if x is None:
    return '-'
  return f'{x:,.{nd}f}'


def _backend_lines(rows: list[dict]) -> list[str]:
  """What the workers ran on (from the first row that records it), and each row's program settings."""
  first = next((r for r in rows if r.get('jax_backend')), None)
  if first is None:
    return []
  b = first['jax_backend']
  process = b.get('process') or {}
  devices = ', '.join(first.get('jax_devices') or [])
  lines = [
    f'JAX backend: {b["description"]}; JAX devices: {devices}; XLA_FLAGS in the worker:'
    f' {process.get("xla_flags", os.environ.get("XLA_FLAGS", ""))!r}; malloc: {process.get("malloc", "unchanged")};'
    f' PyTorch device: {first.get("torch_device") or "-"}.'
  ]
  groups: dict[str, list[str]] = {}
  for r in rows:
    if r.get('jax_backend'):
      pool = (r['jax_backend'].get('process') or {}).get('xla_cpu_pool', 'default')
      options = list((r['jax_backend'].get('compile_options') or {}).values())
      compiled = 'a sampler, jitted with XLA defaults' if not options else f'step compile options {options[0]}'
      key = f'XLA CPU pool {pool}; {compiled}'
      groups.setdefault(key, []).append(r['model'])
  lines += [f'- {", ".join(models)}: {key}' for key, models in groups.items()]
  return lines


def markdown(rows: list[dict], machine: dict, command: str) -> str:
  """The rows as Markdown tables (models, then input pipeline), with the machine description."""
  bf16 = any(r.get('jax_bfloat16_images_per_s') or r.get('torch_amp_bf16_images_per_s') for r in rows)
  extra_head = ' JAX bf16 img/s | PyTorch AMP bf16 img/s |' if bf16 else ''
  lines = [
    '| model | kind | batch | input | JAX img/s | PyTorch eager img/s | PyTorch setting | JAX / PyTorch |'
    ' torch.compile img/s |' + extra_head + ' JAX compile s | JAX peak MB | PyTorch peak MB | params (JAX = PyTorch) |',
    '|---|---|---:|---|---:|---:|---|---:|---:|' + ('---:|---:|' if bf16 else '') + '---:|---:|---:|---:|',
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
    extra = (
      f' {_fmt(r.get("jax_bfloat16_images_per_s"))} | {_fmt(r.get("torch_amp_bf16_images_per_s"))} |' if bf16 else ''
    )
    lines.append(
      f'| {r["model"]} | {r["kind"]} | {r["batch"]} | {shape} | {_fmt(r["jax_images_per_s"])} |'
      f' {_fmt(r["torch_images_per_s"])} | {r.get("torch_setting") or "-"} | {ratio} | {comp_cell} |{extra}'
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
    f' optax {m["optax"]}, grain {m["grain"]}, torch {m["torch"]} (threads tried on CPU: {m["torch_threads"]});'
    f' XLA_FLAGS={m["xla_flags"]!r} given; kernels: {m.get("kernels") or "-"}.',
  ]
  lines += _backend_lines(rows)
  lines.append(f'Command: `{command}`')
  return '\n'.join(lines) + '\n'


def write(out: str, rows: list[dict] | dict, md: str) -> None:
  """`out`: the rows as JSON (replaced atomically); `out` with the suffix .md: the table."""
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(rows, indent=1) + '\n')
  os.replace(tmp, path)
  path.with_suffix('.md').write_text(md)
