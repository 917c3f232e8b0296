"""Weighted and focal cross-entropy against hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax import losses


def test_weighted_ce_matches_pytorch_convention():
  logits = np.array([[2.0, 0.5], [0.1, 1.0], [0.3, 0.2]])
  labels = np.array([0, 1, 1])
  class_w = np.array([0.25, 0.75])
  w = class_w[labels]
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ce = -np.log(p[np.arange(3), labels])
  expected = (w * ce).sum() / w.sum()  # torch.nn.CrossEntropyLoss(weight=class_w)
  got = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w), name='ce')
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_focal_matches_hand_computation_and_reduces_to_ce():
  logits = np.array([[2.0, -1.0], [0.0, 0.4]])
  labels = np.array([0, 0])
  p_t = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[np.arange(2), labels]
  expected = np.mean((1 - p_t) ** 2 * -np.log(p_t))
  ones = jnp.ones(2)
  got = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), ones, name='focal', focal_gamma=2.0)
  assert float(got) == pytest.approx(expected, rel=1e-6)
  g0 = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), ones, name='focal', focal_gamma=0.0)
  ce = losses.classification_loss(jnp.asarray(logits), jnp.asarray(labels), ones, name='ce')
  assert float(g0) == pytest.approx(float(ce), rel=1e-6)


def test_label_smoothing():
  logits = np.array([[1.0, 0.0, -1.0]])
  logp = logits - np.log(np.exp(logits).sum())
  target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  got = losses.cross_entropy_per_example(jnp.asarray(logits), jnp.asarray([0]), 0.1)
  assert float(got[0]) == pytest.approx(-(target * logp).sum(), rel=1e-6)
