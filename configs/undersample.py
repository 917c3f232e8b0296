"""Random undersampling of the majority class down to rebalance.target_ratio (1:1 default).

Run:
  python -m cxrjax.main --config=configs/undersample.py --workdir=runs/undersample
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.rebalance.method = 'undersample'
  return config_lib.with_profile(config, arg)
