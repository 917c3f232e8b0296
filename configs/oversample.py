"""Random oversampling (with replacement) of the minority class up to rebalance.target_ratio.

Run:
  python -m cxrjax.main --config=configs/oversample.py --workdir=runs/oversample
  python -m cxrjax.main --config=configs/oversample.py --config.rebalance.target_ratio=0.5
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.rebalance.method = 'oversample'
  return config_lib.with_profile(config, arg)
