"""Aggregates a sweep: the table (mean +- 95% CI), paired tests, Grad-CAM, plots, report.md."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from cxrjax import config_lib, fileio, progress, seeding
from cxrjax.data import sources
from cxrjax.eval import features, gradcam, stats
from cxrjax.eval import metrics as metrics_lib
from cxrjax.eval.report import PHANTOM_BANNER, TABLE_KEYS, fmt
from cxrjax.sweep import plan

# The single-run report's metrics without accuracy, which says little under class imbalance.
TABLE_METRICS = tuple((key, label) for key, label in TABLE_KEYS if key != 'accuracy')


def csv_text(rows: list[dict]) -> str:
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return buf.getvalue()


def classifier_dir(run_dir: str) -> str:
  """Where a run's classifier outputs live (generative runs nest it in classifier/)."""
  nested = os.path.join(run_dir, 'classifier')
  return nested if os.path.isfile(os.path.join(nested, 'predictions.npz')) else run_dir


def _f1_at(threshold: float):
  def f1(y, s):
    s = np.asarray(s)
    if s.ndim == 1:
      s = s[:, None]
    pred = s >= threshold
    y = np.asarray(y, bool)[:, None]
    tp = np.sum(pred & y, 0)
    fp = np.sum(pred & ~y, 0)
    fn = np.sum(~pred & y, 0)
    return float(np.mean(np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)))

  return f1


def _auroc(y, s):
  s = np.asarray(s)
  if s.ndim == 1:
    return metrics_lib.auroc(y, s)
  return float(np.mean([metrics_lib.auroc(y, s[:, j]) for j in range(s.shape[1])]))


def _scores(workdir: str, method: str, seeds, positive: int):
  cols, labels = [], None
  for s in seeds:
    with np.load(os.path.join(classifier_dir(plan.run_dir(workdir, method, s)), 'predictions.npz')) as z:
      cols.append(z['test_probs'][:, positive])
      labels = z['test_labels']
  return (labels == positive).astype(np.int64), np.stack(cols, 1)


def aggregate(sweep, workdir: str, records: dict) -> dict[str, Any]:
  """Per method: every table metric as mean +- CI over seeds, plus paired tests."""
  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  primary = sweep.primary
  out: dict[str, Any] = {'methods': {}, 'primary': primary, 'seeds': seeds}
  for m in methods:
    per_seed = [records[(m, s)]['test'][primary] for s in seeds]
    row = {key: stats.mean_ci([p[key] for p in per_seed]) for key, _ in TABLE_METRICS}
    row['per_seed_f1'] = [p['f1'] for p in per_seed]
    row['per_seed_auroc'] = [p['auroc'] for p in per_seed]
    row['thresholds'] = [p.get('threshold', 0.5) for p in per_seed]
    row['wall_time_s'] = float(sum(records[(m, s)]['train']['wall_time_s'] for s in seeds))
    gq = records[(m, seeds[0])].get('generator_quality')
    if gq:
      row['generator_quality'] = {
        c: dict(
          fid=v['fid'],
          kid=v['kid']['mean'],
          precision=v['precision'],
          recall=v['recall'],
          memorized=((v.get('memorization') or {}).get('pixel') or {}).get('share_closer'),
        )  # fmt: skip
        for c, v in gq['per_class'].items()
      }
    out['methods'][m] = row
  classic = [m for m in methods if m in plan.CLASSIC]
  best_classic = max(classic, key=lambda m: out['methods'][m]['f1']['mean']) if classic else None
  out['best_classic'] = best_classic
  positive = 1
  thr = 0.5 if primary == 'threshold_0.5' else None
  y, _ = _scores(workdir, methods[0], seeds, positive) if methods else (None, None)
  for ref_name, ref in (('baseline', 'baseline' if 'baseline' in methods else None), ('best_classic', best_classic)):
    if ref is None:
      continue
    _, ref_scores = _scores(workdir, ref, seeds, positive)
    ref_thr = out['methods'][ref]['thresholds']
    for m in methods:
      if m == ref:
        continue
      row = out['methods'][m]
      _, sc = _scores(workdir, m, seeds, positive)
      tests = {
        'f1_t_test': stats.paired_t_test(row['per_seed_f1'], out['methods'][ref]['per_seed_f1']),
        'f1_wilcoxon': stats.wilcoxon_signed_rank(row['per_seed_f1'], out['methods'][ref]['per_seed_f1']),
        'auroc_t_test': stats.paired_t_test(row['per_seed_auroc'], out['methods'][ref]['per_seed_auroc']),
      }
      if thr is not None:
        f1_fn = _f1_at(thr)
        tests['f1_bootstrap'] = stats.paired_bootstrap(y, sc, ref_scores, f1_fn, sweep.bootstrap, seed=0)
      else:  # per-seed Youden thresholds: score each seed at its own threshold
        ta, tb = np.asarray(row['thresholds']), np.asarray(ref_thr)
        tests['f1_bootstrap'] = stats.paired_bootstrap(
          y, (sc >= ta).astype(float), (ref_scores >= tb).astype(float), _f1_at(0.5), sweep.bootstrap, seed=0
        )
      tests['auroc_bootstrap'] = stats.paired_bootstrap(y, sc, ref_scores, _auroc, sweep.bootstrap, seed=1)
      row[f'vs_{ref_name}'] = dict(reference=ref, **tests)
  # Holm over the methods compared with the baseline (F1 bootstrap).
  names = [m for m in methods if 'vs_baseline' in out['methods'][m]]
  if names:
    adj = stats.holm_bonferroni([out['methods'][m]['vs_baseline']['f1_bootstrap']['p_value'] for m in names])
    for m, p in zip(names, adj):
      out['methods'][m]['vs_baseline']['f1_bootstrap_holm'] = float(p)
  return out


