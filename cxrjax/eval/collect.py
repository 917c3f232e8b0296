"""One Markdown table from the metrics.json of several finished runs.

  python -m cxrjax.eval.collect runs/issue3/*            # binary: poster's metrics + more
  python -m cxrjax.eval.collect --per-class runs/kermany3/*

Each row is a workdir (generative runs: their top-level metrics.json); the test
metrics are at threshold 0.5 (binary) or arg-max (K classes), with F1 and
balanced accuracy also at the Youden threshold chosen on validation (binary).
"""

from __future__ import annotations

import argparse
import os
import sys

from cxrjax import fileio
from cxrjax.errors import UserError

COLUMNS = ('precision', 'recall', 'specificity', 'f1', 'balanced_accuracy', 'mcc', 'kappa', 'auroc', 'auprc')


def _f(x) -> str:
  return '—' if x is None else f'{x:.3f}'


def load(workdir: str) -> dict:
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.isfile(path):
    raise UserError(f'{path}: not found; expected a finished run (metrics.json is written last)')
  return fileio.read_json(path)


def table(workdirs: list[str], per_class: bool = False) -> str:
  """The Markdown table of `workdirs` (in the order given)."""
  head = ['run', 'trained on', *COLUMNS, 'F1 @Youden', 'bal. acc @Youden']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  extra = []
  common = os.path.commonpath([os.path.abspath(w) for w in workdirs]) if len(workdirs) > 1 else None
  for wd in workdirs:
    m = load(wd)
    t = m['test']['threshold_0.5']
    y = m['test'].get('youden') or {}
    name = os.path.relpath(os.path.abspath(wd), common) if common else os.path.basename(os.path.normpath(wd))
    name += ' (PHANTOM)' if m.get('phantom') else ''
    trained = m['data']['counts'].get('trained_on')
    cells = [name, str(trained)] + [_f(t.get(c)) for c in COLUMNS] + [_f(y.get('f1')), _f(y.get('balanced_accuracy'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
    if per_class and t.get('per_class'):
      for pc in t['per_class']:
        extra.append(f'| {name} | {pc["name"]} | {pc["support"]} | {_f(pc["precision"])} | {_f(pc["recall"])} |'
                     f' {_f(pc["specificity"])} | {_f(pc["f1"])} | {_f(pc["auroc"])} |')  # fmt: skip
  out = '\n'.join(lines)
  if extra:
    out += ('\n\nPer class (test, one-vs-rest):\n\n| run | class | support | precision | recall | specificity | F1 |'
            ' AUROC |\n|---|---|---:|---|---|---|---|---|\n' + '\n'.join(extra))  # fmt: skip
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--per-class', action='store_true', help='also one row per class (K-class runs)')
  args = p.parse_args(argv)
  try:
    print(table(args.workdirs, args.per_class))
  except UserError as e:
    print(f'cxrjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
