"""Reading pretrained weight files into NumPy: PyTorch pickles and safetensors.

`read_state(path)` returns the file's floating-point tensors by name as float32
NumPy arrays, whatever wrote them, plus a small record of where they came from
(path, format, SHA-256 of the bytes, size) so that a run can say exactly which
weights it started from.

- `.pth`, `.pt`, `.bin`: `torch.save` files, read with
  `torch.load(map_location='cpu', weights_only=True)`. `weights_only` refuses
  pickled code, so an untrusted file cannot run anything. PyTorch is optional
  and imported only here; without it the error says to install it or to convert
  the file to safetensors. A raw state_dict is accepted, and so is a training
  checkpoint that wraps it under 'state_dict' or 'model'; a 'module.' prefix on
  every name (left by `DataParallel`) is removed.
- `.safetensors`: read by `read_safetensors`, a small NumPy reader of the format
  (no PyTorch, no safetensors package): an 8-byte little-endian header length,
  a JSON header mapping each tensor name to its dtype, shape and
  `data_offsets` (begin, end; relative to the byte buffer after the header),
  an optional `__metadata__` entry of strings, then the tensors' bytes,
  little-endian and C-ordered. The header is checked against the file before
  anything is read, so a truncated or damaged download is reported as such
  rather than as a confusing shape error later.

Integer tensors (BatchNorm's `num_batches_tracked`) are not weights: they are
left out of the state and named in `info['skipped']`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

from cxrjax import fileio
from cxrjax.errors import UserError
from cxrjax.pretrained import sources

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
SAFETENSORS_SUFFIXES = ('.safetensors',)

# safetensors dtype -> little-endian NumPy dtype. BF16 has no NumPy dtype: it is read as
# uint16 and widened to float32 (a bfloat16 is the upper half of a float32's bits).
SAFETENSORS_DTYPES = {
  'F64': '<f8',
  'F32': '<f4',
  'F16': '<f2',
  'BF16': '<u2',
  'I64': '<i8',
  'I32': '<i4',
  'I16': '<i2',
  'I8': 'i1',
  'U64': '<u8',
  'U32': '<u4',
  'U16': '<u2',
  'U8': 'u1',
  'BOOL': '?',
}
# The reference implementation refuses headers above 100 MB; a larger length is a damaged file.
MAX_HEADER_BYTES = 100_000_000


def sha256(path: str) -> str:
  """Hex SHA-256 of the file's bytes."""
  return fileio.file_digest(path)


def file_format(path: str) -> str:
  """'torch' or 'safetensors', from the file name's suffix.

  Raises:
    UserError: another suffix.
  """
  lower = path.lower()
  if lower.endswith(TORCH_SUFFIXES):
    return 'torch'
  if lower.endswith(SAFETENSORS_SUFFIXES):
    return 'safetensors'
  raise UserError(
    f'{path}: unknown weights file type; expected a PyTorch file ({", ".join(TORCH_SUFFIXES)}) or .safetensors'
  )


