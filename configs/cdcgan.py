"""Conditional DCGAN oversampling (the poster): one generator over both classes.

gan.alpha is the probability that a randomly drawn generator label during
training is "healthy" (label 0); alpha = 0.5 is uniform. The trained generator
then fills the minority (pneumonia) class to 1:1.

Run:
  python -m cxrjax.main --config=configs/cdcgan.py --workdir=runs/cdcgan-a0.5
  python -m cxrjax.main --config=configs/cdcgan.py --config.gan.alpha=0.25 --workdir=runs/cdcgan-a0.25
  python -m cxrjax.main --config=configs/cdcgan.py:cpu --config.gan.alpha=0.75
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.trainer = 'gan'
  config.gan.conditional = True
  config.gan.alpha = 0.5
  config.rebalance.method = 'synthetic'
  config.generator_tag = 'cdcgan'
  return config_lib.with_profile(config, arg)
