"""Folder trees as they are distributed: split folders recognised by name or named by data.split_dirs,
wrapper folders, one-line refusals of trees that could be read more than one way, and the test-set
prevalence option. Unit tests read tiny PNG trees with the loader; one end-to-end run of the command."""

import json

import numpy as np
import pytest
from PIL import Image

from cxrjax import config_lib, seeding
from cxrjax.backends.base import Backend
from cxrjax.data import imbalance, sources
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import report
from cxrjax.trainers import common

from conftest import run_cli

CLASSES = ('glioma', 'meningioma', 'notumor')


def write_images(folder, n, seed=0, size=8):
  """`n` small distinct PNGs in `folder` (created)."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng([seed, n, len(str(folder))])
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f'img{i}.png')


def make_tree(root, splits: dict[str, int], classes=CLASSES):
  """root/<split folder>/<class>/ with `splits[folder]` images per class ('' = root/<class>/)."""
  for i, (name, n) in enumerate(splits.items()):
    for j, cls in enumerate(classes):
      write_images(root / name / cls if name else root / cls, n, seed=10 * i + j)
  return root


def load(root, tmp_path, **kw):
  args = dict(val_fraction=0.25, test_fraction=0.25, group_regex='', on_bad_image='error', seed=0)
  args.update(kw)
  return sources.load_folder(str(root), 8, 1, cache_dir=str(tmp_path / 'cache'), **args)


# ----------------------------------------------------------------------------- naming styles


STYLES = {
  'train/val/test': {'train': 4, 'val': 3, 'test': 2},
  'Training/Testing': {'Training': 4, 'Testing': 2},
  'train/valid/test': {'train': 4, 'valid': 3, 'test': 2},
  'Train/Val/Test': {'Train': 4, 'Val': 3, 'Test': 2},
  'TRAIN/TEST': {'TRAIN': 4, 'TEST': 2},
  'train/dev/test': {'train': 4, 'dev': 3, 'test': 2},
  'training/validation/testing': {'training': 4, 'validation': 3, 'testing': 2},
  'train_set/Test-Data': {'train_set': 4, 'Test-Data': 2},
}


@pytest.mark.parametrize('style', list(STYLES))
def test_split_folders_recognised_by_name(style, tmp_path):
  layout = STYLES[style]
  ds = load(make_tree(tmp_path / 'data', layout), tmp_path)
  assert ds.class_names == CLASSES
  folders = list(layout)
  c = ds.counts()
  assert c['test'] == [2, 2, 2]  # the tree's own test split, untouched
  if len(folders) == 3:
    assert c['train'] == [4, 4, 4] and c['val'] == [3, 3, 3]
    assert ds.source['split_dirs'] == {'train': folders[0], 'val': folders[1], 'test': folders[2]}
    assert 'carved' not in ds.source['layout']
  else:  # val carved from train
    assert [a + b for a, b in zip(c['train'], c['val'])] == [4, 4, 4] and sum(c['val']) == 3
    assert ds.source['split_dirs'] == {'train': folders[0], 'test': folders[1]}
    assert ds.source['layout'].endswith('val carved from train (25%, grouped by patient)')
  assert ds.source['layout'].startswith(f'split folders train={folders[0]}')
  assert ds.source['split_dirs_from'] == 'name'
  assert ds.source['layout'] in ds.source['description']


def test_class_folders_without_splits_are_carved(tmp_path):
  ds = load(make_tree(tmp_path / 'data', {'': 8}), tmp_path)
  assert ds.class_names == CLASSES
  assert sum(sum(v) for v in ds.counts().values()) == 24
  assert ds.counts()['test'] == [2, 2, 2]
  assert ds.source['split_dirs'] == {} and ds.source['split_dirs_from'].startswith('none')
  assert ds.source['layout'] == (
    'class folders (no split folders); test carved from all images (25%, grouped by patient);'
    ' val carved from train (25%, grouped by patient)'
  )


@pytest.mark.parametrize('wrappers', ['brain_mri', 'archive/brain_mri'])
def test_a_single_wrapper_folder_is_descended_into_and_said(wrappers, tmp_path):
  root = tmp_path / 'data'
  make_tree(root / wrappers, {'Training': 3, 'Testing': 2})
  (root / '.DS_Store').write_text('')  # hidden files and macOS zip debris change nothing
  (root / '__MACOSX').mkdir()
  ds = load(root, tmp_path)
  assert ds.class_names == CLASSES and ds.counts()['test'] == [2, 2, 2]
  assert ds.source['split_dirs'] == {'train': f'{wrappers}/Training', 'test': f'{wrappers}/Testing'}
  assert ds.source['layout'].startswith(f"inside '{wrappers}', the only folder in data.path: split folders")
  assert ds.source['tree'] == str(root / wrappers)


def test_split_dirs_names_folders_of_any_name(tmp_path):
  root = make_tree(tmp_path / 'data', {'part1': 4, 'part2': 3, 'holdout': 2})
  write_images(root / 'unlabelled' / 'x', 2)
  ds = load(root, tmp_path, split_dirs='train=part1,val=part2,test=holdout')
  assert ds.counts() == {'train': [4, 4, 4], 'val': [3, 3, 3], 'test': [2, 2, 2]}
  assert ds.source['split_dirs'] == {'train': 'part1', 'val': 'part2', 'test': 'holdout'}
  assert ds.source['layout'] == 'split folders train=part1, val=part2, test=holdout (data.split_dirs)'
  assert "folders not named in data.split_dirs left out: ['unlabelled']" in ds.source['notes']
  # Folders deeper down, relative to data.path.
  ds = load(root.parent, tmp_path, split_dirs='train=data/part1,test=data/holdout')
  assert ds.counts()['test'] == [2, 2, 2] and ds.source['split_dirs']['train'] == 'data/part1'


def test_split_dirs_naming_a_missing_folder(tmp_path):
  root = make_tree(tmp_path / 'data', {'Training': 2, 'Testing': 2})
  with pytest.raises(UserError, match=r"has no folder 'Test' \(its folders: \['Testing', 'Training'\]\)") as e:
    load(root, tmp_path, split_dirs='train=Training,test=Test')
  assert "config.data.split_dirs='train=Training,test=Test'" in str(e.value)


@pytest.mark.parametrize(
  'spec,fragment',
  [
    ('train=a', 'names no test folder'),
    ('test=b', 'names no train folder'),
    ('train=a,test=b,extra=c', 'expected'),
    ('train=a,train=b,test=c', 'expected'),
    ('train:a,test:b', 'expected'),
    ('train=/abs,test=b', 'expected'),
    ('train=a,test=a/', 'names one folder for two splits'),
  ],
)
def test_split_dirs_format_is_checked_by_finalize(spec, fragment):
  c = config_lib.base_config()
  c.data.split_dirs = spec
  with pytest.raises(UserError, match=f'config.data.split_dirs={spec!r}: .*{fragment}'):
    config_lib.finalize(c)


# ----------------------------------------------------------------------------- refusals


def _nested_classes(root):  # root/<class>/<sub>/*.png: per-patient (or other) subfolders
  for cls, subs in (('a', ('p1', 'p2')), ('b', ('p3',))):
    for s in subs:
      write_images(root / cls / s, 2)


def _unrecognised_splits(root):  # root/{part1,part2}/<class>/: the splits under names nobody recognises
  make_tree(root, {'part1': 3, 'part2': 2})


def _split_named_classes(root):  # data.split_dirs pointing one level too high: classes Testing and Training
  make_tree(root / 'Data', {'Training': 2, 'Testing': 2})
  make_tree(root / 'Other', {'': 2})


def _nested_in_split(root):  # root/Training/brain/<class>/
  make_tree(root / 'Training' / 'brain', {'': 2})
  make_tree(root / 'Testing' / 'brain', {'': 2})


def _inverted(root):  # root/<class>/{train,test}/
  for cls in ('a', 'b'):
    for s in ('train', 'test'):
      write_images(root / cls / s, 2)


def _test_class_train_lacks(root):
  make_tree(root, {'train': 2}, classes=('a', 'b'))
  make_tree(root, {'test': 2}, classes=('a', 'b', 'c'))


def _empty_class(root):
  make_tree(root, {'Training': 2, 'Testing': 2}, classes=('a', 'b'))
  (root / 'Testing' / 'b' / 'img0.png').unlink()
  (root / 'Testing' / 'b' / 'img1.png').unlink()
  (root / 'Testing' / 'b' / 'notes.txt').write_text('no images here')


def _two_train_folders(root):
  make_tree(root, {'train': 2, 'Training': 2, 'test': 2})


def _train_without_test(root):
  make_tree(root, {'Training': 2})


def _test_without_train(root):
  make_tree(root, {'': 2})
  write_images(root / 'test' / 'glioma', 2)


def _folders_beside_splits(root):
  make_tree(root, {'train': 2, 'test': 2})
  write_images(root / 'extra_images' / 'glioma', 2)


REFUSALS = {
  'class folders hold image folders': (_nested_classes, '', '{root}/a: class folder holds image folders (p1, p2)',
                                       'point data.path at the folder whose subfolders are the classes'),
  'splits under unrecognised names': (_unrecognised_splits, '', '{root}/part1: class folder holds image folders',
                                      "data.split_dirs='train=part1,test=part2'"),
  'classes named like splits': (_split_named_classes, 'train=Data,test=Other',
                                "{root}/Data: class folders ['Testing', 'Training'] look like split folders",
                                "data.split_dirs='train=Data/Training,test=Data/Testing' or point data.path at {root}/Data"),
  'classes one level down in splits': (_nested_in_split, '', '{root}/Training/brain: class folder holds image folders',
                                       "data.split_dirs (e.g. 'train=Training/brain,test=Testing/brain')"),
  'split folders inside class folders': (_inverted, '', '{root}/a: class folder holds image folders (test, train)',
                                         'arrange the images as {root}/<split>/<class>/*.png'),
  'test class that train lacks': (_test_class_train_lacks, '',
                                  "{root}/test: test class folders ['a', 'b', 'c'] differ from train's ['a', 'b']",
                                  "only in test: ['c']"),
  'empty class folder': (_empty_class, '', "{root}/Testing/b: class 'b' has no images", 'in every class folder'),
  'two train folders': (_two_train_folders, '', "{root}: folders ['Training', 'train'] all look like the train split",
                        "data.split_dirs='train=FOLDER,test=FOLDER'"),
  'train without test': (_train_without_test, '', '{root}: has a Training/ split folder but no test folder',
                         'point data.path at {root}/Training to carve test and val out of it'),
  'test without train': (_test_without_train, '', "{root}: found split folder(s) ['test'] but no train folder",
                         "data.split_dirs='train=FOLDER,test=FOLDER'"),
  'folders beside the splits': (_folders_beside_splits, '', "there are folders ['extra_images'] that are not splits",
                                "read only the split folders with data.split_dirs='train=train,test=test'"),
}  # fmt: skip


@pytest.mark.parametrize('case', list(REFUSALS))
def test_ambiguous_trees_are_refused_in_one_line(case, tmp_path):
  build, split_dirs, what, remedy = REFUSALS[case]
  root = tmp_path / 'data'
  build(root)
  with pytest.raises(UserError) as e:
    load(root, tmp_path, split_dirs=split_dirs)
  message = str(e.value)
  assert '\n' not in message
  assert what.format(root=root) in message, message
  assert remedy.format(root=root) in message, message
  assert not (tmp_path / 'cache').exists()  # refused before anything is decoded or cached


def test_split_meaning():
  for name in ('train', 'Training', 'TRAIN', 'train_set', 'Train Data'):
    assert sources.split_meaning(name) == 'train', name
  for name in ('val', 'Valid', 'VALIDATION', 'dev', 'dev-set'):
    assert sources.split_meaning(name) == 'val', name
  for name in ('test', 'Testing', 'TEST', 'test_data'):
    assert sources.split_meaning(name) == 'test', name
  for name in ('glioma', 'NORMAL', 'data', 'set', 'trainee', 'contest', 'device'):
    assert sources.split_meaning(name) is None, name


# ----------------------------------------------------------------------------- test-set prevalence


def _split(counts):
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
  names = np.array([f'img{i}' for i in range(len(labels))])
  return Split(np.zeros((len(labels), 2, 2, 1), np.uint8), labels, names.copy(), names)


@pytest.mark.parametrize(
  'spec,after',
  [('1,1', [234, 234]), ('0.5,0.5', [234, 234]), ('0.3,0.7', [167, 390]), ('1,3', [130, 390]), ('2,1', [234, 117])],
)
def test_test_prevalence_keeps_the_largest_subset_with_that_mix(spec, after):
  test = _split([234, 390])
  out, rec = imbalance.apply_test_prevalence(test, ('normal', 'pneumonia'), spec, seed=0)
  assert out.class_counts(2) == after == rec['counts_after']
  assert rec['counts_before'] == [234, 390] and rec['spec'] == spec and rec['seed'] == 0
  assert np.isclose(sum(rec['mix']), 1.0)
  assert len(set(out.names)) == len(out) and set(out.names) <= set(test.names)  # never upsampled
  assert list(out.names) == sorted(out.names, key=lambda n: int(n[3:]))  # the split's own order
  assert 'data.test_prevalence' in rec['note'] and f'from [234, 390] to {after}' in rec['note']


def test_test_prevalence_is_seeded_by_its_own_stream():
  test = _split([30, 60, 90])
  a, _ = imbalance.apply_test_prevalence(test, 'abc', '1,1,1', seed=3)
  b, _ = imbalance.apply_test_prevalence(test, 'abc', '1,1,1', seed=3)
  c, _ = imbalance.apply_test_prevalence(test, 'abc', '1,1,1', seed=4)
  assert a.class_counts(3) == [30, 30, 30]
  np.testing.assert_array_equal(a.names, b.names)
  assert list(a.names) != list(c.names)
  # Drawn from the 'test_prevalence' stream: class 0 is kept whole, class 1's draw comes first.
  rng = seeding.numpy_rng(3, 'test_prevalence')
  idx1 = np.flatnonzero(test.labels == 1)
  expected = np.sort(rng.choice(idx1, size=30, replace=False))
  assert set(a.names[a.labels == 1]) == set(test.names[expected])


@pytest.mark.parametrize(
  'spec,counts,fragment',
  [
    ('1,1,1', [10, 10], '3 values but the data has 2 classes (normal, pneumonia)'),
    ('1,1', [10, 0], "the test split has no images of class 'pneumonia'"),
    ('1,1000', [10, 10], "leaves class 'normal' with no test images"),
  ],
)
def test_test_prevalence_refusals(spec, counts, fragment):
  with pytest.raises(UserError, match=f'config.data.test_prevalence={spec!r}') as e:
    imbalance.apply_test_prevalence(_split(counts), ('normal', 'pneumonia'), spec, seed=0)
  assert fragment in str(e.value)


@pytest.mark.parametrize(
  'spec,num_classes,fragment',
  [('1', 0, 'one positive number per class'), ('1,0', 0, 'one positive number per class'),
   ('1,-1', 0, 'one positive number per class'), ('a,b', 0, 'one positive number per class'),
   ('1,1,1', 2, 'expected 2 values (data.num_classes=2)')],
)  # fmt: skip
def test_test_prevalence_is_checked_by_finalize(spec, num_classes, fragment):
  c = config_lib.base_config()
  c.data.test_prevalence = spec
  c.data.num_classes = num_classes
  with pytest.raises(UserError, match=f'config.data.test_prevalence={spec!r}') as e:
    config_lib.finalize(c)
  assert fragment in str(e.value)


def test_new_data_keys_at_their_defaults_keep_the_hashes():
  c = config_lib.base_config()
  h, g = config_lib.config_hash(c), config_lib.generator_hash(c)
  c.data.split_dirs = 'train=a,test=b'
  assert config_lib.config_hash(c) != h and config_lib.generator_hash(c) != g
  c.data.split_dirs = ''
  c.data.test_prevalence = '1,1'
  assert config_lib.config_hash(c) != h
  assert config_lib.generator_hash(c) == g  # a generator trains on the training split only
  c.data.test_prevalence = ''
  assert (config_lib.config_hash(c), config_lib.generator_hash(c)) == (h, g)
  # Both keys are in OPTIONAL_KEYS, which keeps base_config()'s hash at its value before they existed.
  assert config_lib.config_hash(config_lib.finalize(config_lib.base_config())) == 'f1e4d8f8fc5124db'


def _config(root, tmp_path, **data):
  c = config_lib.with_profile(config_lib.base_config(), 'full')
  c.data.path = str(root)
  c.data.image_size = 8
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.group_regex = ''
  c.imbalance.ratio = 0.0
  for k, v in data.items():
    c.data[k] = v
  return config_lib.finalize(c)


def test_test_prevalence_in_prepare_data_record_report_and_banner(tmp_path, capfd):
  root = tmp_path / 'data'
  make_tree(root, {'Training': 6}, classes=('a', 'b'))
  write_images(root / 'Testing' / 'a', 4, seed=50)
  write_images(root / 'Testing' / 'b', 10, seed=51)
  plain = common.prepare_data(_config(root, tmp_path))
  data = common.prepare_data(_config(root, tmp_path, test_prevalence='1,1'))
  assert plain.record().get('test_prevalence') is None  # '' changes nothing, the record included
  assert data.dataset.splits['test'].class_counts(2) == [4, 4]
  # Only the test split changes: train and val are drawn exactly as without the option.
  for split in ('train', 'val'):
    np.testing.assert_array_equal(plain.dataset.splits[split].names, data.dataset.splits[split].names)
  np.testing.assert_array_equal(plain.train.names, data.train.names)
  record = json.loads(json.dumps(data.record()))  # as metrics.json holds it
  prev = record['test_prevalence']
  assert prev['counts_before'] == [4, 10] and prev['counts_after'] == [4, 4] and prev['mix'] == [0.5, 0.5]
  assert record['counts']['test'] == [4, 4] and record['counts_loaded']['test'] == [4, 10]
  assert record['source']['split_dirs'] == {'train': 'Training', 'test': 'Testing'}
  lines = report.data_section(record)
  assert any(line.startswith('- **Test set subsampled:** test subsampled to 1:1') for line in lines)
  assert '| test (as found) | 4 | 10 | 14 |' in lines and '| test | 4 | 4 | 8 |' in lines
  assert 'split folders train=Training, test=Testing; val carved from train' in lines[2]
  common.banner(data, _config(root, tmp_path, test_prevalence='1,1'), Backend())
  err = capfd.readouterr().err
  assert 'split folders train=Training, test=Testing' in err
  assert '*** test subsampled to 1:1 (data.test_prevalence) from [4, 10] to [4, 4]' in err


def test_test_prevalence_with_more_values_than_classes_found(tmp_path):
  root = make_tree(tmp_path / 'data', {'Training': 6, 'Testing': 2}, classes=('a', 'b'))
  with pytest.raises(UserError, match="test_prevalence='1,1,1': 3 values but the data has 2 classes"):
    common.prepare_data(_config(root, tmp_path, test_prevalence='1,1,1'))


# ----------------------------------------------------------------------------- the command line


@pytest.mark.e2e
def test_cli_reads_a_training_testing_tree_with_its_own_test_split(tmp_path):
  """The issue's acceptance check: a brain-MRI style Training/Testing tree gives its classes, not 'Testing'/'Training'."""
  root = tmp_path / 'brain_mri'
  make_tree(root, {'Training': 30}, classes=CLASSES)
  for j, cls in enumerate(CLASSES):
    write_images(root / 'Testing' / cls, 6 + 2 * j, seed=90 + j, size=16)
  wd = tmp_path / 'run'
  r = run_cli(['--config=configs/baseline.py:smoke', f'--config.data.path={root}', f'--workdir={wd}',
               f'--config.data.cache_dir={tmp_path / "cache"}'])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((wd / 'metrics.json').read_text())
  d = m['data']
  assert d['class_names'] == list(CLASSES)
  assert d['source']['split_dirs'] == {'train': 'Training', 'test': 'Testing'}
  assert d['counts_loaded']['test'] == d['counts']['test'] == [6, 8, 10]  # the tree's own test split
  assert [a + b for a, b in zip(d['counts_loaded']['train'], d['counts_loaded']['val'])] == [30, 30, 30]
  layout = 'split folders train=Training, test=Testing; val carved from train (10%, grouped by patient)'
  assert d['source']['layout'] == layout
  assert layout in r.stderr  # the banner
  assert layout in (wd / 'report.md').read_text()
  assert 'test_prevalence' not in d


