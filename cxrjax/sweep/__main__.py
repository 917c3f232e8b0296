r"""The experiment table: every method x several seeds, statistics, Grad-CAM, one report.

  python -m cxrjax.sweep --config=configs/sweep.py:cpu --workdir=runs/sweep-cpu

Runs each (method, seed) in `WORKDIR/runs/<method>/seed_<s>` (finished runs are
skipped, interrupted ones resume), with the imbalanced training split fixed
across seeds and methods (`imbalance.seed`), so the seeds are paired: every
method sees the same images. Generators are trained once per method in
`WORKDIR/generators/<name>` and reused by every seed's classifier (their
synthetic sets are drawn per seed), or, with `generators_per_seed`, once per
(generator, seed) in `WORKDIR/generators/<name>_seed_<s>`; the reference
feature network is trained once. Then it aggregates: mean +- 95% CI over
seeds, paired tests of F1, Youden's J and AUROC against the baseline and the
best classic method (paired t-test and Wilcoxon over seeds, paired bootstrap
over test images, DeLong and McNemar on the seed-averaged scores, Holm per
endpoint family), per-class one-vs-rest metrics for K > 2 classes,
Grad-CAM/Grad-CAM++ grids and a lung-focus score, plots, `table.md`,
`table.csv` and `report.md`.
"""

from __future__ import annotations

import os
import sys
import time

import ml_collections
import numpy as np

from cxrjax import fileio, progress
from cxrjax.errors import UserError
from cxrjax.sweep import plan, severity


class _SweepClock:
  """Wall time spent in runs, summed over every invocation of one sweep (a resumed
  sweep adds to it); persisted after each run in WORKDIR/sweep_time.json. Time in a
  run that was killed before finishing is not counted (its resumed part is)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'sweep_time.json')
    self.seconds = fileio.read_json(self.path)['run_seconds'] if os.path.isfile(self.path) else 0.0

  def add(self, seconds: float) -> None:
    self.seconds += seconds
    if jax_process_index() == 0:
      fileio.atomic_write_json(self.path, dict(run_seconds=self.seconds))


def jax_process_index() -> int:
  import jax  # noqa: PLC0415 - heavy import, after flag parsing

  return jax.process_index()


def run_all(sweep: ml_collections.ConfigDict, workdir: str, backend=None) -> dict[tuple[str, int], dict]:
  """Runs every (method, seed) not yet finished, on `backend`; returns their metrics records."""
  from cxrjax.trainers import TRAINERS  # noqa: PLC0415 - heavy import, after flag parsing

  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  plan.per_seed_generators(sweep)  # a bad generator name fails here, whatever the methods
  # Validate every config before anything trains.
  configs = {(m, s): plan.method_config(sweep, m, s, workdir) for m in methods for s in seeds}
  order = sorted(configs, key=lambda ms: (ms[0].startswith(plan.MIX_PREFIX), methods.index(ms[0]), ms[1]))
  records, durations = {}, []
  t_sweep = time.time()
  clock = _SweepClock(workdir)
  for i, (m, s) in enumerate(order):
    wd = plan.run_dir(workdir, m, s)
    t0 = time.time()
    progress.log(f'[sweep] run {i + 1}/{len(order)}: {m} seed {s} -> {wd}')
    records[(m, s)] = TRAINERS[configs[(m, s)].trainer](configs[(m, s)], wd, backend)
    dt = time.time() - t0
    clock.add(dt)
    if dt > 5:  # skipped runs take a second; they say nothing about the ETA
      durations.append(dt)
    left = len(order) - i - 1
    eta = left * float(np.median(durations)) if durations else 0.0
    progress.log(
      f'[sweep] {i + 1}/{len(order)} done, elapsed {progress.fmt_duration(time.time() - t_sweep)},'
      f' ETA {progress.fmt_duration(eta)}'
    )
  return records


def run_study(study: ml_collections.ConfigDict, workdir: str, backend=None) -> dict:
  """The severity study (a config with `ratios`): one sweep per ratio, then the study's table and figure."""
  from cxrjax.sweep import report  # noqa: PLC0415 - heavy import (matplotlib, JAX), after flag parsing

  parts = severity.sweeps(study, workdir)
  # Validate every run's config of every ratio before anything trains.
  for _, sweep, rdir in parts:
    for m in plan.methods_of(sweep):
      for s in sweep.seeds:
        plan.method_config(sweep, m, s, rdir)
  results_dir = study.get('results_dir', '')
  per_ratio = {}
  for ratio, sweep, rdir in parts:
    done_here = os.path.isfile(os.path.join(rdir, 'stats.json'))
    kept = severity.load_kept(sweep, results_dir, ratio) if results_dir and not done_here else None
    if kept is not None:
      records, agg, info = kept
      progress.log(f'[severity] ratio {ratio:g}:1: results kept in {severity.ratio_dir(results_dir, ratio)}'
                   f' (commit {info.get("commit")}); not run again')  # fmt: skip
      per_ratio[ratio] = (sweep, records, agg, info)
      continue
    os.makedirs(rdir, exist_ok=True)
    progress.log(f'[severity] ratio {ratio:g}:1 -> {rdir}')
    t0 = time.time()
    records = run_all(sweep, rdir, backend)
    agg = report.write(sweep, rdir, records, wall_time_s=time.time() - t0)
    info = None
    if results_dir and jax_process_index() == 0:
      first = records[(plan.methods_of(sweep)[0], sweep.seeds[0])]
      run_info = dict(commit=first['run'].get('cxrjax_commit', ''), command=first['run'].get('command', ''))
      severity.keep(sweep, rdir, results_dir, ratio, records, run_info)
    per_ratio[ratio] = (sweep, records, agg, info)
  return severity.write(study, workdir, per_ratio)


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415

  from cxrjax import entry  # noqa: PLC0415
  from cxrjax import main as cli  # noqa: PLC0415
  from cxrjax.sweep import report  # noqa: PLC0415 - heavy import (matplotlib, JAX), after flag parsing

  del argv
  from absl import logging  # noqa: PLC0415

  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    sweep = flags.FLAGS['config'].value
    if sweep is None:
      raise UserError('--config is required, e.g. --config=configs/sweep.py:cpu')
    # Before any JAX work; one backend for every run. The CPU backend may restart the process here.
    backend = entry.start(sweep.experiment, distributed=cli.distributed(), compilation_cache=cli.compilation_cache(),
                          one_program=False)  # fmt: skip
    cli.maybe_initialize_distributed()
    backend.check_devices()
    workdir = flags.FLAGS['workdir'].value or cli._workdir(flags.FLAGS['config'].serialize().split('=', 1)[-1])
    os.makedirs(workdir, exist_ok=True)
    import jax  # noqa: PLC0415

    lock = fileio.WorkdirLock(workdir, jax.process_index())
    lock.acquire()
    try:
      if severity.is_study(sweep):
        run_study(sweep, workdir, backend)
      else:
        t0 = time.time()
        records = run_all(sweep, workdir, backend)
        report.write(sweep, workdir, records, wall_time_s=time.time() - t0)
    finally:
      lock.release()
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  from absl import app

  from cxrjax import main as _cli

  app.run(main, flags_parser=_cli.parse_flags, argv=sys.argv)
