"""The sweep's statistics: generators per seed, J/DeLong/McNemar/Holm wiring, K classes, collapse flags.

Most tests aggregate fabricated runs (predictions.npz and metrics records written here), so they check the
wiring against scipy, scikit-learn and hand computations without training anything; one end-to-end test runs
a 3-class smoke sweep on the phantom.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm

from cxrjax import fileio
from cxrjax.errors import UserError
from cxrjax.eval import metrics as metrics_lib
from cxrjax.eval import stats
from cxrjax.sweep import plan
from cxrjax.sweep import report as sweep_report

from conftest import ROOT

_spec = importlib.util.spec_from_file_location('sweep_config', ROOT / 'configs' / 'sweep.py')
sweep_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_config)

SEEDS = (0, 1, 2)


def _sweep(methods: str, **kw) -> ml_collections.ConfigDict:
  c = sweep_config.get_config('smoke')
  c.methods = methods
  c.seeds = SEEDS
  c.bootstrap = 40
  for k, v in kw.items():
    c[k] = v
  return c


# -- generators per seed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'spec, per_seed',
  [('', ()), ('all', ('dcgan', 'ldm')), ('dcgan', ('dcgan',)), ('ldm', ('ldm',))],
)
def test_generators_per_seed_sets_dir_and_seed(spec, per_seed):
  sweep = _sweep('baseline,dcgan,ldm_sample,ldm_img2img', generators_per_seed=spec, generator_seed=7)
  wd = '/tmp/sweep'
  for seed in (0, 1):
    cfgs = {m: plan.method_config(sweep, m, seed, wd) for m in ('dcgan', 'ldm_sample', 'ldm_img2img')}
    for m, gen in (('dcgan', 'dcgan'), ('ldm_sample', 'ldm'), ('ldm_img2img', 'ldm')):
      if gen in per_seed:
        assert cfgs[m].generator_seed == seed
        assert cfgs[m].generator_dir == os.path.join(wd, 'generators', f'{gen}_seed_{seed}')
      else:  # today's behaviour: one generator for every seed
        assert cfgs[m].generator_seed == 7
        assert cfgs[m].generator_dir == os.path.join(wd, 'generators', gen)
    # Both LDM modes sample one trained LDM (per seed or shared).
    assert cfgs['ldm_sample'].generator_dir == cfgs['ldm_img2img'].generator_dir
  assert plan.method_config(sweep, 'baseline', 1, wd).generator_dir == ''


def test_generative_runs_of_a_sweep_record_collapse_and_measure_utility_on_tstr_seeds():
  sweep = _sweep('baseline,dcgan,mix:dcgan+cdcgan_a0.25,cdcgan_a0.25', tstr_seeds=(1,))
  sweep.experiment.quality.on_collapse = 'stop'  # as in the cpu and full profiles (smoke sets 'continue')
  wd = '/tmp/sweep'
  for seed in (0, 1):
    dcgan = plan.method_config(sweep, 'dcgan', seed, wd)
    # A collapse is flagged in the table; it never halts the sweep.
    assert dcgan.quality.on_collapse == 'continue'
    assert dcgan.quality.tstr is (seed == 1)
  base = plan.method_config(sweep, 'baseline', 1, wd)
  assert base.quality.tstr is False
  # The default: no utility stage anywhere.
  assert plan.method_config(_sweep('dcgan'), 'dcgan', 0, wd).quality.tstr is False


def test_generators_per_seed_rejects_unknown_names():
  with pytest.raises(UserError, match="generators_per_seed='dcgan,ldm_sample'.*'ldm_sample' is not a generator"):
    plan.method_config(_sweep('dcgan', generators_per_seed='dcgan,ldm_sample'), 'dcgan', 0, '/tmp/sweep')


def test_report_says_which_generators_were_per_seed():
  line = sweep_report._generators_line(_sweep('dcgan,ldm_sample', generators_per_seed='dcgan'), ['dcgan', 'ldm_sample'])
  assert 'once per seed' in line and ': dcgan (' in line and 'shared by the seeds (generator seed 0): ldm' in line
  assert sweep_report._generators_line(_sweep('baseline'), ['baseline']) == 'no generators'


# -- endpoint functions against scikit-learn and the single-run metrics -----------------------------------------


def test_endpoint_functions_match_sklearn_and_metrics():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  scores = np.clip(0.3 * y[:, None] + rng.uniform(0, 0.7, (200, 3)), 0, 1)
  pred = (scores >= 0.5).astype(np.int64)
  f1 = np.mean([skm.f1_score(y, pred[:, j]) for j in range(3)])
  j = np.mean([skm.recall_score(y, pred[:, i]) + skm.recall_score(1 - y, 1 - pred[:, i]) - 1 for i in range(3)])
  assert sweep_report._f1_fn([1])(y, pred) == pytest.approx(f1, abs=1e-12)
  assert sweep_report._youden_fn([1])(y, pred) == pytest.approx(j, abs=1e-12)
  assert sweep_report._auroc(y, scores) == pytest.approx(
    np.mean([skm.roc_auc_score(y, scores[:, i]) for i in range(3)])
  )
  # K = 3: macro one-vs-rest, as the classifier's own metrics record.
  y3 = rng.integers(0, 3, 300)
  probs = rng.dirichlet(np.ones(3), (300, 2)) + 0.4 * np.eye(3)[y3][:, None]
  probs /= probs.sum(2, keepdims=True)
  pred3 = probs.argmax(2)
  recs = [metrics_lib.multiclass_metrics(y3, probs[:, s]) for s in range(2)]
  classes = np.arange(3)
  assert sweep_report._f1_fn(classes)(y3, pred3) == pytest.approx(np.mean([r['f1'] for r in recs]), abs=1e-12)
  assert sweep_report._f1_fn(classes)(y3, pred3) == pytest.approx(
    np.mean([skm.f1_score(y3, pred3[:, s], average='macro') for s in range(2)]), abs=1e-12
  )
  assert sweep_report._youden_fn(classes)(y3, pred3) == pytest.approx(np.mean([r['youden_j'] for r in recs]))
  assert sweep_report._auroc(y3, probs) == pytest.approx(
    np.mean([skm.roc_auc_score(y3, probs[:, s], multi_class='ovr', average='macro') for s in range(2)])
  )


# -- aggregate over fabricated runs -----------------------------------------------------------------------------


def _fabricate(wd, methods, k=2, n=240, collapse=None, youden=False):
  """Writes predictions.npz per (method, seed) and returns the metrics records the trainers would."""
  rng = np.random.default_rng(1)
  labels = np.arange(n) % k
  records = {}
  for i, m in enumerate(methods):
    for s in SEEDS:
      logits = (0.6 + 0.15 * i) * np.eye(k)[labels] + rng.normal(0, 0.6, (n, k))
      probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
      run = plan.run_dir(str(wd), m, s)
      os.makedirs(run, exist_ok=True)
      fileio.atomic_save_npz(
        os.path.join(run, 'predictions.npz'), dict(test_probs=probs.astype(np.float32), test_labels=labels)
      )
      p32 = probs.astype(np.float32)
      test = {'threshold_0.5': metrics_lib.evaluate_predictions(labels, p32, class_names=[f'c{c}' for c in range(k)])}
      if youden:
        test['youden'] = metrics_lib.evaluate_predictions(labels, p32, threshold=0.4 + 0.05 * s)
      rec = dict(test=test, train=dict(wall_time_s=1.0, history=[]))
      if collapse and (m, s) in collapse:
        rec['generator_quality'] = dict(per_class={}, collapse=collapse[(m, s)])
      records[(m, s)] = rec
  return records


def _old_f1_at_half(y, s):
  """The sweep's F1 before this change (report._f1_at(0.5)), for binary scores [N, S]."""
  pred = np.asarray(s) >= 0.5
  y = np.asarray(y, bool)[:, None]
  tp, fp, fn = np.sum(pred & y, 0), np.sum(pred & ~y, 0), np.sum(~pred & y, 0)
  return float(np.mean(np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)))


