"""The imbalance-severity study: one sweep per imbalance ratio, and one table and one figure across them.

  python -m cxrjax.sweep --config=configs/severity.py:cpu --workdir=runs/severity

A study config is a sweep config with a `ratios` tuple. `WORKDIR/ratio_<r>/` is an
ordinary sweep of the same methods and seeds with `experiment.imbalance.ratio = r`
(its own runs, generators, report.md and stats.json); the reference feature network
is shared by every ratio (`WORKDIR/reference`), because it is trained on the real full
training split, which no ratio changes. Finished runs are skipped and interrupted ones
resume, so the study can be run in parts and a rerun on a finished workdir only
re-aggregates. Across ratios it writes `severity.md`, `severity.csv`, `severity.json`
and `severity.png`: every metric per (ratio, method) with its 95% interval over seeds
and the sweep's paired tests, and the change against the baseline in F1, balanced
accuracy and Youden's J (paired over seeds) with the generators' TSTR utility beside it.

Results kept across machines: with `results_dir` set, each finished ratio's small outputs
(`records.json`: the per-run numbers the study reads; `stats.json`, the tables, report and
figures of its sweep; `kept.json`: the commit, command and a fingerprint of the ratio's
config) are copied to `results_dir/ratio_<r>/`, and the study's own outputs to
`results_dir/`. A later invocation, on another machine with an empty workdir, reads a
kept ratio instead of running it again when its fingerprint matches, so a study longer
than one session runs in parts whose results are committed as they land.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from cxrjax import fileio, progress
from cxrjax.eval import stats
from cxrjax.eval.report import TABLE_KEYS, csv_text, fmt, fmt_ci, fmt_p
from cxrjax.sweep import plan

# The change against the baseline is drawn for these (the study's three endpoints).
DELTA_KEYS = (('f1', 'F1'), ('balanced_accuracy', 'balanced accuracy'), ('youden_j', "Youden's J"))
# The operating point chosen on validation (each run's Youden threshold, applied to test). Beside the
# primary one (0.5) it tells a method's gain in ranking from a shift of its scores toward the minority,
# which a threshold chosen on validation would make without the method.
VALIDATION_POINT = 'youden'


def is_study(config: ml_collections.ConfigDict) -> bool:
  return 'ratios' in config


def ratio_dir(workdir: str, ratio: float) -> str:
  return os.path.join(workdir, f'ratio_{ratio:g}')


def ratio_sweep(study: ml_collections.ConfigDict, workdir: str, ratio: float) -> ml_collections.ConfigDict:
  """The sweep config of one ratio: the study's, with the ratio set and the reference network shared."""
  sweep = copy.deepcopy(study)
  sweep.unlock()
  del sweep['ratios']
  if 'results_dir' in sweep:
    del sweep['results_dir']
  sweep.experiment.imbalance.ratio = float(ratio)
  sweep.reference_dir = os.path.join(workdir, 'reference')
  sweep.lock()
  return sweep


def sweeps(study: ml_collections.ConfigDict, workdir: str) -> list[tuple[float, ml_collections.ConfigDict, str]]:
  """(ratio, its sweep config, its folder) for every ratio of the study, in the study's order."""
  return [(float(r), ratio_sweep(study, workdir, r), ratio_dir(workdir, r)) for r in study.ratios]


# ----------------------------------------------------------------------------- results kept across machines

KEPT_FILES = ('stats.json', 'table.md', 'table.csv', 'report.md')


