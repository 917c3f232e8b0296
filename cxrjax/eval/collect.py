"""One Markdown table from the metrics.json of several finished runs.

  python -m cxrjax.eval.collect runs/issue3/*            # binary: poster's metrics + more
  python -m cxrjax.eval.collect --per-class runs/kermany3/*
  python -m cxrjax.eval.collect --summary runs/full/seed_*  # + median and mean ± sd rows over seeds

Each row is a workdir (generative runs: their top-level metrics.json); the test
metrics are at threshold 0.5 (binary) or arg-max (K classes), with F1 and
balanced accuracy and accuracy also at the Youden threshold chosen on validation
(binary). With `--summary` (runs of one method over several seeds), two rows
follow: the median and the mean ± sample standard deviation of every metric
column, over the runs that have it (with n when that is not all of them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from cxrjax import fileio
from cxrjax.errors import UserError

COLUMNS = ('accuracy', 'precision', 'recall', 'specificity', 'f1', 'balanced_accuracy', 'mcc', 'kappa', 'auroc',
           'auprc')  # fmt: skip


def _f(x) -> str:
  return '—' if x is None else f'{x:.3f}'


def load(workdir: str) -> dict:
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.isfile(path):
    raise UserError(f'{path}: not found; expected a finished run (metrics.json is written last)')
  return fileio.read_json(path)


YOUDEN_COLUMNS = ('f1', 'balanced_accuracy', 'accuracy')


def _summary_rows(values: list[tuple[float | None, ...]]) -> list[str]:
  """Median and mean ± sd rows of a column-major list of values (None where a run lacks the metric)."""
  med, mean = ['**median**', ''], ['**mean ± sd**', '']
  for col in values:
    xs = [x for x in col if x is not None]
    n = f' (n={len(xs)})' if 0 < len(xs) < len(col) else ''  # only some runs have this metric
    med.append(_f(statistics.median(xs)) + n if xs else '—')
    sd = f' ± {statistics.stdev(xs):.3f}' if len(xs) > 1 else ''
    mean.append(f'{statistics.fmean(xs):.3f}{sd}{n}' if xs else '—')
  return ['| ' + ' | '.join(med) + ' |', '| ' + ' | '.join(mean) + ' |']


def table(workdirs: list[str], per_class: bool = False, summary: bool = False) -> str:
  """The Markdown table of `workdirs` (in the order given), with median and mean rows if `summary`."""
  head = ['run', 'trained on', *COLUMNS, 'F1 @Youden', 'bal. acc @Youden', 'acc @Youden']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  extra, columns = [], []
  common = os.path.commonpath([os.path.abspath(w) for w in workdirs]) if len(workdirs) > 1 else None
  for wd in workdirs:
    m = load(wd)
    t = m['test']['threshold_0.5']
    y = m['test'].get('youden') or {}
    name = os.path.relpath(os.path.abspath(wd), common) if common else os.path.basename(os.path.normpath(wd))
    name += ' (PHANTOM)' if m.get('phantom') else ''
    trained = m['data']['counts'].get('trained_on')
    values = [t.get(c) for c in COLUMNS] + [y.get(c) for c in YOUDEN_COLUMNS]
    columns.append(values)
    lines.append('| ' + ' | '.join([name, str(trained)] + [_f(v) for v in values]) + ' |')
    if per_class and t.get('per_class'):
      for pc in t['per_class']:
        extra.append(f'| {name} | {pc["name"]} | {pc["support"]} | {_f(pc["precision"])} | {_f(pc["recall"])} |'
                     f' {_f(pc["specificity"])} | {_f(pc["f1"])} | {_f(pc["auroc"])} |')  # fmt: skip
  if summary:
    lines += _summary_rows(list(zip(*columns, strict=True)))
  out = '\n'.join(lines)
  if extra:
    out += ('\n\nPer class (test, one-vs-rest):\n\n| run | class | support | precision | recall | specificity | F1 |'
            ' AUROC |\n|---|---|---:|---|---|---|---|---|\n' + '\n'.join(extra))  # fmt: skip
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--per-class', action='store_true', help='also one row per class (K-class runs)')
  p.add_argument('--summary', action='store_true', help='also the median and mean ± sd of every column (seeds)')
  args = p.parse_args(argv)
  try:
    print(table(args.workdirs, args.per_class, args.summary))
  except UserError as e:
    print(f'cxrjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
