"""Several sources in one dataset (data.sources): the spec, provenance, duplicates, grouping, the source check.

Tiny trees and npz files are written in tmp_path; near-duplicates are planted across sources
(the same picture resized and JPEG re-encoded in the other source). No training.
"""

import importlib.util
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cxrjax import config_lib
from cxrjax.data import imbalance, multi_source, near_duplicates, rebalance, sources
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import report, source_check
from cxrjax.trainers import common

from conftest import ROOT


def picture(seed: int, size: int = 64) -> np.ndarray:
  """A smooth random grayscale picture: distinct seeds give unrelated pictures, a resized copy stays close."""
  small = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def copy_28_jpeg(pic: np.ndarray) -> np.ndarray:
  """`pic` as another source would hold it: shrunk to 28 px and JPEG re-encoded."""
  buf = io.BytesIO()
  Image.fromarray(pic).resize((28, 28), Image.BILINEAR).save(buf, format='JPEG', quality=90)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('L'))


TREE = {'train': 6, 'val': 3, 'test': 3}  # images per class folder


def write_tree(root, seed0: int = 0, name='person{k}_{i}.png') -> dict:
  """root/{train,val,test}/{NORMAL,PNEUMONIA}/*.png; returns (split, class, i) -> the picture."""
  pics, seed = {}, seed0
  for split, n in TREE.items():
    for cls in ('NORMAL', 'PNEUMONIA'):
      (root / split / cls).mkdir(parents=True)
      for i in range(n):
        pics[split, cls, i] = pic = picture(seed)
        seed += 1
        Image.fromarray(pic).save(root / split / cls / name.format(k=i // 2, i=i))
  return pics


def write_npz(path, planted: dict, seed0: int = 1000) -> None:
  """An npz at 28 px: label 0 normal, 1 pneumonia; rows in `planted` ((split, row) -> picture) are copies."""
  layout = {'train': [0] * 6 + [1] * 4, 'val': [0] * 2 + [1] * 2, 'test': [1, 0, 0, 1]}
  arrays, seed = {}, seed0
  for split, labels in layout.items():
    imgs = []
    for row in range(len(labels)):
      if (split, row) in planted:
        imgs.append(copy_28_jpeg(planted[split, row]))
      else:
        imgs.append(copy_28_jpeg(picture(seed)))
        seed += 1
    arrays[f'{split}_images'] = np.stack(imgs)
    arrays[f'{split}_labels'] = np.array(labels, np.uint8).reshape(-1, 1)
  np.savez(path, **arrays)


@pytest.fixture
def two_sources(tmp_path):
  """Tree `a` and npz `b` with six planted pairs, one per split pair that the rules treat differently."""
  pics = write_tree(tmp_path / 'a')
  planted = {
    ('train', 0): pics['train', 'NORMAL', 0],  # train~train: b's copy goes (a is listed first)
    ('train', 1): pics['val', 'NORMAL', 0],  # val~train: b's training copy goes
    ('train', 2): pics['test', 'NORMAL', 0],  # test~train: b's training copy goes
    ('val', 0): pics['train', 'NORMAL', 1],  # train~val: a's training copy goes
    ('test', 0): pics['test', 'PNEUMONIA', 0],  # test~test: both stay
    ('test', 1): pics['val', 'NORMAL', 1],  # val~test: a's val copy goes
  }
  write_npz(tmp_path / 'b.npz', planted)
  return tmp_path


def data_config(tmp_path, spec: str, **kw) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data.sources = spec
  c.data.image_size = 32
  c.data.cache_dir = str(tmp_path / 'cache')
  for k, v in kw.items():
    c.data[k] = v
  return config_lib.finalize(c)


SPEC = '{root}/a | NORMAL:normal,PNEUMONIA:pneumonia | train,val,test; {root}/b.npz | 0:normal,1:pneumonia'


def names(split: Split, source: str) -> set[str]:
  return set(split.names[split.sources == source].tolist())


def test_planted_duplicates_are_found_dropped_and_counted(two_sources):
  c = data_config(two_sources, SPEC.format(root=two_sources))
  ds = sources.load_dataset(c.data, seed=0)
  dup = ds.source['duplicates']
  assert dup['pairs'] == {'a~b': {'train~train': 1, 'val~train': 1, 'test~train': 1, 'train~val': 1,
                                  'test~test': 1, 'val~test': 1}}  # fmt: skip
  assert dup['pairs_total'] == 6 and dup['kept_in_test'] == 1 and dup['label_conflicts'] == 0
  assert dup['dropped'] == {'train': {'a': [1, 0], 'b': [3, 0]}, 'val': {'a': [1, 0]}}
  assert dup['dropped_per_class'] == {'train': [4, 0], 'val': [1, 0]}
  train, val, test = (ds.splits[s] for s in ('train', 'val', 'test'))
  assert not names(train, 'b') & {'train[0]', 'train[1]', 'train[2]'}  # b's training copies are gone
  assert 'train/NORMAL/person0_1.png' not in names(train, 'a')  # its twin is b's val[0]
  assert 'val/NORMAL/person0_1.png' not in names(val, 'a')  # its twin is b's test[1]
  assert len(test) == 6 + 4  # the test split is never changed
  assert ds.source['counts_read'] == {
    'a': {'train': [6, 6], 'val': [3, 3], 'test': [3, 3]},
    'b': {'train': [6, 4], 'val': [2, 2], 'test': [2, 2]},
  }
  assert ds.counts() == {'train': [12 - 4, 10], 'val': [5 - 1, 5], 'test': [5, 5]}
  line = multi_source.duplicates_line(dup, ds.class_names)
  assert line.startswith('near-duplicates across sources: 6 pair(s) (a~b: ')
  assert 'dropped: train normal 4, pneumonia 0; val normal 1, pneumonia 0' in line


def test_duplicates_are_cached_and_only_counted_in_report_mode(two_sources, monkeypatch):
  c = data_config(two_sources, SPEC.format(root=two_sources))
  first = sources.load_dataset(c.data, seed=0)
  assert not first.source['duplicates']['cached']

  def fail(*args, **kwargs):
    raise AssertionError('recomputed despite the cache')

  monkeypatch.setattr(near_duplicates, 'find_near_duplicates', fail)
  again = sources.load_dataset(c.data, seed=0)
  assert (
    again.source['duplicates']['cached'] and again.source['duplicates']['pairs'] == first.source['duplicates']['pairs']
  )
  assert again.counts() == first.counts()
  c = data_config(two_sources, SPEC.format(root=two_sources), source_duplicates='report')
  report_only = sources.load_dataset(c.data, seed=0)
  assert report_only.source['duplicates']['dropped_per_class'] == {'train': [4, 0], 'val': [1, 0]}
  assert not report_only.source['duplicates']['applied']
  assert report_only.counts() == {'train': [12, 10], 'val': [5, 5], 'test': [5, 5]}
  c = data_config(two_sources, SPEC.format(root=two_sources), source_duplicates='off')
  assert sources.load_dataset(c.data, seed=0).source['duplicates'] is None


def _split(source: str, n: int, label: int, tag: str = '') -> Split:
  images = np.stack([picture(i + 100 * label + (0 if source == 'x' else 50), 8)[..., None] for i in range(n)])
  names_ = np.array([f'{tag}{i}' for i in range(n)])
  return Split(images, np.full(n, label, np.int32), names_, names_, np.full(n, source))


def test_resolution_rules_with_a_stubbed_matcher(monkeypatch, tmp_path):
  # Each source stacks its splits in order: rows 0, 1 train, 2 val, 3 test.
  def per_source(name):
    return name, {s: _split(name, 2 if s == 'train' else 1, 0, s) for s in ('train', 'val', 'test')}

  pairs = ((0, 0), (1, 2), (2, 3), (3, 3), (3, 1))  # (row of x, row of y)
  found = [near_duplicates.Match(b, a, 0.99, (1.0, 1.0)) for a, b in pairs]  # equal sizes: the later source asks
  monkeypatch.setattr(near_duplicates, 'find_near_duplicates', lambda a, b, threshold=None: found)
  out, rec = multi_source.resolve_duplicates([per_source('x'), per_source('y')], 2, 'drop', str(tmp_path))
  assert rec['pairs'] == {'x~y': {'train~train': 1, 'train~val': 1, 'val~test': 1, 'test~test': 1, 'test~train': 1}}
  x, y = out[0][1], out[1][1]
  assert x['train'].names.tolist() == ['train0']  # train~train: the first source keeps its copy
  assert y['train'].names.tolist() == []  # ... y's goes; y's train1 has a twin in x's test
  assert x['val'].names.tolist() == []  # val~test: the val copy goes
  assert y['val'].names.tolist() == ['val0']  # train~val: the training copy (x's train1) went instead
  assert x['test'].names.tolist() == ['test0'] and y['test'].names.tolist() == ['test0']  # test~test: both stay
  assert rec['dropped'] == {'train': {'x': [1, 0], 'y': [2, 0]}, 'val': {'x': [1, 0]}} and rec['kept_in_test'] == 1


def test_provenance_survives_imbalance_and_rebalancing(two_sources):
  c = data_config(two_sources, SPEC.format(root=two_sources), source_duplicates='off')
  ds = sources.load_dataset(c.data, seed=0)
  pixels = {}
  for split in ds.splits.values():
    for img, src, name in zip(split.images, split.sources, split.names):
      pixels[src, name] = img
  assert len(pixels) == sum(len(s) for s in ds.splits.values())  # (source, name) identifies an image
  train, _ = imbalance.apply_imbalance(ds.splits['train'], 2, minority_class=1, ratio=3.0, seed=0)
  assert set(train.sources) == {'a', 'b'}
  for method in ('oversample', 'augment', 'undersample', 'smote'):
    rb = config_lib.base_config().rebalance
    rb.method, rb.smote_k = method, 2
    ts = rebalance.build_training_set(train, 2, rb, seed=0)
    rows = ts.pool.take(ts.plan)
    made = np.char.startswith(rows.sources.astype(str), 'smote:')
    for img, src, name in zip(rows.images[~made], rows.sources[~made], rows.names[~made]):
      np.testing.assert_array_equal(img, pixels[src, name])  # every real row is the image it names
    assert set(rows.sources[~made]) == {'a', 'b'}
    if method == 'smote':
      assert made.sum() and set(rows.sources[made]) <= {'smote:a', 'smote:b', 'smote:a+b', 'smote:b+a'}
  extra = Split(train.images[:2], train.labels[:2], train.groups[:2], np.array(['g[0]', 'g[1]']))
  ts = rebalance.add_extra(ts, extra, 'synthetic:dcgan')
  assert ts.pool.sources[-2:].tolist() == ['synthetic:dcgan'] * 2


def test_prepare_data_counts_every_source_at_every_stage(two_sources):
  c = config_lib.base_config()
  c.data.sources = SPEC.format(root=two_sources)
  c.data.image_size = 32
  c.data.cache_dir = str(two_sources / 'cache')
  c.data.source_check = True
  c.rebalance.method = 'oversample'
  data = common.prepare_data(config_lib.finalize(c))
  ps = data.per_source
  assert list(ps) == ['a', 'b']
  assert ps['a']['train_read'] == [6, 6] and ps['a']['train_loaded'] == [5, 6] and ps['b']['train_loaded'] == [3, 4]
  for stage, total in (('train_imbalanced', data.train.class_counts(2)),
                       ('trained_on', data.training_set.trained_counts(2)), ('test', [5, 5])):  # fmt: skip
    assert np.sum([ps[s][stage] for s in ps], axis=0).tolist() == total, stage
  assert ps['a']['test'] == [3, 3] and ps['b']['test_read'] == [2, 2]
  record = data.record()
  assert record['per_source'] == ps and record['duplicates']['pairs_total'] == 6
  assert set(record['source_check']['by_source']) == {'a', 'b'}
  lines = '\n'.join(report.data_section(record))
  assert '| b | train (read, before duplicates) | 6 | 4 | 10 |' in lines
  assert '| a~b | val~test | 1 |' in lines
  assert '| train | b | 3 | 0 | 3 |' in lines
  assert 'AUROC near 1 means the model can learn the hospital' in '\n'.join(report.source_check_lines(record))


def test_groups_are_per_source_with_their_own_regex(tmp_path):
  # Both trees number patients alike; c's names them pat-N and has no val folder (carved per source).
  write_tree(tmp_path / 'a')
  write_tree(tmp_path / 'c', seed0=500, name='pat-{k}_scan{i}.png')
  for cls in ('NORMAL', 'PNEUMONIA'):
    for f in (tmp_path / 'c' / 'val' / cls).iterdir():  # into train, as patient 9
      f.rename(tmp_path / 'c' / 'train' / cls / f'pat-9{f.name[5:]}')
    (tmp_path / 'c' / 'val' / cls).rmdir()
  (tmp_path / 'c' / 'val').rmdir()
  spec = (f'{tmp_path}/a | NORMAL:normal,PNEUMONIA:pneumonia | train,val,test;'
          rf'{tmp_path}/c | *:normal | train,val | (pat-\d+)')  # fmt: skip
  ds = sources.load_dataset(data_config(tmp_path, spec, val_fraction=0.3).data, seed=0)
  train, val = ds.splits['train'], ds.splits['val']
  assert {g.split(':')[0] for g in train.groups} == {'a', 'c'}
  assert 'a:NORMAL/person0' in set(train.groups) | set(val.groups)
  assert all(g.startswith(('c:NORMAL/pat-', 'c:PNEUMONIA/pat-')) for g in train.groups[train.sources == 'c'])
  c_train, c_val = set(train.groups[train.sources == 'c']), set(val.groups[val.sources == 'c'])
  assert c_val and not c_train & c_val  # val carved from c's own train, whole patients only
  assert ds.class_names == ('normal', 'pneumonia') and set(ds.splits['test'].sources) == {'a'}
  assert ds.splits['train'].class_counts(2)[1] == 6  # c maps every class to normal


def _thumbs_split(n_per: int, shift: int, seed: int) -> Split:
  rng = np.random.default_rng(seed)
  parts = []
  for s, name in enumerate(('x', 'y')):
    imgs = rng.integers(40, 200, (n_per, 16, 16, 1)).astype(np.int64)
    imgs = np.clip(imgs + (shift if s else 0), 0, 255).astype(np.uint8)
    labels = (np.arange(n_per) % 2).astype(np.int32)
    nm = np.array([f'{name}{i}' for i in range(n_per)])
    parts.append(Split(imgs, labels, nm, nm, np.full(n_per, name)))
  images = np.concatenate([p.images for p in parts])
  cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
  return Split(images, cat('labels'), cat('groups'), cat('names'), cat('sources'))


def test_source_check_half_for_alike_sources_one_for_brightness():
  alike = source_check.check(_thumbs_split(150, 0, 0), ('normal', 'pneumonia'))
  assert 0.35 < alike['by_source']['x'] < 0.65
  for w in alike['within_class'].values():
    assert 0.3 < w['auroc']['y'] < 0.7
  bright = source_check.check(_thumbs_split(150, 40, 1), ('normal', 'pneumonia'))
  assert bright['by_source']['x'] > 0.97 and bright['max_within_class'] > 0.97
  assert bright['reading'].startswith("Within class 'normal' the sources are told apart with AUROC 1.00")
  assert 'hospital instead of the disease' in bright['reading']
  few = _thumbs_split(150, 40, 2)
  few = few.take(np.concatenate([np.flatnonzero(few.sources == 'x'), np.flatnonzero(few.sources == 'y')[:12]]))
  assert '(only 6 images from y: a rough estimate)' in source_check.check(few, ('normal', 'pneumonia'))['reading']
  one = source_check.check(_split('x', 6, 0), ('normal', 'pneumonia'))
  assert one['by_source'] == {} and 'one source' in one['note']


@pytest.mark.parametrize(
  'spec,fragment',
  [
    ('a | NORMAL:normal | train,valid,test', "unknown split 'valid'"),
    ('a |  | train,val,test', 'empty class map'),
    ('a | NORMAL:normal,NORMAL:pneumonia', "class 'NORMAL' mapped twice (to 'normal' and 'pneumonia')"),
    ('a | *:normal,X:y', "'*' maps every class and stands alone"),
    ('a | NORMAL:normal; ./a | 0:pneumonia', "entries 1 and 2 both name './a'"),
    ('a | NORMAL:normal | train; b.npz | 0:pneumonia | train', 'no entry feeds the val split'),
    ('a | NORMAL', "class map item 'NORMAL'; expected FROM:TO"),
    ('a', 'expected'),
    ('a | NORMAL:normal;; b | x:y', 'entry 2 is empty'),
    ('a | X:x,Y:y | train,val,test | (unclosed', 'does not compile'),
  ],
)
def test_spec_errors_are_one_line_naming_the_entry(spec, fragment):
  with pytest.raises(UserError, match=None) as e:
    config_lib.parse_sources(spec)
  assert fragment in str(e.value) and '\n' not in str(e.value)


def test_spec_grammar():
  specs = config_lib.parse_sources(
    r'chest_xray | NORMAL:normal, PNEUMONIA:pneumonia | test,train ; x.npz | 0:normal | train,val | (p\d+|q\d+)'
  )
  assert [s.path for s in specs] == ['chest_xray', 'x.npz']
  assert specs[0].class_map == (('NORMAL', 'normal'), ('PNEUMONIA', 'pneumonia')) and specs[0].splits == (
    'train',
    'test',
  )
  assert specs[0].group_regex is None and specs[1].group_regex == r'(p\d+|q\d+)'  # '|' inside the regex
  assert config_lib.source_class_names(specs) == ('normal', 'pneumonia')
  assert config_lib.parse_sources('a | *:x')[0].splits == ('train', 'val', 'test')
  assert config_lib.parse_sources('') == []


@pytest.mark.parametrize(
  'overrides,fragment',
  [
    (dict(path='chest_xray'), "config.data.path='chest_xray': expected '' with data.sources"),
    (dict(num_classes=3), 'config.data.num_classes=3: expected 0 or 2'),
    (dict(class_names='a,b'), "config.data.class_names='a,b': expected ''"),
    (dict(sources='a | *:normal'), 'class maps naming at least 2 classes'),
  ],
)
def test_finalize_refuses_inconsistent_data_keys(overrides, fragment):
  c = config_lib.base_config()
  c.data.sources = 'a | NORMAL:normal,PNEUMONIA:pneumonia'
  for k, v in overrides.items():
    c.data[k] = v
  with pytest.raises(UserError) as e:
    config_lib.finalize(c)
  assert fragment in str(e.value)


def test_loader_errors_name_the_entry(two_sources, monkeypatch):
  root = two_sources
  monkeypatch.setenv('CXRJAX_DATA_DIR', str(root))
  cases = [
    (f'nowhere | *:normal; {root}/b.npz | 1:pneumonia', "config.data.sources entry 1 path 'nowhere': no such file"),
    (f'a | NORMAL:normal,PNEUMONIA:pneumonia; {root}/a | *:normal', f'{root}/a is also entry 1'),
    (f'a | NORMAL:normal,LUNG:pneumonia; {root}/b.npz | 0:normal', "class 'LUNG' not found"),
    (f'a | NORMAL:normal,PNEUMONIA:pneumonia; {root}/b.npz | 7:normal', 'or label indices 0-1'),
    (f'a | NORMAL:normal,PNEUMONIA:pneumonia; {root}/b.npz | 0:normal,class0:x', "class 'class0' mapped twice"),
    (
      f'a | NORMAL:normal | train,val,test; {root}/b.npz | 1:pneumonia | val,test',
      "class 'pneumonia' has no training images after the class maps",
    ),  # fmt: skip
  ]
  for spec, fragment in cases:
    with pytest.raises(UserError) as e:
      sources.load_dataset(data_config(root, spec).data, seed=0)
    assert fragment in str(e.value) and '\n' not in str(e.value), (spec, str(e.value))


PRE_SOURCES_HASHES = {  # (config_hash, generator_hash) before data.sources existed
  ('baseline', 'full'): ('f1e4d8f8fc5124db', 'bda4a1f8a071a945'),
  ('baseline', 'smoke'): ('e8dc023d52be3925', 'fb0c1e8c03b1a7f3'),
  ('kermany3', 'cpu'): ('51be78c152c197fe', 'af93a185ce0219fe'),
  ('cdcgan', 'cpu'): ('ac61f91293bbf1ea', '5ac5a276f5cf1529'),
}


@pytest.mark.parametrize('name,profile', list(PRE_SOURCES_HASHES))
def test_configs_without_sources_hash_as_before(name, profile):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = config_lib.finalize(module.get_config(profile))
  assert (config_lib.config_hash(c), config_lib.generator_hash(c)) == PRE_SOURCES_HASHES[name, profile]
  c.unlock()
  c.data.source_check = True  # changes the report, not the generator's training data
  assert config_lib.config_hash(c) != PRE_SOURCES_HASHES[name, profile][0]
  assert config_lib.generator_hash(c) == PRE_SOURCES_HASHES[name, profile][1]
