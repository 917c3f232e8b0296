"""Aggregates a sweep: the table (mean +- 95% CI), paired tests, Grad-CAM, plots, report.md."""

from __future__ import annotations

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
from cxrjax.eval.report import PHANTOM_BANNER, TABLE_KEYS, csv_text, fmt, fmt_ci, fmt_p
from cxrjax.sweep import plan

# The single-run report's metrics without accuracy, which says little under class imbalance.
TABLE_METRICS = tuple((key, label) for key, label in TABLE_KEYS if key != 'accuracy')


def classifier_dir(run_dir: str) -> str:
  """Where a run's classifier outputs live (generative runs nest it in classifier/)."""
  nested = os.path.join(run_dir, 'classifier')
  return nested if os.path.isfile(os.path.join(nested, 'predictions.npz')) else run_dir


# The endpoints tested between methods: (key in the records, label). F1 and J at the operating point, AUROC of
# the scores; for K > 2 classes each is the macro average of the one-vs-rest values.
ENDPOINTS = (('f1', 'F1'), ('youden_j', "Youden's J"), ('auroc', 'AUROC'))
# Per-class (one-vs-rest) metrics shown for K > 2 classes.
PER_CLASS_METRICS = ('f1', 'sensitivity', 'specificity', 'youden_j', 'auroc')
# The image-level tests adjusted by Holm, each across the methods compared with one reference.
HOLM_TESTS = ('f1_bootstrap', 'youden_j_bootstrap', 'auroc_bootstrap', 'auroc_delong', 'mcnemar')


def _ovr_counts(y: np.ndarray, pred: np.ndarray, classes: np.ndarray):
  """One-vs-rest (tp, fp, fn, tn), each [C, S], of predicted labels `pred` [N, S] against labels `y` [N]."""
  yc = y[None, :, None] == classes[:, None, None]
  pc = pred[None] == classes[:, None, None]
  tp = np.sum(pc & yc, 1)
  fp = np.sum(pc & ~yc, 1)
  fn = np.sum(~pc & yc, 1)
  return tp, fp, fn, len(y) - tp - fp - fn


def _ratio(a, b):
  return np.where(b > 0, a / np.maximum(b, 1), 0.0)


def _f1_fn(classes):
  """F1 of predicted labels [N, S]: one-vs-rest for `classes` (binary: [1], the positive), averaged over the
  classes and then the seeds; 0 where a class is neither present nor predicted (as `metrics.binary_metrics`)."""
  classes = np.asarray(classes)

  def f1(y, pred):
    tp, fp, fn, _ = _ovr_counts(np.asarray(y), np.asarray(pred).reshape(len(y), -1), classes)
    return float(np.mean(_ratio(2 * tp, 2 * tp + fp + fn)))

  return f1


def _youden_fn(classes):
  """Youden's J (sensitivity + specificity - 1) of predicted labels [N, S], one-vs-rest for `classes`, averaged
  over the classes and then the seeds (binary: either class gives the same J)."""
  classes = np.asarray(classes)

  def youden(y, pred):
    tp, fp, fn, tn = _ovr_counts(np.asarray(y), np.asarray(pred).reshape(len(y), -1), classes)
    return float(np.mean(_ratio(tp, tp + fn) + _ratio(tn, tn + fp) - 1))

  return youden


def _auroc(y, s):
  """AUROC of scores [N] or [N, S] (mean over seeds); for probabilities [N, S, K] with labels 0..K-1 the macro
  one-vs-rest AUROC (classes absent from `y` skipped), averaged over the seeds."""
  s = np.asarray(s)
  if s.ndim == 1:
    return metrics_lib.auroc(y, s)
  if s.ndim == 2:
    return float(np.mean([metrics_lib.auroc(y, s[:, j]) for j in range(s.shape[1])]))
  y = np.asarray(y)
  per_seed = [np.nanmean([metrics_lib.auroc(y == c, s[:, j, c]) for c in range(s.shape[2])]) for j in range(s.shape[1])]
  return float(np.mean(per_seed))


