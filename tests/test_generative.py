"""The generative pipelines end to end on PneumoniaMNIST (smoke sizes): stages, outputs, skipping."""

import json
import os

import numpy as np
import pytest

from cxrjax.data import synthetic

from conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope='module')
def reference_dir(tmp_path_factory, cdcgan_smoke_run):
  """The reference network the session's cdcgan smoke run trained, read by the runs here (a fresh folder if it failed)."""
  if cdcgan_smoke_run.returncode == 0:
    return cdcgan_smoke_run.reference_dir
  return tmp_path_factory.mktemp('reference') / 'ref'


def run(config, wd, reference_dir, *extra, env=None):
  return run_cli([f'--config={config}', f'--workdir={wd}', f'--config.quality.reference_dir={reference_dir}', *extra],
                 env=env)  # fmt: skip


def check_outputs(wd, kind):
  for name in ('metrics.json', 'report.md', 'gen_metrics.json', 'synthetic.npz', 'real_vs_synthetic.png',
               'memorization_pneumonia.png', 'classifier/metrics.json'):  # fmt: skip
    assert (wd / name).is_file(), name
  m = json.loads((wd / 'metrics.json').read_text())
  assert m['kind'] == kind
  syn, prov = synthetic.load(str(wd / 'synthetic.npz'))
  # 3:1 then capped to 320 -> [240, 80]: 160 pneumonia images fill the minority to 1:1.
  assert m['data']['counts']['train_imbalanced'] == [240, 80]
  assert len(syn) == 160 and (syn.labels == 1).all()
  assert prov['config_hash'] == m['run']['config_hash'] and prov['seed'] == 0
  # The DCGAN pipeline asks for one XLA pool thread; the diffusion pipeline keeps one per core.
  pool = m['run']['backend']['process'].get('xla_cpu_pool')
  assert pool == 'one XLA thread (NPROC=1)' if kind == 'gan' else pool is None
  assert prov['generator'] == m['generator']['kind'] and prov['generator_step'] == m['generator']['step']
  assert m['data']['counts']['trained_on'] == [240, 240]
  assert m['data']['rebalance']['origin_counts'] == {'real': 320, 'synthetic': 160}
  # Synthetic images only ever enter training: val/test are the real splits, untouched.
  assert m['data']['counts']['val'] == [33, 95] and m['data']['counts']['test'] == [48, 80]
  q = m['generator_quality']['per_class']['pneumonia']
  for key in ('fid', 'kid', 'precision', 'recall', 'memorization', 'fid_real_seen_vs_real_all'):
    assert key in q
  assert 'reference ResNet-18' in m['generator_quality']['features']['network']
  report = (wd / 'report.md').read_text()
  assert 'Synthetic image quality' in report and 'real_vs_synthetic.png' in report
  return m


def test_ldm_sample_skipping_then_img2img_on_the_same_generator(tmp_path, reference_dir):
  # One LDM training serves both modes, as in the sweep (`ldm_sample` and `ldm_img2img` share a generator).
  wd = tmp_path / 'ldm'
  r = run('configs/ldm.py:smoke', wd, reference_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  check_outputs(wd, 'ldm')
  assert (wd / 'generator' / 'autoencoder' / 'reconstructions.png').is_file()
  assert any((wd / 'generator' / 'diffusion' / 'samples').iterdir())
  # Finished: the whole run is skipped.
  r = run('configs/ldm.py:smoke', wd, reference_dir)
  assert r.returncode == 0 and 'already complete' in r.stderr
  # Classifier outputs lost: generator and synthesis are skipped, the classifier reruns.
  syn_mtime = (wd / 'synthetic.npz').stat().st_mtime_ns
  os.remove(wd / 'metrics.json')
  for p in sorted((wd / 'classifier').rglob('*'), reverse=True):
    p.rmdir() if p.is_dir() else p.unlink()
  r = run('configs/ldm.py:smoke', wd, reference_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '[autoencoder] already trained' in r.stderr and '[diffusion] already trained' in r.stderr
  assert 'synthesizing' not in r.stderr
  assert (wd / 'synthetic.npz').stat().st_mtime_ns == syn_mtime
  assert (wd / 'metrics.json').is_file()

  # img2img from that generator, killed during synthesis: nothing half-written, and the rerun finishes.
  wd2 = tmp_path / 'img2img'
  args = ['--config.ldm.mode=img2img', '--config.ldm.strength=0.5', f'--config.generator_dir={wd / "generator"}']
  r = run('configs/ldm.py:smoke', wd2, reference_dir, *args, env={'CXRJAX_FAULT': 'synthesis'})
  assert r.returncode == -9
  assert '[autoencoder] already trained' in r.stderr and '[diffusion] already trained' in r.stderr
  assert not (wd2 / 'synthetic.npz').exists(), 'no half-written synthetic set'
  r = run('configs/ldm.py:smoke', wd2, reference_dir, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  m = check_outputs(wd2, 'ldm')
  assert m['generator']['details']['mode'] == 'img2img' and m['generator']['details']['strength'] == 0.5
  syn, _ = synthetic.load(str(wd2 / 'synthetic.npz'))
  assert np.isfinite(syn.images.astype(float)).all()
  # The sample-mode set is a different set from the same generator.
  assert not np.array_equal(syn.images, synthetic.load(str(wd / 'synthetic.npz'))[0].images)


def test_dcgan_pipeline(tmp_path, reference_dir):
  wd = tmp_path / 'dcgan'
  r = run('configs/dcgan.py:smoke', wd, reference_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  m = check_outputs(wd, 'gan')
  assert m['generator']['kind'] == 'dcgan'
  # The poster's DCGAN: trained on the minority class only (80 pneumonia images here).
  assert m['generator']['details']['generators']['pneumonia']['trained_on'] == 80
  assert any((wd / 'generator' / 'class_1' / 'samples').iterdir())


def test_cdcgan_pipeline(cdcgan_smoke_run):
  # The session's shared run (conftest.py): `configs/cdcgan.py:smoke --config.gan.alpha=0.25`.
  r = cdcgan_smoke_run
  assert r.returncode == 0, r.stderr
  m = check_outputs(r.workdir, 'gan')
  assert m['generator']['kind'] == 'cdcgan'
  assert m['generator']['details']['alpha'] == 0.25
  assert any((r.workdir / 'generator' / 'samples').iterdir())
