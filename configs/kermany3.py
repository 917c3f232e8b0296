"""Kermany chest X-rays, three classes (normal / bacterial / viral pneumonia) at 64x64.

Classes come from the file names (personN_bacteria_M.jpeg, personN_virus_M.jpeg);
validation is carved from train grouped by patient. Protocol: viral pneumonia made
the minority at 3:1 against bacterial (normal kept whole).

Run:
  python -m cxrjax.main --config=configs/kermany3.py:cpu --workdir=runs/kermany3-resnet
  python -m cxrjax.main --config=configs/kermany3.py:cpu --config.model.name=efficientnet_v2_b0
  python -m cxrjax.main --config=configs/kermany3.py:cpu --config.rebalance.method=oversample
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.path = 'chest_xray'  # under $CXRJAX_DATA_DIR
  config.data.image_size = 64
  config.data.num_classes = 3
  config.data.subclasses = 'PNEUMONIA:bacteria=bacterial|virus=viral'
  config.imbalance.class_ratios = '1,1,3'  # normal whole, bacterial whole, viral 1/3 of bacterial
  config.select_metric = 'auroc'  # macro one-vs-rest AUROC for K classes
  config.eval_batch_size = 128
  return config_lib.with_profile(config, arg)
