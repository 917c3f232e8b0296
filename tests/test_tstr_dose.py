"""Synthetic dose (how many synthetic images) and the utility stage (train on synthetic, test on real)."""

import json

import numpy as np
import pytest

from cxrjax import config_lib
from cxrjax.data import rebalance, synthetic
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.trainers import generative, utility

from conftest import CDCGAN_SMOKE_ARGS, ROOT, random_split, run_cli


def synthetic_set(tmp_path, name, counts, seed=1):
  s = random_split(counts, seed=seed, prefix='s')
  path = str(tmp_path / f'{name}.npz')
  synthetic.save(path, s.images, s.labels, dict(tag=name, generator='test', step=3, config_hash='abc', seed=seed))
  return path


def rb(**kw):
  c = config_lib.base_config().rebalance
  c.method = 'synthetic'
  for k, v in kw.items():
    c[k] = v
  return c


def load(name, profile='smoke'):
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(profile)


# ----------------------------------------------------------------------------- dose


@pytest.mark.parametrize(
  'counts, ratio, dose, classes, expected',
  [
    ([120, 40], 1.0, 0.0, 'minority', {0: 0, 1: 80}),  # fill to 1:1, as before
    ([120, 40], 0.5, 0.0, 'minority', {0: 0, 1: 20}),  # fill to 1:2
    ([120, 40], 1.0, 0.5, 'minority', {0: 0, 1: 20}),
    ([120, 40], 1.0, 1.0, 'minority', {0: 0, 1: 40}),
    ([120, 40], 1.0, 2.0, 'minority', {0: 0, 1: 80}),
    ([120, 40], 1.0, 4.0, 'minority', {0: 0, 1: 160}),  # past 1:1: the dose, not the target ratio
    ([120, 40], 1.0, 2.0, 'all', {0: 240, 1: 80}),  # every class: the 3:1 ratio is kept
    ([100, 50, 25], 1.0, 0.5, 'minority', {0: 0, 1: 25, 2: 13}),  # 12.5 rounds half up
    ([100, 50, 25], 1.0, 1.0, 'all', {0: 100, 1: 50, 2: 25}),
    ([60, 60], 1.0, 2.0, 'minority', {0: 0, 1: 0}),  # no minority: nothing to dose
  ],
)
def test_needed_per_class_dose(counts, ratio, dose, classes, expected):
  assert generative.needed_per_class(counts, ratio, dose, classes) == expected


@pytest.mark.parametrize(
  'dose, classes, trained',
  [(0.0, 'minority', [120, 120]), (0.5, 'minority', [120, 60]), (2.0, 'minority', [120, 120]),
   (4.0, 'minority', [120, 200]), (1.0, 'all', [240, 80])],
)  # fmt: skip
def test_dose_builds_the_requested_training_set(tmp_path, dose, classes, trained):
  path = synthetic_set(tmp_path, 'gen', [300, 200])
  train = random_split([120, 40])
  ts = rebalance.build_training_set(train, 2, rb(synthetic=path, synthetic_dose=dose, dose_classes=classes), seed=0)
  assert ts.trained_counts(2) == trained
  added = np.array(trained) - [120, 40]
  # The generative run synthesizes exactly what the training set then draws.
  assert generative.needed_per_class([120, 40], 1.0, dose, classes) == {0: added[0], 1: added[1]}
  assert ts.origin_counts() == {'real': 160, 'synthetic': int(added.sum())}
  if dose:
    assert ts.details['synthetic_dose'] == dict(dose=dose, classes=classes, added=added.tolist())
    assert ts.details['target_ratio'] is None
  else:
    assert 'synthetic_dose' not in ts.details and ts.details['target_ratio'] == 1.0


def test_dose_larger_than_the_set_names_the_set_and_the_dose(tmp_path):
  path = synthetic_set(tmp_path, 'small', [0, 50])
  with pytest.raises(UserError, match='has 50 images of class 1; 80 are needed.*synthetic_dose'):
    rebalance.build_training_set(random_split([120, 40]), 2, rb(synthetic=path, synthetic_dose=2.0), seed=0)


# ----------------------------------------------------------------------------- synthetic only (TSTR's training set)


