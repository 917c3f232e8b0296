"""Synthetic images in validation too (rebalance.synthetic_val): counts, sources, and the test split untouched."""

import json

import numpy as np
import pytest
from test_ldm_per_class import fake_data, small_config

from cxrjax import config_lib, seeding
from cxrjax.data import synthetic
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.trainers import common, gan, ldm

from conftest import run_cli


def fake_set(path, n, label, tag, split=None, seed=0):
  rng = np.random.default_rng(seed)
  prov = dict(tag=tag, generator='fake') | ({'split': split} if split else {})
  synthetic.save(str(path), rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), np.full(n, label, np.int32), prov)


def test_val_needed_by_rule():
  # 3:1 training [240, 80] filled to 1:1 with 160 synthetic pneumonia images: 2 per real one.
  assert synthetic.val_needed([240, 80], [0, 160], [33, 95]) == {0: 0, 1: 190}
  # 3 classes: 25/100 of class 1 and 10/40 of class 2; rounded to the nearest image.
  assert synthetic.val_needed([400, 100, 40], [0, 25, 10], [50, 13, 7]) == {0: 0, 1: 3, 2: 2}
  # 'fill': to target_ratio of the largest validation class, only for classes training filled.
  assert synthetic.val_needed([240, 80], [0, 160], [33, 95], 'fill') == {0: 0, 1: 0}  # pneumonia leads validation
  assert synthetic.val_needed([400, 100, 40], [0, 25, 10], [50, 13, 7], 'fill') == {0: 0, 1: 37, 2: 43}
  assert synthetic.val_needed([400, 100, 40], [0, 25, 10], [50, 13, 7], 'fill', 0.5) == {0: 0, 1: 12, 2: 18}
  with pytest.raises(UserError, match='synthetic_val_rule'):
    synthetic.val_needed([1, 1], [0, 1], [1, 1], 'double')
  assert synthetic.val_companion('runs/x/synthetic.npz') == 'runs/x/synthetic_val.npz'


def test_mix_validation_draws_from_the_val_companions_by_weight(tmp_path):
  for tag, seed in (('a', 1), ('b', 2)):
    fake_set(tmp_path / f'{tag}.npz', 20, 1, tag)
    fake_set(tmp_path / f'{tag}_val.npz', 20, 1, tag, split='val', seed=seed)
  rng = np.random.default_rng(0)
  labels = np.array([0] * 4 + [1] * 10, np.int32)
  names = np.array([f'val[{i}]' for i in range(14)])
  val = Split(rng.integers(0, 256, (14, 28, 28, 1), dtype=np.uint8), labels, names.copy(), names)
  spec = f'{tmp_path / "a.npz"}:3,{tmp_path / "b.npz"}:1'
  # Training [30, 10] got [0, 20] synthetic: 2 per real image, so validation class 1 gets 20.
  mixed, summary = synthetic.mix_validation(val, [30, 10], [0, 20], spec, np.random.default_rng(0))
  assert mixed.class_counts(2) == [4, 30] and summary['synthetic_counts'] == [0, 20]
  assert summary['drawn'] == {'a': {'1': 15}, 'b': {'1': 5}}
  np.testing.assert_array_equal(mixed.images[:14], val.images)  # real rows first, unchanged
  assert list(mixed.names[:14]) == list(names)
  assert sorted(set(mixed.sources[14:])) == ['synthetic:a', 'synthetic:b']
  assert set(mixed.names[14:]) <= {f'{t}[{i}]' for t in 'ab' for i in range(20)}

  (tmp_path / 'b_val.npz').unlink()
  with pytest.raises(UserError, match='b_val.npz'):
    synthetic.mix_validation(val, [30, 10], [0, 20], spec, np.random.default_rng(0))
  fake_set(tmp_path / 'b_val.npz', 20, 1, 'b')  # no split='val' in its provenance: a training set
  with pytest.raises(UserError, match='not a validation synthetic set'):
    synthetic.mix_validation(val, [30, 10], [0, 20], spec, np.random.default_rng(0))


