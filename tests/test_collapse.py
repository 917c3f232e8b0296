"""Mode collapse per class: the verdict on constructed sets, the gate before the classifier, GANs on tiny classes."""

import json
import shutil
import types

import numpy as np
import pytest
from scipy.spatial import distance

from cxrjax import config_lib, mesh
from cxrjax.backends.base import Backend
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import genquality
from cxrjax.trainers import common, gan, generative

from conftest import CDCGAN_SMOKE_ARGS, run_cli

# The defaults: the verdicts below are the calibration the config promises.
_Q = config_lib.base_config().quality
THRESHOLDS = dict(min_diversity=_Q.collapse_min_diversity, min_recall=_Q.collapse_min_recall,
                  min_real=_Q.collapse_min_real)  # fmt: skip


@pytest.fixture(scope='module')
def pneumonia(npz_path) -> np.ndarray:
  """600 real PneumoniaMNIST pneumonia images [N, 28, 28]."""
  with np.load(npz_path) as z:
    images, labels = z['train_images'], z['train_labels'][:, 0]
  return images[labels == 1][:600]


def _class_stats(real_images, gen_images) -> dict:
  """What `judge` records for a class, with pixel rows standing in for the reference features."""
  real, gen = genquality.pixel_rows(real_images), genquality.pixel_rows(gen_images)
  pr = genquality.precision_recall(real, gen)
  div = genquality.diversity(real, gen)
  return dict(recall=pr['recall'], k=pr['k'], num_real=len(real), num_generated=len(gen),
              diversity=dict(features=div, pixel=div))  # fmt: skip


def test_mean_pairwise_distance_matches_scipy():
  x = np.random.default_rng(0).normal(size=(50, 7))
  assert genquality.mean_pairwise_distance(x) == pytest.approx(distance.pdist(x).mean(), rel=1e-9)
  assert genquality.mean_pairwise_distance(x[:1]) == 0.0
  assert genquality.mean_pairwise_distance(np.repeat(x[:1], 5, 0)) == pytest.approx(0.0, abs=1e-6)
  d = genquality.diversity(x, x[:25])
  assert d['ratio'] == pytest.approx(distance.pdist(x[:25]).mean() / distance.pdist(x).mean(), rel=1e-9)


def test_collapsed_sets_are_flagged_and_real_subsets_are_not(pneumonia):
  rng = np.random.default_rng(0)
  real = pneumonia
  one = np.repeat(real[:1], 200, axis=0)  # one image per class
  modes = real[rng.integers(0, 3, 200)].astype(np.float32)  # three images, each with slight noise
  near_copies = np.clip(modes + rng.normal(0, 3, modes.shape), 0, 255).astype(np.uint8)
  per_class = {
    'subset_200': _class_stats(real, real[rng.choice(len(real), 200, replace=False)]),
    'subset_30': _class_stats(real, real[rng.choice(len(real), 30, replace=False)]),
    'one_image': _class_stats(real, one),
    'near_copies': _class_stats(real, near_copies),
    'few_real': _class_stats(real[:12], one[:50]),
  }
  out = genquality.collapse_verdicts(per_class, **THRESHOLDS)
  assert out['verdicts'] == {
    'subset_200': 'ok', 'subset_30': 'ok', 'one_image': 'collapsed', 'near_copies': 'collapsed',
    'few_real': 'cannot_judge',
  }  # fmt: skip
  assert out['any_collapsed'] and out['classes'] == ['one_image', 'near_copies']
  assert out['thresholds'] == THRESHOLDS
  # One repeated image covers only itself (a zero-radius ball): recall is 1 / 600 real images.
  assert per_class['one_image']['recall'] == pytest.approx(1 / 600)
  assert per_class['one_image']['diversity']['features']['ratio'] == 0.0
  assert (
    f'recall 0.002 < {THRESHOLDS["min_recall"]:g}' in out['reasons']['one_image']
    and '12 real' in out['reasons']['few_real']
  )
  # The recall range of the 3:1 `cpu` generators (0.59-0.79) is not collapse at real-like spread.
  for recall in (0.59, 0.79):
    s = dict(per_class['subset_200'], recall=recall)
    assert genquality.collapse_verdicts({'c': s}, **THRESHOLDS)['verdicts'] == {'c': 'ok'}
  # Either measure alone condemns: low spread at a good recall, or low recall at full spread.
  low_div = dict(per_class['subset_200'], diversity=dict(features=dict(ratio=0.3), pixel=dict(ratio=0.3)))
  low_rec = dict(per_class['subset_200'], recall=0.1)
  v = genquality.collapse_verdicts({'d': low_div, 'r': low_rec}, **THRESHOLDS)['verdicts']
  assert v == {'d': 'collapsed', 'r': 'collapsed'}


