"""The CPU backend's kernels and layers (cxrjax/backends/cpu) against XLA, flax and optax, and when a run gets them.

Covered: oneDNN's convolutions (every pass, to second order), transposed convolutions and
BatchNorm; the spatial-first GroupNorm; the bfloat16 convolution formulations
(`strided_conv`, `subpixel_conv`, depthwise taps); the fused Adam; whole models built
with `cxrjax.backends.cpu.layers.LAYERS` against the same models on the stock layers
(one init, so the same parameters); and `cxrjax.backends.select`'s choice.

Tolerances. float32: both sides sum the same float32 products in different orders,
so results differ by rounding only; 2e-5 of the output's largest magnitude covers
sums of up to a few thousand terms (float32's unit roundoff is 6e-8 and rounding
errors of a sum of m terms grow about as sqrt(m), at worst as m). Where a test
compares more (whole training steps, many layers deep) its own comment says why.
bfloat16: unit roundoff u = 2^-8, so results are compared against the worst-case
bound for sums rounded in bfloat16: an output made of m products is off the exact
sum by at most (m + 1) u sum|terms| (the products' roundings, the m - 1 additions'
and the output's own), sum|terms| being the same convolution of the absolute values;
two such computations differ by at most twice that.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from cxrjax import backends
from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import layers as cpu_layers
from cxrjax.backends.cpu import onednn, strided_conv, subpixel_conv
from cxrjax.backends.cpu.backend import CpuBackend
from cxrjax.errors import UserError
from cxrjax.models import efficientnet_v2, resnet
from cxrjax.models import layers as stock_layers

from conftest import init_variables, normal

_DN = ('NHWC', 'HWIO', 'NHWC')
RTOL = 2e-5


@pytest.fixture(autouse=True)
def _extension_loaded():  # the kernels assume `load()` (which `CpuBackend()` calls) has registered them
  onednn.load()


# (batch, size, in, out, kernel, stride, padding): odd and even kernels, strides 1 and 2,
# 1x1 projections, asymmetric and zero padding, and a non-square input.
GEOMETRIES = [
  (3, (9, 9), 3, 5, 3, 1, ((1, 1), (1, 1))),
  (3, (9, 7), 3, 5, 3, 2, ((1, 1), (1, 1))),
  (2, (8, 8), 4, 6, 4, 2, ((1, 1), (1, 1))),
  (2, (7, 7), 4, 6, 1, 2, ((0, 0), (0, 0))),
  (2, (6, 6), 3, 2, 3, 1, ((0, 2), (1, 0))),
  (2, (10, 10), 16, 8, 5, 1, ((2, 2), (2, 2))),
]


def _close(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(np.max(np.abs(b))))


def _xla(x, w, s, p):
  return lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=_DN)


def test_auto_uses_onednn_on_one_cpu_device():
  # The test command installs the `onednn` extra, so here 'auto' must find and build it.
  backend = backends.select('auto')
  assert isinstance(backend, CpuBackend), backend.why
  assert backend.kernels.startswith('oneDNN 3.') and 'libdnnl.so.3' in backend.kernels
  assert backend.layers is cpu_layers.LAYERS
  assert backend.describe().startswith(f'cpu ({backend.kernels}; fused Adam)')
  assert isinstance(backends.select('cpu'), CpuBackend)
  stock = backends.select('stock')
  assert type(stock) is Backend and stock.layers is stock_layers.STOCK and not stock.why
  with pytest.raises(UserError, match="kernels: expected one of auto, stock, cpu, got 'fast'"):
    backends.select('fast')


@pytest.mark.parametrize('geometry', GEOMETRIES, ids=lambda g: f'k{g[4]}s{g[5]}p{g[6]}')
def test_every_pass_matches_xla(geometry):
  n, hw, c, o, k, s, p = geometry
  x = normal(0, (n, *hw, c))
  w = normal(1, (k, k, c, o))
  onednn.load()

  def loss(conv):
    return jax.jit(lambda x, w: jnp.sum(jnp.sin(conv(x, w))))

  ref = lambda x, w: _xla(x, w, s, p)  # noqa: E731
  new = lambda x, w: onednn.conv(x, w, (s, s), p)  # noqa: E731
  _close(jax.jit(new)(x, w), _xla(x, w, s, p))
  for a, b in zip(jax.grad(loss(new), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    _close(a, b)

  # Gradients of gradients (an R1-style penalty): each pass's VJP is made of the others.
  def penalty(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, w))))(x) ** 2), (0, 1)))

  for a, b in zip(penalty(new)(x, w), penalty(ref)(x, w)):
    _close(a, b)


# (batch, size, channels, groups, out, kernel, stride): depthwise (EfficientNet's 3x3 and
# 5x5, strides 1 and 2; one with a channel multiplier of 2) and a two-group convolution.
GROUPED = [
  (2, (9, 9), 8, 8, 8, 3, 1),
  (2, (9, 7), 8, 8, 8, 5, 2),
  (2, (8, 8), 4, 4, 8, 3, 1),
  (2, (7, 7), 6, 2, 4, 3, 2),
]


@pytest.mark.parametrize('geometry', GROUPED, ids=lambda g: f'c{g[2]}g{g[3]}o{g[4]}k{g[5]}s{g[6]}')
def test_grouped_passes_match_xla(geometry):
  n, hw, c, groups, o, k, s = geometry
  p = ((k // 2, k // 2),) * 2
  x = normal(0, (n, *hw, c))
  w = normal(1, (k, k, c // groups, o))

  def ref(x, w):
    return lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=_DN, feature_group_count=groups)

  def new(x, w):
    return onednn.conv(x, w, (s, s), p, groups=groups)

  def loss(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))

  _close(jax.jit(new)(x, w), ref(x, w))
  for a, b in zip(loss(new)(x, w), loss(ref)(x, w)):
    _close(a, b)
  hlo = loss(new).lower(x, w).compile().as_text()
  assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 3 and ' convolution(' not in hlo


def test_onednn_is_deterministic():
  # Resumed runs are compared bit for bit with uninterrupted ones.
  x = normal(0, (8, 14, 14, 32))
  w = normal(1, (3, 3, 32, 32))
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(onednn.conv(x, w, (1, 1), ((1, 1), (1, 1))) ** 2), (0, 1)))
  first, second = f(x, w), f(x, w)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_drop_in_falls_back_where_onednn_does_not_apply():
  x = normal(0, (2, 8, 8, 4))
  w = normal(1, (3, 3, 4, 4))
  cases = [
    dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), rhs_dilation=(2, 2)),
    dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2)),
    dict(window_strides=(1, 1), padding=((-1, 0), (0, 0))),  # negative padding crops
  ]
  for kw in cases:
    out = onednn.conv_general_dilated(x, w, dimension_numbers=_DN, **kw)
    np.testing.assert_array_equal(out, lax.conv_general_dilated(x, w, dimension_numbers=_DN, **kw))
  # Feature groups (depthwise here) stay on oneDNN; batch groups do not.
  depthwise = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                                               feature_group_count=4))  # fmt: skip
  assert onednn.TARGET in depthwise.lower(x, w[:, :, :1]).as_text()
  _close(depthwise(x, w[:, :, :1]), lax.conv_general_dilated(x, w[:, :, :1], (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=_DN, feature_group_count=4))  # fmt: skip
  batch_grouped = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=_DN, batch_group_count=2)
  np.testing.assert_array_equal(onednn.conv_general_dilated(x, w[:, :, :, :2], **batch_grouped),
                                lax.conv_general_dilated(x, w[:, :, :, :2], **batch_grouped))  # fmt: skip
  # 'SAME' / 'VALID' (nn.Conv's default) become explicit pairs and stay on oneDNN.
  for pad, s in (('SAME', 1), ('SAME', 2), ('VALID', 2)):
    f = jax.jit(lambda x, w, pad=pad, s=s: onednn.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=_DN))
    assert onednn.TARGET in f.lower(x, w).as_text()
    _close(f(x, w), lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=_DN))
  bf16 = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN))
  hlo = bf16.lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
  assert onednn.TARGET not in hlo and 'convolution' in hlo
  nchw = onednn.conv_general_dilated(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))  # fmt: skip
  _close(nchw.transpose(0, 2, 3, 1), _xla(x, w, 1, ((1, 1), (1, 1))))


def _value_and_vjp(f):
  """Jitted (x, w, g) -> (f(x, w), d<f(x, w), g>/dx, d<f(x, w), g>/dw)."""
  return jax.jit(lambda x, w, g: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, x, w)))


# (x shape, kernel shape, stride, padding, feature groups, the formulation it must take):
# ResNet's 3x3 and 1x1 downsampling (odd kernels), the DCGAN discriminator's 4x4 (even),
# EfficientNet's 3x3 and 5x5 depthwise convolutions (the k*k shifted multiply-adds).
BF16_ROUTES = [
  ((2, 9, 7, 4), (3, 3, 4, 5), 2, 1, 1, strided_conv.strided_conv),
  ((2, 8, 6, 4), (1, 1, 4, 5), 2, 0, 1, strided_conv.strided_conv),
  ((2, 8, 8, 3), (4, 4, 3, 6), 2, 1, 1, subpixel_conv.conv_2x),
  ((2, 9, 9, 8), (3, 3, 1, 8), 1, 1, 8, 'taps'),
  ((2, 9, 7, 8), (5, 5, 1, 8), 2, 2, 8, 'taps'),
]


@pytest.mark.parametrize('route', BF16_ROUTES, ids=lambda r: f'k{r[1][0]}s{r[2]}g{r[4]}')
def test_bfloat16_convolutions_take_the_xla_formulations(route):
  # Off oneDNN (not float32) the CPU layers' convolution avoids the lhs-dilated convolutions
  # that autodiff of a strided convolution emits (slow in XLA's CPU backend), and that XLA's
  # grouped convolution would run; it computes lax's function to bfloat16 rounding.
  x_shape, w_shape, s, p, groups, formulation = route
  x, w = normal(0, x_shape).astype(jnp.bfloat16), normal(1, w_shape).astype(jnp.bfloat16)
  args = dict(window_strides=(s, s), padding=((p, p), (p, p)), dimension_numbers=_DN, feature_group_count=groups)

  def ours(x, w):
    return cpu_layers.conv_general_dilated(x, w, **args)

  def ref(x, w):
    return lax.conv_general_dilated(x, w, **args)

  g = normal(2, jax.eval_shape(ref, x, w).shape).astype(jnp.bfloat16)
  backward = str(jax.make_jaxpr(lambda x, w, g: _value_and_vjp(ours)(x, w, g))(x, w, g))
  assert 'lhs_dilation=(2, 2)' not in backward
  if s == 2:  # what it avoids: stock's input gradient of a strided convolution
    assert 'lhs_dilation=(2, 2)' in str(jax.make_jaxpr(lambda x, w, g: _value_and_vjp(ref)(x, w, g))(x, w, g))
  if formulation == 'taps':
    assert 'conv_general_dilated' not in backward
  else:
    assert str(jax.make_jaxpr(ours)(x, w)) == str(jax.make_jaxpr(formulation)(x, w))

  # Elementwise bounds (module docstring): each side is within (m + 1) u sum|terms| of the
  # exact result, sum|terms| being the same float32 computation on absolute values.
  def f32(x, w):
    return lax.conv_general_dilated(x, w, **args)

  ax, aw, ag = (jnp.abs(a.astype(jnp.float32)) for a in (x, w, g))
  terms = (f32(ax, aw), jax.vjp(lambda x: f32(x, aw), ax)[1](ag)[0], jax.vjp(lambda w: f32(ax, w), aw)[1](ag)[0])
  kh, kw, cin, cout = w_shape
  n, oh, ow, _ = g.shape
  counts = (kh * kw * cin, kh * kw * cout // groups, n * oh * ow)  # products per output, dx and dw element
  u = 2.0**-8
  for got, want, t, m in zip(_value_and_vjp(ours)(x, w, g), _value_and_vjp(ref)(x, w, g), terms, counts):
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    assert np.all(err <= 2 * (m + 1) * u * np.asarray(t)), float(np.max(err / (np.asarray(t) + 1e-30)))


@pytest.mark.parametrize('k,ci,co,h', [(4, 5, 3, 4), (4, 6, 7, 5), (2, 3, 5, 3), (6, 4, 2, 3)])
def test_stride_2_transposed_convolutions_agree(k, ci, co, h):
  # PyTorch's ConvTranspose2d(k, 2, k/2 - 1) three ways: stock (XLA's lhs-dilated convolution
  # with the flipped kernel), the sub-pixel form, and the CPU layers' (float32: oneDNN's input
  # gradient of the strided convolution). Values, gradients and gradients of gradients.
  x, w = normal(0, (3, h, h, ci)), normal(1, (k, k, ci, co))
  g = normal(2, (3, 2 * h, 2 * h, co))

  def penalty(f):  # an R1-style penalty: each pass's VJP goes through the others
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(f(x, w))))(x) ** 2), (0, 1)))

  want = _value_and_vjp(stock_layers.conv_transpose_2x)(x, w, g)
  want_penalty = penalty(stock_layers.conv_transpose_2x)(x, w)
  assert want[0].shape == (3, 2 * h, 2 * h, co)
  for f in (subpixel_conv.conv_transpose_2x, cpu_layers.conv_transpose_2x):
    for a, b in zip(_value_and_vjp(f)(x, w, g), want):
      _close(a, b)
    for a, b in zip(penalty(f)(x, w), want_penalty):
      _close(a, b)
  hlo = _value_and_vjp(cpu_layers.conv_transpose_2x).lower(x, w, g).compile().as_text()
  assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 3 and ' convolution(' not in hlo


def _twin_variables(models, x):
  """Variables initialised by the stock model, after checking the CPU layers' model makes the same tree."""
  variables = init_variables(models['stock'], jax.random.key(1), x, train=False)
  cpu_shapes = jax.eval_shape(lambda: models['cpu'].init(jax.random.key(1), x, train=False))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), cpu_shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  return variables