def fingerprint(sweep: ml_collections.ConfigDict) -> str:
  """A hash of a ratio's sweep config, without its machine-specific paths."""
  d = json.loads(sweep.to_json_best_effort(sort_keys=True))
  d.pop('reference_dir', None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def compact_record(record: dict) -> dict:
  """What the study reads of a run's metrics record (a few KB instead of the whole record)."""
  gq = record.get('generator_quality') or {}
  return dict(
    test=record['test'],
    data=dict(counts=record['data']['counts']),
    utility=_utility(record),
    generator_quality=dict(collapse=gq.get('collapse')) if gq else None,
  )


def keep(sweep, rdir: str, results_dir: str, ratio: float, records: dict, run_info: dict) -> str:
  """Copies a finished ratio's small outputs to `results_dir/ratio_<r>/`; returns that folder."""
  out = ratio_dir(results_dir, ratio)
  os.makedirs(out, exist_ok=True)
  for name in KEPT_FILES:
    if os.path.isfile(os.path.join(rdir, name)):
      shutil.copyfile(os.path.join(rdir, name), os.path.join(out, name))
  for png in sorted(glob.glob(os.path.join(rdir, '*.png'))):
    shutil.copyfile(png, os.path.join(out, os.path.basename(png)))
  fileio.atomic_write_json(
    os.path.join(out, 'records.json'), {f'{m}|{s}': compact_record(r) for (m, s), r in sorted(records.items())}
  )
  time_path = os.path.join(rdir, 'sweep_time.json')
  seconds = fileio.read_json(time_path)['run_seconds'] if os.path.isfile(time_path) else None
  fileio.atomic_write_json(
    os.path.join(out, 'kept.json'),
    dict(fingerprint=fingerprint(sweep), ratio=ratio, run_seconds=seconds, **run_info),
  )
  return out


def load_kept(sweep, results_dir: str, ratio: float) -> tuple[dict, dict, dict] | None:
  """(records, aggregate, kept.json) of a kept ratio whose config matches `sweep`; None otherwise."""
  folder = ratio_dir(results_dir, ratio)
  paths = [os.path.join(folder, n) for n in ('kept.json', 'records.json', 'stats.json')]
  if not all(os.path.isfile(p) for p in paths):
    return None
  kept = fileio.read_json(paths[0])
  if kept.get('fingerprint') != fingerprint(sweep):
    return None
  records = {}
  for key, rec in fileio.read_json(paths[1]).items():
    m, _, s = key.rpartition('|')
    records[(m, int(s))] = rec
  return records, fileio.read_json(paths[2])['aggregate'], kept


def _per_seed(records: dict, method: str, seeds, primary: str, key: str) -> np.ndarray:
  return np.array([records[(method, s)]['test'][primary][key] for s in seeds], np.float64)


def _deltas(records: dict, method: str, seeds, point: str) -> dict[str, dict]:
  """The paired per-seed change against the baseline at operating point `point` (mean and 95% t-interval)."""
  return {
    key: stats.mean_ci(
      _per_seed(records, method, seeds, point, key) - _per_seed(records, 'baseline', seeds, point, key)
    )
    for key, _ in DELTA_KEYS
  }


def _utility(record: dict) -> dict | None:
  """The TSTR utility of a generative run's generator (absent for classic methods and older runs)."""
  u = record.get('utility') or (record.get('generator_quality') or {}).get('utility')
  return u if isinstance(u, dict) else None


def _collapsed(records: dict, method: str, seeds) -> bool:
  for s in seeds:
    c = (records[(method, s)].get('generator_quality') or {}).get('collapse') or {}
    if c.get('any_collapsed'):
      return True
  return False


def aggregate(study: ml_collections.ConfigDict, per_ratio: dict) -> dict[str, Any]:
  methods = plan.methods_of(study)
  seeds = list(study.seeds)
  out: dict[str, Any] = {'ratios': {}, 'methods': methods, 'seeds': seeds}
  for r, (_, records, agg, *kept) in sorted(per_ratio.items()):
    primary = agg['primary']
    first = records[(methods[0], seeds[0])]
    row: dict[str, Any] = {
      'train_counts': first['data']['counts']['train_imbalanced'],
      'test_counts': first['data']['counts']['test'],
      'best_classic': agg.get('best_classic'),
      'primary': primary,
      'methods': {},
    }
    if kept and kept[0]:
      row['kept'] = {k: kept[0].get(k) for k in ('commit', 'command', 'run_seconds', 'fingerprint')}
    for m in methods:
      a = agg['methods'][m]
      entry: dict[str, Any] = {key: a[key] for key, _ in TABLE_KEYS if key in a}
      if 'baseline' in methods and m != 'baseline':
        entry['delta_vs_baseline'] = _deltas(records, m, seeds, primary)
        if primary != VALIDATION_POINT and all(
          VALIDATION_POINT in records[(x, s)]['test'] for x in (m, 'baseline') for s in seeds
        ):
          entry['delta_vs_baseline_at_validation_threshold'] = _deltas(records, m, seeds, VALIDATION_POINT)
      if all(VALIDATION_POINT in records[(m, s)]['test'] for s in seeds):
        entry['at_validation_threshold'] = {
          key: stats.mean_ci(_per_seed(records, m, seeds, VALIDATION_POINT, key)) for key, _ in DELTA_KEYS
        }
      for ref in ('vs_baseline', 'vs_best_classic'):
        if ref in a:
          entry[ref] = {k: v for k, v in a[ref].items() if k.endswith('_holm') or k == 'reference'}
          entry[ref].update({k: v['p_value'] for k, v in a[ref].items() if isinstance(v, dict) and 'p_value' in v})
      util = _utility(records[(m, seeds[0])])
      if util is not None:
        entry['utility'] = util
      if plan.METHODS.get(m, (None, None))[1] is not None:
        entry['generator_collapsed'] = _collapsed(records, m, seeds)
      row['methods'][m] = entry
    out['ratios'][f'{r:g}'] = row
  return out


def _tstr_value(util: dict | None) -> float | None:
  """One number for the figure: the TSTR classifier's balanced accuracy at 0.5 (else its AUROC) on the real test split."""
  t = ((util or {}).get('tstr') or {}).get('test') or {}
  t = t.get('threshold_0.5', t)
  for key in ('balanced_accuracy', 'auroc'):
    if isinstance(t.get(key), (int, float)):
      return float(t[key])
  return None


def figure(agg: dict, path: str) -> None:
  ratios = sorted(agg['ratios'], key=float)
  x = np.array([float(r) for r in ratios])
  methods = [m for m in agg['methods'] if m != 'baseline']
  fig, axes = plt.subplots(1, len(DELTA_KEYS) + 1, figsize=(4.2 * (len(DELTA_KEYS) + 1), 3.8))
  for ax, (key, label) in zip(axes, DELTA_KEYS):
    for i, m in enumerate(methods):
      d = [agg['ratios'][r]['methods'][m].get('delta_vs_baseline', {}).get(key) for r in ratios]
      if any(v is None for v in d):
        continue
      mean = np.array([v['mean'] for v in d])
      err = np.array([[v['mean'] - v['low'] for v in d], [v['high'] - v['mean'] for v in d]])
      jitter = x * (1 + 0.03 * (i - len(methods) / 2))  # log axis: multiplicative offsets keep bars apart
      ax.errorbar(jitter, mean, yerr=err, marker='o', ms=3, capsize=2, lw=1, label=m, color=f'C{i}')
    ax.axhline(0, color='k', lw=0.8)
    _ratio_axis(ax, x, ratios)
    ax.set_xlabel('imbalance (majority:minority)')
    ax.set_title(f'Δ {label} vs baseline (95% CI over seeds)', fontsize=9)
  ax = axes[-1]
  drawn = 0
  for i, m in enumerate(methods):  # a method keeps its colour (C<i>) in every panel
    ys = [_tstr_value(agg['ratios'][r]['methods'][m].get('utility')) for r in ratios]
    if all(y is None for y in ys):
      continue
    ax.plot(x, [np.nan if y is None else y for y in ys], marker='s', ms=3, lw=1, label=m, color=f'C{i}')
    drawn += 1
  if not drawn:
    ax.text(0.5, 0.5, 'no generator with a TSTR record', ha='center', va='center', transform=ax.transAxes)
  ax.axhline(0.5, color='k', lw=0.8, ls=':')
  ax.set_ylim(0.4, 1.0)
  _ratio_axis(ax, x, ratios)
  ax.set_xlabel('imbalance (majority:minority)')
  ax.set_title('TSTR utility: trained on synthetic only,\ntested on real (balanced accuracy)', fontsize=9)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 7), fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def _ratio_axis(ax, x: np.ndarray, ratios) -> None:
  ax.set_xscale('log')
  ax.set_xlim(x.min() / 1.4, x.max() * 1.4)
  ax.set_xticks(x, [f'{r}:1' for r in ratios])
  ax.minorticks_off()


