"""`python -m cxrjax.eval.collect`: one table from several finished runs."""

import numpy as np
import pytest

from cxrjax import fileio
from cxrjax.eval import collect


def _run(path, f1, per_class=None, auroc=0.9, accuracy=0.7):
  t = dict(accuracy=accuracy, precision=0.5, recall=0.25, specificity=0.75, f1=f1, balanced_accuracy=0.5, mcc=0.1,
           kappa=0.1, auroc=auroc, auprc=0.8)  # fmt: skip
  if per_class:
    t['per_class'] = per_class
  path.mkdir(parents=True)
  m = dict(test={'threshold_0.5': t, 'youden': dict(f1=0.6, balanced_accuracy=0.55, accuracy=0.65)},
           data=dict(counts=dict(trained_on=[30, 10])), phantom=False)  # fmt: skip
  fileio.atomic_write_json(str(path / 'metrics.json'), m)


def test_rows_in_order_named_by_their_distinct_path(tmp_path):
  _run(tmp_path / 'a' / 'seed_0', 0.123456)
  pc = [dict(name='viral', support=7, precision=0.1, recall=0.2, specificity=0.3, f1=0.4, auroc=0.5)]
  _run(tmp_path / 'b' / 'seed_0', 0.9, per_class=pc)
  out = collect.table([str(tmp_path / 'b' / 'seed_0'), str(tmp_path / 'a' / 'seed_0')], per_class=True)
  lines = out.splitlines()
  assert lines[2].startswith('| b/seed_0 | [30, 10] | 0.700 | 0.500 | 0.250 | 0.750 | 0.900 |')
  assert lines[3].startswith('| a/seed_0 |') and '| 0.123 |' in lines[3]
  assert lines[3].endswith('| 0.600 | 0.550 | 0.650 |')
  assert 'median' not in out
  assert '| b/seed_0 | viral | 7 | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 |' in out


def test_unfinished_run_is_named_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    collect.main([str(tmp_path / 'nothing')])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('cxrjax: error:') and 'nothing/metrics.json: not found' in err


def test_summary_rows_are_median_and_mean_sd_over_seeds(tmp_path, capsys):
  runs = [(0.91, 0.976), (0.94, 0.981), (0.79, 0.979), (0.85, 0.970)]  # (accuracy, AUROC) of four seeds
  for i, (acc, auroc) in enumerate(runs):
    _run(tmp_path / f'seed_{i}', 0.5, auroc=auroc, accuracy=acc)
  collect.main(['--summary', *(str(tmp_path / f'seed_{i}') for i in range(4))])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 + 4 + 2
  med = lines[-2].split(' | ')
  mean = lines[-1].split(' | ')
  head = lines[0].split(' | ')
  acc_col, auroc_col = head.index('accuracy'), head.index('auroc')
  assert med[0] == '| **median**' and med[acc_col] == '0.880' and med[auroc_col] == '0.978'
  # numpy's sample standard deviation (ddof=1), independently of the statistics module used by collect.
  assert mean[acc_col] == f'0.873 ± {np.std([r[0] for r in runs], ddof=1):.3f}'
  assert mean[head.index('f1')] == '0.500 ± 0.000'


def test_summary_counts_runs_that_lack_a_metric(tmp_path):
  _run(tmp_path / 'seed_0', 0.5, auroc=0.9)
  _run(tmp_path / 'seed_1', 0.7, auroc=None)  # e.g. a run whose test split had one class
  _run(tmp_path / 'single', 0.5)
  out = collect.table([str(tmp_path / 'seed_0'), str(tmp_path / 'seed_1')], summary=True).splitlines()
  head = out[0].split(' | ')
  col = head.index('auroc')
  assert out[3].split(' | ')[col] == '—'
  assert out[-2].split(' | ')[col] == '0.900 (n=1)' and out[-1].split(' | ')[col] == '0.900 (n=1)'
  assert out[-1].split(' | ')[head.index('f1')] == '0.600 ± 0.141'
  one = collect.table([str(tmp_path / 'single')], summary=True).splitlines()
  assert one[-1].split(' | ')[col] == '0.900'  # one run: no spread to show
