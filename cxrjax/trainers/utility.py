"""The utility stage of a generative run (`quality.tstr`): does the synthetic data carry the classes?

Three classifiers, all of the run's classifier config (model, schedule, seed), all
validated and tested on the real validation and test splits:

  TSTR  train on synthetic, test on real. The generator makes a synthetic copy of the real
        (imbalanced) training split, every class at its real count, the majority class too
        (conditional generators make every class; the unconditional DCGAN trains one generator
        per class, reusing the minority ones in their `class_{c}` folders)
                                            -> workdir/utility/synthetic_full.npz
        The ordinary classifier trainer trains on it alone: the synthetic set replaces the real
        training split in the data layer (`rebalance.synthetic_only`), so no real training row
        is in the pool (checked from the rows' origin tags)  -> workdir/utility/tstr/
  TRTR  the same config trained on the real training split alone (`rebalance.method='none'`);
        it does not depend on the generator, so every generator run beside the same reference
        network shares it                  -> `_trtr-<config hash>/` beside the reference network
  TRTS  the mirror, train on real and test on synthetic: the TRTR classifier tested on the
        synthetic copy (at 0.5 and at its Youden threshold chosen on real validation); the
        reference feature network too (trained on the real full training split), beside its own
        test on the run's real test split (`trtr_reference`).

In img2img mode every synthetic image starts from a real training image of the source class
(the largest by default), majority-class images included: the TSTR set holds no real image but
is derived from real ones, and the record and report say so.

The stage writes workdir/utility/utility.json and is skipped when it exists for the same
config and synthetic set; each classifier resumes or is skipped on its own.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from cxrjax import config_lib, fileio, progress
from cxrjax.backends.base import Backend
from cxrjax.data.dataset import Split
from cxrjax.eval import features as features_lib
from cxrjax.trainers import classifier, common, reference

SET_NAME = 'synthetic_full.npz'


def full_counts(data: common.PreparedData) -> dict[int, int]:
  """Synthetic images per class for TSTR: the real (imbalanced) training split's counts, every class."""
  return {c: int(n) for c, n in enumerate(data.train.class_counts(data.num_classes))}


def _classifier_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  cls = copy.deepcopy(config)
  cls.unlock()
  cls.trainer = 'classifier'
  cls.quality.tstr = False
  cls.rebalance.synthetic_dose = 0.0
  cls.rebalance.dose_classes = 'minority'
  cls.rebalance.synthetic_val = cls.rebalance.synthetic_val_select = False  # validated on real validation only
  return cls


def tstr_config(config: ml_collections.ConfigDict, synthetic_path: str) -> ml_collections.ConfigDict:
  """The run's classifier config, trained on the synthetic set alone (`rebalance.synthetic_only`)."""
  cls = _classifier_base(config)
  cls.rebalance.method = 'synthetic'
  cls.rebalance.synthetic = synthetic_path
  cls.rebalance.synthetic_only = True
  return config_lib.finalize(cls)


def trtr_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's classifier config on the real training split alone, free of every generator setting.

  Rebalancing ('none'), the generator sections, tag, seed and folder and the quality settings
  are the profile's defaults, so the config (and its folder) is the same for every generator of one
  experiment, and it is the baseline's (`configs/baseline.py` at the same profile and overrides).
  """
  cls = _classifier_base(config)
  base = config_lib.with_profile(config_lib.base_config(), config.profile)
  for key in ('rebalance', 'generator_tag', 'generator_seed', 'generator_dir', 'gan', 'ldm', 'quality'):
    cls[key] = copy.deepcopy(base[key])
  cls.overwrite = False  # shared: never cleared by one run's --overwrite
  return config_lib.finalize(cls)


def trtr_dir(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(folder, config) of the TRTR classifier: `_trtr-<hash>` beside the reference network's folder."""
  cfg = trtr_config(config)
  ref_path, _ = reference.reference_dir(config, workdir)
  parent = os.path.dirname(os.path.abspath(ref_path))
  return os.path.join(parent, f'_trtr-{config_lib.config_hash(cfg)}'), cfg


