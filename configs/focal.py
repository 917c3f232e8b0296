"""Focal loss (Lin et al. 2017, gamma = 2) on the imbalanced split, no resampling.

Run:
  python -m cxrjax.main --config=configs/focal.py --workdir=runs/focal
  python -m cxrjax.main --config=configs/focal.py --config.loss.focal_gamma=1.0
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.loss.name = 'focal'
  return config_lib.with_profile(config, arg)
