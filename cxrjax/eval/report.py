"""Run outputs: metrics.json, report.md and PNG figures, each written atomically."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from cxrjax import fileio

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
    f'- Source: {data["source"]["description"]}',
  ]
  if data['source'].get('fallback'):
    lines.append(f'- **Fallback:** {data["source"]["fallback"]}')
  imb = data['imbalance']
  lines.append(
    f'- Imbalance protocol: minority class {imb["minority_class"]} ({names[imb["minority_class"]] if imb["minority_class"] < len(names) else "?"}),'
    f' ratio {imb["ratio"]:g}; {imb.get("note", "")}'
  )
  rb = data['rebalance']
  lines.append(
    f'- Rebalancing: `{rb["method"]}`; class weights {rb["class_weights"]}; per-epoch origin {rb["origin_counts"]}'
  )
  if any(data.get('leakage', {}).values()):
    lines.append(f'- Identical images across splits in the source data (reported, not removed): {data["leakage"]}')
  lines += ['', '| split | ' + ' | '.join(names) + ' | total |', '|' + '---|' * (len(names) + 2)]
  loaded = data.get('counts_loaded') or {}
  rows = [('train (loaded)', loaded.get('train')), ('train (imbalanced)', counts['train_imbalanced']),
          ('train (per epoch, as trained)', counts['trained_on']), ('val', counts['val']), ('test', counts['test'])]  # fmt: skip
  for label, c in rows:
    if c is not None:
      lines.append(f'| {label} | ' + ' | '.join(str(v) for v in c) + f' | {sum(c)} |')
  return lines


def write_classifier_outputs(workdir: str, record: dict, class_names) -> None:
  """metrics.json, report.md, confusion matrices and training curves."""
  phantom = record['phantom']
  tag = 'PHANTOM DATA - ' if phantom else ''
  fileio.atomic_write_json(os.path.join(workdir, 'metrics.json'), record)
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
  if 'per_class' in test['threshold_0.5']:
    lines += ['### Per class (test, arg-max)', '', per_class_table(test['threshold_0.5']), '']
  lines += ['## Figures', '', '![confusion matrix](confusion.png)', '', '![training curves](curves.png)', '']
  lines += ['## Versions', '', ', '.join(f'{k} {v}' for k, v in run['versions'].items()), '']
  fileio.atomic_write_text(os.path.join(workdir, 'report.md'), '\n'.join(lines))