def rows(agg: dict) -> list[dict]:
  out = []
  for r, row in sorted(agg['ratios'].items(), key=lambda kv: float(kv[0])):
    for m, e in row['methods'].items():
      item: dict[str, Any] = {'ratio': float(r), 'method': m, 'train_counts': ' / '.join(map(str, row['train_counts']))}
      for key, _ in TABLE_KEYS:
        if key in e:
          item[key] = e[key]['mean']
          item[f'{key}_ci_low'] = e[key]['low']
          item[f'{key}_ci_high'] = e[key]['high']
      for key, _ in DELTA_KEYS:
        for prefix, field in (('delta', 'delta_vs_baseline'), ('valthr', 'at_validation_threshold'),
                              ('valthr_delta', 'delta_vs_baseline_at_validation_threshold')):  # fmt: skip
          d = (e.get(field) or {}).get(key)
          item[f'{prefix}_{key}'] = d['mean'] if d else None
          item[f'{prefix}_{key}_ci_low'] = d['low'] if d else None
          item[f'{prefix}_{key}_ci_high'] = d['high'] if d else None
      for ref in ('vs_baseline', 'vs_best_classic'):
        for k, v in (e.get(ref) or {}).items():
          if k != 'reference':
            item[f'p_{k}_{ref}'] = v
      item['tstr_utility'] = _tstr_value(e.get('utility'))
      item['generator_collapsed'] = e.get('generator_collapsed')
      out.append(item)
  return out