LAYERS = {'stock': stock_layers.STOCK, 'cpu': cpu_layers.LAYERS}


def _train_loss(model, variables, x, labels):
  """Jitted params -> ((cross-entropy in training mode, new batch_stats), gradients)."""

  def f(params):
    logits, stats = model.apply(dict(variables, params=params), x, train=True, mutable=['batch_stats'])
    return jnp.mean(-jnp.take_along_axis(nn.log_softmax(logits), labels[:, None], 1)), stats

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_resnet_on_cpu_layers_matches_stock():
  # Same parameters (checkpoints interchangeable), same logits and gradients, and
  # every convolution of the training step is the custom call.
  x = normal(0, (4, 16, 16, 1))
  labels = jnp.array([0, 1, 0, 1])
  models = {name: resnet.resnet18(2, width=8, layers=layers) for name, layers in LAYERS.items()}
  variables = _twin_variables(models, x)
  loss = {name: _train_loss(m, variables, x, labels) for name, m in models.items()}
  (lx, _), gx = loss['stock'](variables['params'])
  (lo, _), go = loss['cpu'](variables['params'])
  np.testing.assert_allclose(lo, lx, rtol=1e-5)
  stats = {
    name: m.apply(variables, x, train=True, mutable=['batch_stats'])[1]['batch_stats'] for name, m in models.items()
  }
  assert jax.tree.structure(stats['cpu']) == jax.tree.structure(stats['stock'])
  for a, b in zip(jax.tree.leaves(stats['cpu']), jax.tree.leaves(stats['stock'])):
    _close(a, b)
  # Rounding differences pass through 20 BatchNorms' backward passes, hence 1e-4 rather than RTOL.
  for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.max(np.abs(b))) + 1e-7)
  hlo = loss['cpu'].lower(variables['params']).compile().as_text()
  # 20 convolutions, 3 passes each, but the stem has no input gradient; 20 BatchNorms,
  # forward and backward each.
  assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 20 * 3 - 1
  assert hlo.count(f'custom_call_target="{onednn.BN_FORWARD}"') == 20
  assert hlo.count(f'custom_call_target="{onednn.BN_BACKWARD}"') == 20
  assert ' convolution(' not in hlo