class _Test:
  """One method's test predictions, every seed: what the statistics need."""

  def __init__(self, workdir: str, method: str, seeds, thresholds, positive: int):
    probs, labels = [], None
    for s in seeds:
      with np.load(os.path.join(classifier_dir(plan.run_dir(workdir, method, s)), 'predictions.npz')) as z:
        probs.append(np.asarray(z['test_probs'], np.float64))
        labels = np.asarray(z['test_labels'], np.int64)
    self.probs = np.stack(probs, 1)  # [N, S, K]
    self.k = self.probs.shape[2]
    self.binary = self.k == 2
    if self.binary:
      thr = np.asarray(thresholds, np.float64)
      self.y = (labels == positive).astype(np.int64)
      self.scores = self.probs[:, :, positive]  # [N, S]
      self.pred = (self.scores >= thr[None]).astype(np.int64)  # each seed at its own threshold
      # The seed ensemble: the mean score, at the mean of the seeds' thresholds.
      self.ens_score = self.scores.mean(1)
      self.ens_pred = (self.ens_score >= float(thr.mean())).astype(np.int64)
      self.classes = np.array([1])
      self.auroc_input = self.scores
    else:
      self.y = labels
      self.pred = self.probs.argmax(2)
      self.ens_score = self.probs.mean(1)  # [N, K]
      self.ens_pred = self.ens_score.argmax(1)
      self.classes = np.arange(self.k)
      self.auroc_input = self.probs


def _image_level_tests(a: _Test, b: _Test, n_boot: int, class_names) -> dict:
  """Tests of method a against b on the same test images: paired bootstrap of F1, J and AUROC (every seed
  scored on each resample, averaged over seeds), DeLong on the seed-averaged scores (K > 2: per class, one vs
  rest) and McNemar on the seed ensemble's predictions."""
  out = {
    'f1_bootstrap': stats.paired_bootstrap(a.y, a.pred, b.pred, _f1_fn(a.classes), n_boot, seed=0),
    'youden_j_bootstrap': stats.paired_bootstrap(a.y, a.pred, b.pred, _youden_fn(a.classes), n_boot, seed=0),
    'auroc_bootstrap': stats.paired_bootstrap(a.y, a.auroc_input, b.auroc_input, _auroc, n_boot, seed=1),
    'mcnemar': stats.mcnemar_test(a.y, a.ens_pred, b.ens_pred),
  }
  if a.binary:
    out['auroc_delong'] = stats.delong_test(a.y, a.ens_score, b.ens_score)
  else:
    per_class = {}
    for c in range(a.k):
      if 0 < np.sum(a.y == c) < len(a.y):
        per_class[class_names[c]] = stats.delong_test(a.y == c, a.ens_score[:, c], b.ens_score[:, c])
    out['auroc_delong_per_class'] = per_class
  return out


def _collapse(records: dict, method: str, seeds) -> dict | None:
  """Whether the generator behind a method (a mix: any of its generators) collapsed for any seed; None when no
  run of it recorded a collapse verdict (not generative, or a run from before the check)."""
  parts = method[len(plan.MIX_PREFIX) :].split('+') if method.startswith(plan.MIX_PREFIX) else [method]
  verdicts = []
  for p in parts:
    for s in seeds:
      rec = records.get((p, s)) or {}
      c = (rec.get('generator_quality') or {}).get('collapse')
      if c is not None:
        verdicts.append((p, s, c))
  if not verdicts:
    return None
  bad = [(p, s, c) for p, s, c in verdicts if c.get('any_collapsed')]
  return dict(
    any_collapsed=bool(bad),
    seeds=sorted({s for _, s, _ in bad}),
    classes=sorted({name for _, _, c in bad for name in c.get('classes', [])}),
    generators=sorted({p for p, _, _ in bad}),
  )