def gradcam_section(sweep, workdir: str, records: dict, agg: dict) -> dict[str, Any]:
  """Grad-CAM/Grad-CAM++ grids on fixed test images, and the lung-focus score per method."""
  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  first = classifier_dir(plan.run_dir(workdir, methods[0], seeds[0]))
  _, _, info = features.load_classifier(os.path.join(first, 'export'))
  # The test images are read again from the data the runs used (recorded in their config).
  cfg = plan.method_config(sweep, methods[0], seeds[0], workdir)
  test = sources.load_dataset(cfg.data, cfg.seed).splits['test']
  rng = seeding.numpy_rng(0, 'sweep/gradcam')
  half = max(sweep.gradcam_images // 2, 1)
  shown = np.concatenate([rng.choice(np.flatnonzero(test.labels == c), half, replace=False) for c in (0, 1)])
  focus_idx = rng.choice(len(test), min(sweep.focus_images, len(test)), replace=False)
  masks_shown = gradcam.lung_mask(test.images[shown])
  masks_focus, fallback = gradcam.lung_mask(test.images[focus_idx], return_fallback=True)
  out = dict(shown=[str(test.names[i]) for i in shown], focus_images=int(len(focus_idx)),
             lung_mask_fallback_share=float(np.mean(fallback)), methods={})  # fmt: skip
  del info
  # One jitted CAM function per architecture and CAM method: the runs of a sweep share the classifier and differ
  # in their weights, so tracing each run's again would only repeat work (20 traces of a 5-method, 2-seed sweep).
  cam_fns = {}
  for m in methods:
    scores = {'gradcam': [], 'gradcam++': []}
    grids = {}
    for s in seeds:
      model, variables, _ = features.load_classifier(
        os.path.join(classifier_dir(plan.run_dir(workdir, m, s)), 'export')
      )
      for method in scores:
        key = (repr(model), method)  # a linen module's repr lists its whole configuration
        if key not in cam_fns:
          cam_fns[key] = gradcam.make_cam_fn(model, method)
        fn = cam_fns[key]
        x = jnp.asarray(test.images[focus_idx].astype(np.float32) / 127.5 - 1.0)
        cams = np.asarray(fn(variables, x, 1))  # evidence for pneumonia
        scores[method].append(float(np.nanmean(gradcam.focus_score(cams, masks_focus))))
        if s == seeds[0]:
          xs = jnp.asarray(test.images[shown].astype(np.float32) / 127.5 - 1.0)
          grids[method] = np.asarray(fn(variables, xs, 1))
    png = f'gradcam_{m.replace(":", "_").replace("+", "_")}.png'
    titles = [f'{"pneumonia" if test.labels[i] else "normal"}' for i in shown]
    gradcam.cam_grid(test.images[shown], grids, os.path.join(workdir, png), titles=titles, masks=masks_shown)
    out['methods'][m] = dict(png=png, **{f'focus_{k}': stats.mean_ci(v) for k, v in scores.items()})
  return out


def _bar_plot(agg: dict, path: str, phantom: bool) -> None:
  methods = list(agg['methods'])
  keys = ('f1', 'recall', 'specificity', 'balanced_accuracy', 'auroc')
  fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(methods)), 4))
  width = 0.8 / len(keys)
  x = np.arange(len(methods))
  for i, key in enumerate(keys):
    mean = [agg['methods'][m][key]['mean'] for m in methods]
    err = [[mean[j] - agg['methods'][m][key]['low'] for j, m in enumerate(methods)],
           [agg['methods'][m][key]['high'] - mean[j] for j, m in enumerate(methods)]]  # fmt: skip
    ax.bar(x + (i - len(keys) / 2 + 0.5) * width, mean, width, yerr=err, capsize=2, label=key)
  ax.set_xticks(x, methods, rotation=35, ha='right', fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, ncol=len(keys))
  ax.set_title(('PHANTOM DATA - ' if phantom else '') + f'test metrics ({agg["primary"]}), mean and 95% CI over seeds')
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def _alpha_plot(agg: dict, path: str) -> bool:
  pts = [(float(m.split('_a')[1]), m) for m in agg['methods'] if m.startswith('cdcgan_a')]
  if not pts:
    return False
  fig, ax = plt.subplots(figsize=(4.5, 4))
  for alpha, m in sorted(pts):
    r = agg['methods'][m]
    ax.errorbar(r['specificity']['mean'], r['recall']['mean'],
                xerr=[[r['specificity']['mean'] - r['specificity']['low']], [r['specificity']['high'] - r['specificity']['mean']]],
                yerr=[[r['recall']['mean'] - r['recall']['low']], [r['recall']['high'] - r['recall']['mean']]],
                fmt='o', capsize=3, label=f'alpha={alpha}')  # fmt: skip
  for m in ('baseline', 'dcgan'):
    if m in agg['methods']:
      r = agg['methods'][m]
      ax.plot(r['specificity']['mean'], r['recall']['mean'], 'x', label=m)
  ax.set_xlabel('specificity')
  ax.set_ylabel('sensitivity')
  ax.legend(fontsize=7)
  ax.set_title('cDCGAN alpha sweep', fontsize=9)
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)
  return True


