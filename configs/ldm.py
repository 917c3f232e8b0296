"""Latent diffusion oversampling: autoencoder + class-conditional latent UNet, DDIM sampling.

Mode 'sample' draws minority images from noise; mode 'img2img' turns majority
(normal) images into minority (pneumonia) ones at ldm.strength, as in the
latent-diffusion study.

Run:
  python -m cxrjax.main --config=configs/ldm.py --workdir=runs/ldm
  python -m cxrjax.main --config=configs/ldm.py:cpu --workdir=runs/ldm-cpu
  python -m cxrjax.main --config=configs/ldm.py:smoke --config.ldm.mode=img2img --config.ldm.strength=0.5
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.trainer = 'ldm'
  config.rebalance.method = 'synthetic'  # the pipeline fills rebalance.synthetic with its own set
  config.generator_tag = 'ldm'
  return config_lib.with_profile(config, arg)
