"""Run outputs: metrics.json, report.md and PNG figures, each written atomically."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from cxrjax import fileio
from cxrjax.data.dataset import SOURCE_STAGES

PHANTOM_BANNER = '> **PHANTOM DATA** - procedural images, not real X-rays: these numbers say nothing about medicine.'

TABLE_KEYS = (
  ('precision', 'Precision'),
  ('recall', 'Recall/Sens.'),
  ('specificity', 'Specificity'),
  ('f1', 'F1'),
  ('accuracy', 'Accuracy'),
  ('balanced_accuracy', 'Bal. acc.'),
  ('mcc', 'MCC'),
  ('kappa', 'Kappa'),
  ('youden_j', "Youden's J"),
  ('auroc', 'AUROC'),
  ('auprc', 'AUPRC'),
)


def fmt(v: Any, digits: int = 3) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    return 'nan' if v != v else f'{v:.{digits}f}'
  return str(v)


def fmt_ci(c: dict | None) -> str:
  """'mean ± half-width' of a `stats.mean_ci` record; the mean alone for a single value; '-' for none."""
  if not c:
    return '-'
  if c.get('n', 0) <= 1:
    return fmt(c['mean'])
  return f'{c["mean"]:.3f} ± {(c["high"] - c["low"]) / 2:.3f}'


def fmt_p(x) -> str:
  """A p-value: three decimals, or scientific below 0.001; '-' for none or NaN."""
  return '-' if x is None or x != x else (f'{x:.3f}' if x >= 0.001 else f'{x:.1e}')


def csv_text(rows: list[dict]) -> str:
  """CSV of `rows`; the columns are every key, in order of first appearance."""
  keys: list[str] = []
  for row in rows:
    keys += [k for k in row if k not in keys]
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  return buf.getvalue()


def metrics_table(rows: dict[str, dict]) -> str:
  """A Markdown table with one row per (name -> metric dict)."""
  head = '| | ' + ' | '.join(label for _, label in TABLE_KEYS) + ' | threshold |'
  sep = '|' + '---|' * (len(TABLE_KEYS) + 2)
  lines = [head, sep]
  for name, m in rows.items():
    vals = ' | '.join(fmt(m.get(key)) for key, _ in TABLE_KEYS)
    lines.append(f'| {name} | {vals} | {fmt(m.get("threshold", "argmax"))} |')
  return '\n'.join(lines)


def per_class_table(m: dict) -> str:
  keys = ('support', 'precision', 'recall', 'specificity', 'f1', 'auroc', 'auprc')
  lines = ['| class | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 1)]
  for pc in m.get('per_class', []):
    lines.append(f'| {pc["name"]} | ' + ' | '.join(fmt(pc[key]) for key in keys) + ' |')
  return '\n'.join(lines)


def plot_confusion(cm, class_names, path: str, title: str) -> None:
  fig, ax = plt.subplots(figsize=(3.2 + 0.5 * len(class_names), 2.8 + 0.5 * len(class_names)))
  ax.imshow(cm, cmap='Blues')
  for i, row in enumerate(cm):
    for j, v in enumerate(row):
      ax.text(j, i, str(v), ha='center', va='center', color='black')
  ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha='right')
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def plot_curves(history: list[dict], path: str, title: str, select_metric: str) -> None:
  if not history:
    return
  epochs = [h['epoch'] for h in history]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
  axes[0].plot(epochs, [h.get('train_loss') for h in history], label='train loss')
  axes[0].plot(epochs, [h.get('val_loss') for h in history], label='val loss')
  axes[0].set_xlabel('epoch')
  axes[0].legend()
  for key in ('val_auroc', 'val_f1', 'val_balanced_accuracy', f'val_{select_metric}'):
    if key in history[0]:
      axes[1].plot(epochs, [h.get(key) for h in history], label=key)
  axes[1].set_xlabel('epoch')
  axes[1].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=110)
  plt.close(fig)


def data_section(data: dict) -> list[str]:
  names = data['class_names']
  counts = data['counts']
  lines = [
    '## Data',
    '',
    f'- Source: {data["source"]["description"]}'
    if data['source'].get('kind') != 'sources'
    else f'- Source: {len(data["source"]["sources"])} sources (data.sources), listed below',
  ]
  if data['source'].get('fallback'):
    lines.append(f'- **Fallback:** {data["source"]["fallback"]}')
  if data.get('test_prevalence'):
    lines.append(f'- **Test set subsampled:** {data["test_prevalence"]["note"]}')
  imb = data['imbalance']
  lines.append(
    f'- Imbalance protocol: minority class {imb["minority_class"]} ({names[imb["minority_class"]] if imb["minority_class"] < len(names) else "?"}),'
    f' ratio {imb["ratio"]:g}; {imb.get("note", "")}'
  )
  rb = data['rebalance']
  lines.append(
    f'- Rebalancing: `{rb["method"]}`; class weights {rb["class_weights"]}; per-epoch origin {rb["origin_counts"]}'
  )
  if rb.get('synthetic_dose'):
    d = rb['synthetic_dose']
    lines.append(
      f'- Synthetic dose: {d["dose"]:g} x the real count of {"every class" if d["classes"] == "all" else "each minority class"}'
      f' (rebalance.target_ratio unused): synthetic images added per class {d["added"]}'
    )
  if rb.get('synthetic_only'):
    lines.append(
      '- **Trained on synthetic images only** (rebalance.synthetic_only): no real training image; val and test are real'
    )
  if any(data.get('leakage', {}).values()):
    lines.append(f'- Identical images across splits in the source data (reported, not removed): {data["leakage"]}')
  lines += ['', '| split | ' + ' | '.join(names) + ' | total |', '|' + '---|' * (len(names) + 2)]
  loaded = data.get('counts_loaded') or {}
  rows = [('train (loaded)', loaded.get('train')), ('train (imbalanced)', counts['train_imbalanced']),
          ('train (per epoch, as trained)', counts['trained_on']), ('val', counts['val']), ('test', counts['test'])]  # fmt: skip
  if counts.get('val_with_synthetic'):
    rows.insert(-1, ('val + synthetic (rebalance.synthetic_val)', counts['val_with_synthetic']))
  if data.get('test_prevalence'):
    rows.insert(-1, ('test (as found)', data['test_prevalence']['counts_before']))
  for label, c in rows:
    if c is not None:
      lines.append(f'| {label} | ' + ' | '.join(str(v) for v in c) + f' | {sum(c)} |')
  return lines + source_lines(data)


def source_lines(data: dict) -> list[str]:
  """report.md lines for a dataset of several sources (data.sources): the sources, the near-duplicates
  found across them, and the images per class of each source at every stage."""
  per_source = data.get('per_source') or {}
  src = data['source']
  if src.get('kind') != 'sources' and len(per_source) < 2:
    return []
  names = data['class_names']
  lines = ['', '### Sources', '']
  for s in src.get('sources', []):
    lines.append(f'- `{s["name"]}`: {s["description"]}')
  dup = data.get('duplicates')
  if dup:
    verb = 'Dropped' if dup['applied'] else 'Would drop (`data.source_duplicates=report`)'
    lines += ['', f'Near-duplicates across sources, compared {dup["compared"]}: {dup["pairs_total"]} pair(s).'
              f' Rule: {dup["rule"]}.', '']  # fmt: skip
    lines += ['| sources | split pair | pairs |', '|---|---|---|']
    for pair, by in dup['pairs'].items():
      for split_pair, n in sorted(by.items()) or [('-', 0)]:
        lines.append(f'| {pair} | {split_pair} | {n} |')
    lines += [
      '',
      f'{verb}:',
      '',
      '| split | source | ' + ' | '.join(names) + ' | total |',
      '|' + '---|' * (len(names) + 3),
    ]
    for split, by in dup['dropped'].items():
      for name, c in by.items():
        lines.append(f'| {split} | {name} | ' + ' | '.join(str(v) for v in c) + f' | {sum(c)} |')
    if not dup['dropped']:
      lines.append('| - | - | ' + ' | '.join('0' for _ in names) + ' | 0 |')
    extra = []
    if dup['kept_in_test']:
      extra.append(f'{dup["kept_in_test"]} test~test pair(s) kept (the test split is never changed)')
    if dup['label_conflicts']:
      extra.append(f'{dup["label_conflicts"]} pair(s) whose copies have different labels')
    if extra:
      lines += ['', '; '.join(extra) + '.']
  lines += ['', '| source | stage | ' + ' | '.join(names) + ' | total |', '|' + '---|' * (len(names) + 3)]
  for name, stages in per_source.items():
    for key, label in SOURCE_STAGES:
      if key in stages:
        c = stages[key]
        lines.append(f'| {name} | {label} | ' + ' | '.join(str(v) for v in c) + f' | {sum(c)} |')
  return lines


def source_check_lines(data: dict) -> list[str]:
  """report.md section of the source-shortcut check (data.source_check), when it ran."""
  check = data.get('source_check')
  if not check:
    return []
  lines = ['## Source shortcut check', '', check['reading'], '', f'{check["model"]} on {check["features"]}.', '']
  if not check.get('by_source'):
    return lines
  sources = list(check['by_source'])
  lines += ['| | ' + ' | '.join(sources) + ' |', '|' + '---|' * (len(sources) + 1)]
  lines.append('| all training images | ' + ' | '.join(fmt(check['by_source'][n]) for n in sources) + ' |')
  for cname, w in check['within_class'].items():
    cells = [fmt(w['auroc'].get(n)) if n in w['auroc'] else f'- ({w["rows"].get(n, 0)})' for n in sources]
    lines.append(f'| within {cname} | ' + ' | '.join(cells) + ' |')
  rows = ', '.join(f'{n} {v}' for n, v in check['rows'].items())
  lines += ['', f'AUROC of each source against the others (out of fold); "-" where fewer than two sources give'
            f' at least 2 images of the class (images in brackets). Training images used: {rows}.', '']  # fmt: skip
  return lines


def finetune_lines(finetune: dict | None) -> list[str]:
  """report.md lines on what a classifier started from and which layers it trained."""
  if not finetune:
    return []
  p = finetune.get('pretrained')
  if p:
    start = (
      f'- Started from: `{p["source"]}` ({p["format"]} `{p["path"]}`, sha256 `{p["sha256"]}`): {p["tensors"]} variables'
    )
    start += f'; head {p["head"]}' + (f' ({p["head_reason"]})' if p.get('head_reason') else '')
    if p.get('ignored'):
      start += f'; not used: {", ".join(p["ignored"])}'
  else:
    start = '- Started from: random initialisation'
  return [
    start,
    f'- Input path: `{finetune["input_norm"]}` normalisation; trained: {finetune["trained"]}',
  ]


def synthetic_val_lines(record: dict) -> list[str]:
  """report.md lines flagging synthetic images in validation, with validation metrics on both sets."""
  if 'val_with_synthetic' not in record:
    return []
  sv = record['data'].get('synthetic_val') or {}
  rows = {f'val (real only) @ {key}': m for key, m in record['val'].items()}
  rows.update({f'val + synthetic @ {key}': m for key, m in record['val_with_synthetic'].items()})
  return [
    '## Synthetic images in validation (rebalance.synthetic_val)',
    '',
    f'- **Validation includes synthetic images**: {sum(sv.get("synthetic_counts", []))} added'
    f' (per class {sv.get("synthetic_counts")}, {sv.get("rule", "")}), from {", ".join(sv.get("sources", []))}.'
    ' Validation sets made image-to-image start from validation images only; the test split has none.'
    ' The real validation split keeps its own class mix (the imbalance protocol applies to training only).',
    f'- The checkpoint (and the Youden threshold) is selected on **{record.get("selected_on", "val")}**'
    ' (rebalance.synthetic_val_select). Metrics on real + synthetic validation are optimistic when the'
    " classifier learns the generator's images; the real-only rows show by how much.",
    '',
    metrics_table(rows),
    '',
  ]


def write_classifier_outputs(workdir: str, record: dict, class_names) -> None:
  """Figures, report.md, then metrics.json: written last, it marks the run complete."""
  phantom = record['phantom']
  tag = 'PHANTOM DATA - ' if phantom else ''
  test = record['test']
  main_key = 'youden' if 'youden' in test else 'threshold_0.5'
  plot_confusion(
    test[main_key]['confusion_matrix'],
    class_names,
    os.path.join(workdir, 'confusion.png'),
    f'{tag}test, {main_key.replace("_", " ")}',
  )
  plot_curves(
    record['train']['history'],
    os.path.join(workdir, 'curves.png'),
    f'{tag}{record["model"]["name"]} w{record["model"]["width"]}',
    record['train']['best']['metric'] if record['train']['best'] else 'auroc',
  )
  run = record['run']
  tr = record['train']
  lines = [f'# {tag}Classifier report', '']
  if phantom:
    lines += [PHANTOM_BANNER, '']
  lines += [
    f'- Command: `{run["command"]}`',
    f'- Config hash `{run["config_hash"]}`, profile `{run["profile"]}`, seed {run["seed"]}, commit `{run["cxrjax_commit"]}`',
    f'- Model: {record["model"]["name"]} (width {record["model"]["width"]}, {record["model"]["num_params"]:,} parameters)',
    f'- Training: {tr["epochs"]} epochs x {tr["steps_per_epoch"]} steps, wall time {tr["wall_time_s"]:.0f} s,'
    f' {tr["images_per_s"]:.0f} images/s overall, input wait {100 * tr.get("input_wait_fraction", 0):.1f}% of wall time',
    f'- Best epoch by validation {tr["best"]["metric"]}: {tr["best"]["epoch"]} ({tr["best"]["value"]:.4f})'
    if tr['best']
    else '- Best epoch: none',
    f'- Devices: {len(run["devices"])} x {run["platform"]}, {run["process_count"]} process(es)',
    *finetune_lines(record.get('finetune')),
    '',
  ]
  lines += data_section(record['data'])
  lines += ['', '## Test metrics (best checkpoint)', '']
  rows = {f'test @ {key}': m for key, m in test.items()}
  rows.update({f'val @ {key}': m for key, m in record['val'].items()})
  lines += [metrics_table(rows), '']
  if 'youden' in test:
    lines += [
      f'The Youden threshold ({test["youden"]["threshold"]:.4f}) maximises sensitivity + specificity - 1 on the'
      ' validation split and is then applied unchanged to test.',
      '',
    ]
  lines += synthetic_val_lines(record)
  if 'per_class' in test['threshold_0.5']:
    lines += ['### Per class (test, arg-max)', '', per_class_table(test['threshold_0.5']), '']
  lines += source_check_lines(record['data'])
  lines += ['## Figures', '', '![confusion matrix](confusion.png)', '', '![training curves](curves.png)', '']
  lines += ['## Versions', '', ', '.join(f'{k} {v}' for k, v in run['versions'].items()), '']
  fileio.atomic_write_text(os.path.join(workdir, 'report.md'), '\n'.join(lines))
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), record)


def image_grid(images: np.ndarray, nrow: int) -> np.ndarray:
  """uint8 [N,H,W,C] -> one uint8 [rows*H, nrow*W, C] tile image (1-pixel gaps)."""
  n, h, w, c = images.shape
  rows = (n + nrow - 1) // nrow
  out = np.full((rows * (h + 1) - 1, nrow * (w + 1) - 1, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, nrow)
    out[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = images[i]
  return out


def save_image_grid(images: np.ndarray, path: str, nrow: int = 8, title: str = '') -> None:
  grid = image_grid(images, nrow)
  fig, ax = plt.subplots(figsize=(min(1.0 * nrow, 12), min(1.0 * nrow, 12) * grid.shape[0] / grid.shape[1] + 0.4))
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255)
  ax.axis('off')
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def real_vs_synthetic_grid(train, syn, class_names, path: str, phantom: bool = False, per_class: int = 16) -> None:
  """Rows of real training images and synthetic images for each synthesized class."""
  classes = sorted(set(syn.labels.tolist()))
  if not classes:
    return
  fig, axes = plt.subplots(len(classes), 2, figsize=(10, 2.6 * len(classes)), squeeze=False)
  for row, c in enumerate(classes):
    real = train.images[train.labels == c][:per_class]
    fake = syn.images[syn.labels == c][:per_class]
    for col, (imgs, label) in enumerate(((real, 'real'), (fake, 'synthetic'))):
      grid = image_grid(imgs, 8)
      axes[row, col].imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255)
      axes[row, col].set_title(f'{"PHANTOM " if phantom else ""}{label}: {class_names[c]}', fontsize=9)
      axes[row, col].axis('off')
  fig.tight_layout()
  fileio.atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def collapse_lines(collapse: dict) -> list[str]:
  """The report's mode-collapse paragraph: a flag when a class collapsed, the thresholds always."""
  if not collapse:
    return []
  t = collapse['thresholds']
  rule = (
    f'Mode collapse is judged per class: collapsed when recall < {t["min_recall"]:g} or feature diversity'
    f' < {t["min_diversity"]:g} x real; with fewer than {t["min_real"]} real images the check cannot judge.'
  )
  lines = []
  if collapse['any_collapsed']:
    reasons = '; '.join(f'{n}: {collapse["reasons"][n]}' for n in collapse['classes'])
    lines.append(
      f'**MODE COLLAPSE in {", ".join(collapse["classes"])}** ({reasons}). The classifier below was trained on'
      ' this synthetic set anyway (`quality.on_collapse=continue`): read its numbers with that in mind.'
    )
  unjudged = [n for n, v in collapse['verdicts'].items() if v == 'cannot_judge']
  if unjudged:
    lines.append('Not judged for collapse: ' + '; '.join(f'{n} ({collapse["reasons"][n]})' for n in unjudged) + '.')
  return [line for par in (*lines, rule) for line in (par, '')]


