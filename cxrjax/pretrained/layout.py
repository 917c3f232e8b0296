"""PyTorch -> Flax tensor layouts and BatchNorm names, shared by the converters.

- Convolution weights: PyTorch [out, in / groups, kh, kw] -> Flax [kh, kw, in / groups, out].
  The same transpose serves depthwise convolutions: PyTorch's [C, 1, kh, kw] becomes
  [kh, kw, 1, C], which is the kernel of `nn.Conv(C, feature_group_count=C)`.
- Linear weights: [out, in] -> Dense kernels [in, out].
- Vectors (biases, BatchNorm parameters and statistics) are unchanged.
- BatchNorm: weight, bias -> params scale, bias; running_mean, running_var -> batch_stats mean, var.
"""

from __future__ import annotations

import numpy as np

# BatchNorm2d tensor -> (Flax collection, leaf).
BATCH_NORM = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


def to_flax_layout(value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in Flax's layout (see the module docstring); a new C-contiguous array for 2-D and 4-D."""
  if value.ndim == 4:
    return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
  if value.ndim == 2:
    return np.ascontiguousarray(np.transpose(value))
  return value