def test_synthetic_only_replaces_every_real_row(tmp_path):
  a = synthetic_set(tmp_path, 'cdcgan', [200, 100], seed=1)
  b = synthetic_set(tmp_path, 'ldm', [200, 100], seed=2)
  train = random_split([120, 40])
  ts = rebalance.build_training_set(train, 2, rb(synthetic=f'{a}:0.5,{b}:0.5', synthetic_only=True), seed=0)
  assert ts.trained_counts(2) == [120, 40]  # the real split's class mix
  assert ts.origin_counts() == {'synthetic': 160}
  assert set(ts.origin) == {'synthetic:cdcgan', 'synthetic:ldm'} and set(ts.pool.sources) == set(ts.origin)
  assert ts.details['synthetic']['drawn'] == {
    'cdcgan': {'0': 60, '1': 20},
    'ldm': {'0': 60, '1': 20},
  }
  assert not set(ts.pool.content_hashes()) & set(train.content_hashes())
  assert not set(ts.pool.names) & set(train.names)
  assert ts.details['synthetic_only'] is True and ts.details['target_ratio'] is None


def test_synthetic_only_needs_every_class(tmp_path):
  path = synthetic_set(tmp_path, 'minority_only', [0, 100])
  with pytest.raises(UserError, match='has 0 images of class 0; 120 are needed'):
    rebalance.build_training_set(random_split([120, 40]), 2, rb(synthetic=path, synthetic_only=True), seed=0)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  'edit, fragment',
  [
    (dict(synthetic_dose=-1.0), 'config.rebalance.synthetic_dose=-1.0: expected a multiple'),
    (dict(dose_classes='majority'), "config.rebalance.dose_classes='majority': expected one of minority, all"),
    (dict(method='oversample', synthetic_dose=2.0), "synthetic_dose=2.0: expected its default unless rebalance.method='synthetic'"),
    (dict(method='none', synthetic_only=True), "synthetic_only=True: expected its default unless rebalance.method='synthetic'"),
    (dict(method='synthetic', synthetic_only=True, synthetic_dose=1.0), 'expected 0 with rebalance.synthetic_only'),
  ],
)  # fmt: skip
def test_dose_keys_are_validated(edit, fragment):
  c = config_lib.base_config()
  for k, v in edit.items():
    c.rebalance[k] = v
  with pytest.raises(UserError, match=fragment.replace('(', '\\(').replace(')', '\\)')):
    config_lib.finalize(c)


def test_tstr_needs_a_generator():
  c = config_lib.base_config()
  c.quality.tstr = True
  with pytest.raises(UserError, match="config.quality.tstr=True: expected False unless trainer is 'gan' or 'ldm'"):
    config_lib.finalize(c)


def test_new_keys_at_their_defaults_leave_hashes_unchanged():
  for name in ('baseline', 'cdcgan'):
    c = config_lib.finalize(load(name, 'cpu'))
    before = json.loads(c.to_json_best_effort())
    for section, leaf in (('rebalance', 'synthetic_dose'), ('rebalance', 'dose_classes'),
                          ('rebalance', 'synthetic_only'), ('quality', 'tstr')):  # fmt: skip
      del before[section][leaf]
    import ml_collections  # noqa: PLC0415

    old = ml_collections.ConfigDict(before)
    assert config_lib.config_hash(old) == config_lib.config_hash(c)
    assert config_lib.generator_hash(old) == config_lib.generator_hash(c)
    c2 = load(name, 'cpu')
    c2.rebalance.synthetic_dose = 2.0 if name == 'cdcgan' else 0.0
    c2.quality.tstr = name == 'cdcgan'
    c2 = config_lib.finalize(c2)
    assert config_lib.generator_hash(c2) == config_lib.generator_hash(c)  # the generator is the same
    if name == 'cdcgan':
      assert config_lib.config_hash(c2) != config_lib.config_hash(c)