def test_efficientnet_v2_on_cpu_layers_matches_stock():
  # The convolutions (depthwise ones included) and the BatchNorms move to oneDNN; the
  # parameters, the logits, the batch statistics and the gradients stay stock's to rounding.
  # Stochastic depth and dropout off, so both sides compute the same function.
  x = normal(0, (4, 16, 16, 1))
  labels = jnp.array([0, 1, 0, 1])
  models = {
    name: efficientnet_v2.efficientnet_v2(
      2, 'b0', width=0.25, depth=0.25, stem_stride=1, drop_path_rate=0.0, dropout_rate=0.0, layers=layers
    )
    for name, layers in LAYERS.items()
  }
  variables = _twin_variables(models, x)
  loss = {name: _train_loss(m, variables, x, labels) for name, m in models.items()}
  (lx, sx), gx = loss['stock'](variables['params'])
  (lo, so), go = loss['cpu'](variables['params'])
  np.testing.assert_allclose(lo, lx, rtol=0, atol=1e-5)  # absolute: this loss is near 0 (about 7e-3)
  for a, b in zip(jax.tree.leaves(so), jax.tree.leaves(sx)):
    # Some running means are of order 1e-8 on both sides (rounding noise), so the floor is
    # absolute, at rounding level for O(1) activations.
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * float(np.max(np.abs(b))) + 1e-6)
  # 25 x RTOL: rounding differences are amplified through the backward passes of 22 BatchNorms,
  # each dividing by batch standard deviations that are small for some channels at 4 x 16 x 16
  # samples; a wrong pass is O(1) off. Some leaves' gradients are of order 1e-7 on both sides
  # (rounding noise), hence the floor.
  for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-4 * float(np.max(np.abs(b))) + 1e-6)
  hlo = loss['cpu'].lower(variables['params']).compile().as_text()
  num_bn = len(jax.tree.leaves(variables['batch_stats'])) // 2  # a mean and a variance per BatchNorm
  assert num_bn > 0
  assert hlo.count(f'custom_call_target="{onednn.BN_FORWARD}"') == num_bn
  assert hlo.count(f'custom_call_target="{onednn.BN_BACKWARD}"') == num_bn
  # Stem, expansions, depthwise, projections and head: every kernel but the
  # squeeze-excitation's, each with its three passes.
  convs = [
    path for path, _ in jax.tree_util.tree_leaves_with_path(variables['params'])
    if path[-1].key == 'kernel' and 'conv' in str(path[-2].key)
  ]  # fmt: skip
  assert any('depthwise' in str(path[-2].key) for path in convs)
  assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 3 * len(convs) - 1  # the stem has no input gradient


