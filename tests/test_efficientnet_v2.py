"""EfficientNetV2: published parameter counts, shapes, stochastic depth, a training step that learns."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrjax.models import efficientnet_v2 as effnet

from conftest import normal


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# 1000 classes, 3 input channels; only 'params' (BN scale and bias included, running
# statistics not), as PyTorch's parameters(). S, M, L: the num_params of torchvision's
# efficientnet_v2_{s,m,l} weights (the automl architecture, as timm's tf_efficientnetv2_*).
# B0: timm's tf_efficientnetv2_b0 (its model card rounds to 7.1M).
@pytest.mark.parametrize(
  'variant, expected',
  [('b0', 7_139_704), ('s', 21_458_488), ('m', 54_139_356), ('l', 118_515_272)],
)
def test_parameter_count_matches_published(variant, expected):
  model = effnet.efficientnet_v2(1000, variant)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert count(shapes['params']) == expected


def test_round_filters_as_reference():
  assert effnet.round_filters(1280, 1.0) == 1280
  assert effnet.round_filters(24, 0.25) == 8  # never below the divisor
  assert effnet.round_filters(112, 1.1) == 120  # 123.2 -> nearest multiple of 8
  assert effnet.round_filters(16, 1.2) == 16  # 19.2 rounds down: no 10% guard in the reference
  assert effnet.round_repeats(3, 1.1) == 4  # ceil


# A shallow, narrow S: one block per stage except two in the last, which still has a
# residual FusedMBConv (stage 1) and a residual MBConv with squeeze-excitation (stage 6).
TINY = dict(variant='s', width=0.25, depth=0.1, stem_stride=1)


@pytest.fixture(scope='module')
def tiny():
  """Variables of the tiny model and jitted eval/train forwards, compiled once for the module."""
  # Head dropout off, so any rng dependence in training comes from dropped residual branches.
  model = effnet.efficientnet_v2(3, **TINY, drop_path_rate=0.5, dropout_rate=0.0)
  x = normal(1, (4, 32, 32, 1))
  # Compiling threefry for every parameter's initialiser dominates this module's time on
  # CPU; the RngBitGenerator-based key compiles in about half the time.
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl='unsafe_rbg'), x)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))
  train = jax.jit(
    lambda v, x, key: model.apply(v, x, train=True, mutable=['batch_stats', 'intermediates'], rngs={'dropout': key})
  )
  return variables, x, evaluate, train


def test_forward_shapes_and_cam_features(tiny):
  variables, x, evaluate, train = tiny
  for logits, state in (evaluate(variables, x), train(variables, x, jax.random.key(2))):
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    (fmap,) = state['intermediates']['cam_features']
    # Stride-1 stem and 16x downsampling in the stages; head of 1280 * 0.25 channels.
    assert fmap.shape == (4, 2, 2, 320)
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_default_stem_dtype_and_input_channels():
  model = effnet.efficientnet_v2(2, variant='b0', width=0.25, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 64, 64, 3))
  logits, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False, mutable=True))
  assert variables['intermediates']['cam_features'][0].shape == (1, 2, 2, 320)  # 64 / 32
  assert variables['intermediates']['cam_features'][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  assert {p.dtype for p in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.float32)}


def test_stochastic_depth_only_in_training(tiny):
  variables, x, evaluate, train = tiny
  a, b = (np.asarray(train(variables, x, jax.random.key(seed))[0]) for seed in (0, 1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, np.asarray(train(variables, x, jax.random.key(0))[0]))
  np.testing.assert_array_equal(evaluate(variables, x)[0], evaluate(variables, x)[0])


def test_adam_steps_lower_the_loss(tiny):
  variables, x, _, _ = tiny
  # No stochastic depth, no dropout: training must not depend on the rng (checked below).
  model = effnet.efficientnet_v2(3, **TINY, drop_path_rate=0.0, dropout_rate=0.0)
  labels = jnp.array([0, 1, 2, 1])
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, batch_stats, opt_state, key):
    def loss_fn(p):
      logits, state = model.apply(
        {'params': p, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))
  with_other_key = step(*state, jax.random.key(99))
  losses = []
  for i, key in enumerate(jax.random.split(jax.random.key(3), 10)):
    *state, loss = step(*state, key)
    if i == 0:
      jax.tree.map(np.testing.assert_array_equal, (*state, loss), with_other_key)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
