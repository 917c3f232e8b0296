"""Data sources on the real files: npz, class-per-folder tree, TFDS, phantom, auto."""

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from cxrjax import config_lib
from cxrjax.data import phantom, sources, tfds_source
from cxrjax.errors import UserError


def data_config(**kw):
  c = config_lib.base_config().data
  for k, v in kw.items():
    c[k] = v
  return c


def test_pneumoniamnist_npz_counts_and_pixels(npz_path):
  ds = sources.load_npz(str(npz_path), 28, 1, 0)
  assert ds.counts() == {'train': [1214, 3494], 'val': [135, 389], 'test': [234, 390]}
  assert ds.class_names == ('normal', 'pneumonia')
  assert ds.source['md5'] == '28209eda62fecd6e6a2d98b1501bb15f'
  with np.load(npz_path) as z:
    np.testing.assert_array_equal(ds.splits['test'].images[..., 0], z['test_images'])


def test_npz_resized_and_rgb(npz_path):
  ds = sources.load_npz(str(npz_path), 64, 3, 0)
  assert ds.image_shape == (64, 64, 3)
  assert ds.source['resized_from'] == 28
  img = ds.splits['train'].images[0]
  np.testing.assert_array_equal(img[..., 0], img[..., 2])


def _bad_npz(tmp_path, **arrays):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  return str(path)


def _good_arrays():
  rng = np.random.default_rng(0)
  out = {}
  for s, n in (('train', 20), ('val', 6), ('test', 6)):
    out[f'{s}_images'] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    out[f'{s}_labels'] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
  return out


@pytest.mark.parametrize(
  'mutate,fragment',
  [
    (lambda a: a.pop('test_labels'), 'missing key test_labels'),
    (lambda a: a.__setitem__('train_images', a['train_images'].astype(np.float32)), 'train_images: dtype float32'),
    (lambda a: a.__setitem__('train_images', a['train_images'][:, :, :, None, None]), 'train_images: shape'),
    (lambda a: a.__setitem__('val_labels', a['val_labels'] + 5), 'val_labels: labels range'),
    (lambda a: a.__setitem__('test_labels', a['test_labels'][:3]), 'test_images has 6 rows but test_labels has 3'),
  ],
)
def test_bad_npz_errors_name_the_key(tmp_path, mutate, fragment):
  arrays = _good_arrays()
  mutate(arrays)
  path = _bad_npz(tmp_path, **arrays)
  with pytest.raises(UserError, match=fragment) as e:
    sources.load_npz(path, 28, 1, 2)
  assert path in str(e.value)


def test_npz_with_object_array_is_refused_without_pickle(tmp_path):
  arrays = _good_arrays()
  arrays['train_labels'] = np.array([object()] * 20, dtype=object)
  path = _bad_npz(tmp_path, **arrays)
  with pytest.raises(UserError, match='not a plain array'):
    sources.load_npz(path, 28, 1, 2)


def test_not_an_npz(tmp_path):
  p = tmp_path / 'x.npz'
  p.write_text('hello')
  with pytest.raises(UserError, match='not a readable npz'):
    sources.load_npz(str(p), 28, 1, 0)


def load_kermany(root, tmp_path, size=28, **kw):
  args = dict(val_fraction=0.1, test_fraction=0.2, group_regex=r'(person\d+|IM-\d+)', on_bad_image='error', seed=0)
  args.update(kw)
  return sources.load_folder(str(root), size, 1, cache_dir=str(tmp_path / 'cache'), **args)


def test_kermany_folder_counts_and_patient_grouped_val(chest_xray, tmp_path):
  ds = load_kermany(chest_xray, tmp_path)
  assert ds.class_names == ('NORMAL', 'PNEUMONIA')
  c = ds.counts()
  assert c['test'] == [234, 390]
  assert [a + b for a, b in zip(c['train'], c['val'])] == [1341, 3875]
  assert 0.07 < sum(c['val']) / 5216 < 0.13
  assert not set(ds.splits['train'].groups) & set(ds.splits['val'].groups)
  assert any(g.startswith('PNEUMONIA/person') for g in ds.splits['val'].groups)
  # The cached copy is identical and says so.
  again = load_kermany(chest_xray, tmp_path)
  assert again.source['cache']
  np.testing.assert_array_equal(again.splits['val'].images, ds.splits['val'].images)


def _mini_tree(tmp_path, chest_xray, per_class=6):
  root = tmp_path / 'tree'
  for split in ('train', 'test'):
    for cls in ('NORMAL', 'PNEUMONIA'):
      src = sorted((chest_xray / split / cls).iterdir())[:per_class]
      (root / split / cls).mkdir(parents=True)
      for f in src:
        shutil.copy(f, root / split / cls / f.name)
  return root


