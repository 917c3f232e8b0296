"""Kermany three classes at 64x64 with conditional-DCGAN oversampling of the minority classes.

One conditional generator over the three classes; gan.alpha is P(label 0 = normal)
for generated training labels (the others share the rest). Synthetic images fill
every class up to the largest.

Run:
  python -m cxrjax.main --config=configs/kermany3_cdcgan.py:cpu --workdir=runs/kermany3-cdcgan
  python -m cxrjax.main --config=configs/kermany3_cdcgan.py:cpu --config.model.name=efficientnet_v2_b0
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.path = 'chest_xray'
  config.data.image_size = 64
  config.data.num_classes = 3
  config.data.subclasses = 'PNEUMONIA:bacteria=bacterial|virus=viral'
  config.imbalance.class_ratios = '1,1,3'
  config.eval_batch_size = 128
  config.trainer = 'gan'
  config.gan.conditional = True
  config.gan.alpha = 1 / 3  # uniform over three classes
  config.rebalance.method = 'synthetic'
  config.generator_tag = 'cdcgan'
  return config_lib.with_profile(config, arg)
