"""The severity study's machinery on a smoke version: one sweep per ratio, the study's outputs, and a
rerun on the finished workdir that only re-aggregates."""

import csv
import json
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT, data_dir

pytestmark = pytest.mark.e2e


def study(wd, results):
  env = dict(os.environ, CXRJAX_DATA_DIR=str(data_dir()))
  return subprocess.run(
    [sys.executable, '-m', 'cxrjax.sweep', '--config=configs/severity.py:smoke', f'--workdir={wd}',
     f'--config.results_dir={results}'],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
  )  # fmt: skip


def test_severity_smoke_study_then_rerun_only_reaggregates(tmp_path):
  wd, results = tmp_path / 'severity', tmp_path / 'results'
  r = study(wd, results)
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ('severity.md', 'severity.csv', 'severity.json', 'severity.png', 'ratio_3/report.md',
               'ratio_10/report.md'):  # fmt: skip
    assert (wd / name).is_file(), name
  agg = json.loads((wd / 'severity.json').read_text())
  assert sorted(agg['ratios'], key=float) == ['3', '10']
  # Paired over seeds: the delta's mean is the mean of the per-seed differences.
  for r in ('3', '10'):
    per = {}
    for m in ('baseline', 'oversample'):
      per[m] = [
        json.loads((wd / f'ratio_{r}' / 'runs' / m / f'seed_{s}' / 'metrics.json').read_text())['test'][
          'threshold_0.5']['f1'] for s in (0, 1)
      ]  # fmt: skip
    d = agg['ratios'][r]['methods']['oversample']['delta_vs_baseline']['f1']
    assert d['mean'] == pytest.approx(sum(a - b for a, b in zip(per['oversample'], per['baseline'])) / 2)
    # The same at the threshold each run chose on validation (its Youden threshold, applied to test).
    at = {
      m: [json.loads((wd / f'ratio_{r}' / 'runs' / m / f'seed_{s}' / 'metrics.json').read_text())['test']['youden'][
        'youden_j'] for s in (0, 1)]
      for m in ('baseline', 'oversample')
    }  # fmt: skip
    e = agg['ratios'][r]['methods']['oversample']
    assert e['delta_vs_baseline_at_validation_threshold']['youden_j']['mean'] == pytest.approx(
      sum(a - b for a, b in zip(at['oversample'], at['baseline'])) / 2
    )
    assert e['at_validation_threshold']['youden_j']['mean'] == pytest.approx(sum(at['oversample']) / 2)
    assert agg['ratios'][r]['methods']['oversample']['f1']['mean'] == pytest.approx(sum(per['oversample']) / 2)
  # The ratio reached the training split (smoke caps it at 320 images, keeping the proportions).
  for r in ('3', '10'):
    normal, pneumonia = agg['ratios'][r]['train_counts']
    assert normal + pneumonia == 320 and normal / pneumonia == pytest.approx(float(r), rel=0.05)
  rows = list(csv.DictReader((wd / 'severity.csv').open()))
  assert [(row['ratio'], row['method']) for row in rows] == [
    ('3.0', 'baseline'), ('3.0', 'oversample'), ('10.0', 'baseline'), ('10.0', 'oversample')]  # fmt: skip
  md = (wd / 'severity.md').read_text()
  assert 'When does generation help?' in md and '## At the threshold chosen on validation' in md
  assert rows[1]['valthr_delta_f1'] != '' and rows[0]['valthr_delta_f1'] == '' and rows[0]['valthr_f1'] != ''
  # Finished: a rerun trains nothing and writes the same study.
  before = (wd / 'severity.json').read_text()
  r = study(wd, results)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count('already complete') == 8 and 'epoch' not in r.stderr
  assert (wd / 'severity.json').read_text() == before
  # Each ratio's small results were kept: on another machine (an empty workdir) they are read, not rerun.
  for name in ('severity.md', 'severity.json', 'ratio_3/records.json', 'ratio_3/kept.json', 'ratio_10/stats.json',
               'ratio_10/report.md', 'ratio_10/metrics_bars.png'):  # fmt: skip
    assert (results / name).is_file(), name
  r = study(tmp_path / 'elsewhere', results)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count('results kept in') == 2 and 'epoch' not in r.stderr and 'already complete' not in r.stderr
  again = json.loads((tmp_path / 'elsewhere' / 'severity.json').read_text())
  for r in ('3', '10'):
    assert again['ratios'][r]['kept']['fingerprint'] == json.loads((results / f'ratio_{r}' / 'kept.json').read_text())[
      'fingerprint']  # fmt: skip
    for m in ('baseline', 'oversample'):
      got, want = again['ratios'][r]['methods'][m], agg['ratios'][r]['methods'][m]
      assert got['f1'] == want['f1'] and got.get('delta_vs_baseline') == want.get('delta_vs_baseline')
  # A kept ratio serves only the config that made it: another seed list runs again.
  from cxrjax.sweep import severity  # noqa: PLC0415

  cfg = runpy.run_path(str(ROOT / 'configs' / 'severity.py'))['get_config']('smoke')
  assert severity.load_kept(severity.ratio_sweep(cfg, 'anywhere', 3), str(results), 3) is not None
  cfg.seeds = (0, 1, 2)
  assert severity.load_kept(severity.ratio_sweep(cfg, 'anywhere', 3), str(results), 3) is None


def test_tstr_utility_is_read_from_the_utility_record():
  from cxrjax.sweep import severity  # noqa: PLC0415

  util = {'tstr': {'test': {'threshold_0.5': {'balanced_accuracy': 0.81, 'auroc': 0.9}, 'youden': {}}}}
  assert severity._tstr_value(util) == 0.81
  assert severity._tstr_value({'tstr': {'test': {'threshold_0.5': {'auroc': 0.9}}}}) == 0.9
  assert severity._tstr_value(None) is None and severity._tstr_value({}) is None
