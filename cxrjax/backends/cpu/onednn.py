"""oneDNN convolutions and batch normalization, and a fused Adam update, inside jitted JAX programs on CPU.

They are XLA FFI custom calls. The three passes of a 2-D convolution (forward,
input gradient, weight gradient) are oneDNN primitives behind one FFI target, and
`conv` wires them together with custom VJPs so that reverse mode works to any order
(each pass's VJP is made of the other two). Training-mode batch normalization
(`batch_norm_train`) is two more targets, forward (with an optional fused ReLU)
and backward: XLA runs it as several passes over the activations. A last target,
not oneDNN's, is Adam's update as one pass per parameter (`scale_by_adam`); optax's
runs as four.

Where it applies: float32 NHWC/HWIO convolutions without dilation (grouped and
depthwise ones included), in a program on one CPU device: XLA's SPMD partitioner
cannot split a custom call across devices. `cxrjax.backends.select` decides
whether a run uses this module at all.

How it is built: on first use, `g++` compiles `onednn_conv.cc` against JAX's FFI
headers and the `libdnnl.so.3` of the `onednn-cpu-gomp` wheel (the `onednn`
extra: `pip install cxrjax[onednn]`) into `~/.cache/cxrjax/onednn/`, keyed by the
source, the library and the jaxlib version.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cxrjax.backends.cpu import process

SOURCE = Path(__file__).with_name('onednn_conv.cc')
TARGET = 'cxrjax_onednn_conv'
BN_FORWARD, BN_BACKWARD = 'cxrjax_onednn_bn_forward', 'cxrjax_onednn_bn_backward'
ADAM = 'cxrjax_adam_update'
# -fopenmp: the fused Adam's loop, on the wheel's libgomp (the runtime oneDNN uses).
# -O3 -fno-math-errno: vectorises the Adam loop (its sqrt no longer has to set errno):
# the same IEEE operations in the same order, so the same bits, faster.
_CXXFLAGS = ('-O3', '-fno-math-errno', '-fopenmp', '-std=c++17', '-shared', '-fPIC')
_DN = ('NHWC', 'HWIO', 'NHWC')
_FORWARD, _INPUT_GRAD, _WEIGHT_GRAD = 0, 1, 2


def _library() -> Path:
  """`libdnnl.so.3` from `CXRJAX_ONEDNN_LIB` or the installed `onednn-cpu-gomp` wheel."""
  if os.environ.get('CXRJAX_ONEDNN_LIB'):
    return Path(os.environ['CXRJAX_ONEDNN_LIB'])
  try:
    dist = importlib.metadata.distribution('onednn-cpu-gomp')
  except importlib.metadata.PackageNotFoundError:
    raise RuntimeError('the onednn-cpu-gomp wheel is not installed (pip install cxrjax[onednn])') from None
  for f in dist.files or ():
    if f.name == 'libdnnl.so.3':
      return Path(dist.locate_file(f)).resolve()
  raise RuntimeError('the onednn-cpu-gomp wheel has no libdnnl.so.3')


def _build(lib: Path) -> Path:
  """The compiled extension for this source, library and jaxlib, compiling it if it is not cached."""
  include = jax.ffi.include_dir()
  key = hashlib.sha256(
    SOURCE.read_bytes() + str(lib).encode() + jax.lib.__version__.encode() + ' '.join(_CXXFLAGS).encode()
  ).hexdigest()[:16]
  out = process.cache_dir('onednn') / f'onednn_conv-{key}.so'
  if out.exists():
    return out
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise RuntimeError(f'no C++ compiler ({os.environ.get("CXX", "g++")}) to build {SOURCE.name}')
  return process.compile_once([cxx, *_CXXFLAGS, f'-I{include}', str(SOURCE), str(lib), f'-Wl,-rpath,{lib.parent}'], out)


@functools.cache
def load() -> str:
  """Builds (once), loads and registers the extension; returns what is in use, e.g. 'oneDNN 3.2.0 (...)'.

  Raises:
    RuntimeError: the wheel, the compiler or the build is missing, or the library is not oneDNN 3.
  """
  lib = _library()
  so = ctypes.CDLL(str(_build(lib)))
  so.cxrjax_onednn_version.restype = ctypes.c_int
  v = so.cxrjax_onednn_version()
  if v // 10000 != 3:
    raise RuntimeError(f'{lib} is oneDNN {v // 10000}.{v // 100 % 100}, not 3.x')
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(so.cxrjax_onednn_conv), platform='cpu')
  jax.ffi.register_ffi_target(BN_FORWARD, jax.ffi.pycapsule(so.cxrjax_onednn_bn_forward), platform='cpu')
  jax.ffi.register_ffi_target(BN_BACKWARD, jax.ffi.pycapsule(so.cxrjax_onednn_bn_backward), platform='cpu')
  jax.ffi.register_ffi_target(ADAM, jax.ffi.pycapsule(so.cxrjax_adam_update), platform='cpu')
  return f'oneDNN {v // 10000}.{v // 100 % 100}.{v % 100} ({lib})'


def _call(kind: int, a, b, shape, strides, padding, groups):
  (pt, pb), (pl, pr) = padding
  # Under vmap, one call per batch element (the kernel takes rank-4 operands only).
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method='sequential')(
    a, b, kind=np.int64(kind), sh=np.int64(strides[0]), sw=np.int64(strides[1]),
    pt=np.int64(pt), pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr), groups=np.int64(groups))  # fmt: skip


def _out_hw(x_shape, w_shape, strides, padding):
  return tuple((x_shape[1 + i] + sum(padding[i]) - w_shape[i]) // strides[i] + 1 for i in range(2))


# The three passes, each with a custom VJP made of the other two, so gradients of
# gradients (an R1 penalty, say) stay on oneDNN too. All three are bilinear.
# `groups` is lax's feature_group_count.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _forward(x, w, strides, padding, groups):
  oh, ow = _out_hw(x.shape, w.shape, strides, padding)
  return _call(_FORWARD, x, w, (x.shape[0], oh, ow, w.shape[3]), strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _input_grad(dy, w, x_shape, strides, padding, groups):
  return _call(_INPUT_GRAD, dy, w, x_shape, strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _onednn_weight_grad(x, dy, w_shape, strides, padding, groups):
  return _call(_WEIGHT_GRAD, x, dy, w_shape, strides, padding, groups)


def _weight_grad(x, dy, w_shape, strides, padding, groups):
  if w_shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)) and strides != (1, 1):
    # A strided 1x1 kernel sees every stride-th pixel, so its weight gradient is the
    # stride-1 one of those pixels. A workaround: oneDNN 3.2's 1x1 weight gradient with
    # stride 2 (jit_1x1) writes past the scratchpad it asks for at 64 px and above (heap
    # corruption in a 64-px smoke run; tests/test_cpu_kernels.py keeps a regression case);
    # stride 1 is unaffected.
    oh, ow = dy.shape[1:3]
    x = x[:, : (oh - 1) * strides[0] + 1 : strides[0], : (ow - 1) * strides[1] + 1 : strides[1]]
    strides = (1, 1)
  return _onednn_weight_grad(x, dy, w_shape, strides, padding, groups)


def _forward_fwd(x, w, strides, padding, groups):
  return _forward(x, w, strides, padding, groups), (x, w)


def _forward_bwd(strides, padding, groups, res, g):
  x, w = res
  return _input_grad(g, w, x.shape, strides, padding, groups), _weight_grad(x, g, w.shape, strides, padding, groups)


def _input_grad_fwd(dy, w, x_shape, strides, padding, groups):
  return _input_grad(dy, w, x_shape, strides, padding, groups), (dy, w)


def _input_grad_bwd(x_shape, strides, padding, groups, res, g):  # g has x's shape
  dy, w = res
  return _forward(g, w, strides, padding, groups), _weight_grad(g, dy, w.shape, strides, padding, groups)


def _weight_grad_fwd(x, dy, w_shape, strides, padding, groups):
  return _onednn_weight_grad(x, dy, w_shape, strides, padding, groups), (x, dy)


def _weight_grad_bwd(w_shape, strides, padding, groups, res, g):  # g has w's shape
  x, dy = res
  return _input_grad(dy, g, x.shape, strides, padding, groups), _forward(x, g, strides, padding, groups)


_forward.defvjp(_forward_fwd, _forward_bwd)
_input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
_onednn_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


def conv(x: jax.Array, w: jax.Array, strides=(1, 1), padding=((0, 0), (0, 0)), groups: int = 1) -> jax.Array:
  """A float32 NHWC x HWIO convolution on oneDNN (`load()` must have succeeded).

  Args:
    x: `[n, h, w, c]` input.
    w: `[kh, kw, c / groups, o]` kernel (o a multiple of groups).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), each >= 0.
    groups: lax's `feature_group_count` (c for a depthwise convolution).

  Returns:
    `[n, oh, ow, o]`, as `lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO',
    'NHWC'), feature_group_count=groups)`.
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _forward(x, w, strides, padding, int(groups))


