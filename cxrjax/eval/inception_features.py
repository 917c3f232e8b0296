"""FID Inception-V3 pool3 features from pytorch-fid's weights, for FID as in the literature.

The default quality features come from the reference ResNet-18 (`features.py`);
with `quality.inception_weights` pointing at pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (a torch state_dict of TensorFlow's FID
Inception graph), `judge` also reports FID/KID/precision/recall on the 2048-d
pool3 features of `cxrjax.models.inception`. cxrjax cannot download the file,
and reading it needs PyTorch (the optional `bench` extra), imported only here.

Key mapping (module names are the same on both sides):

  `<module>.conv.weight` [O, I, H, W]  <->  params/<module>/conv/kernel [H, W, I, O]
  `<module>.bn.weight`, `.bn.bias`      <->  params/<module>/bn/scale, bias
  `<module>.bn.running_mean`, `_var`    <->  batch_stats/<module>/bn/mean, var

with `<module>` e.g. `Conv2d_1a_3x3` or `Mixed_5b.branch1x1`: the names and
layouts of torchvision's Inception-V3, mapped by `cxrjax.pretrained.inception_v3`.
Other keys of the file (`fc.*`, the 1008-way classifier, and
`num_batches_tracked`) are not used.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxrjax.errors import UserError
from cxrjax.models import inception
from cxrjax.pretrained import inception_v3 as weights

_EXPECTED = "pytorch-fid's FID Inception-V3 state_dict (pt_inception-2015-12-05-6726825d.pth)"


@functools.lru_cache(maxsize=2)
def _abstract(model: inception.InceptionV3) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened variable shapes of `model`, without computing anything."""
  size = inception.INPUT_SIZE
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return traverse_util.flatten_dict({k: shapes[k] for k in ('params', 'batch_stats')})


def to_torch_state_dict(variables) -> dict[str, np.ndarray]:
  """Flax variables of `InceptionV3` -> pytorch-fid state_dict arrays (the inverse of the loader)."""
  flat = traverse_util.flatten_dict({k: variables[k] for k in ('params', 'batch_stats')})
  return {weights.torch_key(path): weights.to_torch_layout(np.asarray(v)) for path, v in flat.items()}


def from_torch_state_dict(state: dict[str, Any], source: str = 'state_dict') -> dict[str, Any]:
  """pytorch-fid state_dict (name -> array-like) -> Flax variables of `InceptionV3`.

  Args:
    state: the file's tensors (or NumPy arrays) by name; unused keys are ignored.
    source: where `state` came from, for error messages.

  Returns:
    {'params': ..., 'batch_stats': ...} as float32 arrays.

  Raises:
    UserError: naming `source` and the first missing or wrongly shaped key.
  """
  fc = state.get('fc.weight')
  if any(k.startswith('AuxLogits.') for k in state) or (fc is not None and tuple(fc.shape)[0] != 1008):
    # torchvision's ImageNet Inception has the same key names but other weights
    # (and a 1000-way head): its features are not the FID ones.
    raise UserError(f"{source}: looks like torchvision's ImageNet Inception-V3, not {_EXPECTED}")
  flat = {}
  for path, spec in _abstract(inception.InceptionV3()).items():
    key, shape = weights.torch_key(path), weights.torch_shape(spec.shape)
    if key not in state:
      raise UserError(f'{source}: missing key {key!r}; expected {_EXPECTED}')
    value = np.asarray(state[key], dtype=np.float32)
    if value.shape != shape:
      raise UserError(f'{source}: key {key!r} has shape {value.shape}, expected {shape}; expected {_EXPECTED}')
    flat[path] = jnp.asarray(weights.to_flax_layout(value))
  return traverse_util.unflatten_dict(flat)


def load_inception(weights_path: str) -> tuple[inception.InceptionV3, dict[str, Any]]:
  """(model, variables) of the FID Inception-V3 from pytorch-fid's weights file.

  The file is read with `torch.load(weights_only=True)`, which refuses pickled
  code, so an untrusted file cannot run anything.

  Raises:
    UserError: the file is missing or unreadable, PyTorch is not installed, or
      a key is missing or has the wrong shape (named).
  """
  if not os.path.isfile(weights_path):
    raise UserError(f'quality.inception_weights={weights_path!r}: file not found; expected {_EXPECTED}')
  try:
    import torch  # noqa: PLC0415 - PyTorch is the optional `bench` extra, needed only to read this file
  except ImportError as e:
    raise UserError(f'{weights_path}: reading Inception weights needs PyTorch (pip install torch)') from e
  try:
    state = torch.load(weights_path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types here (pickle, zip, runtime); all mean "not a state_dict"
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise UserError(f'{weights_path}: not a readable torch state_dict ({type(e).__name__}: {first})') from e
  if not isinstance(state, dict):
    raise UserError(f'{weights_path}: holds a {type(state).__name__}, expected {_EXPECTED}')
  arrays = {k: v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
  return inception.InceptionV3(), from_torch_state_dict(arrays, weights_path)


@functools.lru_cache(maxsize=4)
def _feature_fn(model: inception.InceptionV3):
  @jax.jit
  def fn(variables, images):
    # uint8 -> [0, 1] as torchvision's ToTensor in pytorch-fid; the model does the rest.
    return model.apply(variables, images.astype(jnp.float32) / 255.0)

  return fn


def extract_inception(model: inception.InceptionV3, variables, images_uint8: np.ndarray, batch_size: int = 64):
  """[N, 2048] pool3 features of uint8 images [N, H, W] or [N, H, W, 1|3], resized to 299 on device.

  Batches are padded to `batch_size` when there is more than one, so a set
  compiles once whatever its size.
  """
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8:
    raise UserError(f'extract_inception: expected uint8 images, got {images.dtype}')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f'extract_inception: expected images [N, H, W] or [N, H, W, 1|3], got shape {images.shape}')
  fn = _feature_fn(model)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    n = len(chunk)
    if n < batch_size and len(images) > batch_size:  # keep one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    out.append(np.asarray(fn(variables, chunk), np.float32)[:n])
  return np.concatenate(out) if out else np.zeros((0, inception.FEATURE_DIM), np.float32)