@contextlib.contextmanager
def _waiting_lock(path: str):
  """Waits for another single-process run that trains the shared folder `path`, then holds it.

  The workdir lock refuses a second run outright; a shared stage waits instead. Multi-process
  runs skip the wait (their processes train together and must not block one another).
  """
  if jax.process_count() > 1:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(f'{path}.wait.lock', 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      progress.log(f'[utility] waiting for another run to finish {path}')
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


def derived_from_real(config: ml_collections.ConfigDict, data: common.PreparedData, counts: dict[int, int]) -> str:
  """What real images the synthetic copy is made from ('' when it is made from noise)."""
  if config.trainer != 'ldm' or config.ldm.mode != 'img2img':
    return ''
  k = data.num_classes
  src = config.ldm.source_class if config.ldm.source_class >= 0 else int(np.argmax(data.train.class_counts(k)))
  name = data.dataset.class_names[src]
  return (
    f'img2img: every synthetic image starts from a real {name} training image, noised to strength'
    f' {config.ldm.strength:g} and denoised toward its label; {counts.get(src, 0)} of the {sum(counts.values())}'
    f' images are {name} made from {name} images. The TSTR training set holds no real image, but it is derived'
    ' from real training images.'
  )


def _predictor(model, variables, config, mesh) -> Callable[[Split], np.ndarray]:
  """split -> class probabilities of `model` (jitted once, reused for every split)."""
  fn = jax.jit(classifier.make_predict(model))
  return lambda split: classifier.predict_split(fn, variables, split, config.eval_batch_size, mesh)


def _metrics(probs: np.ndarray, split: Split, config, class_names, threshold: float | None = None) -> dict:
  out = {'threshold_0.5': classifier.evaluate(probs, split, config, class_names)}
  if threshold is not None and probs.shape[1] == 2:
    out['youden'] = classifier.evaluate(probs, split, config, class_names, threshold)
  return out


def provenance_check(tstr_record: dict, syn: Split, real_train: Split) -> dict[str, Any]:
  """No real training row in the TSTR training set, from the rows' origin tags; pixel copies counted.

  Raises:
    RuntimeError: a row of the TSTR training set is not synthetic (the data layer failed its contract).
  """
  rb = tstr_record['data']['rebalance']
  origin = rb['origin_counts']
  not_synthetic = {k: v for k, v in origin.items() if k != 'synthetic'}
  trained = tstr_record['data'].get('per_source', {})
  real_sources = sorted(
    s for s, st in trained.items() if sum(st.get('trained_on', [0])) and not s.startswith('synthetic:')
  )
  if not_synthetic or real_sources or not rb.get('synthetic_only'):
    raise RuntimeError(f'TSTR training set has rows that are not synthetic: {not_synthetic or real_sources}')
  real = set(real_train.content_hashes())
  copies = int(sum(h in real for h in syn.content_hashes()))
  return dict(
    origin_counts=origin,
    real_rows=0,
    trained_on_sources=sorted(s for s, st in trained.items() if sum(st.get('trained_on', [0]))),
    pixel_copies_of_real_training_images=copies,
  )


def evaluate(
  config: ml_collections.ConfigDict,
  run: common.Run,
  data: common.PreparedData,
  generator,
  gen_dir: str,
  mesh,
  backend: Backend,
  provenance: Callable[[ml_collections.ConfigDict, dict], dict],
  key: dict,
) -> dict:
  """Runs TSTR, TRTR and TRTS (module docstring); returns the utility record.

  Args:
    config: the generative run's config.
    run: its open workdir.
    data: its prepared data (the real imbalanced training split in `data.train`).
    generator: the generator module (`train`, `synthesize`; see `generative.GENERATORS`).
    gen_dir: the generator's folder.
    mesh: the device mesh.
    backend: the platform kernels.
    provenance: (config, generator record) -> the synthetic set's provenance.
    key: what the stage's outputs depend on beyond the config (the run's synthetic provenance):
      a finished stage with the same key is skipped.
  """
  udir = run.path('utility')
  out_path = os.path.join(udir, 'utility.json')
  want = dict(config_hash=config_lib.config_hash(config), **key)
  if os.path.isfile(out_path):
    done = fileio.read_json(out_path)
    if done.get('key') == want:
      progress.log(f'[utility] already complete ({out_path}); skipping')
      return done
  os.makedirs(udir, exist_ok=True)
  k = data.num_classes
  names = list(data.dataset.class_names)
  counts = full_counts(data)

  # The synthetic copy of the training split: every class at its real count.
  gen_info, handle = generator.train(config, gen_dir, data, mesh, counts, backend)
  prov = dict(provenance(config, gen_info), purpose='tstr', counts=[counts[c] for c in range(k)])
  syn_path = os.path.join(udir, SET_NAME)
  syn = common.ensure_synthetic(
    syn_path, prov, counts, lambda labels: (generator.synthesize(config, handle, data, labels), None),
    '[utility]', 'a synthetic copy of the training split',
  )  # fmt: skip

  # TSTR: the ordinary classifier trainer, on the synthetic set alone.
  progress.log('[utility] TSTR: training a classifier on synthetic images only, testing on real')
  tstr = classifier.train_and_evaluate(tstr_config(config, syn_path), os.path.join(udir, 'tstr'), backend)
  check = provenance_check(tstr, syn, data.dataset.splits['train'])

  # TRTR: the same config on the real training split alone (shared across generators).
  path, trtr_cfg = trtr_dir(config, run.workdir)
  progress.log(f'[utility] TRTR: the classifier trained on real images only, in {path}')
  with _waiting_lock(path):
    trtr = classifier.train_and_evaluate(trtr_cfg, path, backend)

  # TRTS: the real-trained classifiers tested on the synthetic copy.
  model, variables, _ = features_lib.load_classifier(os.path.join(path, 'export'))
  thr = trtr['test'].get('youden', {}).get('threshold')
  trts = _metrics(_predictor(model, variables, config, mesh)(syn), syn, config, names, thr)
  ref_model, ref_vars, ref_info = reference.reference_network(config, run.workdir, backend)
  ref_predict = _predictor(ref_model, ref_vars, config, mesh)
  test = data.dataset.splits['test']
  trts_ref = _metrics(ref_predict(syn), syn, config, names)
  trtr_ref = _metrics(ref_predict(test), test, config, names)

  epochs = f'{config.num_epochs} epoch' + ('s' if config.num_epochs != 1 else '')
  model_desc = f'{config.model.name} (width {config.model.width}), {epochs}, seed {config.seed}'
  ref_desc = (
    f'the reference network (ResNet-18 width {ref_info["model"]["width"]}), trained on the real full training split'
  )
  record = dict(
    key=want,
    synthetic_set=dict(
      path=os.path.relpath(syn_path, run.workdir),
      count=int(len(syn)),
      per_class={names[c]: int(n) for c, n in counts.items()},
      provenance=prov,
      derived_from_real=derived_from_real(config, data, counts),
    ),
    tstr=dict(
      network=f'{model_desc}, trained on the synthetic copy only',
      workdir=os.path.relpath(os.path.join(udir, 'tstr'), run.workdir),
      trained_on=tstr['data']['counts']['trained_on'],
      val=tstr['val'],
      test=tstr['test'],
    ),
    trtr=dict(
      network=f'{model_desc}, trained on the real training split only',
      workdir=path,
      trained_on=trtr['data']['counts']['trained_on'],
      val=trtr['val'],
      test=trtr['test'],
    ),
    trts=dict(network='the TRTR classifier (above), tested on the synthetic copy', test=trts),
    trts_reference=dict(network=f'{ref_desc}, tested on the synthetic copy', path=ref_info['path'], test=trts_ref),
    trtr_reference=dict(network=f'{ref_desc}, tested on the real test split', path=ref_info['path'], test=trtr_ref),
    provenance_check=check,
  )
  if jax.process_index() == 0:
    fileio.atomic_write_json(out_path, record)
  t = record['tstr']['test']['threshold_0.5']
  progress.log(
    f'[utility] TSTR test auroc {t["auroc"]:.4f} bal. acc {t["balanced_accuracy"]:.4f}; TRTR test auroc'
    f' {trtr["test"]["threshold_0.5"]["auroc"]:.4f}; TRTS auroc {trts["threshold_0.5"]["auroc"]:.4f} -> {out_path}'
  )
  return record
