"""torchvision's Inception-V3 weights -> variables of `cxrjax.models.inception.InceptionV3(variant='torchvision')`.

Pure NumPy (and JAX for the variable shapes): the caller reads the checkpoint
(e.g. torchvision's `inception_v3_google-0cc3c7bd.pth`) and passes its arrays by
name. Module names are the same on both sides, so the mapping is name for name:

  `<module>.conv.weight` [O, I, H, W]   <->  params/<module>/conv/kernel [H, W, I, O]
  `<module>.bn.weight`, `.bn.bias`      <->  params/<module>/bn/scale, bias
  `<module>.bn.running_mean`, `_var`    <->  batch_stats/<module>/bn/mean, var
  `fc.weight` [out, in], `fc.bias`      <->  params/head/kernel [in, out], bias
  `AuxLogits.fc.weight`, `.bias`        <->  params/AuxLogits/fc/kernel, bias

with `<module>` e.g. `Conv2d_1a_3x3`, `Mixed_5b.branch1x1` or `AuxLogits.conv0`.
The classifier is `head` in cxrjax (its other classifiers' name), torchvision's
`fc`. pytorch-fid's FID network uses the same names (`cxrjax.eval.inception_features`
maps it with `torch_key` and the layout functions here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxrjax.errors import UserError
from cxrjax.models import inception

# The Flax module paths (under params) of the classification heads, re-initialised for a new task.
HEAD = (('head',), ('AuxLogits', 'fc'))

# (collection, flax leaf) -> torch leaf.
_LEAVES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
_FLAX_TO_TORCH_MODULE = {'head': 'fc'}


def torch_key(path: tuple[str, ...]) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'; head -> fc."""
  collection, *modules, leaf = path
  modules = [_FLAX_TO_TORCH_MODULE.get(m, m) if i == 0 else m for i, m in enumerate(modules)]
  return '.'.join([*modules, _LEAVES[(collection, leaf)]])


def to_flax_layout(value: np.ndarray) -> np.ndarray:
  """A torch array in Flax's layout: convolution OIHW -> HWIO, linear [out, in] -> [in, out], others unchanged."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  return value.T if value.ndim == 2 else value


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  """The inverse of `to_flax_layout`: HWIO -> OIHW, [in, out] -> [out, in]."""
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  return value.T if value.ndim == 2 else value


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a Flax variable of `shape`."""
  shape = tuple(shape)
  if len(shape) == 4:
    return tuple(shape[i] for i in (3, 2, 0, 1))
  return shape[::-1] if len(shape) == 2 else shape


@functools.lru_cache(maxsize=4)
def _expected(num_classes: int | None, aux_logits: bool, channels: int) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """torch key -> (Flax path, torch shape) of every variable of the matching classifier (shapes only)."""
  model = inception.InceptionV3(num_classes=num_classes, variant='torchvision', aux_logits=aux_logits)
  size = inception.INPUT_SIZE  # the auxiliary head's minimum
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
  flat = traverse_util.flatten_dict({k: shapes[k] for k in ('params', 'batch_stats')})
  return {torch_key(path): (path, torch_shape(spec.shape)) for path, spec in flat.items()}


def torch_to_flax(state: dict[str, np.ndarray], source: str = 'state_dict') -> dict[tuple[str, ...], np.ndarray]:
  """torchvision Inception-V3 state_dict arrays -> flat Flax variables (float32, Flax layouts).

  The network is read off the arrays: the classes from `fc.weight` (no `fc`: the
  feature network), the auxiliary head from `AuxLogits.*` keys, the input
  channels from `Conv2d_1a_3x3.conv.weight`. Every variable of that network must be
  present with its shape; `num_batches_tracked` counters are skipped.

  Args:
    state: torch name -> array (torchvision's names and layouts).
    source: where `state` came from, for error messages.

  Returns:
    {('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel'): array, ...,
     ('batch_stats', ..., 'bn', 'mean'): array, ...}; `traverse_util.unflatten_dict`
    gives the variables of `InceptionV3(num_classes, 'torchvision', aux_logits=...)`.

  Raises:
    UserError: naming `source` and the first unknown, missing or wrongly shaped key.
  """
  fc = state.get('fc.weight')
  num_classes = int(np.shape(fc)[0]) if fc is not None else None
  aux_logits = any(k.startswith('AuxLogits.') for k in state)
  if aux_logits and num_classes is None:
    raise UserError(f'{source}: has AuxLogits.* keys but no fc.weight; expected a torchvision Inception-V3 state_dict')
  stem = state.get('Conv2d_1a_3x3.conv.weight')
  channels = int(np.shape(stem)[1]) if stem is not None and np.ndim(stem) == 4 else 3
  expected = _expected(num_classes, aux_logits, channels)
  out = {}
  for key, value in state.items():
    if key.endswith('num_batches_tracked'):
      continue
    if key not in expected:
      raise UserError(f'{source}: unknown key {key!r}; expected a torchvision Inception-V3 state_dict')
    path, shape = expected[key]
    value = np.asarray(value, dtype=np.float32)
    if value.shape != shape:
      raise UserError(f'{source}: key {key!r} has shape {value.shape}, expected {shape}')
    out[path] = np.ascontiguousarray(to_flax_layout(value))
  missing = [k for k in expected if k not in state]
  if missing:
    raise UserError(f'{source}: missing key {missing[0]!r} ({len(missing)} missing); expected a torchvision '
                    'Inception-V3 state_dict')  # fmt: skip
  return out