def _holm(p):
  p = np.asarray(p, float)
  order = np.argsort(p)
  adj = np.empty_like(p)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p) - rank) * p[i]))
    adj[i] = running
  return adj


def _delong_reference(y, a, b):
  """DeLong et al. (1988) with the O(m n) kernel psi(x, y) = 1{x > y} + 1/2 1{x = y}, written out."""
  pos, neg = y == 1, y == 0
  v10, v01 = [], []
  for s in (a, b):
    psi = (s[pos][:, None] > s[neg][None]) + 0.5 * (s[pos][:, None] == s[neg][None])
    v10.append(psi.mean(1))
    v01.append(psi.mean(0))
  aucs = np.array([v.mean() for v in v10])
  cov = np.cov(np.array(v10)) / pos.sum() + np.cov(np.array(v01)) / neg.sum()
  z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  return aucs, 2 * sps.norm.sf(abs(z))


def _mcnemar_reference(y, pa, pb):
  b = int(np.sum((pa == y) & (pb != y)))
  c = int(np.sum((pa != y) & (pb == y)))
  if b + c < 25:
    return sps.binomtest(b, b + c, 0.5).pvalue
  return sps.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1)


METHODS = ('baseline', 'oversample', 'smote', 'dcgan')


@pytest.mark.parametrize('primary', ['threshold_0.5', 'youden'])
def test_binary_aggregate_tests_match_scipy_and_hand(tmp_path, primary):
  records = _fabricate(tmp_path, METHODS, youden=primary == 'youden')
  sweep = _sweep(','.join(METHODS), primary=primary)
  agg = sweep_report.aggregate(sweep, str(tmp_path), records)
  assert agg['num_classes'] == 2 and agg['operating_point'] == primary
  best = agg['best_classic']
  assert best == max(('oversample', 'smote'), key=lambda m: agg['methods'][m]['f1']['mean'])

  def load(m):
    probs = [np.load(os.path.join(plan.run_dir(str(tmp_path), m, s), 'predictions.npz'))['test_probs'] for s in SEEDS]
    labels = np.load(os.path.join(plan.run_dir(str(tmp_path), m, 0), 'predictions.npz'))['test_labels']
    thr = [records[(m, s)]['test'][primary]['threshold'] for s in SEEDS]
    return labels, np.stack([p[:, 1] for p in probs], 1).astype(np.float64), np.asarray(thr)

  for ref_name, ref in (('baseline', 'baseline'), ('best_classic', best)):
    y, ref_scores, ref_thr = load(ref)
    names = [m for m in METHODS if m != ref]
    p_delong, p_mcnemar, p_j = [], [], []
    for m in names:
      v = agg['methods'][m][f'vs_{ref_name}']
      _, scores, thr = load(m)
      j_m = [records[(m, s)]['test'][primary]['youden_j'] for s in SEEDS]
      j_r = [records[(ref, s)]['test'][primary]['youden_j'] for s in SEEDS]
      assert v['youden_j_t_test']['p_value'] == pytest.approx(sps.ttest_rel(j_m, j_r).pvalue)
      assert v['youden_j_wilcoxon']['p_value'] == pytest.approx(sps.wilcoxon(j_m, j_r).pvalue)
      # The bootstrap's point estimate is the seed-mean J difference of the records.
      assert v['youden_j_bootstrap']['delta'] == pytest.approx(np.mean(j_m) - np.mean(j_r), abs=1e-12)
      # F1's bootstrap is the one the sweep ran before J (its F1 function, copied here): unchanged.
      old = stats.paired_bootstrap(
        y,
        (scores >= thr).astype(float),
        (ref_scores >= ref_thr).astype(float),
        _old_f1_at_half,
        sweep.bootstrap,
        seed=0,
      )
      assert v['f1_bootstrap']['p_value'] == pytest.approx(old['p_value'])
      assert v['f1_bootstrap']['delta'] == pytest.approx(old['delta'])
      # DeLong on the seed-averaged scores, against the written-out original.
      aucs, p = _delong_reference(y, scores.mean(1), ref_scores.mean(1))
      assert v['auroc_delong']['auc_a'] == pytest.approx(aucs[0]) and v['auroc_delong']['p_value'] == pytest.approx(p)
      # McNemar on the seed ensembles at the mean threshold.
      pa = (scores.mean(1) >= thr.mean()).astype(int)
      pb = (ref_scores.mean(1) >= ref_thr.mean()).astype(int)
      assert v['mcnemar']['p_value'] == pytest.approx(_mcnemar_reference(y, pa, pb))
      p_delong.append(v['auroc_delong']['p_value'])
      p_mcnemar.append(v['mcnemar']['p_value'])
      p_j.append(v['youden_j_bootstrap']['p_value'])
    # Holm within each test, across the comparisons with this reference.
    for test, ps in (('auroc_delong', p_delong), ('mcnemar', p_mcnemar), ('youden_j_bootstrap', p_j)):
      got = [agg['methods'][m][f'vs_{ref_name}'][f'{test}_holm'] for m in names]
      np.testing.assert_allclose(got, _holm(ps))