def test_img2img_val_sources_are_validation_images_only():
  cfg = small_config(mode='img2img')
  data = fake_data()  # val[0] duplicates train[0]'s pixels
  source, pick = ldm.img2img_sources(cfg, data, 20, 'val')
  assert source is data.dataset.splits['val']
  # From the largest training class (0), in validation, never the duplicate of a training image.
  assert set(pick.tolist()) <= {1, 2, 3, 4, 5} and len(set(pick.tolist())) == 5
  names = ldm.derived_from(cfg, data, np.ones(20, np.int32), 'val')
  assert set(names) <= {f'val[{i}]' for i in range(1, 6)}
  # Training sets keep their stream: the same draw as before validation sets existed.
  _, train_pick = ldm.img2img_sources(cfg, data, 20, 'train')
  expected = seeding.numpy_rng(cfg.seed, 'ldm/synthesize').choice(np.arange(40), size=20, replace=False)
  np.testing.assert_array_equal(train_pick, expected)
  assert ldm.derived_from(small_config(), data, np.ones(3, np.int32)) is None  # from noise
  labels = np.ones(2, np.int32)
  for fn in (lambda: ldm.img2img_sources(cfg, data, 2, 'test'), lambda: ldm.synthesize(cfg, {}, data, labels, 'test'),
             lambda: gan.synthesize(cfg, {}, data, labels, split='test')):  # fmt: skip
    with pytest.raises(ValueError, match='never made for the test split'):
      fn()


def classifier_config(tmp_path, **rebalance):
  cfg = config_lib.with_profile(config_lib.base_config(), 'smoke')
  cfg.rebalance.method = 'synthetic'
  cfg.rebalance.synthetic = str(tmp_path / 'synthetic.npz')
  for key, value in rebalance.items():
    cfg.rebalance[key] = value
  return config_lib.finalize(cfg)


def test_prepare_data_adds_to_validation_and_never_to_test(tmp_path):
  fake_set(tmp_path / 'synthetic.npz', 160, 1, 'ldm')
  fake_set(tmp_path / 'synthetic_val.npz', 190, 1, 'ldm', split='val', seed=1)
  plain = common.prepare_data(classifier_config(tmp_path))
  data = common.prepare_data(classifier_config(tmp_path, synthetic_val=True))
  assert plain.val_synthetic is None
  # Smoke PneumoniaMNIST: training [240, 80] + 160 synthetic; validation [33, 95] + 2 x 95.
  assert data.training_set.trained_counts(2) == [240, 240]
  assert data.val_synthetic.class_counts(2) == [33, 285]
  assert data.dataset.splits['val'].class_counts(2) == [33, 95]  # the real validation split is kept as it is
  for d in (plain, data):
    test = d.dataset.splits['test']
    assert test.class_counts(2) == [48, 80] and all(n.startswith('test[') for n in test.names)
    assert not any('synthetic' in s for s in test.sources)
  np.testing.assert_array_equal(plain.dataset.splits['test'].images, data.dataset.splits['test'].images)
  rec = data.record()
  assert rec['counts']['val_with_synthetic'] == [33, 285] and rec['counts']['test'] == [48, 80]
  assert rec['synthetic_val']['selects'] == 'val' and rec['synthetic_val']['synthetic_counts'] == [0, 190]
  with pytest.raises(UserError, match='rebalance.synthetic_val_select'):
    classifier_config(tmp_path, synthetic_val_select=True)
  with pytest.raises(UserError, match="rebalance.method='none'"):
    config_lib.finalize(_with(synthetic_val=True))


def _with(**rebalance):
  cfg = config_lib.base_config()
  for key, value in rebalance.items():
    cfg.rebalance[key] = value
  return cfg