def _quality(recall: float, ratio: float, num_real: int = 500) -> dict:
  s = dict(recall=recall, k=3, num_real=num_real, num_generated=100,
           diversity=dict(features=dict(ratio=ratio), pixel=dict(ratio=ratio + 0.1)))  # fmt: skip
  return dict(per_class={'normal': dict(s, recall=0.7, diversity=dict(features=dict(ratio=0.9), pixel=dict(ratio=0.9))),
                         'glioma': s})  # fmt: skip


def _config(**quality):
  c = config_lib.base_config()
  c.trainer = 'gan'
  c.quality.update(quality)
  return config_lib.finalize(c)


def test_gate_stops_on_a_collapsed_class_and_continue_goes_on(capsys):
  q = _quality(recall=0.03, ratio=0.12)
  q['collapse'] = generative.collapse_verdicts(_config(), q)
  assert q['collapse']['verdicts'] == {'normal': 'ok', 'glioma': 'collapsed'} and q['collapse']['on_collapse'] == 'stop'
  with pytest.raises(UserError) as e:
    generative.collapse_gate(_config(), q, '/run/gen_metrics.json')
  msg = str(e.value)
  assert '\n' not in msg and "class 'glioma'" in msg and 'normal' not in msg
  assert 'recall 0.030' in msg and 'feature diversity 0.12 x real' in msg and 'pixel diversity 0.22 x real' in msg
  assert '--config.quality.on_collapse=continue' in msg and '/run/gen_metrics.json' in msg

  cont = _config(on_collapse='continue')
  q['collapse'] = generative.collapse_verdicts(cont, q)
  generative.collapse_gate(cont, q, '/run/gen_metrics.json')  # no exception
  err = capsys.readouterr().err
  assert "WARNING: mode collapse in class 'glioma'" in err and 'quality.on_collapse=continue' in err

  ok = _quality(recall=0.6, ratio=0.8)
  ok['collapse'] = generative.collapse_verdicts(_config(), ok)
  generative.collapse_gate(_config(), ok, '/run/gen_metrics.json')
  # Too few real images of the class: said in words, never a stop.
  few = _quality(recall=0.0, ratio=0.0, num_real=5)
  few['collapse'] = generative.collapse_verdicts(_config(), few)
  assert few['collapse']['verdicts']['glioma'] == 'cannot_judge' and not few['collapse']['any_collapsed']
  generative.collapse_gate(_config(), few, '/run/gen_metrics.json')


def test_collapse_keys_are_validated_and_leave_the_config_hash_alone():
  base = config_lib.finalize(config_lib.base_config())
  assert base.quality.on_collapse == 'stop'
  for key, value in (('on_collapse', 'ignore'), ('collapse_min_recall', 1.5), ('collapse_min_real', 1)):
    c = config_lib.base_config()
    c.quality[key] = value
    with pytest.raises(UserError, match=f'quality.{key}'):
      config_lib.finalize(c)
  changed = config_lib.base_config()
  changed.quality.on_collapse = 'continue'
  changed.quality.collapse_min_recall = 0.1
  assert config_lib.config_hash(config_lib.finalize(changed)) == config_lib.config_hash(base)


def test_smoke_run_records_the_collapse_and_stop_leaves_no_completed_run(cdcgan_smoke_run, tmp_path):
  """The session's cdcgan smoke run (`on_collapse='continue'` in the smoke profile) and a rerun of its stages with 'stop'."""
  assert cdcgan_smoke_run.returncode == 0, cdcgan_smoke_run.stderr
  run = cdcgan_smoke_run.workdir
  quality = json.loads((run / 'gen_metrics.json').read_text())
  record = json.loads((run / 'metrics.json').read_text())
  collapse = record['generator_quality']['collapse']
  assert collapse == quality['collapse']
  assert set(collapse) >= {'any_collapsed', 'classes', 'verdicts', 'thresholds'}
  s = quality['per_class']['pneumonia']
  assert set(s['diversity']) == {'features', 'pixel'} and s['diversity']['features']['real'] > 0
  # 20 smoke steps make near-noise: flagged, and the report says so.
  assert collapse['verdicts'] == {'pneumonia': 'collapsed'} and collapse['on_collapse'] == 'continue'
  assert '**MODE COLLAPSE in pneumonia**' in (run / 'report.md').read_text()

  # The same stages with 'stop': generator, synthetic set and gen_metrics.json are reused
  # (the keys leave the config hash alone), and the run ends before the classifier.
  copy = tmp_path / 'run'
  shutil.copytree(run, copy, ignore=shutil.ignore_patterns('classifier', 'metrics.json', 'report.md', '.lock*'))
  r = run_cli([*CDCGAN_SMOKE_ARGS, f'--workdir={copy}', f'--config.quality.reference_dir={cdcgan_smoke_run.reference_dir}',
               '--config.quality.on_collapse=stop'])  # fmt: skip
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert "mode collapse in class 'pneumonia'" in last and '--config.quality.on_collapse=continue' in last
  assert not (copy / 'metrics.json').exists() and not (copy / 'report.md').exists()
  assert not (copy / 'classifier').exists()
  assert json.loads((copy / 'gen_metrics.json').read_text())['collapse']['on_collapse'] == 'stop'


