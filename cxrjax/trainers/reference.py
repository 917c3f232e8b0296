"""The reference feature network: a fixed classifier trained once per dataset, as a feature extractor.

FID, KID, precision/recall, the feature-space memorization audit and SMOTE in
feature space (`rebalance.smote_space='feature'`) need an image embedding.
ImageNet Inception weights cannot be downloaded here, and an ImageNet embedding
says little about 28-pixel X-rays anyway, so cxrjax trains a fixed reference
classifier (ResNet-18, `quality.reference_width`) on the real, full training
split once per dataset, and uses its globally pooled last feature map
(`cxrjax.eval.features`). It is shared by every experiment under the same
parent folder, so numbers are comparable across methods and seeds; the metrics
record names it.

This workflow sits above the classifier trainer (it runs it), so the data layer
never imports it: `common.prepare_data` receives `feature_encoder` from its
caller, and the trainer registry (`cxrjax.trainers.TRAINERS`) supplies it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import ml_collections
import numpy as np

from cxrjax import config_lib, fileio, progress
from cxrjax.backends.base import Backend
from cxrjax.eval import features
from cxrjax.trainers import classifier


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference classifier's config: same data, the real training split (capped by quality.reference_limit_train), fixed seed."""
  ref = config_lib.base_config()
  ref.data = copy.deepcopy(config.data)
  ref.data.limit_train = config.quality.reference_limit_train
  ref.data.limit_eval = 0
  ref.data.test_prevalence = ''  # an evaluation choice: one reference network whatever the test mix
  ref.imbalance.ratio = 0.0  # the real training split as published
  ref.seed = 0  # fixed: one reference for every experiment seed
  ref.model.name = 'resnet18'
  ref.model.width = config.quality.reference_width
  ref.num_epochs = config.quality.reference_epochs
  ref.batch_size = config.batch_size
  ref.eval_batch_size = config.eval_batch_size
  ref.mesh = copy.deepcopy(config.mesh)
  ref.profile = config.profile
  return config_lib.finalize(ref)


def reference_dir(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(folder, config) of the reference classifier: `quality.reference_dir`, else `_reference-<hash>` beside workdir."""
  ref = reference_config(config)
  if config.quality.reference_dir:
    return config.quality.reference_dir, ref
  parent = os.path.dirname(os.path.abspath(workdir))
  return os.path.join(parent, f'_reference-{config_lib.config_hash(ref)}'), ref


def reference_network(config: ml_collections.ConfigDict, workdir: str, backend: Backend | None = None):
  """(model, variables, info) of the reference classifier, training it (on `backend`) on first use."""
  path, ref = reference_dir(config, workdir)
  export = os.path.join(path, 'export')
  if not os.path.isfile(os.path.join(export, 'model.json')):
    progress.log(f'[quality] training the reference feature network in {path}')
    classifier.train_and_evaluate(ref, path, backend)
  model, variables, info = features.load_classifier(export)
  metrics = fileio.read_json(os.path.join(path, 'metrics.json'))
  info['path'] = path
  info['test_auroc'] = metrics['test']['threshold_0.5']['auroc']
  return model, variables, info


def feature_encoder(
  config: ml_collections.ConfigDict, workdir: str, backend: Backend | None = None
) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [N, H, W, C] -> [N, D] reference-network features (trains the network on first use).

  The `feature_encoder` that `common.prepare_data` calls when SMOTE searches
  neighbours in feature space.
  """
  model, variables, _ = reference_network(config, workdir, backend)
  return lambda images: features.extract(model, variables, images)
