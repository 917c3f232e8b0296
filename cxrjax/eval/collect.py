"""One Markdown table from the metrics.json of several finished runs.

  python -m cxrjax.eval.collect runs/issue3/*            # binary: poster's metrics + more
  python -m cxrjax.eval.collect --per-class runs/kermany3/*
  python -m cxrjax.eval.collect --summary runs/full/seed_*  # + median and mean ± sd rows over seeds
  python -m cxrjax.eval.collect --utility runs/tstr-*      # generative runs: FID... beside TSTR/TRTS

Each row is a workdir (generative runs: their top-level metrics.json); the test
metrics are at threshold 0.5 (binary) or arg-max (K classes), with F1 and
balanced accuracy and accuracy also at the Youden threshold chosen on validation
(binary). With `--summary` (runs of one method over several seeds), two rows
follow: the median and the mean ± sample standard deviation of every metric
column, over the runs that have it (with n when that is not all of them).
With `--utility` (generative runs with quality.tstr), one row per run: the
synthetic set's quality per synthesized class (FID, KID, precision, recall on
the reference network) beside its utility: train on synthetic / test on real
(TSTR), the same classifier trained on real (TRTR), and that one tested on the
synthetic copy (TRTS).
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


UTILITY_HEAD = ('run', 'generator', 'class', 'FID', 'KID x1e3', 'precision', 'recall', 'TSTR AUROC', 'TSTR bal. acc',
                'TSTR bal. acc @Youden', 'TSTR F1 @Youden', 'TRTR AUROC', 'TRTR bal. acc @Youden', 'TRTS AUROC',
                'TRTS bal. acc', 'TSTR / TRTR AUROC')  # fmt: skip


def utility_table(workdirs: list[str]) -> str:
  """Generator quality beside utility, one row per (run, synthesized class) (module docstring)."""
  lines = ['| ' + ' | '.join(UTILITY_HEAD) + ' |', '|' + '---|' * len(UTILITY_HEAD)]
  common = os.path.commonpath([os.path.abspath(w) for w in workdirs]) if len(workdirs) > 1 else None
  for wd in workdirs:
    m = load(wd)
    u = m.get('utility')
    if u is None:
      raise UserError(f'{wd}: no utility record; expected a generative run with --config.quality.tstr=True')
    name = os.path.relpath(os.path.abspath(wd), common) if common else os.path.basename(os.path.normpath(wd))
    name += ' (PHANTOM)' if m.get('phantom') else ''
    gen = m['generator'].get('kind', '?') + (
      ' (derived from real images)' if u['synthetic_set'].get('derived_from_real') else ''
    )
    t5, ty = u['tstr']['test']['threshold_0.5'], u['tstr']['test'].get('youden') or {}
    r5, ry = u['trtr']['test']['threshold_0.5'], u['trtr']['test'].get('youden') or {}
    s5 = u['trts']['test']['threshold_0.5']
    ratio = t5['auroc'] / r5['auroc'] if r5.get('auroc') else None
    util = [t5.get('auroc'), t5.get('balanced_accuracy'), ty.get('balanced_accuracy'), ty.get('f1'), r5.get('auroc'),
            ry.get('balanced_accuracy'), s5.get('auroc'), s5.get('balanced_accuracy'), ratio]  # fmt: skip
    for cls, q in (m.get('generator_quality') or {}).get('per_class', {}).items():
      kid = (q.get('kid') or {}).get('mean')
      quality = [q.get('fid'), None if kid is None else 1e3 * kid, q.get('precision'), q.get('recall')]
      lines.append('| ' + ' | '.join([name, gen, cls] + [_f(v) for v in quality + util]) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--per-class', action='store_true', help='also one row per class (K-class runs)')
  p.add_argument('--summary', action='store_true', help='also the median and mean ± sd of every column (seeds)')
  p.add_argument('--utility', action='store_true', help='generator quality beside TSTR/TRTR/TRTS (quality.tstr runs)')
  args = p.parse_args(argv)
  try:
    print(utility_table(args.workdirs) if args.utility else table(args.workdirs, args.per_class, args.summary))
  except UserError as e:
    print(f'cxrjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
