"""SMOTE in pixel space: minority interpolations between k = 5 nearest minority neighbours.

Run:
  python -m cxrjax.main --config=configs/smote.py --workdir=runs/smote
  python -m cxrjax.main --config=configs/smote.py --config.rebalance.smote_k=3
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.rebalance.method = 'smote'
  return config_lib.with_profile(config, arg)