def test_fit_batch_is_the_batch_or_every_image_in_multiples_of_the_devices(capsys):
  def on(devices):
    return types.SimpleNamespace(devices=np.empty(devices))

  assert common.fit_batch(64, 5000, on(1), '[gan:x]', 'gan.batch_size') == 64
  assert common.fit_batch(64, 64, on(1), '[gan:x]', 'gan.batch_size') == 64
  assert capsys.readouterr().err == ''  # a full batch is not announced
  assert common.fit_batch(64, 12, on(1), '[gan:x]', 'gan.batch_size') == 12
  assert common.fit_batch(64, 13, on(4), '[ldm] diffusion:', 'ldm.unet.batch_size') == 12
  err = capsys.readouterr().err
  assert '[gan:x] 12 training images, fewer than a batch of 64: training on batches of 12' in err
  assert '[ldm] diffusion: 13 training images, fewer than a batch of 64: training on batches of 12' in err
  with pytest.raises(UserError, match='3 training images for a generator on 4 devices: needs at least 4'):
    common.fit_batch(64, 3, on(4), '[gan:x]', 'gan.batch_size')


def test_dcgan_trains_on_twelve_images(npz_path, tmp_path, capsys):
  """At 100:1 a minority is about a dozen images: the per-class DCGAN trains on all of them each step."""
  cfg = config_lib.with_profile(config_lib.base_config(), 'smoke')
  cfg.trainer = 'gan'
  cfg.gan.steps, cfg.gan.log_every, cfg.gan.checkpoint_every, cfg.gan.sample_every = 2, 1, 2, 2
  cfg = config_lib.finalize(cfg)
  with np.load(npz_path) as z:
    images, labels = z['train_images'], z['train_labels'][:, 0].astype(np.int32)
  idx = np.concatenate([np.flatnonzero(labels == 0)[:100], np.flatnonzero(labels == 1)[:12]])
  n = len(idx)
  train = Split(images[idx, :, :, None], labels[idx], np.arange(n).astype(str), np.arange(n).astype(str))
  data = types.SimpleNamespace(
    train=train, num_classes=2,
    dataset=types.SimpleNamespace(class_names=('normal', 'pneumonia'), image_shape=(28, 28, 1)),
  )  # fmt: skip
  assert cfg.gan.batch_size > 12
  m = mesh.make_mesh(cfg.mesh)
  info, handle = gan.train(cfg, str(tmp_path / 'gen'), data, m, {0: 0, 1: 30}, Backend())
  rec = info['details']['generators']['pneumonia']
  assert rec['step'] == 2 and rec['trained_on'] == 12 and rec['batch_size'] == 12
  assert 'pneumonia 12' in info['description']
  assert 'training on batches of 12' in capsys.readouterr().err
  assert (tmp_path / 'gen' / 'class_1' / 'samples' / 'step_000002.png').is_file()
  out = gan.synthesize(cfg, handle, data, np.ones(30, np.int32))
  assert out.shape == (30, 28, 28, 1) and out.dtype == np.uint8


def test_calibration_probe_separates_real_subsets_from_copies(cdcgan_smoke_run, npz_path):
  """`python -m cxrjax.eval.collapse_probe`, whose numbers calibrated the thresholds (BUILD_NOTES), on the smoke run."""
  from cxrjax.eval import collapse_probe  # noqa: PLC0415

  assert cdcgan_smoke_run.returncode == 0, cdcgan_smoke_run.stderr
  rows = {r['set']: r for r in collapse_probe.probe(str(cdcgan_smoke_run.workdir), str(npz_path))}
  assert rows['one real image repeated']['diversity_pixels'] == 0 and rows['one real image repeated']['recall'] < 0.01
  assert rows['real subset of 160']['recall'] > 0.5 > rows['one real image repeated']['recall']
  assert rows['synthetic set of the run']['n'] == 160