def _curves_plot(records: dict, methods, seeds, path: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4))
  for m in methods:
    hist = [records[(m, s)]['train']['history'] for s in seeds]
    n = min(len(h) for h in hist)
    if n == 0:
      continue
    vals = np.array([[h[i].get('val_auroc', np.nan) for i in range(n)] for h in hist])
    ax.plot(range(1, n + 1), np.nanmean(vals, 0), label=m)
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation AUROC (mean over seeds)')
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=110)
  plt.close(fig)


def _ci(c: dict) -> str:
  if c['n'] <= 1:
    return fmt(c['mean'])
  return f'{c["mean"]:.3f} ± {(c["high"] - c["low"]) / 2:.3f}'


def _p(x) -> str:
  return '-' if x is None or x != x else (f'{x:.3f}' if x >= 0.001 else f'{x:.1e}')


def table_rows(agg: dict, cams: dict | None) -> list[dict]:
  rows = []
  for m, r in agg['methods'].items():
    row = {'method': m}
    for key, _ in TABLE_METRICS:
      row[key] = r[key]['mean']
      row[f'{key}_ci_low'] = r[key]['low']
      row[f'{key}_ci_high'] = r[key]['high']
    vb = r.get('vs_baseline', {})
    row['p_f1_vs_baseline_ttest'] = vb.get('f1_t_test', {}).get('p_value')
    row['p_f1_vs_baseline_bootstrap'] = vb.get('f1_bootstrap', {}).get('p_value')
    row['p_f1_vs_baseline_bootstrap_holm'] = vb.get('f1_bootstrap_holm')
    vc = r.get('vs_best_classic', {})
    row['p_f1_vs_best_classic_bootstrap'] = vc.get('f1_bootstrap', {}).get('p_value')
    if cams:
      row['lung_focus_gradcam'] = cams['methods'][m]['focus_gradcam']['mean']
      row['lung_focus_gradcam++'] = cams['methods'][m]['focus_gradcam++']['mean']
    rows.append(row)
  return rows


