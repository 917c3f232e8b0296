"""Crash safety: a run killed at any point and rerun ends exactly like an uninterrupted one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrjax import fileio

from conftest import ROOT, data_dir, run_cli

pytestmark = pytest.mark.e2e

# 3 epochs x 10 steps (320 capped training images, batch 32), checkpoint each epoch.
ARGS = ['--config=configs/baseline.py:smoke', '--config.num_epochs=3']


def outputs(wd):
  m = json.loads((wd / 'metrics.json').read_text())
  with np.load(wd / 'predictions.npz') as z:
    preds = {k: z[k] for k in z.files}
  return m, preds


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp('ref') / 'run'
  r = run_cli([*ARGS, f'--workdir={wd}'])
  assert r.returncode == 0, r.stderr[-2000:]
  return outputs(wd)


@pytest.mark.parametrize('fault', ['classifier-step@25', 'classifier-checkpoint@20', 'final-eval'])
def test_killed_run_resumes_to_identical_results(fault, uninterrupted, tmp_path):
  wd = tmp_path / 'run'
  r = run_cli([*ARGS, f'--workdir={wd}'], env={'CXRJAX_FAULT': fault})
  assert r.returncode == -9, f'the fault must kill the run: {r.returncode} {r.stderr[-1000:]}'
  assert not (wd / 'metrics.json').exists()
  committed = sorted(int(p.name) for p in (wd / 'ckpt').iterdir() if p.name.isdigit())
  assert committed, 'the scenario needs a committed checkpoint before the kill'
  r = run_cli([*ARGS, f'--workdir={wd}'])
  assert r.returncode == 0, r.stderr[-2000:]
  if fault != 'final-eval':
    assert 'resumed from' in r.stderr
  m, preds = outputs(wd)
  ref_m, ref_preds = uninterrupted
  for k in ref_preds:
    np.testing.assert_array_equal(preds[k], ref_preds[k], err_msg=k)  # bitwise on CPU
  assert m['test'] == ref_m['test']
  assert [h['val_auroc'] for h in m['train']['history']] == [h['val_auroc'] for h in ref_m['train']['history']]


def test_finished_run_is_skipped_and_other_config_refused(tmp_path):
  wd = tmp_path / 'run'
  assert run_cli([*ARGS, '--config.num_epochs=1', f'--workdir={wd}']).returncode == 0
  before = (wd / 'metrics.json').stat().st_mtime_ns
  r = run_cli([*ARGS, '--config.num_epochs=1', f'--workdir={wd}'])
  assert r.returncode == 0 and 'already complete' in r.stderr
  assert (wd / 'metrics.json').stat().st_mtime_ns == before
  r = run_cli([*ARGS, '--config.num_epochs=1', '--config.seed=5', f'--workdir={wd}'])
  assert r.returncode == 2 and 'different config (differs in seed)' in r.stderr
  r = run_cli([*ARGS, '--config.num_epochs=1', '--config.seed=5', f'--workdir={wd}', '--overwrite'])
  assert r.returncode == 0
  assert json.loads((wd / 'metrics.json').read_text())['run']['seed'] == 5


def _gan_worker(gen_dir, out, env=None):
  full_env = dict(os.environ, CXRJAX_DATA_DIR=str(data_dir()), **(env or {}))
  return subprocess.run(
    [sys.executable, str(ROOT / 'tests' / 'gan_resume_worker.py'), str(gen_dir), str(out)],
    cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


@pytest.fixture(scope='module')
def gan_uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('gan_ref')
  r = _gan_worker(tmp / 'gen', tmp / 'out.npz')
  assert r.returncode == 0, r.stderr[-2000:]
  with np.load(tmp / 'out.npz') as z:
    return z['images'], int(z['step'])


# Killed after the step-10 checkpoint committed (resume at 10), and killed while the
# step-20 checkpoint was being written (resume at 10 again: the torn write is ignored).
@pytest.mark.parametrize('fault', ['gan:pneumonia-step@15', 'gan:pneumonia-checkpoint@20'])
def test_killed_generator_training_resumes_to_identical_generator(fault, gan_uninterrupted, tmp_path):
  r = _gan_worker(tmp_path / 'gen', tmp_path / 'out.npz', env={'CXRJAX_FAULT': fault})
  assert r.returncode == -9, f'the fault must kill the run: {r.returncode} {r.stderr[-1000:]}'
  assert not (tmp_path / 'out.npz').exists()
  r = _gan_worker(tmp_path / 'gen', tmp_path / 'out.npz')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'resumed from' in r.stderr
  with np.load(tmp_path / 'out.npz') as z:
    images, step = z['images'], int(z['step'])
  ref_images, ref_step = gan_uninterrupted
  assert step == ref_step == 30
  np.testing.assert_array_equal(images, ref_images)  # bitwise on CPU


def test_two_runs_cannot_share_a_workdir(tmp_path):
  wd = tmp_path / 'run'
  with fileio.WorkdirLock(str(wd)):
    r = run_cli([*ARGS, '--config.num_epochs=1', f'--workdir={wd}'])
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('cxrjax: error:')]
  assert len(errors) == 1 and 'workdir is in use by another run' in errors[0], r.stderr[-1000:]
  assert sorted(os.listdir(wd)) == ['.lock'], 'the refused run writes nothing'
