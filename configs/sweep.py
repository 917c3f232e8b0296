"""The experiment table: 13 methods + a generator mix x 3 seeds on PneumoniaMNIST-28, 3:1 protocol.

Profiles: ':cpu' (narrow ResNet-18 and generators, shorter schedules; measured on a
2-core CPU: all 14 methods x 3 seeds in 1 h 49 min, the LDM generator 26 min of it),
':full' (published widths; for GPU/TPU),
':smoke' (a few methods, two seeds, tiny everything: a test of the machinery, not a
result).

Run:
  python -m cxrjax.sweep --config=configs/sweep.py:cpu --workdir=runs/sweep-cpu
  python -m cxrjax.sweep --config=configs/sweep.py --workdir=runs/sweep-full
  python -m cxrjax.sweep --config=configs/sweep.py:cpu --config.methods=baseline,dcgan --config.seeds=(0,1)
"""

import ml_collections

from cxrjax import config_lib

ALL_METHODS = (
  'baseline,class_weights,undersample,oversample,smote,augment,focal,'
  'dcgan,cdcgan_a0.25,cdcgan_a0.5,cdcgan_a0.75,ldm_sample,ldm_img2img,mix:dcgan+cdcgan_a0.25'
)


def get_config(arg=None):
  profile = arg or 'full'
  c = ml_collections.ConfigDict()
  c.experiment = config_lib.with_profile(config_lib.base_config(), profile)
  c.methods = ALL_METHODS
  c.seeds = (0, 1, 2)
  c.data_seed = 0  # one imbalanced training split for every run: seeds are paired
  c.generator_seed = 0  # generators trained once per method, shared by the seeds
  # Generators trained once per seed instead (seed = the run's seed), so the intervals include generator
  # variance: '' none (shared, as above), 'all', or generator names, e.g. 'dcgan,cdcgan_a0.5' (GANs per seed,
  # one LDM shared: 'ldm' names the LDM behind ldm_sample and ldm_img2img). See cxrjax/sweep/plan.py.
  c.generators_per_seed = ''
  c.tstr_seeds = ()  # seeds whose generative runs also measure TSTR/TRTS utility (e.g. (0,))
  c.primary = 'threshold_0.5'  # the table's operating point ('threshold_0.5' or 'youden'; K > 2 classes: argmax)
  c.bootstrap = 2000  # paired bootstrap resamples over test images
  c.gradcam_images = 8  # fixed test images shown per method (half per class)
  c.focus_images = 128  # test images averaged in the lung-focus score
  if profile == 'smoke':
    c.methods = 'baseline,oversample,dcgan,cdcgan_a0.25,mix:dcgan+cdcgan_a0.25'
    c.seeds = (0, 1)
    c.bootstrap = 200
    c.focus_images = 32
  return c