def test_corrupt_jpeg_is_named_or_skipped(chest_xray, tmp_path):
  root = _mini_tree(tmp_path, chest_xray)
  victim = sorted((root / 'train' / 'NORMAL').iterdir())[0]
  data = victim.read_bytes()
  victim.write_bytes(data[: len(data) // 3])  # truncated JPEG
  with pytest.raises(UserError, match=victim.name):
    load_kermany(root, tmp_path)
  ds = load_kermany(root, tmp_path, on_bad_image='skip')
  assert ds.source['skipped_images'] == 1
  assert sum(ds.counts()['train']) + sum(ds.counts()['val']) == 11


def test_mixed_modes_and_sizes_in_class_folders(tmp_path):
  root = tmp_path / 'mixed'
  rng = np.random.default_rng(0)
  for cls in ('a', 'b', 'c'):
    (root / cls).mkdir(parents=True)
    for i in range(10):
      arr = rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)
      im = Image.fromarray(arr) if i % 2 else Image.fromarray(arr[..., 0])
      im.save(root / cls / f'img{i}.png')
  (root / 'a' / 'notes.txt').write_text('not an image')
  ds = sources.load_folder(str(root), 16, 1, val_fraction=0.2, test_fraction=0.2, group_regex='', on_bad_image='error',
                           seed=0, cache_dir=str(tmp_path / 'c'))  # fmt: skip
  assert ds.class_names == ('a', 'b', 'c')
  assert ds.image_shape == (16, 16, 1)
  assert sum(sum(v) for v in ds.counts().values()) == 30
  assert any('non-image' in n for n in ds.source['notes'])


def test_folder_with_one_class_is_an_error(tmp_path):
  (tmp_path / 'only').mkdir()
  with pytest.raises(UserError, match='at least 2'):
    sources.load_folder(str(tmp_path), 16, 1, val_fraction=0.1, test_fraction=0.2, group_regex='', on_bad_image='error',
                        seed=0, cache_dir=str(tmp_path / 'c'))  # fmt: skip


def test_empty_class_folder_is_named(tmp_path):
  for cls in ('x', 'y'):
    (tmp_path / 'd' / cls).mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'd' / 'x' / 'a.png')
  with pytest.raises(UserError, match="class 'y' has no images"):
    sources.load_folder(str(tmp_path / 'd'), 8, 1, val_fraction=0.1, test_fraction=0.2, group_regex='',
                        on_bad_image='error', seed=0, cache_dir=str(tmp_path / 'c'))  # fmt: skip


def test_grouped_split_never_splits_a_group():
  labels = np.array([0] * 50 + [1] * 50)
  groups = np.array([f'p{i // 3}' for i in range(100)])
  held, rest = sources.grouped_split(labels, groups, 0.2, seed=0)
  assert not set(groups[held]) & set(groups[rest])
  assert 12 <= len(held) <= 28


def test_phantom_is_deterministic_labelled_and_learnable():
  a = phantom.load_phantom(2, 28, 1, seed=0, scale=0.1)
  b = phantom.load_phantom(2, 28, 1, seed=0, scale=0.1)
  np.testing.assert_array_equal(a.splits['train'].images, b.splits['train'].images)
  assert a.is_phantom and 'PHANTOM' in a.source['description']
  tr = a.splits['train']
  lung = phantom.lung_masks(28)
  mean_in_lung = [tr.images[tr.labels == k][..., 0][:, lung].mean() for k in (0, 1)]
  assert mean_in_lung[1] > mean_in_lung[0] + 3  # opacities brighten the lung fields


def test_tfds_builder_prepares_without_tensorflow_and_reads_pixel_exact(npz_path, tmp_path):
  tfds_dir = str(tmp_path / 'tfds')
  tfds_source.prepare(28, tfds_dir, manual_dir=str(npz_path.parent))
  assert tfds_source.is_prepared('cxrjax_pneumonia_mnist', 28, tfds_dir)
  ds = tfds_source.load('cxrjax_pneumonia_mnist', 28, 1, tfds_dir, download=False)
  with np.load(npz_path) as z:
    np.testing.assert_array_equal(ds.splits['train'].images[..., 0], z['train_images'])
    np.testing.assert_array_equal(ds.splits['val'].labels, z['val_labels'][:, 0])
  assert 'tensorflow' not in sys.modules


def test_tfds_offline_message_says_how_to_point_at_npz(tmp_path, monkeypatch):
  monkeypatch.delenv('CXRJAX_DATA_DIR', raising=False)
  monkeypatch.setattr(tfds_source, 'URLS', {**tfds_source.URLS, 64: 'http://127.0.0.1:9/none.npz'})
  with pytest.raises(UserError, match='data.path'):
    tfds_source.prepare(64, str(tmp_path / 'tfds'), manual_dir=str(tmp_path))


def test_auto_prefers_configured_path_then_env_then_phantom(npz_path, chest_xray, tmp_path, monkeypatch):
  monkeypatch.setenv('CXRJAX_DATA_DIR', str(npz_path.parent))
  ds = sources.load_dataset(data_config(), seed=0)
  assert ds.source['kind'] == 'npz' and not ds.is_phantom
  ds = sources.load_dataset(data_config(path='chest_xray', cache_dir=str(tmp_path / 'c')), seed=0)
  assert ds.source['kind'] == 'folder'
  monkeypatch.setenv('CXRJAX_DATA_DIR', str(tmp_path))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'no-tfds'))
  monkeypatch.setattr(sources, '_online', lambda *a, **k: False)
  ds = sources.load_dataset(data_config(), seed=0)
  assert ds.is_phantom and 'PHANTOM' in ds.source['fallback']


def test_missing_path_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv('CXRJAX_DATA_DIR', str(tmp_path))
  with pytest.raises(UserError, match="data.path 'nowhere.npz': no such file"):
    sources.load_dataset(data_config(path='nowhere.npz'), seed=0)


def test_env_dir_missing_is_named(monkeypatch):
  monkeypatch.setenv('CXRJAX_DATA_DIR', '/does/not/exist')
  with pytest.raises(UserError, match='CXRJAX_DATA_DIR'):
    sources.load_dataset(data_config(), seed=0)
  assert not os.path.exists('/does/not/exist')
