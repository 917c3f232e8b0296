"""The latent-diffusion study's classifier: ImageNet-pretrained Inception-V3, fine-tuned on chest X-rays.

Binary normal / pneumonia on Kermany's chest X-rays at Inception-V3's native 299 px,
starting from torchvision's ImageNet weights (`inception_v3_google-0cc3c7bd.pth` in
torchvision's cache; the error names the download command when it is missing), with
the auxiliary classifier (loss weight 0.4), a new 2-class head, [-1, 1] inputs (what
the Google weights expect), one warmup epoch and a cosine decay.

Profiles:
  (none)  the study's setting: pretrained from torchvision's file, 299 px.
  :cpu    the same at 96 px for a CPU: the network, not the study (pretrained still;
          no auxiliary head, which needs 299 px).
  :smoke  no weights file: Inception-V3 from scratch at 80 px (its minimum is 75), a few
          steps, to exercise the pipeline; its numbers mean nothing, and it says so in its
          config (model.pretrained is '').

Run:
  python -m cxrjax.main --config=configs/inception_v3.py --workdir=runs/inception_v3
  python -m cxrjax.main --config=configs/inception_v3.py --config.model.pretrained=/path/to/weights.safetensors
  python -m cxrjax.main --config=configs/inception_v3.py:smoke --workdir=/tmp/inception-smoke
"""

from cxrjax import config_lib


def get_config(arg=None):
  profile = arg or 'full'
  config = config_lib.with_profile(config_lib.base_config(), 'smoke' if profile == 'smoke' else 'full')
  config.profile = profile
  config.data.path = 'chest_xray'  # under $CXRJAX_DATA_DIR
  config.data.image_size = 299
  config.data.augment.crop_pad = 16
  config.data.augment.rotate_deg = 5.0
  config.imbalance.ratio = 0.0  # Kermany's own imbalance (about 3 pneumonia : 1 normal in train)
  config.model.name = 'inception_v3'
  config.model.pretrained = 'torchvision'
  config.model.aux_logits = True
  config.model.aux_loss_weight = 0.4
  config.optim.lr = 1e-4
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  config.num_epochs = 10
  config.batch_size = 32
  config.eval_batch_size = 64
  if profile == 'cpu':
    config.data.image_size = 96
    config.data.augment.crop_pad = 6
    config.model.aux_logits = False  # the auxiliary head needs 299 px
  elif profile == 'smoke':
    config.model.pretrained = ''  # no weights file here: from scratch, to exercise the pipeline only
    config.data.image_size = 80
    config.data.augment.crop_pad = 4
    config.model.aux_logits = False  # the auxiliary head needs 299 px
    config.num_epochs = 1
    config.optim.warmup_epochs = 0.0
  return config