def generative_report(record: dict, class_names) -> str:
  """report.md of a generative run: generator, sample quality, classifier metrics."""
  phantom = record['phantom']
  tag = 'PHANTOM DATA - ' if phantom else ''
  run, gen, q = record['run'], record['generator'], record['generator_quality']
  lines = [f'# {tag}Generative oversampling report ({record["kind"]})', '']
  if phantom:
    lines += [PHANTOM_BANNER, '']
  lines += [
    f'- Command: `{run["command"]}`',
    f'- Config hash `{run["config_hash"]}`, profile `{run["profile"]}`, seed {run["seed"]}, commit `{run["cxrjax_commit"]}`',
    f'- Generator: {gen.get("description", gen.get("kind"))}; trained {gen.get("step")} steps,'
    f' {gen.get("wall_time_s", 0):.0f} s',
    f'- Synthetic set: {record["synthetic"]["count"]} images, `{record["synthetic"]["path"]}`'
    + (f'; per class {record["synthetic"]["per_class"]}' if record['synthetic'].get('per_class') else ''),
    *(
      [
        f'- Validation synthetic set: {record["synthetic"]["val"]["count"]} images, `{record["synthetic"]["val"]["path"]}`'
        ' (rebalance.synthetic_val, below)'
      ]
      if record['synthetic'].get('val')
      else []
    ),
  ]
  dose = record['synthetic'].get('dose')
  if dose:
    lines.append(
      f'- Synthetic dose: {dose["dose"]:g} x the real count of'
      f' {"every class" if dose["classes"] == "all" else "each minority class"}'
    )
  lines.append('')
  lines += data_section(record['data'])
  lines += ['', '## Synthetic image quality', '', f'Features: {q["features"]["network"]}'
            f' (width {q["features"]["width"]}, test AUROC {q["features"]["reference_test_auroc"]:.3f}), `{q["features"]["path"]}`', '']  # fmt: skip
  collapse = q.get('collapse') or {}
  lines += collapse_lines(collapse)
  lines += ['| class | n gen | FID | FID real-vs-real | KID (x1e3) | precision | recall | density | coverage | memorized (pixel) | memorized (feature) | exact copies | diversity (feature) | diversity (pixel) | collapse |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']  # fmt: skip
  for name, s in q['per_class'].items():
    mem = s.get('memorization') or {}
    pix = (mem.get('pixel') or {}).get('share_closer')
    feat = (mem.get('features') or {}).get('share_closer')
    div = s.get('diversity') or {}
    lines.append(
      f'| {name} | {s["num_generated"]} | {fmt(s["fid"], 2)} | {fmt(s["fid_real_seen_vs_real_all"], 2)} |'
      f' {fmt(1e3 * s["kid"]["mean"], 2)} | {fmt(s["precision"])} | {fmt(s["recall"])} | {fmt(s["density"])} |'
      f' {fmt(s["coverage"])} | {fmt(pix)} | {fmt(feat)} | {mem.get("exact_copies", "-")} |'
      f' {fmt((div.get("features") or {}).get("ratio"), 2)} | {fmt((div.get("pixel") or {}).get("ratio"), 2)} |'
      f' {(collapse.get("verdicts") or {}).get(name, "-")} |'
    )
  for name, s in q['per_class'].items():
    if s.get('inception'):
      i = s['inception']
      lines.append(
        f'| {name} (Inception pool3) | | {fmt(i["fid"], 2)} | | {fmt(1e3 * i["kid"]["mean"], 2)} |'
        f' {fmt(i["precision"])} | {fmt(i["recall"])} | | | | | | | | |'
      )
  lines += [
    '',
    'FID/KID/precision/recall compare the synthetic images with all real training images of the class;'
    ' "FID real-vs-real" is the FID between the images the generator saw and all real images of the class,'
    ' a floor for this sample size. "Memorized" is the share of synthetic images closer to their nearest'
    ' training image than 95% of training images are to theirs (about 0.05 when nothing is copied).'
    ' "Diversity" is the mean pairwise distance of the synthetic images of the class over that of its real'
    ' images (about 1 when they spread alike, 0 for one image repeated), on the features above and in pixels;'
    ' "collapse" is the verdict from within-class recall and feature diversity.',
    '',
  ]
  for name, s in q['per_class'].items():
    lines.append(f'![closest pairs {name}]({s["pairs_png"]})')
  lines += ['', '![real vs synthetic](real_vs_synthetic.png)', '']
  if gen.get('samples_png'):
    lines += [f'![generator samples]({gen["samples_png"]})', '']
  test = record['test']
  lines += ['## Classifier on real + synthetic (tested on real images only)', '']
  rows = {f'test @ {key}': m for key, m in test.items()}
  lines += [metrics_table(rows), '', 'Full classifier report: [classifier/report.md](classifier/report.md)', '']
  if record.get('utility'):
    lines += utility_lines(record['utility'])
  lines += synthetic_val_lines(record)
  lines += source_check_lines(record['data'])
  return '\n'.join(lines)


