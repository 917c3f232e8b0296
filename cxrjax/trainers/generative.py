"""Generative oversampling, all stages: `train_and_evaluate(config, workdir, backend)` for 'gan' and 'ldm'.

  1. train the generator on the imbalanced training split  -> workdir/generator/
  2. synthesize minority images up to rebalance.target_ratio -> workdir/synthetic.npz
     (with provenance: generator, step, config hash, seed);
     with rebalance.synthetic_val, a validation set too      -> workdir/synthetic_val.npz
  3. judge them: FID/KID/precision/recall on reference-network features, a
     memorization audit and a mode-collapse verdict per class -> workdir/gen_metrics.json
     and stop here (exit 2) on a collapsed class unless quality.on_collapse='continue'
  4. train the classifier on real + synthetic, test on real  -> workdir/classifier/
     with quality.tstr, the generator's utility: train on synthetic / test on real and
     the mirror (`cxrjax.trainers.utility`)                  -> workdir/utility/
  5. one report                                              -> workdir/report.md, metrics.json

How many images stage 2 makes per class is `needed_per_class`: up to
rebalance.target_ratio, or rebalance.synthetic_dose x the real count of each dosed class.

Each stage is skipped when its output exists for the same config and resumes
when it was interrupted. The classifier stage is the ordinary classifier
trainer: the synthetic set reaches it through the data layer
(`rebalance.method='synthetic'`), never as a branch in the trainer.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from cxrjax import config_lib, faults, fileio, progress
from cxrjax import mesh as mesh_lib
from cxrjax.backends.base import Backend
from cxrjax.data import rebalance, synthetic
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import features as features_lib
from cxrjax.eval import genquality, inception_features, report
from cxrjax.trainers import classifier, common, gan, ldm, reference, utility

# The generator kinds, by trainer name: a module with
# `train(config, gen_dir, data, mesh, needed, backend) -> (record, handle)` and
# `synthesize(config, handle, data, labels, split='train') -> uint8 images` (`split`: the set being
# made, 'train' or 'val': its own random stream; never 'test'), and optionally
# `derived_from(config, data, labels, split)` -> the real image each one starts from (image-to-image).
GENERATORS = {
  'gan': gan,
  'ldm': ldm,
}


def needed_per_class(
  train_counts: list[int], target_ratio: float, dose: float = 0.0, dose_classes: str = 'minority'
) -> dict[int, int]:
  """How many synthetic images each class gets: up to target_ratio of the largest class, or with
  dose > 0, dose x its real count for each of dose_classes (`rebalance.synthetic_needed`, which the
  classifier's training set uses too)."""
  need = rebalance.synthetic_needed(train_counts, target_ratio, dose, dose_classes)
  return {c: int(n) for c, n in enumerate(need)}


def _base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  base = copy.deepcopy(config)
  base.unlock()
  base.rebalance.method = 'none'
  base.rebalance.synthetic = ''
  base.rebalance.synthetic_val = base.rebalance.synthetic_val_select = False
  return base


def classifier_config(config: ml_collections.ConfigDict, synthetic_path: str) -> ml_collections.ConfigDict:
  cls = copy.deepcopy(config)
  cls.unlock()
  cls.trainer = 'classifier'
  cls.quality.tstr = False  # the utility stage is the generative run's, not the classifier's
  cls.rebalance.method = 'synthetic'
  cls.rebalance.synthetic = synthetic_path
  return config_lib.finalize(cls)


def provenance(config, gen_info: dict[str, Any]) -> dict[str, Any]:
  return dict(
    tag=config.generator_tag or f'{config.trainer}',
    generator=gen_info.get('kind', config.trainer),
    generator_step=gen_info.get('step'),
    generator_hash=gen_info.get('config_hash'),
    generator_seed=config_lib.generator_seed(config),
    config_hash=config_lib.config_hash(config),
    seed=config.seed,
    details=gen_info.get('details', {}),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, backend: Backend | None = None, generators: dict | None = None
) -> dict:
  """Runs the five stages above; returns the metrics record (classifier + generator quality)."""
  backend = backend or Backend()
  generator = (generators or GENERATORS)[config.trainer]
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch_size(config.batch_size, mesh)
  base_cfg = _base_config(config)
  data = common.prepare_data(base_cfg)
  k = data.num_classes
  rb = config.rebalance
  needed = needed_per_class(data.train.class_counts(k), rb.target_ratio, rb.synthetic_dose, rb.dose_classes)

  run = common.Run(config, workdir).open()
  try:
    done = common.completed_record(run)
    if done is not None:
      return done
    common.banner(data, config, backend)
    progress.log(f'[{config.trainer}] synthetic images needed per class: {needed}')

    # 1. generator
    gen_dir = config.generator_dir or run.path('generator')
    gen_info, handle = generator.train(config, gen_dir, data, mesh, needed, backend)
    gen_info['dir'] = gen_dir

    # 2. synthesis (atomic; redone if the generator or config changed)
    syn_path = run.path('synthetic.npz')
    prov = provenance(config, gen_info)

    def make(labels):
      images = generator.synthesize(config, handle, data, labels)
      faults.maybe_fail('synthesis')
      return images, None

    syn_split = common.ensure_synthetic(syn_path, prov, needed, make, f'[{config.trainer}]', 'the training set')
    val_set = synthesize_val(config, generator, handle, data, syn_split, prov, syn_path)

    # 3. quality
    quality_path = run.path('gen_metrics.json')
    quality = fileio.read_json(quality_path) if os.path.isfile(quality_path) else None
    if quality is None or quality.get('synthetic_provenance') != prov or not _judged_diversity(quality):
      quality = judge(config, run, data, syn_split, prov, backend)
      if jax.process_index() == 0:
        fileio.atomic_write_json(quality_path, quality)

    # 3b. the mode-collapse gate: verdicts re-derived with this config's thresholds
    collapse = collapse_verdicts(config, quality)
    if collapse != quality.get('collapse'):
      quality['collapse'] = collapse
      if jax.process_index() == 0:
        fileio.atomic_write_json(quality_path, quality)
    collapse_gate(config, quality, quality_path)

    # 4. classifier on real + synthetic
    cls_cfg = classifier_config(config, syn_path)
    record = classifier.train_and_evaluate(cls_cfg, run.path('classifier'), backend)
    # 4b. the generator's utility: train on synthetic / test on real, and the mirror
    utility_record = None
    if config.quality.tstr:
      utility_record = utility.evaluate(
        config, run, data, generator, gen_dir, mesh, backend, provenance, dict(synthetic_provenance=prov)
      )

    # 5. report
    record = dict(record)
    record['kind'] = config.trainer
    record['run'] = common.run_info(config, backend)
    record['generator'] = gen_info
    record['generator_quality'] = quality
    record['synthetic'] = dict(path=syn_path, provenance=prov, count=len(syn_split),
                               per_class={data.dataset.class_names[c]: n for c, n in needed.items()},
                               dose=synthetic_dose(config))  # fmt: skip
    if utility_record is not None:
      record['utility'] = utility_record
    if val_set is not None:
      record['synthetic']['val'] = val_set
    if jax.process_index() == 0:
      write_report(run, record, data, syn_split)
    return record
  finally:
    run.close()


def synthetic_dose(config) -> dict[str, Any] | None:
  """The dose a run asked for (None: fill to rebalance.target_ratio)."""
  rb = config.rebalance
  if not rb.synthetic_dose:
    return None
  return dict(dose=float(rb.synthetic_dose), classes=rb.dose_classes)


def synthesize_val(config, generator, handle, data, syn_split: Split, prov: dict, syn_path: str) -> dict | None:
  """rebalance.synthetic_val: the validation companion of the synthetic set (`synthetic.val_companion`).

  Each validation class gets images as its training class did (`synthetic.val_needed`), made for the
  'val' split: the generator's own random stream for it, and image-to-image from validation images
  only (their names are kept as `derived_from`). Skipped when it exists for the same provenance.
  """
  if not config.rebalance.synthetic_val:
    return None
  k = data.num_classes
  path = synthetic.val_companion(syn_path)
  vprov = dict(prov, split='val')
  counts = synthetic.val_needed(
    data.train.class_counts(k), syn_split.class_counts(k), data.dataset.splits['val'].class_counts(k),
    config.rebalance.synthetic_val_rule, config.rebalance.target_ratio,
  )  # fmt: skip

  def make(labels):
    derived = getattr(generator, 'derived_from', None)
    derived = derived(config, data, labels, split='val') if derived is not None else None
    return generator.synthesize(config, handle, data, labels, split='val'), derived

  common.ensure_synthetic(path, vprov, counts, make, f'[{config.trainer}]', 'the validation set')
  return dict(path=path, count=int(sum(counts.values())), per_class=[counts[c] for c in range(k)])


def inception_quality(model, variables, real: np.ndarray, gen: np.ndarray, seed: int) -> dict:
  """FID/KID/precision/recall on FID Inception-V3 pool3 features, the embedding of the literature.

  Same comparison as the reference-network numbers (all real images of the
  class vs the generated ones, same KID seed), so the two can be read side by side.
  """
  f_real = inception_features.extract_inception(model, variables, real)
  f_gen = inception_features.extract_inception(model, variables, gen)
  pr = genquality.precision_recall(f_real, f_gen)
  return dict(
    fid=float(genquality.frechet_distance(f_real, f_gen)),
    kid=genquality.kernel_inception_distance(f_real, f_gen, seed=seed),
    precision=pr['precision'],
    recall=pr['recall'],
  )


def judge(config, run: common.Run, data: common.PreparedData, syn: Split, prov, backend: Backend | None = None) -> dict:
  """FID/KID/precision/recall and the memorization audit, per synthesized class."""
  # Loaded first: a bad weights file should fail before the reference network trains.
  inception = None
  if config.quality.inception_weights:
    inception = inception_features.load_inception(config.quality.inception_weights)
  model, variables, ref_info = reference.reference_network(config, run.workdir, backend)
  full_train = data.dataset.splits['train']
  out = dict(
    synthetic_provenance=prov,
    features=dict(
      network='cxrjax reference ResNet-18 (pooled last feature map), trained on the real full training split',
      path=ref_info['path'],
      width=ref_info['model']['width'],
      reference_test_auroc=ref_info['test_auroc'],
    ),
    per_class={},
  )
  if inception is not None:
    out['features']['inception_weights'] = config.quality.inception_weights
  for c in sorted(set(syn.labels.tolist())):
    gen = syn.images[syn.labels == c]
    seen = data.train.images[data.train.labels == c]  # what the generator trained on
    real = full_train.images[full_train.labels == c]  # all real images of the class
    f_gen = features_lib.extract(model, variables, gen)
    f_seen = features_lib.extract(model, variables, seen)
    f_real = features_lib.extract(model, variables, real)
    summ = genquality.summary(
      f_real, f_gen, features=out['features']['network'], train_images=seen, gen_images=gen,
      train_feats=f_seen, gen_feats=f_gen, num_pairs=config.quality.num_pairs, seed=config.seed,
    )  # fmt: skip
    # Real vs real baseline: the FID between the images the generator saw and
    # all real images of the class, so a reader can tell what a "good" FID is here.
    summ['fid_real_seen_vs_real_all'] = float(genquality.frechet_distance(f_seen, f_real))
    summ['num_generated'] = int(len(gen))
    summ['num_real'] = int(len(real))
    summ['num_seen'] = int(len(seen))
    # Within-class spread: on the reference features (the verdict's) and in pixels (the grid titles').
    summ['diversity'] = dict(
      features=genquality.diversity(f_real, f_gen, seed=config.seed),
      pixel=genquality.diversity(genquality.pixel_rows(real), genquality.pixel_rows(gen), seed=config.seed),
    )
    name = data.dataset.class_names[c]
    if inception is not None:
      progress.log(f'[quality] Inception-V3 pool3 features: {len(real)} real, {len(gen)} generated ({name})')
      summ['inception'] = inception_quality(*inception, real, gen, seed=config.seed)
    pairs_png = f'memorization_{name}.png'
    genquality.pairs_figure(
      gen, seen, summ['memorization'], run.path(pairs_png), f'closest generated/train pairs: {name}'
    )
    summ['pairs_png'] = pairs_png
    out['per_class'][name] = summ
  out['collapse'] = collapse_verdicts(config, out)
  return out


def _judged_diversity(quality: dict) -> bool:
  """Whether gen_metrics.json has the within-class diversity the collapse verdict needs (older runs lack it)."""
  return all('diversity' in s for s in quality.get('per_class', {}).values())


def collapse_verdicts(config, quality: dict) -> dict:
  """`genquality.collapse_verdicts` of a gen_metrics dict with this config's thresholds and `on_collapse`."""
  q = config.quality
  out = genquality.collapse_verdicts(
    quality['per_class'], min_diversity=q.collapse_min_diversity, min_recall=q.collapse_min_recall,
    min_real=q.collapse_min_real,
  )  # fmt: skip
  out['on_collapse'] = q.on_collapse
  return out


def collapse_summary(quality: dict) -> str:
  """One clause per collapsed class: its name and numbers."""
  c = quality['collapse']
  parts = []
  for name in c['classes']:
    s = quality['per_class'][name]
    parts.append(
      f"class '{name}' (recall {s['recall']:.3f}, feature diversity {s['diversity']['features']['ratio']:.2f} x real,"
      f' pixel diversity {s["diversity"]["pixel"]["ratio"]:.2f} x real)'
    )
  return '; '.join(parts)


def collapse_gate(config, quality: dict, quality_path: str) -> None:
  """Stops before the classifier when a synthesized class is collapsed, unless `quality.on_collapse='continue'`.

  Every verdict is logged; with 'continue' a collapse is announced and stays in
  gen_metrics.json and the report. Raises UserError (exit 2) with 'stop'.
  """
  c = quality['collapse']
  for name, verdict in c['verdicts'].items():
    progress.log(f'[quality] mode collapse check, {name}: {verdict} ({c["reasons"][name]})')
  if not c['any_collapsed']:
    return
  t = c['thresholds']
  what = (
    f'mode collapse in {collapse_summary(quality)}; thresholds: recall >= {t["min_recall"]:g},'
    f' feature diversity >= {t["min_diversity"]:g} x real (evidence: {quality_path})'
  )
  if config.quality.on_collapse == 'continue':
    progress.log(f'[quality] WARNING: {what}; training the classifier anyway (quality.on_collapse=continue)')
    return
  raise UserError(
    f'{what}; the classifier was not trained. Pass --config.quality.on_collapse=continue to train it anyway'
  )


def write_report(run: common.Run, record: dict, data: common.PreparedData, syn) -> None:
  report.real_vs_synthetic_grid(
    data.train, syn, data.dataset.class_names, run.path('real_vs_synthetic.png'), phantom=data.dataset.is_phantom
  )
  fileio.atomic_write_text(run.path('report.md'), report.generative_report(record, data.dataset.class_names))
  fileio.atomic_write_json(run.path('metrics.json'), record)