def aggregate(sweep, workdir: str, records: dict) -> dict[str, Any]:
  """Per method: every table metric as mean +- CI over seeds, plus paired tests."""
  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  positive = int(sweep.experiment.data.positive_class)
  first = records[(methods[0], seeds[0])]['test']
  binary = 'per_class' not in first['threshold_0.5']
  # K > 2 classes: the classifier reports the arg-max prediction only (under the key 'threshold_0.5').
  primary = sweep.primary if binary else 'threshold_0.5'
  per_seed_gen = plan.per_seed_generators(sweep)
  out: dict[str, Any] = {
    'methods': {},
    'primary': primary,
    'seeds': seeds,
    'num_classes': 2 if binary else len(first['threshold_0.5']['per_class']),
    'operating_point': primary if binary else 'argmax',
    'generators_per_seed': list(per_seed_gen),
  }
  class_names = None if binary else [pc['name'] for pc in first['threshold_0.5']['per_class']]
  out['class_names'] = class_names
  for m in methods:
    per_seed = [records[(m, s)]['test'][primary] for s in seeds]
    row = {key: stats.mean_ci([p[key] for p in per_seed]) for key, _ in TABLE_METRICS}
    for key, _ in ENDPOINTS:
      row[f'per_seed_{key}'] = [p[key] for p in per_seed]
    row['thresholds'] = [p.get('threshold', 0.5) for p in per_seed]
    row['wall_time_s'] = float(sum(records[(m, s)]['train']['wall_time_s'] for s in seeds))
    if not binary:
      row['per_class'] = {
        name: {key: stats.mean_ci([p['per_class'][c][key] for p in per_seed]) for key in PER_CLASS_METRICS}
        for c, name in enumerate(class_names)
      }
    gen = plan.METHODS[m][1] if m in plan.METHODS else None
    if gen:
      row['generator_per_seed'] = gen in per_seed_gen
    row['collapse'] = _collapse(records, m, seeds)
    gq = records[(m, seeds[0])].get('generator_quality')
    if gq:
      row['generator_quality'] = {
        c: dict(
          fid=v['fid'],
          kid=v['kid']['mean'],
          precision=v['precision'],
          recall=v['recall'],
          memorized=((v.get('memorization') or {}).get('pixel') or {}).get('share_closer'),
          collapse=((gq.get('collapse') or {}).get('verdicts') or {}).get(c),
        )  # fmt: skip
        for c, v in gq['per_class'].items()
      }
    out['methods'][m] = row
  classic = [m for m in methods if m in plan.CLASSIC]
  best_classic = max(classic, key=lambda m: out['methods'][m]['f1']['mean']) if classic else None
  out['best_classic'] = best_classic
  tests = {m: _Test(workdir, m, seeds, out['methods'][m]['thresholds'], positive) for m in methods}
  for ref_name, ref in (('baseline', 'baseline' if 'baseline' in methods else None), ('best_classic', best_classic)):
    if ref is None:
      continue
    for m in methods:
      if m == ref:
        continue
      row, ref_row = out['methods'][m], out['methods'][ref]
      t = {}
      for key, _ in ENDPOINTS:
        t[f'{key}_t_test'] = stats.paired_t_test(row[f'per_seed_{key}'], ref_row[f'per_seed_{key}'])
        t[f'{key}_wilcoxon'] = stats.wilcoxon_signed_rank(row[f'per_seed_{key}'], ref_row[f'per_seed_{key}'])
      t.update(_image_level_tests(tests[m], tests[ref], sweep.bootstrap, class_names))
      row[f'vs_{ref_name}'] = dict(reference=ref, **t)
    # Holm per test, across the methods compared with this reference.
    names = [m for m in methods if f'vs_{ref_name}' in out['methods'][m]]
    for test in HOLM_TESTS:
      have = [m for m in names if test in out['methods'][m][f'vs_{ref_name}']]
      if not have:
        continue
      adj = stats.holm_bonferroni([out['methods'][m][f'vs_{ref_name}'][test]['p_value'] for m in have])
      for m, p in zip(have, adj):
        out['methods'][m][f'vs_{ref_name}'][f'{test}_holm'] = float(p)
  return out


