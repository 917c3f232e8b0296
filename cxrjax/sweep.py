r"""The experiment table: every method x several seeds, statistics, Grad-CAM, one report.

  python -m cxrjax.sweep --config=configs/sweep.py:cpu --workdir=runs/sweep-cpu

Runs each (method, seed) in `WORKDIR/runs/<method>/seed_<s>` (finished runs are
skipped, interrupted ones resume), with the imbalanced training split fixed
across seeds and methods (`imbalance.seed`), so the seeds are paired: every
method sees the same images. Generators are trained once per method in
`WORKDIR/generators/<name>` and reused by every seed's classifier (their
synthetic sets are drawn per seed); the reference feature network is trained
once. Then it aggregates: mean +- 95% CI over seeds, paired tests against the
baseline and the best classic method (paired t-test and Wilcoxon over seeds,
paired bootstrap over test images), Grad-CAM/Grad-CAM++ grids and a lung-focus
score, plots, `table.md`, `table.csv` and `report.md`.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import sys
import time
from collections.abc import Callable

import ml_collections
import numpy as np

import cxrjax  # noqa: F401 - sets XLA flags before JAX starts
from cxrjax import config_lib, fileio, progress
from cxrjax.errors import UserError

CLASSIC = ('class_weights', 'undersample', 'oversample', 'smote', 'augment', 'focal')


def _classic(method: str) -> Callable:
  def apply(c):
    if method == 'focal':
      c.loss.name = 'focal'
    else:
      c.rebalance.method = method

  return apply


def _gan(conditional: bool, alpha: float = 0.5) -> Callable:
  def apply(c):
    c.trainer = 'gan'
    c.gan.conditional = conditional
    c.gan.alpha = alpha
    c.rebalance.method = 'synthetic'

  return apply


def _ldm(mode: str) -> Callable:
  def apply(c):
    c.trainer = 'ldm'
    c.ldm.mode = mode
    c.rebalance.method = 'synthetic'

  return apply


# name -> (config edit, generator name shared across seeds or None)
METHODS: dict[str, tuple[Callable, str | None]] = {
  'baseline': (lambda c: None, None),
  **{m: (_classic(m), None) for m in CLASSIC},
  'dcgan': (_gan(False), 'dcgan'),
  'cdcgan_a0.25': (_gan(True, 0.25), 'cdcgan_a0.25'),
  'cdcgan_a0.5': (_gan(True, 0.5), 'cdcgan_a0.5'),
  'cdcgan_a0.75': (_gan(True, 0.75), 'cdcgan_a0.75'),
  'ldm_sample': (_ldm('sample'), 'ldm'),
  'ldm_img2img': (_ldm('img2img'), 'ldm'),  # same trained generator as ldm_sample
}
MIX_PREFIX = 'mix:'  # 'mix:dcgan+cdcgan_a0.25' mixes those methods' synthetic sets 1:1


def method_config(sweep: ml_collections.ConfigDict, method: str, seed: int, workdir: str) -> ml_collections.ConfigDict:
  """The full experiment config of one (method, seed) run."""
  c = copy.deepcopy(sweep.experiment)
  c.unlock()
  c.seed = seed
  c.imbalance.seed = sweep.data_seed  # the same imbalanced training split for every run
  if method.startswith(MIX_PREFIX):
    parts = method[len(MIX_PREFIX) :].split('+')
    for p in parts:
      if p not in METHODS or METHODS[p][1] is None:
        raise UserError(f'sweep method {method!r}: {p!r} is not a generative method')
    c.rebalance.method = 'synthetic'
    c.rebalance.synthetic = ','.join(
      f'{os.path.join(run_dir(workdir, p, seed), "synthetic.npz")}:{1.0 / len(parts)}' for p in parts
    )
    return config_lib.finalize(c)
  if method not in METHODS:
    raise UserError(f'sweep method {method!r}: expected one of {", ".join(METHODS)} or mix:a+b')
  edit, generator = METHODS[method]
  edit(c)
  if generator:
    c.generator_tag = method
    c.generator_seed = sweep.generator_seed
    c.generator_dir = os.path.join(workdir, 'generators', generator)
  c.quality.reference_dir = os.path.join(workdir, 'reference')
  return config_lib.finalize(c)


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', method.replace(':', '_').replace('+', '_'), f'seed_{seed}')


def methods_of(sweep) -> list[str]:
  return [m.strip() for m in sweep.methods.split(',') if m.strip()]


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


def run_all(sweep: ml_collections.ConfigDict, workdir: str) -> dict[tuple[str, int], dict]:
  """Runs every (method, seed) not yet finished; returns their metrics records."""
  from cxrjax.trainers import TRAINERS  # noqa: PLC0415 - heavy import, after flag parsing

  methods = methods_of(sweep)
  seeds = list(sweep.seeds)
  # Validate every config before anything trains.
  configs = {(m, s): method_config(sweep, m, s, workdir) for m in methods for s in seeds}
  order = sorted(configs, key=lambda ms: (ms[0].startswith(MIX_PREFIX), methods.index(ms[0]), ms[1]))
  records, durations = {}, []
  t_sweep = time.time()
  clock = _SweepClock(workdir)
  for i, (m, s) in enumerate(order):
    wd = run_dir(workdir, m, s)
    t0 = time.time()
    progress.log(f'[sweep] run {i + 1}/{len(order)}: {m} seed {s} -> {wd}')
    records[(m, s)] = TRAINERS[configs[(m, s)].trainer](configs[(m, s)], wd)
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


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415

  from cxrjax import main as cli  # noqa: PLC0415
  from cxrjax.eval import sweep_report  # noqa: PLC0415

  del argv
  from absl import logging  # noqa: PLC0415

  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  cli.maybe_initialize_distributed()
  try:
    sweep = flags.FLAGS['config'].value
    if sweep is None:
      raise UserError('--config is required, e.g. --config=configs/sweep.py:cpu')
    workdir = flags.FLAGS['workdir'].value or cli._workdir(flags.FLAGS['config'].serialize().split('=', 1)[-1])
    os.makedirs(workdir, exist_ok=True)
    import jax  # noqa: PLC0415

    lock = fileio.WorkdirLock(workdir, jax.process_index())
    lock.acquire()
    try:
      t0 = time.time()
      records = run_all(sweep, workdir)
      sweep_report.write(sweep, workdir, records, wall_time_s=time.time() - t0)
    finally:
      lock.release()
  except UserError as e:
    cli.fail(str(e))


def csv_text(rows: list[dict]) -> str:
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return buf.getvalue()


if __name__ == '__main__':
  from absl import app

  from cxrjax import _xla_env
  from cxrjax import main as _cli

  _xla_env.reexec_with_block_cache()
  app.run(main, flags_parser=_cli.parse_flags, argv=sys.argv)
