"""torchvision ResNet-18 state_dict names -> the variables of `cxrjax.models.resnet.ResNet`.

Our ResNet is laid out as torchvision's (same blocks, strides, explicit symmetric
padding, BatchNorm epsilon 1e-5), so the conversion is a renaming plus layout changes:

  conv1.weight                        params/stem_conv/kernel
  bn1.{weight, bias}                  params/stem_bn/{scale, bias}
  bn1.{running_mean, running_var}     batch_stats/stem_bn/{mean, var}
  layer<i>.<j>.conv1 / bn1            stage<i>_block<j+1>/Conv_0 / BatchNorm_0
  layer<i>.<j>.conv2 / bn2            stage<i>_block<j+1>/Conv_1 / BatchNorm_1
  layer<i>.<j>.downsample.0 / .1      stage<i>_block<j+1>/proj_conv / proj_bn
  fc.{weight, bias}                   params/head/{kernel, bias}

Convolution weights go from PyTorch's [out, in, kh, kw] to Flax's [kh, kw, in, out], the
Linear weight from [out, in] to [in, out]. `num_batches_tracked` counters are skipped.

timm's `resnet18` (e.g. `resnet18.a1_in1k`) started as a copy of torchvision's and keeps
these names (conv1, bn1, layer1.0.conv1, ..., downsample.0/1, fc), so its files convert
the same way. Its variants with a deep stem (`resnet18d`: `conv1.0`, `conv1.1`, ...) are a
different network: their keys are refused as unknown.

The stem weights are the 7x7 ImageNet stem: the model must be built with
`model.stem='imagenet'` (the loader says so when the shapes disagree).
"""

from __future__ import annotations

import re

import numpy as np

from cxrjax.errors import UserError
from cxrjax.pretrained.layout import BATCH_NORM, to_flax_layout

# The head's variables (under 'params'): re-initialised for another number of classes.
HEAD = (('head',),)

_BLOCK_PARTS = {'conv1': 'Conv_0', 'bn1': 'BatchNorm_0', 'conv2': 'Conv_1', 'bn2': 'BatchNorm_1',
                'downsample.0': 'proj_conv', 'downsample.1': 'proj_bn'}  # fmt: skip
_BLOCK = re.compile(r'layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)')
EXPECTED = "torchvision's resnet18 names (conv1, bn1, layer1.0.conv1, ..., fc)"


def _module_leaf(module: str, kind: str, leaf: str, key: str) -> tuple[str, ...]:
  """The Flax path of a convolution ('conv') or BatchNorm ('bn') tensor of module `module`."""
  if kind == 'conv' and leaf == 'weight':
    return ('params', module, 'kernel')
  if kind == 'bn' and leaf in BATCH_NORM:
    collection, name = BATCH_NORM[leaf]
    return (collection, module, name)
  raise UserError(f'unknown key {key!r}; expected {EXPECTED}')


def flax_names(state: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
  """torch key -> flat Flax variable path, for every tensor of `state` but `num_batches_tracked`.

  Raises:
    UserError: a key that is not a torchvision ResNet-18 name (named).
  """
  names = {}
  for key in state:
    if key.endswith('num_batches_tracked'):
      continue
    if key.startswith('conv1.'):
      names[key] = _module_leaf('stem_conv', 'conv', key[len('conv1.') :], key)
    elif key.startswith('bn1.'):
      names[key] = _module_leaf('stem_bn', 'bn', key[len('bn1.') :], key)
    elif key in ('fc.weight', 'fc.bias'):
      names[key] = ('params', 'head', 'kernel' if key == 'fc.weight' else 'bias')
    elif match := _BLOCK.fullmatch(key):
      stage, block, part, leaf = match.groups()
      kind = 'conv' if part in ('conv1', 'conv2', 'downsample.0') else 'bn'
      path = _module_leaf(_BLOCK_PARTS[part], kind, leaf, key)
      names[key] = (path[0], f'stage{stage}_block{int(block) + 1}', *path[1:])
    else:
      raise UserError(f'unknown key {key!r}; expected {EXPECTED}')
  return names


def torch_to_flax(state: dict[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
  """A torchvision (or timm) ResNet-18 state_dict -> flat Flax variables {('params', 'stem_conv', 'kernel'): ...}.

  Raises:
    UserError: a key that is not a ResNet-18 name (named; the loader adds the file).
  """
  return {path: to_flax_layout(np.asarray(state[key])) for key, path in flax_names(state).items()}
