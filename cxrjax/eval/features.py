"""Saved classifiers as feature extractors: load an exported classifier, embed images.

The embedding is a classifier's globally pooled last feature map (the
`cam_features` every classifier exposes). The quality metrics and SMOTE in
feature space use the reference classifier's (`cxrjax.trainers.reference`,
which trains it); this module only reads an `export/` folder and extracts.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxrjax import checkpoint, fileio
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