def test_multiclass_aggregate_and_tables(tmp_path):
  methods = ('baseline', 'oversample', 'dcgan')
  collapse = {('dcgan', 1): dict(any_collapsed=True, classes=['c2'], verdicts={'c0': 'ok', 'c1': 'ok', 'c2': 'collapsed'}),
              ('dcgan', 0): dict(any_collapsed=False, classes=[], verdicts={})}  # fmt: skip
  records = _fabricate(tmp_path, methods, k=3, collapse=collapse)
  sweep = _sweep(','.join(methods), primary='youden')  # binary-only setting: K classes use the arg-max
  agg = sweep_report.aggregate(sweep, str(tmp_path), records)
  assert agg['num_classes'] == 3 and agg['operating_point'] == 'argmax' and agg['class_names'] == ['c0', 'c1', 'c2']
  row = agg['methods']['oversample']
  assert set(row['per_class']) == {'c0', 'c1', 'c2'}
  per_seed = [records[('oversample', s)]['test']['threshold_0.5'] for s in SEEDS]
  assert row['per_class']['c1']['youden_j']['mean'] == pytest.approx(
    np.mean([p['per_class'][1]['youden_j'] for p in per_seed])
  )
  v = row['vs_baseline']
  f1_m = [p['f1'] for p in per_seed]
  f1_b = [records[('baseline', s)]['test']['threshold_0.5']['f1'] for s in SEEDS]
  assert v['f1_bootstrap']['delta'] == pytest.approx(np.mean(f1_m) - np.mean(f1_b), abs=1e-12)
  assert 'auroc_delong' not in v and set(v['auroc_delong_per_class']) == {'c0', 'c1', 'c2'}
  probs = {m: np.stack([np.load(os.path.join(plan.run_dir(str(tmp_path), m, s), 'predictions.npz'))['test_probs']
                        for s in SEEDS], 1).astype(np.float64).mean(1) for m in ('oversample', 'baseline')}  # fmt: skip
  y = np.arange(probs['baseline'].shape[0]) % 3
  _, p = _delong_reference((y == 2).astype(int), probs['oversample'][:, 2], probs['baseline'][:, 2])
  assert v['auroc_delong_per_class']['c2']['p_value'] == pytest.approx(p)
  assert v['mcnemar']['p_value'] == pytest.approx(
    _mcnemar_reference(y, probs['oversample'].argmax(1), probs['baseline'].argmax(1))
  )
  assert 'auroc_bootstrap_holm' in v and 'auroc_delong_holm' not in v
  # Collapse: flagged for the method whose generator collapsed in any seed; not judged elsewhere.
  assert agg['methods']['dcgan']['collapse'] == dict(
    any_collapsed=True, seeds=[1], classes=['c2'], generators=['dcgan']
  )
  assert agg['methods']['baseline']['collapse'] is None
  rows = {r['method']: r for r in sweep_report.table_rows(agg, None)}
  assert rows['dcgan']['collapsed'] is True and rows['baseline']['collapsed'] == ''
  assert rows['oversample']['youden_j_c1'] == pytest.approx(row['per_class']['c1']['youden_j']['mean'])
  assert rows['oversample']['p_mcnemar_vs_baseline'] == pytest.approx(v['mcnemar']['p_value'])
  table = sweep_report.markdown_table(agg, None)
  assert '| dcgan ⚠ collapsed (c2; seed 1) |' in table and '| oversample |' in table
  assert '| oversample | c2 |' in sweep_report.per_class_table(agg)
  assert 'p AUROC bootstrap (Holm)' in sweep_report.tests_table(agg, 'baseline')


