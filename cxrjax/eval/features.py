"""Saved classifiers as feature extractors: the reference network of the quality metrics.

FID, KID, precision/recall and the feature-space memorization audit need an
image embedding. ImageNet Inception weights cannot be downloaded here, and an
ImageNet embedding says little about 28-pixel X-rays anyway, so cxrjax trains a
fixed reference classifier (ResNet-18, `quality.reference_width`) on the real,
full training split once per dataset, and uses its globally pooled last feature
map (the `cam_features` every classifier exposes). It is shared by every
experiment under the same parent folder, so numbers are comparable across
methods and seeds; the metrics record names it.
"""

from __future__ import annotations

import copy
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxrjax import checkpoint, config_lib, fileio, progress
from cxrjax.models import build_classifier


def load_classifier(export_dir: str):
  """(model, variables, info) from a classifier's `export/` folder."""
  info = fileio.read_json(os.path.join(export_dir, 'model.json'))
  model_cfg = ml_collections.ConfigDict(info['model'])
  model = build_classifier(model_cfg, info['num_classes'], tuple(info['image_shape']))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *info['image_shape'])), train=False))
  abstract = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  variables = checkpoint.load_tree(os.path.join(export_dir, 'variables'), abstract)
  return model, variables, info


@functools.lru_cache(maxsize=8)
def _feature_fn(model):
  @jax.jit
  def fn(variables, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    _, inter = model.apply(variables, x, train=False, mutable=['intermediates'])
    fmap = inter['intermediates']['cam_features'][0]
    return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))

  return fn


def extract(model, variables, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """[N, D] pooled last-layer features of uint8 images [N, H, W, C]."""
  fn = _feature_fn(model)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    n = len(chunk)
    if n < batch_size and len(images) > batch_size:  # keep one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    out.append(np.asarray(fn(variables, chunk))[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference classifier's config: same data, the real training split (capped by quality.reference_limit_train), fixed seed."""
  ref = config_lib.base_config()
  ref.data = copy.deepcopy(config.data)
  ref.data.limit_train = config.quality.reference_limit_train
  ref.data.limit_eval = 0
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
  ref = reference_config(config)
  if config.quality.reference_dir:
    return config.quality.reference_dir, ref
  parent = os.path.dirname(os.path.abspath(workdir))
  return os.path.join(parent, f'_reference-{config_lib.config_hash(ref)}'), ref


def reference_network(config: ml_collections.ConfigDict, workdir: str):
  """(model, variables, info) of the reference classifier, training it on first use."""
  path, ref = reference_dir(config, workdir)
  export = os.path.join(path, 'export')
  if not os.path.isfile(os.path.join(export, 'model.json')):
    progress.log(f'[quality] training the reference feature network in {path}')
    from cxrjax.trainers import classifier  # noqa: PLC0415 - avoids an import cycle

    classifier.train_and_evaluate(ref, path)
  model, variables, info = load_classifier(export)
  metrics = fileio.read_json(os.path.join(path, 'metrics.json'))
  info['path'] = path
  info['test_auroc'] = metrics['test']['threshold_0.5']['auroc']
  return model, variables, info
