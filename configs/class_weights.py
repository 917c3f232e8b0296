"""Class weights: inverse-frequency weights in the cross-entropy (PyTorch's weighted CE).

Run:
  python -m cxrjax.main --config=configs/class_weights.py --workdir=runs/class_weights
  python -m cxrjax.main --config=configs/class_weights.py --config.rebalance.weighting=effective
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.rebalance.method = 'class_weights'
  return config_lib.with_profile(config, arg)
