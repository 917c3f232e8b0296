"""DCGAN oversampling (the poster): a DCGAN trained on the minority class only fills it to 1:1.

Run:
  python -m cxrjax.main --config=configs/dcgan.py --workdir=runs/dcgan
  python -m cxrjax.main --config=configs/dcgan.py:cpu --workdir=runs/dcgan-cpu
  python -m cxrjax.main --config=configs/dcgan.py --config.gan.diffaugment=color,translation,cutout
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.trainer = 'gan'
  config.gan.conditional = False
  config.rebalance.method = 'synthetic'  # the pipeline fills rebalance.synthetic with its own set
  config.generator_tag = 'dcgan'
  return config_lib.with_profile(config, arg)
