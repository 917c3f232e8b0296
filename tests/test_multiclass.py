"""K classes end to end: Kermany's three classes from file names, and a 4-class folder seen for the first time."""

import json

import numpy as np
import pytest
from PIL import Image

from cxrjax.backends.cpu import process
from cxrjax.data import phantom

from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_kermany_three_classes(tmp_path, chest_xray):
  wd = tmp_path / 'k3'
  r = run_cli(['--config=configs/kermany3.py:smoke', f'--workdir={wd}', f'--config.data.cache_dir={tmp_path / "c"}'])
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((wd / 'metrics.json').read_text())
  assert m['data']['class_names'] == ['NORMAL', 'bacterial', 'viral']
  # Kermany test split: 234 normal, 242 bacterial, 148 viral (smoke caps it to 128, stratified).
  assert sum(m['data']['counts']['test']) == 128
  loaded = m['data']['counts_loaded']
  assert [a + b for a, b in zip(loaded['train'], loaded['val'])] == [1341, 2530, 1345]
  t = m['test']['threshold_0.5']
  assert [pc['name'] for pc in t['per_class']] == ['NORMAL', 'bacterial', 'viral']
  assert 'youden' not in m['test']  # thresholds are a binary notion
  assert '### Per class' in (wd / 'report.md').read_text()


@pytest.fixture(scope='module')
def four_class_folder(tmp_path_factory):
  """A dataset the project has never seen: 4 classes, mixed sizes, gray/RGB, PNG/JPEG, no split folders."""
  root = tmp_path_factory.mktemp('fourclass') / 'xrays'
  names = ['atelectasis', 'clear', 'effusion', 'nodule']
  split = phantom.make_split([60, 60, 60, 60], 48, 1, seed=3, split='train')
  rng = np.random.default_rng(0)
  for i, (img, lab) in enumerate(zip(split.images, split.labels)):
    d = root / names[lab]
    d.mkdir(parents=True, exist_ok=True)
    size = int(rng.integers(40, 90))
    im = Image.fromarray(img[..., 0]).resize((size, size + int(rng.integers(0, 9))))
    if i % 3 == 0:
      im = im.convert('RGB')
    im.save(d / f'patient{i // 2}_{i}.{"jpg" if i % 2 else "png"}')
  return root


def test_four_class_folder_by_configuration_alone(tmp_path, four_class_folder):
  wd = tmp_path / 'four'
  r = run_cli([
    '--config=configs/baseline.py:smoke', f'--workdir={wd}', f'--config.data.path={four_class_folder}',
    '--config.data.group_regex=(patient\\d+)', '--config.imbalance.class_ratios=1,3,1,2',
    '--config.rebalance.method=oversample', '--config.model.name=efficientnet_v2_b0',
    f'--config.data.cache_dir={tmp_path / "c"}',
  ])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((wd / 'metrics.json').read_text())
  assert m['data']['class_names'] == ['atelectasis', 'clear', 'effusion', 'nodule']
  imb = m['data']['counts']['train_imbalanced']
  assert imb[1] < imb[0] and imb[3] < imb[0]
  assert len(set(m['data']['counts']['trained_on'])) == 1  # oversampled to equal counts
  assert len(m['test']['threshold_0.5']['per_class']) == 4
  # EfficientNetV2's step compiles without YNN's elementwise fusion (ResNet-18's keeps it: test_cli.py).
  assert m['run']['backend']['compile_options']['efficientnet_v2_b0'] == process.NO_ELEMENTWISE_YNN
  # And B0's runs ask for one XLA pool thread (many short oneDNN calls per step), before JAX starts.
  assert m['run']['backend']['process']['xla_cpu_pool'] == 'one XLA thread (NPROC=1)'
  assert 'xla_cpu_pool: one XLA thread' in r.stderr  # said in the banner too


def test_four_class_folder_with_conditional_gan(tmp_path, four_class_folder):
  wd = tmp_path / 'four-gan'
  r = run_cli([
    '--config=configs/cdcgan.py:smoke', f'--workdir={wd}', f'--config.data.path={four_class_folder}',
    '--config.imbalance.class_ratios=1,3,1,2', '--config.gan.alpha=0.25', f'--config.data.cache_dir={tmp_path / "c"}',
    f'--config.quality.reference_dir={tmp_path / "ref"}',
  ])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((wd / 'metrics.json').read_text())
  counts = m['data']['counts']
  assert len(set(counts['trained_on'])) == 1, counts  # every class filled to the largest
  assert set(m['generator_quality']['per_class']) == {'clear', 'nodule'}
