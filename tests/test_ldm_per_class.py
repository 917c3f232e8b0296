"""Per-disease latent diffusion (ldm.per_class_finetune): pretrain on all classes, fine-tune a copy per class.

In-process on a few random images at smoke widths and two steps per stage: what is checked is where
the weights come from and which weights make which class, not image quality.
"""

import types

import jax
import numpy as np
import pytest

from cxrjax import config_lib
from cxrjax import mesh as mesh_lib
from cxrjax.backends.base import Backend
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.trainers import ldm, loop


def small_config(**ldm_overrides):
  cfg = config_lib.with_profile(config_lib.base_config(), 'smoke')
  cfg.trainer = 'ldm'
  cfg.rebalance.method = 'synthetic'
  cfg.ldm.ae.steps = cfg.ldm.unet.steps = 2
  cfg.ldm.sample_steps, cfg.ldm.sample_every, cfg.ldm.sample_batch, cfg.ldm.log_every = 2, 0, 4, 1
  for key, value in ldm_overrides.items():
    cfg.ldm[key] = value
  return config_lib.finalize(cfg)


def fake_data(n0=40, n1=12, size=28):
  """Two classes, class 1 smaller than one smoke batch (32): the fine-tune must train on what there is."""
  rng = np.random.default_rng(0)
  labels = np.array([0] * n0 + [1] * n1, np.int32)
  images = rng.integers(0, 256, (len(labels), size, size, 1), dtype=np.uint8)
  names = np.array([f'train[{i}]' for i in range(len(labels))])
  train = Split(images, labels, names.copy(), names)
  vlabels = np.array([0] * 6 + [1] * 3, np.int32)
  vnames = np.array([f'val[{i}]' for i in range(len(vlabels))])
  vimages = rng.integers(0, 256, (len(vlabels), size, size, 1), dtype=np.uint8)
  vimages[0] = images[0]  # a validation image that duplicates a training image's pixels
  val = Split(vimages, vlabels, vnames.copy(), vnames)
  dataset = types.SimpleNamespace(
    image_shape=(size, size, 1), class_names=('normal', 'pneumonia'), splits={'train': train, 'val': val}
  )
  return types.SimpleNamespace(train=train, dataset=dataset, num_classes=2)


def trees_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_config_keys_leave_existing_hashes_alone():
  cfg = small_config()
  stripped = cfg.copy_and_resolve_references()
  stripped.unlock()
  for key in ('per_class_finetune', 'finetune_steps', 'finetune_lr'):
    del stripped.ldm[key]
  for key in ('synthetic_val', 'synthetic_val_select', 'synthetic_val_rule'):
    del stripped.rebalance[key]
  assert config_lib.config_hash(cfg) == config_lib.config_hash(stripped)
  assert config_lib.generator_hash(cfg) == config_lib.generator_hash(stripped) == ldm.pretrain_hash(cfg)
  per_class = small_config(per_class_finetune=True, finetune_steps=3)
  # The fine-tunes are another generator; the pretrained stages they start from are shared.
  assert config_lib.generator_hash(per_class) != config_lib.generator_hash(cfg)
  assert ldm.pretrain_hash(per_class) == ldm.pretrain_hash(cfg)
  assert ldm.finetune_steps(cfg) == 1 and ldm.finetune_steps(per_class) == 3  # 0: a quarter of ldm.unet.steps
  with pytest.raises(UserError, match='ldm.finetune_steps'):
    small_config(finetune_steps=-1)


def test_finetune_starts_from_pretrained_and_makes_its_class(tmp_path, monkeypatch):
  cfg = small_config(per_class_finetune=True, finetune_steps=2)
  data = fake_data()
  mesh = mesh_lib.make_mesh(cfg.mesh)
  runs = []
  real_run = loop.run

  def spy(program, **kw):
    result = real_run(program, **kw)
    runs.append((kw['name'], program, result))
    return result

  monkeypatch.setattr(ldm.loop, 'run', spy)
  info, handle = ldm.train(cfg, str(tmp_path / 'gen'), data, mesh, {0: 0, 1: 28}, Backend())
  assert [name for name, _, _ in runs] == ['autoencoder', 'diffusion', 'finetune:pneumonia']
  pretrained = runs[1][2].state.ema
  _, ft_prog, ft = runs[2]
  # The fine-tune's initial state is the pretrained EMA weights (params and EMA both) ...
  initial = jax.jit(ft_prog.init)(ft_prog.start())
  assert trees_equal(initial.params, pretrained) and trees_equal(initial.ema, pretrained)
  # ... and two steps on the minority's 12 images move them.
  assert ft.step == 2 and not trees_equal(ft.state.params, pretrained) and not trees_equal(ft.state.ema, pretrained)
  assert trees_equal(handle['unet_ema_by_class'][1], ft.state.ema) and 0 not in handle['unet_ema_by_class']
  d = info['details']
  assert d['weights_by_class'] == {'normal': 'diffusion (class-conditional, step 2)', 'pneumonia': 'finetune/class_1'}
  rec = d['per_class_finetune']['pneumonia']
  assert rec['trained_on'] == 12 and rec['batch_size'] == 12 and rec['steps'] == 2
  assert rec['started_from'] == 'diffusion EMA weights at step 2'
  assert (tmp_path / 'gen' / 'finetune' / 'class_1' / 'done.json').is_file()

  # Class 1's images come from its fine-tuned copy: the same as the pretrained handle given those weights.
  labels = np.ones(4, np.int32)
  got = ldm.synthesize(cfg, handle, data, labels)
  swapped = dict(handle, unet_ema=handle['unet_ema_by_class'][1], unet_ema_by_class={})
  np.testing.assert_array_equal(got, ldm.synthesize(cfg, swapped, data, labels))

  # Rerun: every stage is restored, none retrains.
  runs.clear()
  _, again = ldm.train(cfg, str(tmp_path / 'gen'), data, mesh, {0: 0, 1: 28}, Backend())
  assert [r.skipped for _, _, r in runs] == [True, True, True]
  assert trees_equal(again['unet_ema_by_class'][1], ft.state.ema)