def read_state(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The floating-point tensors of a weights file, as float32 NumPy arrays by name.

  Args:
    path: a `.pth`/`.pt`/`.bin` (torch.save) or `.safetensors` file.

  Returns:
    (state, info): `state` maps tensor names to float32 arrays (PyTorch layouts,
    e.g. OIHW convolutions); `info` is {'path', 'format' ('torch' or
    'safetensors'), 'sha256', 'bytes', 'skipped' (names of non-floating tensors
    left out)}, plus 'metadata' (the `__metadata__` strings) for safetensors.

  Raises:
    UserError: the file is missing, of an unknown type, truncated or corrupt, not a
      state_dict, or (for PyTorch files) PyTorch is not installed.
  """
  if not os.path.exists(path):
    raise UserError(f'{path}: weights file not found{sources.download_hint(path)}')
  if os.path.isdir(path):
    raise UserError(f'{path}: is a folder; expected a weights file (.pth, .pt, .bin or .safetensors)')
  fmt = file_format(path)
  if fmt == 'torch':
    tensors = _read_torch(path)
    metadata = None
  else:
    tensors, metadata = read_safetensors(path)
  state, skipped = {}, []
  for name, value in tensors.items():
    if np.issubdtype(value.dtype, np.floating):
      state[name] = np.asarray(value, dtype=np.float32)
    else:
      skipped.append(name)
  info = {'path': path, 'format': fmt, 'sha256': sha256(path), 'bytes': os.path.getsize(path), 'skipped': skipped}
  if metadata is not None:
    info['metadata'] = metadata
  return state, info


def _first_line(e: BaseException, limit: int = 200) -> str:
  return (str(e).strip().splitlines() or [''])[0][:limit]


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
  """Removes the 'module.' that `nn.DataParallel` puts before every name (only if every name has it)."""
  if state and all(k.startswith('module.') for k in state):
    return {k[len('module.') :]: v for k, v in state.items()}
  return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """A torch.save file's tensors as NumPy arrays (floating tensors widened to float32)."""
  try:
    import torch  # noqa: PLC0415 - PyTorch is optional, needed only for PyTorch files
  except ImportError as e:
    raise UserError(
      f'{path}: reading a PyTorch weights file needs PyTorch (pip install torch); or convert the file to'
      ' .safetensors, which cxrjax reads without it'
    ) from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types here (zip, pickle, runtime); all mean "not a readable file"
    raise UserError(
      f'{path}: not a readable PyTorch weights file, truncated or corrupt? ({type(e).__name__}: {_first_line(e)});'
      ' expected a state_dict saved by torch.save'
    ) from e
  if isinstance(obj, dict):
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
  tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(
    obj, dict
  ) else {}  # fmt: skip
  if not tensors:
    found = f'a dict with keys {sorted(map(str, obj))[:5]}' if isinstance(obj, dict) else f'a {type(obj).__name__}'
    raise UserError(
      f"{path}: holds {found}; expected a state_dict (tensor name -> tensor), possibly under 'state_dict' or 'model'"
    )
  out = {}
  for name, t in _strip_module_prefix(tensors).items():
    t = t.detach()
    out[name] = t.float().numpy() if t.is_floating_point() else t.numpy()
  return out


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Every tensor of a .safetensors file as a NumPy array, and its `__metadata__`, without PyTorch.

  Dtypes are kept (F32, F16, F64 and the integer types) except BF16, which NumPy lacks
  and which is widened exactly to float32. 8-bit float dtypes are refused.

  Raises:
    UserError: naming the file and what is wrong: missing, truncated (the header or a
      tensor's bytes run past the end), a header that is not the format's JSON, offsets
      that overlap, leave gaps or disagree with dtype and shape, or an unsupported dtype.
  """
  if not os.path.isfile(path):
    raise UserError(f'{path}: safetensors file not found')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    if size < 8:
      raise UserError(f'{path}: truncated safetensors file ({size} bytes; expected at least the 8-byte header length)')
    (header_len,) = struct.unpack('<Q', f.read(8))
    if header_len > MAX_HEADER_BYTES:
      raise UserError(f'{path}: not a safetensors file (header length {header_len} bytes; expected at most 100 MB)')
    if 8 + header_len > size:
      raise UserError(
        f'{path}: truncated safetensors file (header of {header_len} bytes, but only {size - 8} bytes follow the'
        ' length)'
      )
    raw = f.read(header_len)
    try:
      header = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f'{path}: safetensors header is not valid JSON ({_first_line(e)})') from e
    if not isinstance(header, dict):
      raise UserError(f'{path}: safetensors header is a {type(header).__name__}; expected a JSON object')
    metadata = header.pop('__metadata__', None) or {}
    if not isinstance(metadata, dict):
      raise UserError(f'{path}: safetensors __metadata__ is a {type(metadata).__name__}; expected a JSON object')
    buffer_start, buffer_len = 8 + header_len, size - 8 - header_len
    entries = [(name, *_check_entry(path, name, entry)) for name, entry in header.items()]
    # The tensors tile the byte buffer exactly, in offset order (the format's own rule).
    expected_begin = 0
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
      if begin != expected_begin:
        raise UserError(
          f'{path}: corrupt safetensors header: tensor {name!r} starts at byte {begin} of the data, expected'
          f' {expected_begin} (tensors must not overlap or leave gaps)'
        )
      expected_begin = end
    if expected_begin > buffer_len:
      raise UserError(
        f'{path}: truncated safetensors file ({size} bytes; the header describes {buffer_start + expected_begin})'
      )
    if expected_begin < buffer_len:
      raise UserError(
        f'{path}: corrupt safetensors file ({buffer_len - expected_begin} bytes after the last tensor; expected'
        f' {buffer_start + expected_begin} bytes in all)'
      )
    out = {}
    for name, dtype, shape, begin, end in entries:
      f.seek(buffer_start + begin)
      data = f.read(end - begin)
      if len(data) != end - begin:  # the file shrank while being read
        raise UserError(f'{path}: truncated safetensors file (tensor {name!r} ends past the end of the file)')
      array = np.frombuffer(data, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)
      if dtype == 'BF16':
        array = (array.astype(np.uint32) << 16).view(np.float32)
      out[name] = array.astype(array.dtype.newbyteorder('='), copy=True)
  return out, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(path: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry, checked for consistency."""
  if not isinstance(entry, dict) or not {'dtype', 'shape', 'data_offsets'} <= set(entry):
    raise UserError(f'{path}: corrupt safetensors header: entry {name!r} lacks dtype, shape or data_offsets')
  dtype, shape, offsets = entry['dtype'], entry['shape'], entry['data_offsets']
  if dtype not in SAFETENSORS_DTYPES:
    raise UserError(
      f'{path}: tensor {name!r} has dtype {dtype!r}, which cxrjax cannot read; expected one of'
      f' {", ".join(SAFETENSORS_DTYPES)}'
    )
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise UserError(f'{path}: corrupt safetensors header: tensor {name!r} has shape {shape!r}')
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
    raise UserError(f'{path}: corrupt safetensors header: tensor {name!r} has data_offsets {offsets!r}')
  begin, end = offsets
  nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
  if begin < 0 or end - begin != nbytes:
    raise UserError(
      f'{path}: corrupt safetensors header: tensor {name!r} ({dtype}, shape {tuple(shape)}) has data_offsets'
      f' [{begin}, {end}], expected a span of {nbytes} bytes'
    )
  return dtype, tuple(shape), begin, end


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)
