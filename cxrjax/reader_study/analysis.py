"""Scores a study's readers against its answer key: analysis.json, report.md and two figures.

Per reader and pooled over readers:
- accuracy at calling an image real or synthetic, with an exact two-sided binomial test
  against chance (0.5: a reader who guesses, in whatever proportion, is right half the
  time on average whatever the share of synthetic images) and its Clopper-Pearson 95% CI;
  sensitivity (synthetic images called synthetic), specificity (real images called real)
  and their mean (balanced accuracy, 0.5 for any answer that ignores the image);
- the AUC of the 1-5 realism score for real against synthetic (0.5: the score does not
  separate them; 1: every real image scored above every synthetic one), with a bootstrap
  95% CI over images;
- the same per class, and, when the study asks for the class, how often readers name the
  class a synthetic image was generated as (against real images' true class and 1/K);
- agreement between readers: Fleiss' kappa on the images every reader answered.

The pooled test counts every answer as one trial; answers to the same image by several
readers are not independent, so its p-value is optimistic (the report says so). The
images most often mistaken for real are shown beside the real ones most often called
synthetic.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cxrjax import fileio
from cxrjax.errors import UserError
from cxrjax.reader_study import study

BOOTSTRAP = 2000
SHOWN = 6  # images per row of the mistaken-images figure


def fleiss_kappa(counts) -> float:
  """Fleiss' kappa of a [items, categories] table of rater counts (the same number of raters per item).

  kappa = (P - Pe) / (1 - Pe), where P is the mean over items of the share of rater pairs
  that agree, and Pe = sum_j p_j^2 the agreement expected from the categories' overall
  shares p_j. NaN when Pe = 1 (every answer in one category: agreement is not defined).
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or len(counts) == 0:
    raise ValueError('counts must be [items, categories] with at least one item')
  m = counts.sum(1)
  if not np.all(m == m[0]) or m[0] < 2:
    raise ValueError('every item needs the same number of raters, at least 2')
  m = m[0]
  p_j = counts.sum(0) / counts.sum()
  p_i = ((counts**2).sum(1) - m) / (m * (m - 1))
  p_bar, p_e = p_i.mean(), float((p_j**2).sum())
  if np.isclose(p_e, 1.0):
    return float('nan')
  return float((p_bar - p_e) / (1.0 - p_e))


def binomial(k: int, n: int, p0: float = 0.5) -> dict[str, Any]:
  """k successes in n trials against chance p0: the rate, exact two-sided p-value and Clopper-Pearson 95% CI."""
  from scipy import stats  # noqa: PLC0415 - scipy only where statistics are computed

  if n == 0:
    return dict(k=0, n=0, rate=None, p_value=None, ci=[None, None], p0=p0)
  r = stats.binomtest(int(k), int(n), p0, alternative='two-sided')
  ci = r.proportion_ci(confidence_level=0.95, method='exact')
  return dict(k=int(k), n=int(n), rate=k / n, p_value=float(r.pvalue), ci=[float(ci.low), float(ci.high)], p0=p0)


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """AUC from counts per score value ([..., V], values ascending): P(pos > neg) + P(pos = neg) / 2."""
  below = np.cumsum(neg, -1) - neg
  with np.errstate(invalid='ignore', divide='ignore'):
    return (pos * (below + 0.5 * neg)).sum(-1) / (pos.sum(-1) * neg.sum(-1))


def realism_auc(is_real: np.ndarray, realism: np.ndarray, rng: np.random.Generator) -> dict[str, Any] | None:
  """AUC of the realism score for real (positive) against synthetic, with a bootstrap 95% CI; None with one kind.

  The estimate is sklearn's `roc_auc_score`; the bootstrap resamples images as multinomial
  weights and computes each resample's AUC from counts per score value (the same number, as
  the Mann-Whitney statistic with ties counted half), all resamples in one matrix product.
  """
  from sklearn.metrics import roc_auc_score  # noqa: PLC0415

  is_real, realism = np.asarray(is_real, bool), np.asarray(realism, np.float64)
  if is_real.all() or not is_real.any():
    return None
  auc = float(roc_auc_score(is_real, realism))
  values, which = np.unique(realism, return_inverse=True)
  onehot = np.eye(len(values))[which]
  weights = rng.multinomial(len(realism), np.full(len(realism), 1.0 / len(realism)), size=BOOTSTRAP)
  boots = _auc_from_counts(weights @ (onehot * is_real[:, None]), weights @ (onehot * ~is_real[:, None]))
  boots = boots[np.isfinite(boots)]  # resamples with only one kind of image have no AUC
  lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan)
  return dict(auc=auc, ci=[float(lo), float(hi)], bootstrap=len(boots))