def _fresh(code: str, **env) -> dict:
  proc = subprocess.run([sys.executable, '-c', code], env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=300)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_falls_back_with_a_reason_and_onednn_insists(tmp_path):
  # In a fresh interpreter: this one has loaded the extension already (`load` is cached).
  code = """
import json
from cxrjax import backends
from cxrjax.errors import UserError
auto = backends.select('auto')
out = dict(auto=[auto.name, auto.why, type(auto).__name__])
try:
  backends.select('cpu')
except UserError as e:
  out['cpu'] = str(e)
print(json.dumps(out))
"""
  # Several devices: a custom call is not partitioned, so the run stays stock.
  many = _fresh(code, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  assert many['auto'][0] == 'stock' and many['auto'][2] == 'Backend', many
  assert many['auto'][1].startswith('kernels=auto: CPU kernels not used') and '8 forced CPU devices' in many['auto'][1]
  assert many['cpu'].startswith('kernels=cpu is not available: 8 forced CPU devices'), many
  # No library (or no wheel): the build cannot happen, and the reason is recorded.
  missing = _fresh(code, XLA_FLAGS='', CXRJAX_ONEDNN_LIB=str(tmp_path / 'libdnnl.so.3'),
                   CXRJAX_CACHE_DIR=str(tmp_path / 'cache'))  # fmt: skip
  assert missing['auto'][0] == 'stock' and 'libdnnl.so.3' in missing['auto'][1], missing
  assert missing['cpu'].startswith('kernels=cpu is not available:') and 'libdnnl.so.3' in missing['cpu'], missing


def _grads_close(fn_stock, fn_cpu, params, rtol=1e-4):
  """Loss and gradients of two jitted losses agree: rounding differences, a few layers deep, within `rtol`."""
  (lx, gx), (lo, go) = jax.jit(jax.value_and_grad(fn_stock))(params), jax.jit(jax.value_and_grad(fn_cpu))(params)
  np.testing.assert_allclose(lo, lx, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(np.max(np.abs(b))) + 1e-7)


def test_dcgan_on_cpu_layers_matches_stock():
  # The generator's transposed convolutions are oneDNN's input gradient of a strided
  # convolution, the discriminator's strided ones its forward pass; stock's are XLA's
  # lhs-dilated and strided convolutions.
  from cxrjax.models.dcgan import Discriminator, Generator  # noqa: PLC0415

  z = normal(0, (4, 16))
  gens = {
    n: Generator(image_size=28, latent_dim=16, base_width=8, num_classes=2, layers=ly) for n, ly in LAYERS.items()
  }
  discs = {n: Discriminator(image_size=28, base_width=8, num_classes=2, layers=ly) for n, ly in LAYERS.items()}
  labels = jnp.array([0, 1, 1, 0])
  images = jnp.zeros((4, 28, 28, 1))
  gv = init_variables(gens['stock'], jax.random.key(1), z, labels, train=False)
  dv = init_variables(discs['stock'], jax.random.key(2), images, labels, train=False)
  for model, variables, x in ((gens['cpu'], gv, z), (discs['cpu'], dv, images)):
    shapes = jax.eval_shape(lambda model=model, x=x: model.init(jax.random.key(1), x, labels, train=False))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)

  def loss(name):
    def f(params):
      gp, dp = params
      img, _ = gens[name].apply(dict(gv, params=gp), z, labels, train=True, mutable=['batch_stats'])
      logits, _ = discs[name].apply(dict(dv, params=dp), img, labels, train=True, mutable=['batch_stats'])
      return jnp.mean(jax.nn.softplus(-logits))

    return f

  _grads_close(loss('stock'), loss('cpu'), (gv['params'], dv['params']))
  train_hlo = jax.jit(jax.grad(loss('cpu'))).lower((gv['params'], dv['params'])).as_text()
  assert onednn.BN_FORWARD in train_hlo and onednn.BN_BACKWARD in train_hlo  # G's and D's BatchNorms
  img = gens['cpu'].apply(gv, z, labels, train=False)
  hlo = jax.jit(lambda v: gens['cpu'].apply(v, z, labels, train=False)).lower(gv).as_text()
  assert onednn.TARGET in hlo and 'convolution' not in hlo.replace(onednn.TARGET, '')
  _close(img, gens['stock'].apply(gv, z, labels, train=False))