@pytest.mark.e2e
def test_ldm_img2img_with_synthetic_validation_and_per_class_finetune(tmp_path, cdcgan_smoke_run):
  ref = cdcgan_smoke_run.reference_dir if cdcgan_smoke_run.returncode == 0 else tmp_path / 'ref'
  wd = tmp_path / 'run'
  args = ['--config=configs/ldm.py:smoke', f'--workdir={wd}', f'--config.quality.reference_dir={ref}',
          '--config.ldm.mode=img2img', '--config.ldm.strength=0.5', '--config.ldm.ae.steps=2',
          '--config.ldm.unet.steps=2', '--config.ldm.per_class_finetune=True', '--config.ldm.finetune_steps=2',
          '--config.ldm.sample_steps=2', '--config.num_epochs=2', '--config.rebalance.synthetic_val=True',
          '--config.rebalance.synthetic_val_select=True']  # fmt: skip
  r = run_cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'validation includes synthetic images' in r.stderr
  m = json.loads((wd / 'metrics.json').read_text())
  assert m['generator']['details']['weights_by_class']['pneumonia'] == 'finetune/class_1'
  assert m['data']['counts']['val'] == [33, 95] and m['data']['counts']['val_with_synthetic'] == [33, 285]
  assert m['data']['counts']['test'] == [48, 80]
  assert m['synthetic']['val']['per_class'] == [0, 190]
  # Validation sets made image-to-image start from validation images, never from training images.
  derived = synthetic.load_derived_from(str(wd / 'synthetic_val.npz'))
  assert len(derived) == 190 and all(n.startswith('val[') for n in derived)
  val_set, prov = synthetic.load(str(wd / 'synthetic_val.npz'))
  train_set, _ = synthetic.load(str(wd / 'synthetic.npz'))
  assert prov['split'] == 'val' and not set(val_set.content_hashes()) & set(train_set.content_hashes())
  # Metrics on both validation sets; the real+synthetic one selected the checkpoint (and the threshold).
  assert m['selected_on'] == 'val+synthetic' and set(m['val_with_synthetic']) == {'threshold_0.5', 'youden'}
  best = m['train']['best']
  chosen = next(h for h in m['train']['history'] if h['step'] == best['step'])
  assert best['value'] == pytest.approx(chosen['valsyn_auroc']) and 'val_auroc' in chosen
  preds = np.load(wd / 'classifier' / 'predictions.npz')
  assert all(str(n).startswith('test[') for n in preds['test_names'])
  report = (wd / 'report.md').read_text()
  assert 'Validation includes synthetic images' in report and 'val + synthetic @ threshold_0.5' in report
  assert 'selected on **val+synthetic**' in report and 'Validation synthetic set: 190 images' in report


def test_ensure_synthetic_makes_once_remakes_on_new_provenance_and_keeps_derived_from(tmp_path, capsys):
  # The one path by which the training set, its validation companion and the TSTR copy are made.
  path = str(tmp_path / 'synthetic.npz')
  calls = []

  def make(labels):
    calls.append(labels.tolist())
    images = np.full((len(labels), 28, 28, 1), len(calls), np.uint8)
    return images, np.array([f'real[{i}]' for i in range(len(labels))])

  prov = dict(tag='dcgan', generator='g', step=10)
  first = common.ensure_synthetic(path, prov, {0: 1, 1: 2}, make, '[dcgan]', 'the training set')
  assert calls == [[0, 1, 1]] and first.labels.tolist() == [0, 1, 1] and int(first.images.max()) == 1
  assert '[dcgan] synthesizing the training set: 3 images, per class {0: 1, 1: 2}' in capsys.readouterr().err
  assert synthetic.load_derived_from(path).tolist() == ['real[0]', 'real[1]', 'real[2]']
  again = common.ensure_synthetic(path, prov, {0: 1, 1: 2}, make, '[dcgan]', 'the training set')
  assert len(calls) == 1 and np.array_equal(again.images, first.images)  # read, not made again
  # Another generator step: made again, replacing the file.
  moved = common.ensure_synthetic(path, dict(prov, step=20), {1: 2}, make, '[dcgan]', 'the training set')
  assert calls[-1] == [1, 1] and moved.labels.tolist() == [1, 1] and synthetic.load(path)[1]['step'] == 20