def test_trtr_is_the_baseline_whatever_the_generator():
  baseline = config_lib.config_hash(config_lib.finalize(load('baseline', 'cpu')))
  for name, edit in (('dcgan', {}), ('cdcgan', {'alpha': 0.25}), ('ldm', {})):
    c = load(name, 'cpu')
    c.quality.tstr = True
    c.rebalance.synthetic_dose = 2.0
    c.gan.alpha = edit.get('alpha', c.gan.alpha)
    c.generator_dir = '/elsewhere'
    c = config_lib.finalize(c)
    trtr = utility.trtr_config(c)
    assert config_lib.config_hash(trtr) == baseline
    assert trtr.rebalance.method == 'none' and trtr.trainer == 'classifier'
    tstr = utility.tstr_config(c, '/x/synthetic_full.npz')
    assert tstr.rebalance.synthetic_only and tstr.rebalance.synthetic_dose == 0 and not tstr.quality.tstr


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_tstr_on_the_session_cdcgan(tmp_path, cdcgan_smoke_run, npz_path):
  """The utility stage on the session's cDCGAN (its generator reused through generator_dir)."""
  assert cdcgan_smoke_run.returncode == 0, cdcgan_smoke_run.stderr
  wd = tmp_path / 'tstr'
  gen_dir = cdcgan_smoke_run.workdir / 'generator'
  r = run_cli([*CDCGAN_SMOKE_ARGS, f'--workdir={wd}', f'--config.generator_dir={gen_dir}',
               f'--config.quality.reference_dir={cdcgan_smoke_run.reference_dir}', '--config.quality.tstr=True'])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert '[gan:conditional] already trained' in r.stderr  # the generator is reused, not retrained

  m = json.loads((wd / 'metrics.json').read_text())
  u = m['utility']
  assert u == json.loads((wd / 'utility' / 'utility.json').read_text())
  # The synthetic copy: every class at the real (imbalanced, capped) training split's counts.
  syn, prov = synthetic.load(str(wd / 'utility' / 'synthetic_full.npz'))
  assert m['data']['counts']['train_imbalanced'] == [240, 80]
  assert np.bincount(syn.labels).tolist() == [240, 80] and u['synthetic_set']['per_class'] == {
    'normal': 240,
    'pneumonia': 80,
  }
  assert prov['purpose'] == 'tstr' and prov['generator'] == 'cdcgan' and prov['generator_step'] == 20

  # TSTR: no real training row (origin tags), and no real training image's pixels.
  t = json.loads((wd / 'utility' / 'tstr' / 'metrics.json').read_text())
  assert t['data']['rebalance']['origin_counts'] == {'synthetic': 320}
  assert t['data']['counts']['trained_on'] == [240, 80]
  trained = {s for s, st in t['data']['per_source'].items() if sum(st.get('trained_on', [0]))}
  assert trained == {'synthetic:cdcgan'}
  with np.load(npz_path) as z:
    images = z['train_images'][..., None]
  blank = np.full(len(images), '')
  real = Split(images, np.zeros(len(images), np.int32), blank, blank)
  assert not set(syn.content_hashes()) & set(real.content_hashes())
  assert u['provenance_check']['real_rows'] == 0 and u['provenance_check']['pixel_copies_of_real_training_images'] == 0
  # Val and test stay real: the same splits as the run's own classifier.
  assert t['data']['counts']['val'] == m['data']['counts']['val'] and t['data']['counts']['test'] == [48, 80]

  # The utility record: TSTR and TRTR on the real test split, TRTS on the synthetic copy.
  for part in ('tstr', 'trtr'):
    assert u[part]['test']['threshold_0.5']['n'] == 128 and 'youden' in u[part]['test']
  assert u['trtr']['trained_on'] == [240, 80]
  assert u['trts']['test']['threshold_0.5']['n'] == 320 and u['trts_reference']['test']['threshold_0.5']['n'] == 320
  for key in ('auroc', 'balanced_accuracy', 'f1'):
    assert 0 <= u['tstr']['test']['threshold_0.5'][key] <= 1
  assert u['trtr']['workdir'].startswith(str(cdcgan_smoke_run.reference_dir.parent / '_trtr-'))
  assert u['synthetic_set']['derived_from_real'] == ''  # cDCGAN: from noise
  report = (wd / 'report.md').read_text()
  assert 'Utility of the synthetic data' in report and 'synthetic (TSTR)' in report and 'real (TRTS)' in report


def test_collect_puts_quality_beside_utility(tmp_path):
  from cxrjax.eval import collect  # noqa: PLC0415

  def m(auroc, bal):
    return {'threshold_0.5': dict(auroc=auroc, balanced_accuracy=bal), 'youden': dict(balanced_accuracy=bal, f1=0.5)}

  record = dict(
    generator=dict(kind='ldm'),
    generator_quality=dict(per_class={'pneumonia': dict(fid=12.5, kid=dict(mean=0.004), precision=0.7, recall=0.6)}),
    utility=dict(
      synthetic_set=dict(derived_from_real='img2img: ...'),
      tstr=dict(test=m(0.8, 0.7)),
      trtr=dict(test=m(0.96, 0.9)),
      trts=dict(test=m(0.9, 0.85)),
    ),  # fmt: skip
  )
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'metrics.json').write_text(json.dumps(record))
  row = collect.utility_table([str(tmp_path / 'a')]).splitlines()[2]
  assert row == (
    '| a | ldm (derived from real images) | pneumonia | 12.500 | 4.000 | 0.700 | 0.600 | 0.800 | 0.700 | 0.700 |'
    ' 0.500 | 0.960 | 0.900 | 0.900 | 0.850 | 0.833 |'
  )
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'metrics.json').write_text(json.dumps(dict(record, utility=None)))
  with pytest.raises(UserError, match='no utility record; expected a generative run with --config.quality.tstr=True'):
    collect.utility_table([str(tmp_path / 'b')])