def test_unet_on_cpu_layers_matches_stock():
  # oneDNN convolutions and the spatial-first GroupNorm against nn.Conv and nn.GroupNorm.
  from cxrjax.models.unet import UNet  # noqa: PLC0415

  x = normal(0, (2, 8, 8, 4))
  t, labels = jnp.array([3, 500]), jnp.array([0, 1])
  nets = {n: UNet(4, 2, base_channels=8, channel_mults=(1, 2), num_heads=2, layers=ly) for n, ly in LAYERS.items()}
  v = init_variables(nets['stock'], jax.random.key(1), x, t, labels)
  # conv_out starts at zero (LDM's init), which would hide the path through every other layer.
  params = jax.tree.map(lambda p: p + 0.01 if p.ndim == 4 and not p.any() else p, v['params'])

  def loss(name):
    return lambda p: jnp.mean(nets[name].apply({'params': p}, x, t, labels) ** 2)

  _grads_close(loss('stock'), loss('cpu'), params)
  hlo = jax.jit(jax.grad(loss('cpu'))).lower(params).as_text()
  assert onednn.TARGET in hlo and 'convolution' not in hlo.replace(onednn.TARGET, '')


def test_no_heap_corruption_at_64_px():
  # oneDNN 3.2's 1x1 stride-2 weight gradient overran its scratchpad at 64 px (it took
  # the process down with "free(): invalid next size"); strided 1x1 weight gradients are
  # now the stride-1 ones of every other pixel. Run in a fresh process so a crash fails
  # this test only, on the layers of a narrow 64-px ResNet-18 (the Kermany smoke run that
  # found it) and a few more.
  code = """
import json, jax, jax.numpy as jnp, numpy as np
from jax import lax
from cxrjax.backends.cpu import onednn
onednn.load()
worst = 0.0
for c, o, k, s in [(1, 4, 3, 1), (4, 4, 3, 1), (4, 8, 3, 2), (4, 8, 1, 2), (1, 4, 1, 2), (8, 16, 1, 2), (16, 32, 1, 2)]:
  p = ((k // 2, k // 2),) * 2
  x = jax.random.normal(jax.random.key(0), (32, 64, 64, c))
  w = jax.random.normal(jax.random.key(1), (k, k, c, o))
  f = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))
  for _ in range(3):
    new = f(lambda x, w: onednn.conv(x, w, (s, s), p))(x, w)
  ref = f(lambda x, w: lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
  for a, b in zip(new, ref):
    worst = max(worst, float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
print(json.dumps(dict(worst=worst)))
"""
  # Weight gradients here sum 32 * 64 * 64 = 131,072 products; rounding errors grow about as
  # the square root of the count (sqrt(131,072) x 6e-8 = 2.2e-5), so 1e-4 rather than RTOL.
  assert _fresh(code)['worst'] < 1e-4