def markdown(study, agg: dict, workdir: str) -> str:
  seeds = agg['seeds']
  lines = ['# When does generation help? The imbalance-severity study', '']
  exp = study.experiment
  lines += [
    f'- Ratios (majority:minority in training): {", ".join(f"{r}:1" for r in sorted(agg["ratios"], key=float))};'
    f' methods {", ".join(agg["methods"])}; seeds {seeds} (paired: one imbalanced split per ratio,'
    f' imbalance seed {study.data_seed}); profile `{exp.profile}`',
    '- Per ratio, an ordinary sweep: `ratio_<r>/report.md` (Grad-CAM, curves, generator quality); the'
    ' reference feature network is shared by the ratios.',
    f'- Operating point `{next(iter(agg["ratios"].values()))["primary"]}`; intervals are 95% t-intervals over'
    ' seeds; Δ is the paired per-seed difference against the baseline.',
    f'- Run time summed over every invocation: {_minutes(workdir, agg)}',
    '',
    '## Δ against the baseline (mean ± 95% CI over seeds) and TSTR utility',
    '',
    '| ratio | minority / majority train | method | Δ F1 | Δ bal. acc. | Δ J | p Holm F1 / J vs baseline'
    ' | p Holm F1 vs best classic | TSTR bal. acc. | collapsed |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for it in rows(agg):
    if it['method'] == 'baseline':
      continue
    ratio = agg['ratios'][f'{it["ratio"]:g}']
    counts = ratio['train_counts']
    e = ratio['methods'][it['method']]
    vb, vc = e.get('vs_baseline') or {}, e.get('vs_best_classic') or {}
    d = e.get('delta_vs_baseline') or {}
    lines.append(
      f'| {it["ratio"]:g}:1 | {min(counts)} / {max(counts)} | {it["method"]} | {fmt_ci(d.get("f1"))} |'
      f' {fmt_ci(d.get("balanced_accuracy"))} | {fmt_ci(d.get("youden_j"))} |'
      f' {fmt_p(vb.get("f1_bootstrap_holm"))} / {fmt_p(vb.get("youden_j_bootstrap_holm"))} |'
      f' {fmt_p(vc.get("f1_bootstrap_holm", vc.get("f1_bootstrap")))} |'
      f' {fmt(it["tstr_utility"])} | {"yes" if it["generator_collapsed"] else ("no" if it["generator_collapsed"] is False else "-")} |'
    )
  lines += ['', '![severity](severity.png)', '']
  lines += [
    "## At the threshold chosen on validation (each run's Youden threshold, applied to test)",
    '',
    "The same runs at the other operating point: where a method's gain above shrinks here, it came from"
    ' moving the scores past 0.5, which choosing the threshold on validation does for the baseline too.',
    '',
    '| ratio | method | F1 | bal. acc. | J | Δ F1 vs baseline | Δ bal. acc. | Δ J |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r, row in sorted(agg['ratios'].items(), key=lambda kv: float(kv[0])):
    for m, e in row['methods'].items():
      at, d = e.get('at_validation_threshold') or {}, e.get('delta_vs_baseline_at_validation_threshold') or {}
      if not at:
        continue
      cells = [fmt_ci(at.get(k)) for k, _ in DELTA_KEYS] + [
        fmt_ci(d.get(k)) if m != 'baseline' else '(reference)' for k, _ in DELTA_KEYS
      ]
      lines.append(f'| {r}:1 | {m} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Every metric (mean ± 95% CI over seeds)', '']
  keys = [(k, label) for k, label in TABLE_KEYS if k != 'accuracy']
  lines += ['| ratio | method | ' + ' | '.join(label for _, label in keys) + ' |', '|' + '---|' * (len(keys) + 2)]
  for r, row in sorted(agg['ratios'].items(), key=lambda kv: float(kv[0])):
    for m, e in row['methods'].items():
      lines.append(f'| {r}:1 | {m} | ' + ' | '.join(fmt_ci(e.get(k)) for k, _ in keys) + ' |')
  lines += ['', '## Per ratio', '']
  for r in sorted(agg['ratios'], key=float):
    kept = agg['ratios'][r].get('kept')
    lines.append(f'- {r}:1: [ratio_{r}/report.md](ratio_{r}/report.md), best classic method'
                 f' `{agg["ratios"][r]["best_classic"]}`'
                 + (f'; results kept from commit `{kept["commit"]}`, not rerun here' if kept else ''))  # fmt: skip
  return '\n'.join(lines) + '\n'


def _minutes(workdir: str, agg: dict) -> str:
  total = 0.0
  for r in agg['ratios']:
    path = os.path.join(ratio_dir(workdir, float(r)), 'sweep_time.json')
    if os.path.isfile(path):
      total += fileio.read_json(path)['run_seconds']
    elif agg['ratios'][r].get('kept', {}).get('run_seconds'):
      total += agg['ratios'][r]['kept']['run_seconds']
  return f'{total / 60:.1f} min in runs'


STUDY_FILES = ('severity.md', 'severity.csv', 'severity.json', 'severity.png')


def write(study, workdir: str, per_ratio: dict) -> dict:
  """The study's outputs in `workdir` (and in `study.results_dir`, when set)."""
  agg = aggregate(study, per_ratio)
  figure(agg, os.path.join(workdir, 'severity.png'))
  fileio.atomic_write_json(os.path.join(workdir, 'severity.json'), agg)
  fileio.atomic_write_text(os.path.join(workdir, 'severity.csv'), csv_text(rows(agg)))
  fileio.atomic_write_text(os.path.join(workdir, 'severity.md'), markdown(study, agg, workdir))
  results_dir = study.get('results_dir', '')
  if results_dir:
    os.makedirs(results_dir, exist_ok=True)
    for name in STUDY_FILES:
      shutil.copyfile(os.path.join(workdir, name), os.path.join(results_dir, name))
  progress.log(f'[severity] report: {os.path.join(results_dir or workdir, "severity.md")}')
  return agg
