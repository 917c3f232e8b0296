"""The fine-tuning recipe: frozen backbone and BatchNorm, the backbone's learning rate, and the input path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cxrjax import backends, config_lib
from cxrjax.errors import UserError
from cxrjax.models import build_classifier
from cxrjax.models.preprocess import prepare_input
from cxrjax.trainers import classifier, finetune

from conftest import torchvision_models


def _config(**optim):
  c = config_lib.with_profile(config_lib.base_config(), 'smoke')
  for k, v in optim.items():
    section, leaf = k.split('__')
    c[section][leaf] = v
  c.num_epochs = 3
  return config_lib.finalize(c)


def _steps(config, kernels: str, n: int, spe: int = 2):
  """Runs `n` classifier training steps of the trainer's own program; returns the states after init and each step."""
  backend = backends.select(kernels)
  prog = classifier.program(config, 2, (28, 28, 1), backend, total_steps=3 * spe, steps_per_epoch=spe)
  state = jax.jit(prog.init)()
  step = jax.jit(prog.step)
  rng = np.random.default_rng(0)
  states = [jax.device_get(state)]
  for _ in range(n):
    batch = {
      'image': jnp.asarray(rng.integers(0, 256, (8, 28, 28, 1), np.uint8)),
      'label': jnp.asarray(rng.integers(0, 2, 8), jnp.int32),
      'weight': jnp.ones(8, jnp.float32),
    }
    state, _ = step(state, batch, jax.random.key(1))
    states.append(jax.device_get(state))
  return states


def _split(params):
  flat = {'/'.join(k): v for k, v in _flatten(params).items()}
  head = {k: v for k, v in flat.items() if k.startswith('head/')}
  return head, {k: v for k, v in flat.items() if not k.startswith('head/')}


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = np.asarray(v)
  return out


def _same(a: dict, b: dict) -> bool:
  return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('kernels', ['stock', 'cpu'])
def test_frozen_backbone_epoch_then_all_layers(kernels):
  # 2 steps per epoch, the first epoch frozen: steps 1-2 move the head only, step 3 the backbone too.
  config = _config(optim__freeze_backbone_epochs=1.0, optim__backbone_lr_mult=0.5)
  states = _steps(config, kernels, 3)
  heads, bodies = zip(*(_split(s.params) for s in states))
  assert _same(bodies[0], bodies[1]) and _same(bodies[0], bodies[2]), 'the backbone must not move while frozen'
  assert not _same(heads[0], heads[1]) and not _same(heads[1], heads[2]), 'the head trains from the first step'
  assert not _same(bodies[2], bodies[3]), 'after the frozen epoch the backbone trains'
  # BatchNorm ('train'): the statistics follow the batches even while the weights are frozen.
  assert not _same(_flatten(states[0].batch_stats), _flatten(states[1].batch_stats))


def test_frozen_batch_norm_keeps_the_statistics_bitwise():
  config = _config(optim__freeze_backbone_epochs=3.0)
  config.model.batch_norm = 'frozen'
  states = _steps(config, 'stock', 2)
  stats = [_flatten(s.batch_stats) for s in states]
  assert _same(stats[0], stats[1]) and _same(stats[0], stats[2])
  bodies = [_split(s.params)[1] for s in states]
  assert _same(bodies[0], bodies[2]) and not _same(_split(states[0].params)[0], _split(states[2].params)[0])


def test_backbone_learning_rate_multiplier_scales_the_first_update():
  # Adam's first update is lr * sign(g) (up to epsilon) per parameter: the backbone's moves half as far.
  full = _steps(_config(optim__backbone_lr_mult=1.0), 'stock', 1)
  half = _steps(_config(optim__backbone_lr_mult=0.5), 'stock', 1)
  for k, v0 in _split(full[0].params)[1].items():
    d_full = np.abs(_split(full[1].params)[1][k] - v0).max()
    d_half = np.abs(_split(half[1].params)[1][k] - v0).max()
    np.testing.assert_allclose(d_half, 0.5 * d_full, rtol=1e-3, err_msg=k)
  for k in _split(full[0].params)[0]:  # the head at the full rate in both
    np.testing.assert_allclose(_split(half[1].params)[0][k], _split(full[1].params)[0][k], rtol=1e-6, err_msg=k)