def markdown_table(agg: dict, cams: dict | None) -> str:
  head = ['method'] + [label for _, label in TABLE_METRICS]
  head += ['Δ F1 vs baseline (bootstrap CI)', 'p t-test / Wilcoxon / bootstrap (Holm)', 'p vs best classic (bootstrap)']
  if cams:
    head += ['lung focus Grad-CAM / ++']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for m, r in agg['methods'].items():
    cells = [m] + [_ci(r[key]) for key, _ in TABLE_METRICS]
    vb = r.get('vs_baseline')
    if vb:
      b = vb['f1_bootstrap']
      cells.append(f'{b["delta"]:+.3f} [{b["low"]:+.3f}, {b["high"]:+.3f}]')
      cells.append(f'{_p(vb["f1_t_test"]["p_value"])} / {_p(vb["f1_wilcoxon"]["p_value"])} / {_p(b["p_value"])}'
                   f' ({_p(vb.get("f1_bootstrap_holm"))})')  # fmt: skip
    else:
      cells += ['(reference)', '-']
    vc = r.get('vs_best_classic')
    cells.append(_p(vc['f1_bootstrap']['p_value']) if vc else ('(best classic)' if m == agg['best_classic'] else '-'))
    if cams:
      c = cams['methods'][m]
      cells.append(f'{fmt(c["focus_gradcam"]["mean"])} / {fmt(c["focus_gradcam++"]["mean"])}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _total_minutes(workdir: str) -> str:
  path = os.path.join(workdir, 'sweep_time.json')
  if not os.path.isfile(path):
    return 'not recorded'
  return f'{fileio.read_json(path)["run_seconds"] / 60:.1f} min in runs'


def _profile_section(exp) -> list[str]:
  """Every field in which this sweep's experiment differs from the published ('full') settings."""
  diffs = config_lib.differences_from_full(exp)
  if not diffs:
    return ['Profile `full`: published architectures and schedules (no differences).', '']
  lines = [f'## Differences from the `full` profile (this sweep: `{exp.profile}`)', '',
           '| setting | full | this sweep |', '|---|---|---|']  # fmt: skip
  lines += [f'| `{k}` | {full} | {this} |' for k, full, this in diffs]
  return [*lines, '']


def write(sweep, workdir: str, records: dict, wall_time_s: float) -> dict:
  """Writes table.md, table.csv, stats.json, the PNGs and report.md into the sweep folder."""
  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  first = records[(methods[0], seeds[0])]
  phantom = bool(first.get('phantom'))
  progress.log('[sweep] aggregating: statistics')
  agg = aggregate(sweep, workdir, records)
  progress.log('[sweep] Grad-CAM')
  cams = gradcam_section(sweep, workdir, records, agg)
  _bar_plot(agg, os.path.join(workdir, 'metrics_bars.png'), phantom)
  has_alpha = _alpha_plot(agg, os.path.join(workdir, 'alpha_sweep.png'))
  _curves_plot(records, methods, seeds, os.path.join(workdir, 'training_curves.png'))
  table = markdown_table(agg, cams)
  fileio.atomic_write_text(os.path.join(workdir, 'table.md'), table + '\n')
  fileio.atomic_write_text(os.path.join(workdir, 'table.csv'), csv_text(table_rows(agg, cams)))
  fileio.atomic_write_json(os.path.join(workdir, 'stats.json'), dict(aggregate=agg, gradcam=cams))
  exp = sweep.experiment
  lines = [('# PHANTOM DATA - ' if phantom else '# ') + 'Sweep report', '']
  if phantom:
    lines += [PHANTOM_BANNER, '']
  d = first['data']
  lines += [
    f'- Command: `{first["run"]["command"]}` (sweep: `python -m cxrjax.sweep`), profile `{exp.profile}`',
    f'- Data: {d["source"]["description"]}; imbalanced training split {d["counts"]["train_imbalanced"]}'
    f' (imbalance seed {sweep.data_seed}, the same for every run); test {d["counts"]["test"]}',
    f'- Classifier: {exp.model.name} width {exp.model.width}, {exp.num_epochs} epochs, batch {exp.batch_size},'
    f' {exp.optim.name} lr {exp.optim.lr}; model chosen by validation {exp.select_metric}',
    f'- Seeds {seeds}; generators trained once per method (generator seed {sweep.generator_seed}),'
    ' synthetic sets drawn per seed',
    f'- {len(methods)} methods x {len(seeds)} seeds; wall time of this invocation {wall_time_s / 60:.1f} min;'
    f' summed over all invocations of this sweep (resumes included) {_total_minutes(workdir)}',
    f'- Operating point: `{agg["primary"]}`; best classic method by mean F1: `{agg["best_classic"]}`',
    '',
    '## Table (test set, mean ± half-width of the 95% t-interval over seeds)',
    '',
    table,
    '',
    'Tests: paired t-test and Wilcoxon signed-rank over seeds (per-seed F1), and a paired bootstrap over test'
    f' images ({sweep.bootstrap} resamples; each resample scores every seed of both methods on the same images'
    ' and averages over seeds); Holm-adjusted bootstrap p-values across the methods compared with the baseline.'
    f' With {len(seeds)} seeds the exact Wilcoxon test cannot go below p = {2 / 2 ** len(seeds):.3g}: read it as'
    ' a sign check, not as evidence.',
    '',
    f'Lung focus: share of Grad-CAM mass (evidence for pneumonia) inside the lung fields, over {cams["focus_images"]}'
    ' fixed test images; the lung fields are estimated per image by thresholding (Otsu) within the body and'
    f' morphological cleanup, falling back to a two-ellipse prior ({100 * cams["lung_mask_fallback_share"]:.0f}%'
    ' of images here); see cxrjax/eval/gradcam.py.',
    '',
    *_profile_section(exp),
    '## Generator quality (seed 0 synthetic sets)',
    '',
    '| method | class | FID | KID | precision | recall | memorized (pixel) |',
    '|---|---|---|---|---|---|---|',
  ]
  for m, r in agg['methods'].items():
    for c, q in (r.get('generator_quality') or {}).items():
      lines.append(f'| {m} | {c} | {fmt(q["fid"], 2)} | {fmt(q["kid"], 4)} | {fmt(q["precision"])} |'
                   f' {fmt(q["recall"])} | {fmt(q["memorized"])} |')  # fmt: skip
  lines += ['', '## Figures', '', '![metrics](metrics_bars.png)', '']
  if has_alpha:
    lines += ['![alpha sweep](alpha_sweep.png)', '']
  lines += ['![training curves](training_curves.png)', '', '### Grad-CAM (left: Grad-CAM, right: Grad-CAM++)', '']
  for m in methods:
    lines += [f'**{m}**', '', f'![gradcam {m}]({cams["methods"][m]["png"]})', '']
  lines += ['## Runs', '']
  for m in methods:
    lines.append(
      f'- {m}: '
      + ', '.join(f'[seed {s}]({os.path.relpath(plan.run_dir(workdir, m, s), workdir)}/report.md)' for s in seeds)
    )
  fileio.atomic_write_text(os.path.join(workdir, 'report.md'), '\n'.join(lines) + '\n')
  progress.log(f'[sweep] report: {os.path.join(workdir, "report.md")}')
  return agg