def _bn_reference(x, scale, bias, eps, relu):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = ((x - mean) ** 2).mean(axes)
  y = (x - mean) * lax.rsqrt(var + eps) * scale + bias
  return (jnp.maximum(y, 0) if relu else y), mean, var


@pytest.mark.parametrize('shape', [(6, 5, 4, 16), (4, 3, 3, 3), (32, 7)])
@pytest.mark.parametrize('relu', [False, True])
def test_batch_norm_matches_reference_to_second_order(shape, relu):
  # Outputs, batch statistics, gradients through all three (the statistics' own
  # cotangents included) and gradients of gradients, against the same function in jnp.
  k = jax.random.split(jax.random.key(0), 3)
  c = shape[-1]
  x = jax.random.normal(k[0], shape) * 2 + 1
  scale, bias = jax.random.normal(k[1], (c,)), jax.random.normal(k[2], (c,))
  for got, want in zip(jax.jit(onednn.batch_norm_train, static_argnums=(3, 4))(x, scale, bias, 1e-5, relu),
                       _bn_reference(x, scale, bias, 1e-5, relu)):  # fmt: skip
    _close(got, want)

  def loss(f):
    def g(x, scale, bias):
      y, mean, var = f(x, scale, bias, 1e-5, relu)
      return (jnp.sin(y) * jnp.cos(x)).sum() + (mean**2).sum() + jnp.sqrt(var).sum()

    return g

  def grad_norm(f):
    return lambda *a: sum((t**2).sum() for t in jax.grad(loss(f), argnums=(0, 1))(*a))

  for make in (loss, grad_norm):
    got = jax.jit(jax.grad(make(onednn.batch_norm_train), argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.grad(make(_bn_reference), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(got, want):
      _close(a, b)


def test_batchnorm_modules_keep_flax_variables_and_updates():
  x = normal(0, (8, 5, 5, 16)) * 3 + 1
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
  variables = flax_bn.init(jax.random.key(1), x)
  want, want_stats = flax_bn.apply(variables, x, mutable=['batch_stats'])
  for name, layers in LAYERS.items():
    # use_running_average at call time, as flax allows.
    bn = layers.batch_norm(momentum=0.9, relu=True)
    shapes = jax.eval_shape(lambda bn=bn: bn.init(jax.random.key(1), x, use_running_average=False))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    f = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, use_running_average=False, mutable=['batch_stats']))
    got, stats = f(variables, x)
    assert jax.tree.structure(stats) == jax.tree.structure(want_stats)  # the oneDNN path's own variables
    assert (onednn.BN_FORWARD in f.lower(variables, x).as_text()) == (name == 'cpu')
    if name == 'stock':  # flax's own code: bit for bit with flax + ReLU, compiled alike
      flax_y, flax_stats = jax.jit(lambda v, x: (lambda y, s: (nn.relu(y), s))(
        *flax_bn.apply(v, x, mutable=['batch_stats'])))(variables, x)  # fmt: skip
      np.testing.assert_array_equal(got, flax_y)
      np.testing.assert_array_equal(stats['batch_stats']['var'], flax_stats['batch_stats']['var'])
    _close(got, nn.relu(want))
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
      _close(a, b)
  # Where oneDNN does not apply, flax's code runs: bf16 inputs, epsilon 0, empty batches.
  for bn, inp in (
    (cpu_layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16), x.astype(jnp.bfloat16)),
    (cpu_layers.BatchNorm(use_running_average=False, epsilon=0.0), x),
    (cpu_layers.BatchNorm(use_running_average=False), x[:0]),
  ):
    f = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, mutable=['batch_stats']))
    assert onednn.BN_FORWARD not in f.lower(variables, inp).as_text()


