"""The sweep's plan: its methods, the experiment config of each (method, seed) run, and where each run lives.

Pure configuration (no JAX work), shared by the command (`__main__.py`), which
runs the plan, and by `report.py`, which reads the runs' outputs back.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import ml_collections

from cxrjax import config_lib
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
GENERATORS = tuple(dict.fromkeys(g for _, g in METHODS.values() if g))  # dcgan, cdcgan_a0.25, ..., ldm


def per_seed_generators(sweep) -> tuple[str, ...]:
  """The generators trained once per seed (`sweep.generators_per_seed`); the others are shared by the seeds.

  '' (the default): none, every generator is trained once (seed `sweep.generator_seed`) and serves every seed;
  'all': every generator; else a comma list of generator names (`GENERATORS`: 'ldm' is the one LDM behind
  `ldm_sample` and `ldm_img2img`), e.g. 'dcgan,cdcgan_a0.5' trains the GANs per seed and keeps one shared LDM.
  """
  spec = str(sweep.get('generators_per_seed', '') or '').strip()
  if not spec:
    return ()
  if spec == 'all':
    return GENERATORS
  names = tuple(dict.fromkeys(n.strip() for n in spec.split(',') if n.strip()))
  for n in names:
    if n not in GENERATORS:
      raise UserError(
        f'sweep.generators_per_seed={spec!r}: {n!r} is not a generator; expected "all" or names from'
        f' {", ".join(GENERATORS)}'
      )
  return names


def generator_dir(workdir: str, generator: str, seed: int, per_seed: bool) -> str:
  """Where a generator is trained: one folder per generator, or per (generator, seed) when trained per seed."""
  name = f'{generator}_seed_{seed}' if per_seed else generator
  return os.path.join(workdir, 'generators', name)


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
    per_seed = generator in per_seed_generators(sweep)
    c.generator_tag = method
    c.generator_seed = seed if per_seed else sweep.generator_seed
    c.generator_dir = generator_dir(workdir, generator, seed, per_seed)
    # A collapsed generator is recorded and flagged in the table; it does not halt the sweep.
    c.quality.on_collapse = 'continue'
    # The utility stage (TSTR/TRTS) on these seeds' generator runs (it trains two more classifiers).
    c.quality.tstr = seed in tuple(sweep.get('tstr_seeds', ()))
  # A study of several sweeps shares one reference network (`reference_dir`); a sweep keeps its own.
  c.quality.reference_dir = sweep.get('reference_dir') or os.path.join(workdir, 'reference')
  return config_lib.finalize(c)


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', method.replace(':', '_').replace('+', '_'), f'seed_{seed}')


def methods_of(sweep) -> list[str]:
  return [m.strip() for m in sweep.methods.split(',') if m.strip()]
