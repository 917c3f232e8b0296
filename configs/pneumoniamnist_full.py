"""ResNet-18 on all of PneumoniaMNIST-28 (no imbalance protocol): the accuracy check.

The reference: a plain PyTorch ResNet-18 (CIFAR stem, width 16, Adam 1e-3,
batch 128, random crop with 2-pixel padding, 15 epochs, model chosen by
validation AUROC) reached test AUROC 0.982 / accuracy 0.950 on this data.

Run:
  python -m cxrjax.main --config=configs/pneumoniamnist_full.py:cpu --config.seed=0
  python -m cxrjax.main --config=configs/pneumoniamnist_full.py --config.num_epochs=6
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.imbalance.ratio = 0.0  # the split as published
  return config_lib.with_profile(config, arg)