UTILITY_KEYS = (('auroc', 'AUROC'), ('balanced_accuracy', 'Bal. acc.'), ('f1', 'F1'), ('sensitivity', 'Sens.'),
                ('specificity', 'Spec.'), ('mcc', 'MCC'), ('youden_j', "Youden's J"))  # fmt: skip


def utility_lines(u: dict) -> list[str]:
  """report.md's utility section: train on synthetic / test on real (TSTR), the mirror (TRTS), TRTR."""
  syn = u['synthetic_set']
  lines = [
    '## Utility of the synthetic data (train on synthetic, test on real)',
    '',
    f'A synthetic copy of the real training split, every class at its real count ({syn["per_class"]},'
    f' {syn["count"]} images, `{syn["path"]}`), trained a classifier alone (TSTR); a classifier of the same'
    ' config trained on the real training split alone (TRTR) was tested on the real test split and on that'
    ' synthetic copy (TRTS). Validation (checkpoint and threshold choice) is real for all.',
    '',
  ]
  if syn.get('derived_from_real'):
    lines += [f'**Derived from real images:** {syn["derived_from_real"]}', '']
  head = '| trained on | tested on | network | ' + ' | '.join(label for _, label in UTILITY_KEYS) + ' |'
  lines += [head, '|' + '---|' * (len(UTILITY_KEYS) + 3)]
  rows = (('synthetic (TSTR)', 'real test', u['tstr']), ('real (TRTR)', 'real test', u['trtr']),
          ('real (TRTS)', 'synthetic copy', u['trts']), ('real, full split', 'real test', u['trtr_reference']),
          ('real, full split', 'synthetic copy', u['trts_reference']))  # fmt: skip
  for trained, tested, part in rows:
    for key, m in part['test'].items():
      vals = ' | '.join(fmt(m.get(name)) for name, _ in UTILITY_KEYS)
      lines.append(f'| {trained} | {tested} @ {key} | {part["network"]} | {vals} |')
  check = u['provenance_check']
  lines += [
    '',
    f'TSTR training rows by origin: {check["origin_counts"]} (real rows: {check["real_rows"]}); synthetic images'
    f' pixel-identical to a real training image: {check["pixel_copies_of_real_training_images"]}.'
    " TRTS metrics use the generator's labels as truth: a low TRTS says the images do not look like their class"
    ' to a classifier that learnt it from real images.',
    '',
  ]
  return lines