def test_collapse_of_a_mix_comes_from_its_generators():
  records = {('dcgan', 0): {'generator_quality': {'collapse': dict(any_collapsed=False, classes=[])}},
             ('cdcgan_a0.25', 0): {'generator_quality': {'collapse': dict(any_collapsed=True, classes=['pneumonia'])}}}  # fmt: skip
  c = sweep_report._collapse(records, 'mix:dcgan+cdcgan_a0.25', [0])
  assert c == dict(any_collapsed=True, seeds=[0], classes=['pneumonia'], generators=['cdcgan_a0.25'])
  assert sweep_report._collapse(records, 'dcgan', [0])['any_collapsed'] is False
  assert sweep_report._collapse({('dcgan', 0): {}}, 'dcgan', [0]) is None  # a run from before the check


# -- a 3-class smoke sweep -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_three_class_smoke_sweep_writes_its_report(tmp_path):
  wd = tmp_path / 'sweep3'
  r = subprocess.run(
    [sys.executable, '-m', 'cxrjax.sweep', '--config=configs/sweep.py:smoke', f'--workdir={wd}',
     '--config.methods=baseline,oversample', '--config.seeds=(0,1)', '--config.bootstrap=50',
     '--config.gradcam_images=3', '--config.focus_images=16', '--config.experiment.data.source=phantom',
     '--config.experiment.data.num_classes=3', '--config.experiment.imbalance.class_ratios=1,1,3',
     '--config.experiment.data.limit_train=96'],
    cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  agg = json.loads((wd / 'stats.json').read_text())['aggregate']
  assert agg['num_classes'] == 3 and agg['operating_point'] == 'argmax'
  v = agg['methods']['oversample']['vs_baseline']
  for test in ('f1_bootstrap', 'youden_j_bootstrap', 'auroc_bootstrap', 'mcnemar'):
    assert 0 < v[test]['p_value'] <= 1 and 0 < v[f'{test}_holm'] <= 1
  rows = list(csv.DictReader((wd / 'table.csv').open()))
  assert [x['method'] for x in rows] == ['baseline', 'oversample']
  assert {'f1_normal', 'youden_j_lesion2', 'auroc_lesion1', 'p_youden_j_vs_baseline_bootstrap'} <= set(rows[0])
  report = (wd / 'report.md').read_text()
  assert 'arg-max over 3 classes (normal, lesion1, lesion2)' in report
  assert '## Per class (one vs rest' in report and '| oversample | lesion2 |' in report
  assert "## Tests of Youden's J, AUROC and McNemar" in report and (wd / 'gradcam_oversample.png').is_file()