def test_config_refuses_bad_fine_tuning_values():
  c = config_lib.with_profile(config_lib.base_config(), 'smoke')
  c.optim.freeze_backbone_epochs = c.num_epochs + 1
  with pytest.raises(UserError, match='optim.freeze_backbone_epochs'):
    config_lib.finalize(c)
  c = config_lib.with_profile(config_lib.base_config(), 'smoke')
  c.model.aux_logits = True
  with pytest.raises(UserError, match='only inception_v3'):
    config_lib.finalize(c)


def test_new_keys_at_their_defaults_keep_the_config_hash():
  c = config_lib.base_config()
  h = config_lib.config_hash(c)
  c.model.pretrained = '/weights.pth'
  assert config_lib.config_hash(c) != h
  c.model.pretrained = ''
  c.optim.backbone_lr_mult = 0.1
  assert config_lib.config_hash(c) != h


# ----------------------------------------------------------------------------- the input path


@pytest.fixture(scope='module')
def xray(chest_xray) -> np.ndarray:
  """A real chest X-ray, grayscale uint8, cropped to a 224 square."""
  path = sorted((chest_xray / 'train' / 'NORMAL').iterdir())[0]
  img = np.asarray(Image.open(path).convert('L'))
  return img[:224, :224]


def _torchvision_preset(weights_name: str, image: np.ndarray):
  """torchvision's own preprocessing of an RGB uint8 image [H, W, 3] -> NHWC float32 (no resampling: sizes equal)."""
  import torch  # noqa: PLC0415

  tvm = torchvision_models()
  preset = tvm.get_weight(weights_name).transforms(crop_size=image.shape[0], resize_size=image.shape[0])
  x = preset(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
  return x, tvm


def test_imagenet_input_path_equals_torchvisions_preprocessing(xray):
  # ResNet-18 and EfficientNetV2: torchvision's preset of the grayscale image as RGB, against the
  # model's own input path from the trainer's [-1, 1] pixels.
  rgb = np.repeat(xray[:, :, None], 3, axis=-1)
  for weights in ('ResNet18_Weights.IMAGENET1K_V1', 'EfficientNet_V2_S_Weights.IMAGENET1K_V1'):
    expected, _ = _torchvision_preset(weights, rgb)
    ours = prepare_input(classifier.normalize(jnp.asarray(xray[None, :, :, None])), 'imagenet', rgb=True)
    np.testing.assert_allclose(np.asarray(ours)[0], expected.numpy().transpose(1, 2, 0), atol=2e-6)


def test_inception_input_path_equals_torchvisions_transform_input(xray):
  # torchvision's Inception-V3 weights: its preset (ImageNet statistics), then the network's own
  # `transform_input`, which maps back to the [-1, 1] the Google weights were trained on.
  rgb = np.repeat(xray[:, :, None], 3, axis=-1)
  normalized, tvm = _torchvision_preset('Inception_V3_Weights.IMAGENET1K_V1', rgb)
  net = tvm.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
  expected = net._transform_input(normalized[None])[0].numpy().transpose(1, 2, 0)
  ours = prepare_input(classifier.normalize(jnp.asarray(xray[None, :, :, None])), 'inception', rgb=True)
  np.testing.assert_allclose(np.asarray(ours)[0], expected, atol=2e-6)


def test_auto_input_norm_follows_the_weights(tmp_path):
  c = config_lib.base_config()
  assert finetune.input_norm(c.model) == 'none'
  c.model.pretrained = str(tmp_path / 'w.pth')
  (tmp_path / 'w.pth').write_bytes(b'')
  assert finetune.input_norm(c.model) == 'imagenet'
  c.model.input_norm = 'none'
  assert finetune.input_norm(c.model) == 'none'
  model = build_classifier(finetune.model_config(config_lib.finalize(c)), 2, (28, 28, 1))
  assert model.input_norm == 'none' and not model.rgb_input