def transposed_conv(x: jax.Array, w: jax.Array, out_shape, strides, padding) -> jax.Array:
  """The transposed convolution of `conv`: its input gradient, as a differentiable function on oneDNN.

  Args:
    x: `[n, oh, ow, o]`, shaped like `conv`'s output.
    w: `[kh, kw, c, o]`, the kernel of the convolution being transposed (HWIO).
    out_shape: `[n, h, w, c]`, the shape of that convolution's input.
    strides: (sh, sw) of that convolution.
    padding: ((top, bottom), (left, right)) of that convolution.

  Returns:
    `[n, h, w, c]`: `vjp(lambda v: conv(v, w, strides, padding), zeros(out_shape))(x)`.
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _input_grad(x, w, tuple(out_shape), strides, padding, 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):  # fmt: skip
  """`lax.conv_general_dilated`, on oneDNN where it applies and XLA's otherwise (pass it to `nn.Conv`).

  oneDNN's case: rank-4 float32 NHWC x HWIO, no dilation, feature groups (depthwise
  included) but no batch groups, padding that is 'SAME'/'VALID' or non-negative pairs.
  Arguments and result are `lax.conv_general_dilated`'s.
  """
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)  # fmt: skip
  fits = (
    lhs.ndim == 4
    and rhs.ndim == 4
    and lhs.dtype == jnp.float32
    and rhs.dtype == jnp.float32
    and preferred_element_type in (None, jnp.float32)
    and lhs.shape[-1] == rhs.shape[2] * feature_group_count
    and rhs.shape[3] % feature_group_count == 0
    and batch_group_count == 1
    and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
  )
  if fits and isinstance(padding, str):  # 'SAME' / 'VALID' (flax's default) as explicit pairs
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if not fits or any(lo < 0 or hi < 0 for lo, hi in padding):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return conv(lhs, rhs, window_strides, padding, feature_group_count)


# Batch normalization with batch statistics (training), on oneDNN. As with the
# convolutions, the primal and each VJP are custom VJPs, so reverse mode works to any
# order: the backward pass is oneDNN's, and its own VJP (needed only for gradients of
# gradients) is autodiff of `_bn_backward_reference`, the same function in jnp.
def _as_nhwc(x):
  return x.reshape((-1, 1, 1, x.shape[-1])) if x.ndim != 4 else x


def _bn_forward_call(x, scale, bias, eps, relu):
  c = x.shape[-1]
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  x4 = _as_nhwc(x)
  y, mean, var = jax.ffi.ffi_call(BN_FORWARD, (f32(x4.shape), f32((c,)), f32((c,))), vmap_method='sequential')(
    x4, scale, bias, eps=np.float32(eps), relu=np.int64(relu)
  )
  return y.reshape(x.shape), mean, var


def _bn_backward_reference(x, dy, scale, mean, var, eps):
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  inv = lax.rsqrt(var + eps)
  xhat = (x - mean) * inv
  dbias = dy.sum(axes)
  dscale = (dy * xhat).sum(axes)
  return (scale * inv) * (dy - dbias / m - xhat * (dscale / m)), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bn_backward(x, dy, scale, mean, var, eps):
  c = x.shape[-1]
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  x4 = _as_nhwc(x)
  dx, dscale, dbias = jax.ffi.ffi_call(BN_BACKWARD, (f32(x4.shape), f32((c,)), f32((c,))), vmap_method='sequential')(
    x4, _as_nhwc(dy), mean, var, scale, eps=np.float32(eps)
  )
  return dx.reshape(x.shape), dscale, dbias


def _bn_backward_fwd(x, dy, scale, mean, var, eps):
  return _bn_backward(x, dy, scale, mean, var, eps), (x, dy, scale, mean, var)


def _bn_backward_bwd(eps, res, g):
  return jax.vjp(functools.partial(_bn_backward_reference, eps=eps), *res)[1](g)


_bn_backward.defvjp(_bn_backward_fwd, _bn_backward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train(x, scale, bias, eps, relu):
  return _bn_forward_call(x, scale, bias, eps, relu)


def _bn_train_fwd(x, scale, bias, eps, relu):
  x, scale, bias = x.value, scale.value, bias.value
  y, mean, var = _bn_train(x, scale, bias, eps, relu)
  # y is kept only for the ReLU's mask: without one, keeping it would hold an extra
  # activation-sized buffer per layer until the backward pass.
  return (y, mean, var), (x, scale, mean, var, y if relu else None)


def _bn_train_bwd(eps, relu, res, cts):
  x, scale, mean, var, y = res
  dy, dmean, dvar = cts
  zero = jax.custom_derivatives.SymbolicZero
  dy = jnp.zeros_like(x) if isinstance(dy, zero) else dy
  if relu:
    dy = jnp.where(y > 0, dy, 0.0)
  dx, dscale, dbias = _bn_backward(x, dy, scale, mean, var, eps)
  # Where the statistics themselves are differentiated (they are not in training, only
  # stored): d mean / dx = 1/m, d var / dx = 2 (x - mean) / m.
  m = x.size // x.shape[-1]
  if not isinstance(dmean, zero):
    dx = dx + dmean / m
  if not isinstance(dvar, zero):
    dx = dx + (x - mean) * (2.0 * dvar / m)
  return dx, dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd, symbolic_zeros=True)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, relu: bool = False):
  """Batch normalization over every axis but the last, with batch statistics, on oneDNN.

  `load()` must have succeeded. Differentiable to any order in reverse mode.

  Args:
    x: float32 `[..., c]` (any rank >= 2).
    scale: float32 `[c]`.
    bias: float32 `[c]`.
    eps: added to the variance.
    relu: apply a ReLU to the result (fused into the same pass).

  Returns:
    (y, mean, var): y like x; the batch mean and biased variance, `[c]` each, as
    `flax.linen.BatchNorm` computes them for its running averages.
  """
  return _bn_train(x, scale, bias, float(eps), bool(relu))


def _adam_leaf(g, m, v, d1, d2, b1, b2, eps, eps_root):
  if g.dtype != jnp.float32 or m.dtype != jnp.float32 or v.dtype != jnp.float32 or g.size == 0:
    new_m = (1 - b1) * g + b1 * m
    new_v = (1 - b2) * (g * g) + b2 * v
    u = (new_m / d1.astype(new_m.dtype)) / (jnp.sqrt(new_v / d2.astype(new_v.dtype) + eps_root) + eps)
    return u, new_m.astype(m.dtype), new_v.astype(v.dtype)  # optax keeps the state's dtypes
  f32 = jax.ShapeDtypeStruct(g.shape, jnp.float32)
  # 1 - b is formed in double and rounded once, as optax's Python-float arithmetic does.
  return jax.ffi.ffi_call(ADAM, (f32, f32, f32), input_output_aliases={1: 1, 2: 2}, vmap_method='sequential')(
    g, m, v, d1, d2, a1=np.float32(1 - b1), b1=np.float32(b1), a2=np.float32(1 - b2), b2=np.float32(b2),
    eps=np.float32(eps), eps_root=np.float32(eps_root),
  )  # fmt: skip


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0):
  """`optax.scale_by_adam` with one fused pass per float32 parameter (`load()` must have succeeded).

  The same state (`optax.ScaleByAdamState`: count, mu, nu; checkpoints interchangeable)
  and the same arithmetic, operation for operation (results equal to rounding: XLA may
  contract a multiply-add that the kernel rounds twice). optax's `mu_dtype` and
  `nesterov` options are not offered.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator's square root.
    eps_root: added inside the square root.

  Returns:
    An `optax.GradientTransformation`.
  """
  base = optax.scale_by_adam(b1, b2, eps, eps_root)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    # optax's bias corrections, computed the same way: 1 - decay**count in float32.
    d1 = (1 - b1**count).astype(jnp.float32)
    d2 = (1 - b2**count).astype(jnp.float32)
    out = jax.tree.map(lambda g, m, v: _adam_leaf(g, m, v, d1, d2, b1, b2, eps, eps_root), updates, state.mu, state.nu)
    u, mu, nu = jax.tree.transpose(jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), out)
    return u, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update_fn)