def _rows(manifest: dict, key: dict, record: dict) -> list[dict[str, Any]]:
  out = []
  for token, a in record['answers'].items():
    truth = key['items'][token]
    out.append(
      dict(
        token=token,
        truth=truth['truth'],
        cls=truth['class'],
        call=a['call'],
        realism=int(a['realism']),
        named=a.get('class'),
        seconds=a.get('seconds'),
      )
    )
  return out


def score(rows: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
  """The real/synthetic metrics of a set of answers (one reader's, one class's, or pooled)."""
  if not rows:
    return dict(n=0)
  truth = np.array([r['truth'] for r in rows])
  call = np.array([r['call'] for r in rows])
  realism = np.array([r['realism'] for r in rows], np.float64)
  syn, real = truth == 'synthetic', truth == 'real'
  correct = int((truth == call).sum())
  sens = float((call[syn] == 'synthetic').mean()) if syn.any() else None
  spec = float((call[real] == 'real').mean()) if real.any() else None
  seconds = [r['seconds'] for r in rows if isinstance(r.get('seconds'), (int, float))]
  return dict(
    n=len(rows),
    n_real=int(real.sum()),
    n_synthetic=int(syn.sum()),
    accuracy=binomial(correct, len(rows)),
    sensitivity=sens,
    specificity=spec,
    balanced_accuracy=None if sens is None or spec is None else (sens + spec) / 2,
    called_real=float((call == 'real').mean()),
    realism_mean=dict(
      real=float(realism[real].mean()) if real.any() else None,
      synthetic=float(realism[syn].mean()) if syn.any() else None,
    ),
    realism_counts=dict(
      real=[int((realism[real] == v).sum()) for v in study.REALISM],
      synthetic=[int((realism[syn] == v).sum()) for v in study.REALISM],
    ),
    realism_auc=realism_auc(real, realism, rng),
    median_seconds=float(np.median(seconds)) if seconds else None,
  )


def naming(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
  """How often the class named is the class of the image: synthetic images (the class they were generated as) and real."""
  out = {}
  for kind in study.CALLS:
    sel = [r for r in rows if r['truth'] == kind]
    out[kind] = binomial(sum(r['named'] == r['cls'] for r in sel), len(sel), 1.0 / len(classes))
    out[kind]['per_class'] = {
      c: binomial(
        sum(r['named'] == c for r in sel if r['cls'] == c), sum(r['cls'] == c for r in sel), 1.0 / len(classes)
      )
      for c in classes
    }
  return out


def agreement(records: dict[str, dict], manifest: dict) -> dict[str, Any]:
  """Fleiss' kappa over the images every reader answered: on the call, the realism score and (if asked) the class."""
  names = [n for n, r in records.items() if r['answers']]
  if len(names) < 2:
    return dict(readers=len(names), items=0, note='agreement needs at least two readers')
  common = sorted(set.intersection(*(set(records[n]['answers']) for n in names)))
  out: dict[str, Any] = dict(readers=len(names), items=len(common))
  if not common:
    out['note'] = 'no image was answered by every reader'
    return out
  fields = [('call', list(study.CALLS)), ('realism', list(study.REALISM))]
  if manifest['ask_class']:
    fields.append(('class', manifest['classes']))
  for field, cats in fields:
    table = np.zeros((len(common), len(cats)), np.int64)
    for i, t in enumerate(common):
      for n in names:
        table[i, cats.index(records[n]['answers'][t][field])] += 1
    out[f'kappa_{field}'] = fleiss_kappa(table)
  return out


def per_image(records: dict[str, dict], key: dict) -> list[dict[str, Any]]:
  out = []
  for token, truth in sorted(key['items'].items()):
    answers = [r['answers'][token] for r in records.values() if token in r['answers']]
    out.append(
      dict(
        token=token,
        truth=truth['truth'],
        cls=truth['class'],
        origin=truth.get('origin'),
        readers=len(answers),
        called_real=sum(a['call'] == 'real' for a in answers),
        realism_mean=float(np.mean([a['realism'] for a in answers])) if answers else None,
      )
    )
  return out


def mistaken(images: list[dict[str, Any]], k: int = SHOWN) -> dict[str, list[dict[str, Any]]]:
  """The synthetic images most often called real and the real ones most often called synthetic (ties: by realism)."""
  syn = [i for i in images if i['truth'] == 'synthetic' and i['readers'] and i['called_real']]
  real = [i for i in images if i['truth'] == 'real' and i['readers'] and i['called_real'] < i['readers']]
  syn.sort(key=lambda i: (-i['called_real'] / i['readers'], -i['realism_mean'], i['token']))
  real.sort(key=lambda i: (-(1 - i['called_real'] / i['readers']), i['realism_mean'], i['token']))
  return dict(synthetic_called_real=syn[:k], real_called_synthetic=real[:k])


def analyze(study_dir: str, key_path: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
  """Reads the study, its key (sha256 checked) and every reader; writes analysis.json, report.md and figures."""
  manifest = study.load_manifest(study_dir)
  key_file = study.key_location(study_dir, manifest, key_path)
  key = study.load_key(key_file, manifest)
  records, empty = {}, []
  for path in study.reader_files(study_dir):
    record = study.load_reader(path, manifest)
    if record['answers']:
      records[record['reader']] = record
    else:
      empty.append(record['reader'])
  if not records:
    raise UserError(
      f'{study_dir}: no answers yet in {study.READERS}/ (readers answer with `serve STUDY --reader NAME`)'
    )
  seed = manifest['seed']
  classes = manifest['classes']
  readers = {}
  for name, record in sorted(records.items()):
    rows = _rows(manifest, key, record)
    entry = dict(
      simulated=bool(record.get('simulated')),
      answered=len(rows),
      of=len(record['order']),
      overall=score(rows, study.rng(seed, f'analysis/{name}')),
      per_class={
        c: score([r for r in rows if r['cls'] == c], study.rng(seed, f'analysis/{name}/{c}')) for c in classes
      },
    )
    if manifest['ask_class']:
      entry['naming'] = naming(rows, classes)
    readers[name] = entry
  pooled_rows = [r for rec in records.values() for r in _rows(manifest, key, rec)]
  pooled = dict(
    readers=len(records),
    overall=score(pooled_rows, study.rng(seed, 'analysis/pooled')),
    per_class={
      c: score([r for r in pooled_rows if r['cls'] == c], study.rng(seed, f'analysis/pooled/{c}')) for c in classes
    },
    mean_reader_accuracy=float(np.mean([r['overall']['accuracy']['rate'] for r in readers.values()])),
  )
  if manifest['ask_class']:
    pooled['naming'] = naming(pooled_rows, classes)
  images = per_image(records, key)
  result = dict(
    study_id=manifest['study_id'],
    study=os.path.abspath(study_dir),
    key=dict(path=os.path.abspath(key_file), sha256=manifest['key']['sha256'], verified=True),
    simulated=sorted(n for n, r in readers.items() if r['simulated']),
    readers_without_answers=empty,
    readers=readers,
    pooled=pooled,
    agreement=agreement(records, manifest),
    images=images,
    mistaken=mistaken(images),
  )
  out_dir = out_dir or study.study_path(study_dir, study.ANALYSIS)
  os.makedirs(out_dir, exist_ok=True)
  result['figures'] = _figures(result, study_dir, out_dir)
  fileio.atomic_write_json(os.path.join(out_dir, 'analysis.json'), result)
  fileio.atomic_write_text(os.path.join(out_dir, 'report.md'), report(result, manifest))
  result['out_dir'] = out_dir
  return result


# ---------------------------------------------------------------------------------------------------------------------
# Figures and report


def _figures(result: dict[str, Any], study_dir: str, out_dir: str) -> dict[str, str]:
  import matplotlib  # noqa: PLC0415 - plotting only here

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  tag = ' (SIMULATED readers)' if result['simulated'] else ''
  figures = {}
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  names = list(result['readers']) + ['pooled']
  accs = [result['readers'][n]['overall']['accuracy'] for n in result['readers']] + [
    result['pooled']['overall']['accuracy']
  ]
  x = np.arange(len(names))
  rates = np.array([a['rate'] for a in accs])
  err = np.array([[a['rate'] - a['ci'][0], a['ci'][1] - a['rate']] for a in accs]).T
  ax1.bar(x, rates, color=['#4a7fb0'] * (len(names) - 1) + ['#555555'])
  ax1.errorbar(x, rates, yerr=err, fmt='none', ecolor='black', capsize=4)
  ax1.axhline(0.5, color='#c44', linestyle='--', linewidth=1, label='chance')
  ax1.set_xticks(x, [n + (' (sim.)' if n in result['simulated'] else '') for n in names[:-1]] + ['pooled'],
                 rotation=30, ha='right')  # fmt: skip
  ax1.set_ylim(0, 1)
  ax1.set_ylabel('accuracy, real vs synthetic')
  ax1.set_title('Accuracy with 95% CI' + tag, fontsize=10)
  ax1.legend(loc='lower right', fontsize=8)
  counts = result['pooled']['overall']['realism_counts']
  v = np.arange(1, 6)
  for offset, kind, color in ((-0.2, 'real', '#4a7fb0'), (0.2, 'synthetic', '#d08a3a')):
    c = np.asarray(counts[kind], np.float64)
    ax2.bar(v + offset, c / max(c.sum(), 1), width=0.4, color=color, label=f'{kind} ({int(c.sum())} answers)')
  auc = result['pooled']['overall']['realism_auc']
  ax2.set_xticks(v, [f'{i}\n' + study.REALISM_LABELS[i].replace(' ', '\n') for i in v], fontsize=7)
  ax2.set_ylabel('share of answers')
  ax2.set_title('Realism score, pooled' + (f' (AUC {auc["auc"]:.2f})' if auc else ''), fontsize=10)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, 'accuracy_realism.png')
  fileio.atomic_savefig(fig, path, dpi=90)
  plt.close(fig)
  figures['accuracy_realism'] = os.path.basename(path)

  groups = result['mistaken']
  cols = max(1, max(len(g) for g in groups.values()))
  fig, axes = plt.subplots(2, cols, figsize=(1.7 * cols + 0.3, 4.4), squeeze=False)
  titles = {
    'synthetic_called_real': 'Synthetic, most often called real',
    'real_called_synthetic': 'Real, most often called synthetic',
  }
  for row, (group, items) in enumerate(groups.items()):
    for col in range(cols):
      ax = axes[row, col]
      ax.axis('off')
      if col >= len(items):
        continue
      it = items[col]
      img = np.asarray(Image.open(study.study_path(study_dir, study.IMAGES, f'{it["token"]}.png')))
      ax.imshow(img, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
      called = it['called_real'] if group == 'synthetic_called_real' else it['readers'] - it['called_real']
      word = 'real' if group == 'synthetic_called_real' else 'synth.'
      ax.set_title(f'{called}/{it["readers"]} {word}\nrealism {it["realism_mean"]:.1f}', fontsize=8)
    axes[row, 0].text(-0.1, 0.5, titles[group], transform=axes[row, 0].transAxes, rotation=90, va='center',
                      ha='right', fontsize=8)  # fmt: skip
    if not items:
      axes[row, 0].text(0.5, 0.5, 'none', transform=axes[row, 0].transAxes, ha='center', fontsize=9)
  fig.suptitle('Images most often mistaken' + tag, fontsize=10)
  fig.tight_layout()
  path = os.path.join(out_dir, 'mistaken.png')
  fileio.atomic_savefig(fig, path, dpi=90)
  plt.close(fig)
  figures['mistaken'] = os.path.basename(path)
  return figures


def _f(x, digits: int = 3) -> str:
  return '-' if x is None or (isinstance(x, float) and np.isnan(x)) else f'{x:.{digits}f}'


def _p(p) -> str:
  return '-' if p is None else ('< 0.001' if p < 0.001 else f'{p:.3f}')


def _p_eq(p) -> str:
  """'p = 0.057' or 'p < 0.001', for sentences."""
  return 'p ' + (_p(p) if p is not None and p < 0.001 else f'= {_p(p)}')


def _excluded(ex: dict[str, int]) -> str:
  if not ex:
    return 'none'
  words = {'repeated': 'repeated within the held-out images'}
  return ', '.join(f'{n} {words.get(k, k.replace("_in_", " images also in "))}' for k, n in sorted(ex.items()))


def _acc(a: dict) -> str:
  return '-' if a['rate'] is None else f'{a["rate"]:.3f} [{a["ci"][0]:.3f}, {a["ci"][1]:.3f}] ({a["k"]}/{a["n"]})'


def _auc(a: dict | None) -> str:
  return '-' if a is None else f'{a["auc"]:.3f} [{_f(a["ci"][0])}, {_f(a["ci"][1])}]'


def _score_row(label: str, s: dict) -> str:
  if not s.get('n'):
    return f'| {label} | 0 | - | - | - | - | - | - | - |'
  rm = s['realism_mean']
  return (
    f'| {label} | {s["n"]} | {_acc(s["accuracy"])} | {_p(s["accuracy"]["p_value"])} | {_f(s["sensitivity"])} |'
    f' {_f(s["specificity"])} | {_f(s["balanced_accuracy"])} | {_auc(s["realism_auc"])} |'
    f' {_f(rm["real"], 2)} / {_f(rm["synthetic"], 2)} |'
  )


SCORE_HEADER = (
  '| reader | answers | accuracy [95% CI] (correct/n) | p (binomial, vs 0.5) | sensitivity (synthetic called synthetic)'
  ' | specificity (real called real) | balanced accuracy | realism AUC [95% CI] | mean realism real / synthetic |\n'
  '|---|---:|---|---:|---:|---:|---:|---|---|'
)


def _kappa_words(k: float) -> str:
  if k is None or np.isnan(k):
    return 'not defined'
  bands = [(0.0, 'poor (below chance)'), (0.2, 'slight'), (0.4, 'fair'), (0.6, 'moderate'), (0.8, 'substantial')]
  for top, word in bands:
    if k <= top:
      return word
  return 'almost perfect'


def verdict(acc: dict) -> str:
  """One sentence on the accuracy test, for the report's summary."""
  if acc['rate'] is None:
    return 'no answers'
  if acc['p_value'] >= 0.05:
    return (
      'not significantly different from chance (p >= 0.05); the CI shows how large a skill these answers can'
      ' rule out, and no test proves that readers cannot tell the images apart'
    )
  if acc['rate'] > 0.5:
    return 'better than chance (p < 0.05): the synthetic images were told apart from real ones'
  return 'worse than chance (p < 0.05): synthetic images were called real more often than real ones were'


def report(result: dict[str, Any], manifest: dict[str, Any]) -> str:
  sim = result['simulated']
  banner = ''
  if sim:
    banner = (
      f'\n> **SIMULATED.** The answers of {", ".join(sim)} were made up by `simulate`, not given by a person.'
      ' Nothing below says anything about the images.\n'
    )
  src = manifest['source']
  gen = src['generator']
  quality = src.get('generator_quality') or {}
  counts = '; '.join(f'{c}: {v["real"]} real, {v["synthetic"]} synthetic' for c, v in manifest['counts'].items())
  lines = [
    f'# Reader study report{" (SIMULATED readers)" if sim else ""}',
    banner,
    '## Study',
    '',
    f'- study `{manifest["study_id"]}`, seed {manifest["seed"]}: {manifest["n"]} images ({counts}); synthetic share'
    f' {manifest["synthetic_share"]["actual"]:.2f}',
    f'- generator: {gen.get("tag")} ({gen.get("generator")}), step {gen.get("generator_step")}, config'
    f' {gen.get("config_hash")}; run `{src["run"]}`'
    + (''.join(f'; {c}: FID {_f(q.get("fid"), 2)} (reference network)' for c, q in quality.items()) if quality else ''),
    f'- real images: the {" and ".join(src["real"]["splits"])} split of {src["real"]["data"]}, never the training'
    f' split; left out as pixel duplicates: {_excluded(src["real"]["excluded"])}'
    + (' — **PHANTOM data**' if src['real'].get('phantom') else ''),
    f'- images: {manifest["image"]["width"]}x{manifest["image"]["height"]} {manifest["image"]["mode"]} PNG, one'
    ' encoder, random names, a per-reader random order',
    f'- answer key: `{result["key"]["path"]}`, sha256 `{result["key"]["sha256"]}` (matches the manifest)',
    f'- readers: {len(result["readers"])}'
    + (
      f'; no answers yet: {", ".join(result["readers_without_answers"])}' if result['readers_without_answers'] else ''
    ),
    '',
    '## Summary',
    '',
  ]
  pa = result['pooled']['overall']['accuracy']
  lines.append(
    f'Pooled over readers, accuracy at telling synthetic from real is {_acc(pa)}, {verdict(pa)}. Per reader (exact'
    ' tests, each on its own answers):'
  )
  lines.append('')
  for name, r in result['readers'].items():
    a = r['overall']['accuracy']
    tag = ' (SIMULATED)' if r['simulated'] else ''
    lines.append(f'- {name}{tag}: {_acc(a)}, {_p_eq(a["p_value"])}: {verdict(a)}.')
  lines += [
    '',
    'Chance is 0.5: a reader who guesses is right half the time whatever the share of synthetic images. The pooled'
    ' test counts every answer as a trial, but several readers judged the same images, so its p-value is'
    ' optimistic; the per-reader tests are exact. The realism AUC is the probability that a real image got a'
    ' higher realism score than a synthetic one (ties count half): 0.5 means the score does not separate them.',
    '',
    '## Per reader',
    '',
    SCORE_HEADER,
  ]
  for name, r in result['readers'].items():
    label = name + (' (SIMULATED)' if r['simulated'] else '')
    if r['answered'] < r['of']:
      label += f' (incomplete: {r["answered"]}/{r["of"]})'
    lines.append(_score_row(label, r['overall']))
  lines.append(_score_row(f'**pooled** ({len(result["readers"])} readers)', result['pooled']['overall']))
  lines += ['', f"Mean of the readers' accuracies: {result['pooled']['mean_reader_accuracy']:.3f}.", '']
  med = {n: r['overall']['median_seconds'] for n, r in result['readers'].items()}
  if any(v is not None for v in med.values()):
    lines += ['Median seconds per image: ' + ', '.join(f'{n} {_f(v, 1)}' for n, v in med.items()) + '.', '']
  lines += ['## Per class', '', SCORE_HEADER.replace('| reader |', '| class, reader |', 1)]
  for c in manifest['classes']:
    for name, r in result['readers'].items():
      lines.append(_score_row(f'{c}, {name}', r['per_class'][c]))
    lines.append(_score_row(f'{c}, **pooled**', result['pooled']['per_class'][c]))
  lines.append('')
  if manifest['ask_class']:
    k = len(manifest['classes'])
    lines += [
      '## Class named',
      '',
      f'Share of answers naming the class of the image (chance 1/{k} = {1 / k:.3f}; binomial test against it): for'
      ' synthetic images the class they were generated as, for real images their true class.',
      '',
      '| reader | synthetic: named as generated | p | real: named correctly | p |',
      '|---|---|---:|---|---:|',
    ]
    for name, r in list(result['readers'].items()) + [('**pooled**', result['pooled'])]:
      nm = r['naming']
      lines.append(
        f'| {name} | {_acc(nm["synthetic"])} | {_p(nm["synthetic"]["p_value"])} | {_acc(nm["real"])} |'
        f' {_p(nm["real"]["p_value"])} |'
      )
    lines += ['', '| class | synthetic, pooled: named as generated | real, pooled: named correctly |', '|---|---|---|']
    for c in manifest['classes']:
      nm = result['pooled']['naming']
      lines.append(f'| {c} | {_acc(nm["synthetic"]["per_class"][c])} | {_acc(nm["real"]["per_class"][c])} |')
    lines.append('')
  ag = result['agreement']
  lines += ['## Agreement between readers', '']
  if 'kappa_call' in ag:
    lines.append(f"Fleiss' kappa over the {ag['items']} images all {ag['readers']} readers answered:")
    lines.append('')
    for field, label in (('call', 'real / synthetic'), ('realism', 'realism score (5 categories)'), ('class', 'class')):
      if f'kappa_{field}' in ag:
        kv = ag[f'kappa_{field}']
        lines.append(f'- {label}: {_f(kv)} ({_kappa_words(kv)}, Landis and Koch)')
  else:
    lines.append(f'Not computed: {ag["note"]}.')
  lines += [
    '',
    '## Figures',
    '',
    f'![accuracy and realism]({result["figures"]["accuracy_realism"]})',
    '',
    'The synthetic images most often called real (top row) beside the real images most often called synthetic'
    ' (bottom row), with how many readers said so and their mean realism score:',
    '',
    f'![mistaken images]({result["figures"]["mistaken"]})',
    '',
    '| image | truth | class | origin | called real | mean realism |',
    '|---|---|---|---|---:|---:|',
  ]
  for group in ('synthetic_called_real', 'real_called_synthetic'):
    for it in result['mistaken'][group]:
      lines.append(
        f'| `{it["token"]}` | {it["truth"]} | {it["cls"]} | {it["origin"]} | {it["called_real"]}/{it["readers"]} |'
        f' {_f(it["realism_mean"], 2)} |'
      )
  lines += ['', 'Every number above is in `analysis.json` (per image too).', '']
  return '\n'.join(lines)


def summary_lines(result: dict[str, Any]) -> str:
  pa = result['pooled']['overall']['accuracy']
  sim = f' [SIMULATED: {", ".join(result["simulated"])}]' if result['simulated'] else ''
  out = [f'{len(result["readers"])} reader(s){sim}; pooled accuracy {_acc(pa)}, {_p_eq(pa["p_value"])}']
  for name, r in result['readers'].items():
    a = r['overall']['accuracy']
    out.append(f'  {name}: accuracy {_acc(a)}, {_p_eq(a["p_value"])}, realism AUC {_auc(r["overall"]["realism_auc"])}')
  kappa = result['agreement'].get('kappa_call')
  if kappa is not None:
    out.append(f"  Fleiss' kappa (real/synthetic): {_f(kappa)}")
  out.append(f'report: {os.path.join(result["out_dir"], "report.md")}')
  return '\n'.join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Simulated readers


def simulate_reader(
  study_dir: str,
  name: str,
  accuracy: float = 0.6,
  seed: int = 0,
  always: str | None = None,
  key_path: str | None = None,
  answers: int | None = None,
) -> str:
  """Writes answers of a made-up reader (marked simulated) to readers/<name>.json; returns the path.

  The reader calls an image correctly with probability `accuracy` (or answers `always`
  for every image), scores realism 3-5 for what they call real and 1-3 otherwise, and
  names the true class 80% of the time. `answers` stops after that many images (a reader
  part-way through). For trying the analysis and the page, never for results.
  """
  manifest = study.load_manifest(study_dir)
  key = study.load_key(study.key_location(study_dir, manifest, key_path), manifest)
  if always not in (None, *study.CALLS):
    raise UserError(f'--always {always!r}: expected real or synthetic')
  if not 0.0 <= accuracy <= 1.0:
    raise UserError(f'--accuracy {accuracy}: expected a probability')
  path = study.reader_path(study_dir, name)
  if os.path.exists(path):
    raise UserError(f'{path}: reader {name} exists; choose another name')
  rng = study.rng(seed, f'simulate/{manifest["study_id"]}/{name}')
  record = study.new_reader(manifest, name, simulated=True)
  classes = manifest['classes']
  if answers is not None and not 0 <= answers <= len(record['order']):
    raise UserError(f'--answers {answers}: expected 0-{len(record["order"])}')
  for token in record['order'][:answers]:
    truth = key['items'][token]
    if always:
      call = always
    else:
      right = rng.random() < accuracy
      call = truth['truth'] if right else ('real' if truth['truth'] == 'synthetic' else 'synthetic')
    realism = int(rng.integers(3, 6) if call == 'real' else rng.integers(1, 4))
    cls = None
    if manifest['ask_class']:
      cls = truth['class'] if rng.random() < 0.8 else classes[int(rng.integers(len(classes)))]
    study.record_answer(record, manifest, token, dict(call=call, realism=realism, **{'class': cls}),
                        seconds=float(rng.uniform(3, 15)))  # fmt: skip
  os.makedirs(os.path.dirname(path), exist_ok=True)
  study.save_reader(path, record)
  return path
