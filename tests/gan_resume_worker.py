"""Run in a subprocess: trains a smoke DCGAN in GEN_DIR (resuming if it exists), then
synthesizes 16 images and writes them with the generator's step to OUT (npz).

A fault in CXRJAX_FAULT kills this process part-way, like a preempted job.
"""

import os
import runpy
import sys

import numpy as np

from cxrjax import backends, config_lib
from cxrjax import mesh as mesh_lib
from cxrjax.trainers import common, gan, generative

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'dcgan.py')


def main(gen_dir: str, out: str) -> None:
  config = runpy.run_path(CONFIG)['get_config']('smoke')
  config.gan.steps = 30
  config.gan.checkpoint_every = 10
  config = config_lib.finalize(config)
  data = common.prepare_data(generative._base_config(config))  # real data only, as the trainer does
  mesh = mesh_lib.make_mesh(config.mesh)
  # The run's kernels (the CPU backend's on one CPU device), without the command line's process settings.
  info, handle = gan.train(config, gen_dir, data, mesh, {1: 16}, backends.select(config.kernels))
  images = gan.synthesize(config, handle, data, np.ones(16, np.int32))
  np.savez(out, images=images, step=np.int64(info['step']))


if __name__ == '__main__':
  main(*sys.argv[1:])