# ----------------------------------------------------------------------------- mixed sizes and modes


def test_mixed_sizes_and_modes_are_normalised_and_counted(tmp_path):
  # As folders come: grayscale and RGB, a palette PNG, 16-bit grayscale, alpha, several sizes.
  rng = np.random.default_rng(0)
  root = tmp_path / 'mixed'
  for cls in CLASSES[:2]:
    (root / cls).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / cls / 'gray8.png')
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / cls / 'rgb.jpg')
    Image.fromarray(rng.integers(0, 255, (12, 12, 4), dtype=np.uint8)).save(root / cls / 'rgba.png')
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).convert('P').save(root / cls / 'palette.png')
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(root / cls / 'gray16.png')
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / cls / f'more{i}.png')
  ds = load(root, tmp_path)
  n = sum(len(s) for s in ds.splits.values())
  assert n == 16 and all(s.images.shape[1:] == (8, 8, 1) for s in ds.splits.values())
  norm = ds.source['normalised']
  assert norm['images'] == 16 and norm['target'] == '8x8 L'
  assert norm['resized'] == 6  # rgb 40x30, rgba 12x12, gray16 16x16, in each class
  assert norm['distinct_sizes'] == 4 and norm['common_sizes']['8x8'] == 10
  assert norm['converted'] == 8 and norm['modes'] == {'I;16': 2, 'L': 8, 'P': 2, 'RGB': 2, 'RGBA': 2}
  assert any('6 of 16 image(s) resized' in note and '8 converted' in note for note in ds.source['notes'])
  # The decoded cache keeps the originals: a second read reports the same.
  again = load(root, tmp_path)
  assert again.source['cache'] and again.source['normalised'] == norm