@pytest.mark.parametrize('shape,groups', [((4, 6, 5, 16), 4), ((3, 7, 8), 2), ((5, 12), 3), ((2, 3, 3, 6), 6)])
def test_group_norm_fast_path_matches_flax_to_second_order(shape, groups):
  x = normal(0, shape) * 2 + 0.5
  flax_gn = nn.GroupNorm(num_groups=groups)
  variables = flax_gn.init(jax.random.key(1), x)
  c = shape[-1]
  params = dict(scale=normal(2, (c,)), bias=normal(3, (c,)))
  fast = cpu_layers.GroupNorm(num_groups=groups)
  assert jax.tree.structure(jax.eval_shape(lambda: fast.init(jax.random.key(1), x))) == jax.tree.structure(variables)

  def loss(mod):
    return lambda x, p: jnp.sum(jnp.sin(mod.apply({'params': p}, x)) * jnp.cos(x))

  def grad_norm(mod):
    return lambda x, p: sum((t**2).sum() for t in jax.tree.leaves(jax.grad(loss(mod), (0, 1))(x, p)))

  # The fast path is taken (a different program from flax's) and computes the same function.
  assert str(jax.make_jaxpr(fast.apply)({'params': params}, x)) != str(
    jax.make_jaxpr(flax_gn.apply)({'params': params}, x)
  )
  _close(fast.apply({'params': params}, x), flax_gn.apply({'params': params}, x))
  for make in (loss, grad_norm):
    got = jax.jit(jax.grad(make(fast), (0, 1)))(x, params)
    want = jax.grad(make(flax_gn), (0, 1))(x, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      _close(a, b)
  # The stock layers' GroupNorm, and the cases the fast path does not take, are flax's own code.
  for mod, inp in (
    (stock_layers.STOCK.group_norm(num_groups=groups), x),
    (cpu_layers.GroupNorm(num_groups=groups, dtype=jnp.bfloat16), x.astype(jnp.bfloat16)),
    (cpu_layers.GroupNorm(num_groups=None, group_size=c // groups), x),
  ):
    ref = nn.GroupNorm(num_groups=mod.num_groups, group_size=mod.group_size, dtype=mod.dtype)
    np.testing.assert_array_equal(
      jax.jit(lambda p, x, mod=mod: mod.apply({'params': p}, x))(params, inp),
      jax.jit(lambda p, x, ref=ref: ref.apply({'params': p}, x))(params, inp),
    )


def test_cpu_backend_adam_is_optax_adam_with_the_fused_update():
  params = {
    'kernel': normal(0, (3, 3, 64, 64)),  # above the kernel's threading threshold
    'bias': jnp.ones((7,)),
    'half': jnp.ones((5,), jnp.bfloat16),  # not float32: optax's arithmetic in jnp
  }
  schedule = optax.cosine_decay_schedule(1e-2, 10)
  ours, ref = CpuBackend().adam(schedule, b1=0.5, b2=0.99), optax.adam(schedule, b1=0.5, b2=0.99)
  state, want_state = ours.init(params), ref.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(want_state)  # checkpoints interchangeable
  update = jax.jit(ours.update, donate_argnums=(1,))  # moments updated in place, as in the trainers
  assert onednn.ADAM in jax.jit(ours.update).lower(params, state, params).as_text()
  p, want_p = params, params
  for i in range(4):
    g = jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape, x.dtype), params)
    u, state = update(g, state, p)
    want_u, want_state = ref.update(g, want_state, want_p)
    p, want_p = optax.apply_updates(p, u), optax.apply_updates(want_p, want_u)
  # optax's arithmetic operation for operation, but XLA may contract a multiply-add that the kernel
  # rounds twice: a few float32 roundings (6e-8 each) over four steps, well inside rtol 1e-5.
  for a, b in zip(jax.tree.leaves((p, state)), jax.tree.leaves((want_p, want_state))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


def test_fused_adam_kernel_is_float32_arithmetic_bit_for_bit():
  # The kernel is compiled with -O3 -fno-math-errno (vectorised): each element must still
  # get the same float32 operations in the same order, no contraction into multiply-adds
  # and no reassociation. Lengths: a vector tail, and one above the threading threshold.
  b1, b2, eps, eps_root = 0.9, 0.999, 1e-8, 1e-10
  a1, a2 = np.float32(1 - b1), np.float32(1 - b2)
  d1, d2 = np.float32(1 - b1**3), np.float32(1 - b2**3)
  for n in (37, 50_003):
    g, m, v = (np.asarray(jax.random.normal(jax.random.key(i), (n,))) for i in range(3))
    v = np.abs(v) * np.float32(1e-3)
    f32 = np.float32
    want_m = a1 * g + f32(b1) * m
    want_v = a2 * (g * g) + f32(b2) * v
    want_u = (want_m / d1) / (np.sqrt(want_v / d2 + f32(eps_root)) + f32(eps))
    leaf = jax.jit(lambda g, m, v: onednn._adam_leaf(g, m, v, jnp.float32(d1), jnp.float32(d2), b1, b2, eps, eps_root))
    u, new_m, new_v = leaf(g, m, v)
    for got, want in ((u, want_u), (new_m, want_m), (new_v, want_v)):
      np.testing.assert_array_equal(np.asarray(got), want)


def test_fused_adam_follows_optax_arithmetic_closely():
  # Defaults (b2=0.999, where rounding 1 - b2 in float32 instead of double would show at
  # ~1e-5), tiny gradients (nu ~1e-12, so eps and eps_root matter) and eps_root != 0.
  params = {'w': jnp.zeros((40000,))}  # above the threading threshold
  ours = onednn.scale_by_adam(eps_root=1e-10)
  ref = optax.scale_by_adam(eps_root=1e-10)
  state, want_state = ours.init(params), ref.init(params)
  for i in range(3):
    g = {'w': 1e-6 * jax.random.normal(jax.random.key(i), (40000,))}
    u, state = jax.jit(ours.update)(g, state)
    want_u, want_state = ref.update(g, want_state)
    for a, b in zip(jax.tree.leaves((u, state)), jax.tree.leaves((want_u, want_state))):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
