"""Losses: weighted and focal cross-entropy (the imbalance methods that live in the loss).

Class weights reach the loss as a per-example weight (the weight of the
example's class), and the weighted mean divides by the sum of weights, as
PyTorch's `CrossEntropyLoss(weight=...)` does, so results compare with
PyTorch implementations of the same methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_per_example(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """[B] cross-entropy of integer labels, with optional label smoothing."""
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(onehot * logp, axis=-1)


def focal_per_example(logits: jax.Array, labels: jax.Array, gamma: float, label_smoothing: float = 0.0) -> jax.Array:
  """[B] focal loss (Lin et al. 2017): (1 - p_t)^gamma * cross-entropy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp_t = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  p_t = jnp.exp(logp_t)
  ce = cross_entropy_per_example(logits, labels, label_smoothing)
  return (1.0 - p_t) ** gamma * ce


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def classification_loss(logits, labels, weights, *, name: str = 'ce', focal_gamma: float = 2.0,
                        label_smoothing: float = 0.0) -> jax.Array:  # fmt: skip
  """The configured classification loss, averaged with per-example weights.

  Args:
    logits: [B, K].
    labels: [B] integer classes.
    weights: [B] per-example weights (class weights looked up by label; 1 if none).
    name: 'ce' or 'focal'.
    focal_gamma: the focusing parameter of the focal loss.
    label_smoothing: uniform label smoothing.

  Returns:
    A scalar loss.
  """
  if name == 'ce':
    per_example = cross_entropy_per_example(logits, labels, label_smoothing)
  elif name == 'focal':
    per_example = focal_per_example(logits, labels, focal_gamma, label_smoothing)
  else:
    raise ValueError(f'unknown loss {name!r}')
  return weighted_mean(per_example, weights)
