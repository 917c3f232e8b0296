"""When does generation help? The imbalance-severity study: the sweep at several imbalance ratios.

One sweep per ratio (WORKDIR/ratio_<r>/, each an ordinary sweep with its own report), then
WORKDIR/severity.md, .csv, .json and severity.png across the ratios; see cxrjax/sweep/severity.py.
Resumable: finished runs are skipped, so it can be run in parts, and a rerun on a finished
workdir only re-aggregates. Each finished ratio's small results are also kept in
`results_dir` (committed to the repository for the `cpu` profile), and a later invocation
on another machine reads a kept ratio instead of running it again.

Profiles: ':cpu' (the study as run on a 2-core CPU: PneumoniaMNIST-28, ratios 3/10/30/100,
7 methods, 3 paired seeds), ':full' (published widths; for GPU/TPU), ':smoke' (two ratios,
two classic methods, two seeds, tiny everything: a test of the machinery, not a result).

Run:
  python -m cxrjax.sweep --config=configs/severity.py:cpu --workdir=runs/severity-cpu
  python -m cxrjax.sweep --config=configs/severity.py:cpu --config.ratios=(3,10) --workdir=runs/severity-cpu
"""

import ml_collections

from cxrjax import config_lib

METHODS = 'baseline,class_weights,oversample,augment,dcgan,cdcgan_a0.5,ldm_img2img'


def get_config(arg=None):
  profile = arg or 'full'
  c = ml_collections.ConfigDict()
  c.experiment = config_lib.with_profile(config_lib.base_config(), profile)
  c.ratios = (3, 10, 30, 100)  # majority:minority in the training split (at 100:1, ~12 pneumonia images)
  c.methods = METHODS
  c.seeds = (0, 1, 2)
  c.data_seed = 0  # one imbalanced training split per ratio for every run: seeds are paired
  c.generator_seed = 0  # the seed of generators shared by the seeds (here: the LDM)
  c.generators_per_seed = 'dcgan,cdcgan_a0.5'  # GANs once per seed (their variance is in the intervals)
  c.tstr_seeds = (0,)  # the TSTR utility of seed 0's generators, per ratio
  c.primary = 'threshold_0.5'
  c.results_dir = f'results/severity-{profile}' if profile != 'smoke' else ''  # '' keeps nothing outside the workdir
  c.bootstrap = 2000
  c.gradcam_images = 8
  c.focus_images = 128
  if profile == 'smoke':
    c.ratios = (3, 10)
    c.methods = 'baseline,oversample'
    c.seeds = (0, 1)
    c.bootstrap = 200
    c.gradcam_images = 2
    c.focus_images = 16
  return c
