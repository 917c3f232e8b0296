"""The sweep machinery on tiny settings: runs, shared stages, skip/resume, aggregation and report."""

import csv
import json
import os
import subprocess
import sys

import pytest

from cxrjax.sweep import report as sweep_report

from conftest import ROOT, data_dir

pytestmark = pytest.mark.e2e

# The mix reuses its components' synthetic sets, so the cDCGAN is a method of its own here.
METHODS = 'baseline,oversample,dcgan,mix:dcgan+cdcgan_a0.25,cdcgan_a0.25'


def sweep(wd, env=None):
  full_env = dict(os.environ, CXRJAX_DATA_DIR=str(data_dir()), **(env or {}))
  return subprocess.run(
    [sys.executable, '-m', 'cxrjax.sweep', '--config=configs/sweep.py:smoke', f'--workdir={wd}',
     f'--config.methods={METHODS}', '--config.seeds=(0,1)'],
    cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=1200,
  )  # fmt: skip


def test_sweep_interrupted_then_resumed_then_skipped(tmp_path):
  wd = tmp_path / 'sweep'
  # Killed while training the cDCGAN, the last generator (after the baseline, oversample and DCGAN runs finished).
  r = sweep(wd, env={'CXRJAX_FAULT': 'gan:conditional-step@15'})
  assert r.returncode == -9, r.stderr[-2000:]
  r = sweep(wd)
  assert r.returncode == 0, r.stderr[-3000:]
  # The 6 finished runs, generative ones included, are skipped after the interruption.
  assert r.stderr.count('already complete') == 6, r.stderr[-3000:]
  assert '[gan:conditional] resumed from' in r.stderr
  for name in ('report.md', 'table.md', 'table.csv', 'stats.json', 'metrics_bars.png', 'alpha_sweep.png',
               'training_curves.png', 'gradcam_baseline.png', 'gradcam_mix_dcgan_cdcgan_a0.25.png'):  # fmt: skip
    assert (wd / name).is_file(), name
  # Shared stages: one DCGAN and one cDCGAN generator for both seeds, one reference network.
  assert sorted(os.listdir(wd / 'generators')) == ['cdcgan_a0.25', 'dcgan']
  assert (wd / 'reference' / 'export' / 'model.json').is_file()
  stats = json.loads((wd / 'stats.json').read_text())
  agg = stats['aggregate']
  assert set(agg['methods']) == set(METHODS.split(','))
  assert agg['methods']['baseline']['f1']['n'] == 2
  vb = agg['methods']['dcgan']['vs_baseline']
  assert vb['f1_t_test']['test'] == 'paired t-test' and vb['f1_bootstrap']['test'] == 'paired bootstrap'
  assert 0 <= vb['f1_bootstrap']['p_value'] <= 1 and 'f1_bootstrap_holm' in vb
  assert agg['best_classic'] == 'oversample'
  for m in agg['methods']:
    assert 0 <= stats['gradcam']['methods'][m]['focus_gradcam']['mean'] <= 1
  rows = list(csv.DictReader((wd / 'table.csv').open()))
  assert [r['method'] for r in rows] == METHODS.split(',')
  report = (wd / 'report.md').read_text()
  assert 'paired bootstrap' in report and 'Lung focus' in report and '![gradcam dcgan]' in report
  assert (
    'Differences from the `full` profile (this sweep: `smoke`)' in report and '| `model.width` | 64 | 4 |' in report
  )
  # A rerun of a finished sweep only re-aggregates: tests/test_severity.py (a sweep per ratio) checks it.


def test_alpha_plot_marks_each_alpha_and_the_references(tmp_path):
  # The cDCGAN alpha figure from aggregated statistics: one point per alpha, and none without a cDCGAN.
  def stat(mean):
    return {'mean': mean, 'low': mean - 0.05, 'high': mean + 0.05}

  methods = {m: {'specificity': stat(0.8 + 0.01 * i), 'recall': stat(0.9 - 0.01 * i)}
             for i, m in enumerate(('baseline', 'dcgan', 'cdcgan_a0.25', 'cdcgan_a0.75'))}  # fmt: skip
  path = tmp_path / 'alpha.png'
  assert sweep_report._alpha_plot({'methods': methods}, str(path)) and path.stat().st_size > 1000
  assert not sweep_report._alpha_plot({'methods': {'baseline': methods['baseline']}}, str(tmp_path / 'none.png'))
  assert not (tmp_path / 'none.png').exists()
