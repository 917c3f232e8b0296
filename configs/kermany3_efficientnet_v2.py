"""The cross-modality study's classifier: ImageNet-pretrained EfficientNetV2-S on healthy / bacterial / viral X-rays.

Kermany's chest X-rays in three classes (as `configs/kermany3.py`: viral made the
minority at 3:1 against bacterial), EfficientNetV2-S from torchvision's ImageNet weights
(`efficientnet_v2_s-dd5fe13b.pth` in torchvision's cache), ImageNet normalisation of
the grayscale image repeated to RGB, at 384 px (the weights' native size; the images
are 224 px JPEGs, so this upsamples: `--config.data.image_size=224` trains at theirs).
The head alone trains for the first epoch, then every layer with the backbone at a
tenth of the head's learning rate; warmup and cosine decay.

Profiles:
  (none)  the study's setting, pretrained from torchvision's file.
  :cpu    224 px, still pretrained.
  :smoke  no weights file: a narrow EfficientNetV2 from scratch at 64 px, a few steps, to
          exercise the fine-tuning machinery (frozen first epoch, backbone multiplier);
          model.pretrained is '' in its config.

Run:
  python -m cxrjax.main --config=configs/kermany3_efficientnet_v2.py --workdir=runs/kermany3-effnet
  python -m cxrjax.main --config=configs/kermany3_efficientnet_v2.py:smoke --workdir=/tmp/effnet-smoke
"""

from cxrjax import config_lib


def get_config(arg=None):
  profile = arg or 'full'
  config = config_lib.with_profile(config_lib.base_config(), 'smoke' if profile == 'smoke' else 'full')
  config.profile = profile
  config.data.path = 'chest_xray'  # under $CXRJAX_DATA_DIR
  config.data.num_classes = 3
  config.data.subclasses = 'PNEUMONIA:bacteria=bacterial|virus=viral'
  config.imbalance.class_ratios = '1,1,3'
  config.select_metric = 'auroc'
  config.data.image_size = 384
  config.data.augment.crop_pad = 16
  config.model.name = 'efficientnet_v2_s'
  config.model.pretrained = 'torchvision'
  config.optim.lr = 1e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  config.optim.backbone_lr_mult = 0.1
  config.optim.freeze_backbone_epochs = 1.0
  config.num_epochs = 10
  config.batch_size = 32
  config.eval_batch_size = 64
  if profile == 'cpu':
    config.data.image_size = 224
  elif profile == 'smoke':
    config.model.pretrained = ''  # no weights file here: from scratch, to exercise the machinery only
    config.data.image_size = 64
    config.data.augment.crop_pad = 4
    config.num_epochs = 2
    config.optim.warmup_epochs = 0.0
  return config
