"""Minority oversampling where every repeat gets strong augmentation (affine, gamma, noise).

Run:
  python -m cxrjax.main --config=configs/augment.py --workdir=runs/augment
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.rebalance.method = 'augment'
  return config_lib.with_profile(config, arg)
