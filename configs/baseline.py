"""Baseline: ResNet-18 on PneumoniaMNIST-28, 3:1 normal:pneumonia, no rebalancing.

Run:
  python -m cxrjax.main --config=configs/baseline.py --workdir=runs/baseline
  python -m cxrjax.main --config=configs/baseline.py:cpu    # width-16 ResNet-18
  python -m cxrjax.main --config=configs/baseline.py:smoke  # about a minute
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  return config_lib.with_profile(config, arg)