def gradcam_section(sweep, workdir: str, records: dict, agg: dict) -> dict[str, Any]:
  """Grad-CAM/Grad-CAM++ grids on fixed test images, and the lung-focus score per method."""
  methods = plan.methods_of(sweep)
  seeds = list(sweep.seeds)
  first = classifier_dir(plan.run_dir(workdir, methods[0], seeds[0]))
  _, _, info = features.load_classifier(os.path.join(first, 'export'))
  # The test images are read again from the data the runs used (recorded in their config).
  cfg = plan.method_config(sweep, methods[0], seeds[0], workdir)
  ds = sources.load_dataset(cfg.data, cfg.seed)
  test, class_names = ds.splits['test'], ds.class_names
  rng = seeding.numpy_rng(0, 'sweep/gradcam')
  k = len(class_names)
  per_class = max(sweep.gradcam_images // k, 1)
  shown = np.concatenate([
    rng.choice(pool, min(per_class, len(pool)), replace=False)
    for pool in (np.flatnonzero(test.labels == c) for c in range(k))
  ])  # fmt: skip
  # Binary: the evidence for the positive class (pneumonia) in every image; K > 2: for each image's own class.
  positive = int(cfg.data.positive_class)
  focus_idx = rng.choice(len(test), min(sweep.focus_images, len(test)), replace=False)
  target_focus = positive if k == 2 else jnp.asarray(test.labels[focus_idx], jnp.int32)
  target_shown = positive if k == 2 else jnp.asarray(test.labels[shown], jnp.int32)
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
        cams = np.asarray(fn(variables, x, target_focus))
        scores[method].append(float(np.nanmean(gradcam.focus_score(cams, masks_focus))))
        if s == seeds[0]:
          xs = jnp.asarray(test.images[shown].astype(np.float32) / 127.5 - 1.0)
          grids[method] = np.asarray(fn(variables, xs, target_shown))
    png = f'gradcam_{m.replace(":", "_").replace("+", "_")}.png'
    if k == 2:
      titles = [f'{"pneumonia" if test.labels[i] else "normal"}' for i in shown]
    else:
      titles = [str(class_names[test.labels[i]]) for i in shown]
    gradcam.cam_grid(test.images[shown], grids, os.path.join(workdir, png), titles=titles, masks=masks_shown)
    out['methods'][m] = dict(png=png, **{f'focus_{name}': stats.mean_ci(v) for name, v in scores.items()})
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


def _collapsed_cell(r: dict):
  """The CSV's `collapsed`: True/False from the runs' collapse verdicts, '' where none was recorded."""
  c = r.get('collapse')
  return '' if c is None else c['any_collapsed']


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
    # Added with J, DeLong, McNemar and Holm per test (after the columns above, which keep their order).
    for ref in ('baseline', 'best_classic'):
      v = r.get(f'vs_{ref}', {})
      for key, _ in ENDPOINTS:
        row[f'delta_{key}_vs_{ref}_bootstrap'] = v.get(f'{key}_bootstrap', {}).get('delta')
        for test, col in (('t_test', 'ttest'), ('wilcoxon', 'wilcoxon'), ('bootstrap', 'bootstrap')):
          row[f'p_{key}_vs_{ref}_{col}'] = v.get(f'{key}_{test}', {}).get('p_value')
        row[f'p_{key}_vs_{ref}_bootstrap_holm'] = v.get(f'{key}_bootstrap_holm')
      row[f'p_auroc_vs_{ref}_delong'] = v.get('auroc_delong', {}).get('p_value')
      row[f'p_auroc_vs_{ref}_delong_holm'] = v.get('auroc_delong_holm')
      row[f'p_mcnemar_vs_{ref}'] = v.get('mcnemar', {}).get('p_value')
      row[f'p_mcnemar_vs_{ref}_holm'] = v.get('mcnemar_holm')
    for name, pc in (r.get('per_class') or {}).items():
      for key in PER_CLASS_METRICS:
        row[f'{key}_{name}'] = pc[key]['mean']
    row['generator_per_seed'] = r.get('generator_per_seed', '')
    row['collapsed'] = _collapsed_cell(r)
    rows.append(row)
  return rows


def _delta_cell(b: dict) -> str:
  return f'{b["delta"]:+.3f} [{b["low"]:+.3f}, {b["high"]:+.3f}]'


def _method_cell(m: str, r: dict) -> str:
  c = r.get('collapse')
  if c and c['any_collapsed']:
    return f'{m} ⚠ collapsed ({", ".join(c["classes"]) or "?"}; seed {", ".join(map(str, c["seeds"]))})'
  return m


def markdown_table(agg: dict, cams: dict | None) -> str:
  head = ['method'] + [label for _, label in TABLE_METRICS]
  head += ['Δ F1 vs baseline (bootstrap CI)', 'p t-test / Wilcoxon / bootstrap (Holm)', 'p vs best classic (bootstrap)']
  if cams:
    head += ['lung focus Grad-CAM / ++']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for m, r in agg['methods'].items():
    cells = [_method_cell(m, r)] + [fmt_ci(r[key]) for key, _ in TABLE_METRICS]
    vb = r.get('vs_baseline')
    if vb:
      b = vb['f1_bootstrap']
      cells.append(_delta_cell(b))
      cells.append(f'{fmt_p(vb["f1_t_test"]["p_value"])} / {fmt_p(vb["f1_wilcoxon"]["p_value"])} / {fmt_p(b["p_value"])}'
                   f' ({fmt_p(vb.get("f1_bootstrap_holm"))})')  # fmt: skip
    else:
      cells += ['(reference)', '-']
    vc = r.get('vs_best_classic')
    cells.append(
      fmt_p(vc['f1_bootstrap']['p_value']) if vc else ('(best classic)' if m == agg['best_classic'] else '-')
    )
    if cams:
      c = cams['methods'][m]
      cells.append(f'{fmt(c["focus_gradcam"]["mean"])} / {fmt(c["focus_gradcam++"]["mean"])}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def tests_table(agg: dict, ref_name: str) -> str:
  """Every endpoint's tests against one reference ('baseline' or 'best_classic'): J and AUROC beside F1."""
  binary = agg['num_classes'] == 2
  auroc_test = 'auroc_delong' if binary else 'auroc_bootstrap'
  head = ['method', 'Δ J (bootstrap CI)', 'p J t-test / Wilcoxon / bootstrap (Holm)', 'Δ AUROC (bootstrap CI)',
          'p AUROC t-test / Wilcoxon', 'p AUROC ' + ('DeLong' if binary else 'bootstrap') + ' (Holm)',
          'p McNemar (Holm)', 'p F1 bootstrap (Holm)']  # fmt: skip
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for m, r in agg['methods'].items():
    v = r.get(f'vs_{ref_name}')
    if not v:
      continue
    j, a = v['youden_j_bootstrap'], v['auroc_bootstrap']
    cells = [
      _method_cell(m, r),
      _delta_cell(j),
      f'{fmt_p(v["youden_j_t_test"]["p_value"])} / {fmt_p(v["youden_j_wilcoxon"]["p_value"])} / {fmt_p(j["p_value"])}'
      f' ({fmt_p(v.get("youden_j_bootstrap_holm"))})',
      _delta_cell(a),
      f'{fmt_p(v["auroc_t_test"]["p_value"])} / {fmt_p(v["auroc_wilcoxon"]["p_value"])}',
      f'{fmt_p(v[auroc_test]["p_value"])} ({fmt_p(v.get(auroc_test + "_holm"))})',
      f'{fmt_p(v["mcnemar"]["p_value"])} ({fmt_p(v.get("mcnemar_holm"))})',
      f'{fmt_p(v["f1_bootstrap"]["p_value"])} ({fmt_p(v.get("f1_bootstrap_holm"))})',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def per_class_table(agg: dict) -> str:
  """K > 2 classes: one-vs-rest metrics per method and class, mean ± half-width of the 95% CI over seeds, and
  DeLong's p against the baseline on the seed-averaged score of that class."""
  head = ['method', 'class'] + list(PER_CLASS_METRICS) + ['p AUROC DeLong vs baseline']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for m, r in agg['methods'].items():
    delong = (r.get('vs_baseline') or {}).get('auroc_delong_per_class') or {}
    for name, pc in r['per_class'].items():
      cells = [m, name] + [fmt_ci(pc[key]) for key in PER_CLASS_METRICS]
      cells.append(fmt_p(delong[name]['p_value']) if name in delong else '-')
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


def _generators_line(sweep, methods) -> str:
  """Which generators were trained per seed and which were shared by the seeds."""
  used = list(dict.fromkeys(plan.METHODS[m][1] for m in methods if m in plan.METHODS and plan.METHODS[m][1]))
  if not used:
    return 'no generators'
  per_seed = [g for g in used if g in plan.per_seed_generators(sweep)]
  shared = [g for g in used if g not in per_seed]
  parts = []
  if per_seed:
    parts.append(f'generators trained once per seed (generator seed = the run\'s seed): {", ".join(per_seed)}'
                 ' (their intervals include generator variance)')  # fmt: skip
  if shared:
    parts.append(f'generators trained once and shared by the seeds (generator seed {sweep.generator_seed}):'
                 f' {", ".join(shared)}')  # fmt: skip
  return '; '.join(parts) + '; synthetic sets drawn per seed'


def _operating_point_line(sweep, agg: dict) -> str:
  if agg['num_classes'] == 2:
    return f'`{agg["primary"]}`'
  note = (
    f" (the sweep's `primary={sweep.primary}` applies to binary tasks only)" if sweep.primary != 'threshold_0.5' else ''
  )
  return (f'arg-max over {agg["num_classes"]} classes ({", ".join(agg["class_names"])}){note}; F1, J, sensitivity,'
          ' specificity and AUROC are macro averages of the one-vs-rest values')  # fmt: skip


def _evidence(agg: dict) -> str:
  return 'evidence for pneumonia' if agg['num_classes'] == 2 else "evidence for each image's own class"


def _collapse_note(agg: dict) -> list[str]:
  flagged = [m for m, r in agg['methods'].items() if (r.get('collapse') or {}).get('any_collapsed')]
  if not flagged:
    return []
  return ['', f'⚠ collapsed: the generator behind {", ".join(flagged)} produced a collapsed synthetic set (near-'
              'identical images within a class) for at least one seed; its rows measure a classifier trained on it'
              ' (see its runs\' gen_metrics.json).']  # fmt: skip


def _tests_section(sweep, agg: dict) -> list[str]:
  binary = agg['num_classes'] == 2
  lines = []
  for ref_name, title in (
    ('baseline', 'the baseline'),
    ('best_classic', f'the best classic method (`{agg["best_classic"]}`)'),
  ):
    if any(f'vs_{ref_name}' in r for r in agg['methods'].values()):
      lines += [f'### Tests against {title}', '', tests_table(agg, ref_name), '']
  if not lines:
    return []
  auroc = (
    'DeLong on the seed-averaged score of each method (the mean over seeds of its probability for the positive'
    " class), so it tests the seed ensemble's AUROC, which can differ from the mean of the per-seed AUROCs in the"
    ' table'
    if binary
    else 'the paired bootstrap of the macro AUROC (DeLong is defined for one binary label; it is given per class,'
    ' one vs rest on the seed-averaged probability of that class, in the per-class table)'
  )
  threshold = (
    "the seed-averaged score at the mean of the seeds' thresholds"
    if binary
    else 'the arg-max of the seed-averaged probabilities'
  )
  return [
    "## Tests of Youden's J, AUROC and McNemar",
    '',
    *lines,
    "Youden's J (sensitivity + specificity - 1 at the operating point; macro one-vs-rest for K > 2) gets the tests F1"
    ' gets: paired t-test and Wilcoxon over seeds, paired bootstrap over test images (the same resamples as F1).'
    f' AUROC: t-test and Wilcoxon over per-seed AUROCs, the paired bootstrap, and {auroc}. McNemar compares the'
    f' errors of the seed ensembles: each method predicts with {threshold}. Holm adjusts each image-level test'
    ' (F1, J and AUROC bootstrap, DeLong, McNemar) across the methods compared with the same reference; the best'
    ' classic method is itself chosen on these test images (highest mean F1), so its comparisons are optimistic for'
    ' it.',
    '',
  ]


def _per_class_section(agg: dict) -> list[str]:
  if agg['num_classes'] == 2:
    return []
  return [
    '## Per class (one vs rest; mean ± half-width of the 95% t-interval over seeds)',
    '',
    per_class_table(agg),
    '',
  ]


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
    f'- Seeds {seeds}; {_generators_line(sweep, methods)}',
    f'- {len(methods)} methods x {len(seeds)} seeds; wall time of this invocation {wall_time_s / 60:.1f} min;'
    f' summed over all invocations of this sweep (resumes included) {_total_minutes(workdir)}',
    f'- Operating point: {_operating_point_line(sweep, agg)}; best classic method by mean F1: `{agg["best_classic"]}`',
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
    *_collapse_note(agg),
    '',
    *_tests_section(sweep, agg),
    *_per_class_section(agg),
    f'Lung focus: share of Grad-CAM mass ({_evidence(agg)}) inside the lung fields, over {cams["focus_images"]}'
    ' fixed test images; the lung fields are estimated per image by thresholding (Otsu) within the body and'
    f' morphological cleanup, falling back to a two-ellipse prior ({100 * cams["lung_mask_fallback_share"]:.0f}%'
    ' of images here); see cxrjax/eval/gradcam.py.',
    '',
    *_profile_section(exp),
    '## Generator quality (seed 0 synthetic sets)',
    '',
    '| method | class | FID | KID | precision | recall | memorized (pixel) | collapse |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for m, r in agg['methods'].items():
    for c, q in (r.get('generator_quality') or {}).items():
      lines.append(f'| {m} | {c} | {fmt(q["fid"], 2)} | {fmt(q["kid"], 4)} | {fmt(q["precision"])} |'
                   f' {fmt(q["recall"])} | {fmt(q["memorized"])} | {q.get("collapse") or "-"} |')  # fmt: skip
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
