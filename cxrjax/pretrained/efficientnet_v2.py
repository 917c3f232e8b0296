"""torchvision EfficientNetV2 state_dict names -> the variables of `cxrjax.models.efficientnet_v2.EfficientNetV2`.

torchvision's `efficientnet_v2_s` and our EfficientNetV2-S are the same network: the
same stage table (2 + 4 + 4 FusedMBConv blocks, 6 + 9 + 15 MBConv blocks), channel
rounding, squeeze-excitation width (block input channels // 4, SiLU, sigmoid gate, 1x1
convolutions with biases), 1x1 head convolution to 1280 channels, BatchNorm epsilon
1e-3 and momentum 0.1 in PyTorch's convention (0.9 in Flax's), symmetric k // 2 padding,
SiLU activations, and no activation after the projection unless a fused block has no
expansion. Both have 21,458,488 parameters, and the equivalence test runs torchvision's
own model code beside ours on the same weights.

torchvision's names:

  features.0.0 / features.0.1                 stem convolution / BatchNorm
  features.<s>.<b>.block.<k>.0 / .1           convolution / BatchNorm number k of block b of stage s
  features.<s>.<b>.block.<k>.fc1 / .fc2       squeeze-excitation reduce / expand (MBConv only)
  features.<last>.0 / .1                      head 1x1 convolution / BatchNorm
  classifier.1                                the Linear classifier (classifier.0 is the dropout)

A block's position k depends on its kind, which the names themselves tell: a block
with a squeeze-excitation is an MBConv, `[expand,] depthwise, se, project`; one
without is a FusedMBConv, `[expand,] project`. Ours names them
`stage<s>_block<b+1>/{expand,depthwise,project}_{conv,bn}` and `se/{reduce,expand}`,
the stem `stem_conv`/`stem_bn`, the head `head_conv`/`head_bn`, the classifier `head`.
The conversion follows the names, not a fixed table, so torchvision's M and L files
convert as well (into a model of the same depth and width).

Depthwise weights [C, 1, k, k] become [k, k, 1, C], the kernel our depthwise
`nn.Conv(C, feature_group_count=C)` holds. timm's EfficientNetV2 files
(`conv_stem`, `blocks.*`, `conv_head`, `classifier`) are another naming, and for the
`tf_` ports another padding; they are refused with an error saying so.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from cxrjax.errors import UserError
from cxrjax.pretrained.layout import BATCH_NORM, to_flax_layout

# The head's variables (under 'params'): re-initialised for another number of classes.
HEAD = (('head',),)

EXPECTED = (
  "torchvision's efficientnet_v2_s names (features.0.0.weight, features.1.0.block.0.0.weight, ..., classifier.1.weight)"
)
_CONV_NORM = re.compile(r'features\.(\d+)\.([01])\.(\w+)')
_BLOCK = re.compile(r'features\.(\d+)\.(\d+)\.block\.(\d+)\.(0|1|fc1|fc2)\.(\w+)')
_TIMM_PREFIXES = ('conv_stem.', 'blocks.', 'conv_head.')


def _unknown(key: str) -> UserError:
  return UserError(f'unknown key {key!r}; expected {EXPECTED}')


def _conv_or_norm(module: str, part: str, leaf: str, key: str) -> tuple[str, ...]:
  """Path of a Conv2dNormActivation tensor: part '0' is the convolution, '1' the BatchNorm."""
  if part == '0' and leaf == 'weight':
    return ('params', f'{module}_conv', 'kernel')
  if part == '1' and leaf in BATCH_NORM:
    collection, name = BATCH_NORM[leaf]
    return (collection, f'{module}_bn', name)
  raise _unknown(key)


def _block_roles(stage: int, block: int, positions: dict[int, set[str]]) -> dict[int, str]:
  """Position k in `features.<stage>.<block>.block` -> 'expand', 'depthwise', 'se' or 'project'."""
  se = [k for k, parts in positions.items() if parts & {'fc1', 'fc2'}]
  convs = sorted(k for k, parts in positions.items() if parts & {'0', '1'})
  if len(se) > 1 or set(se) & set(convs):
    raise UserError(f'features.{stage}.{block}: unexpected block layout {sorted(positions)}; expected {EXPECTED}')
  if se:  # MBConv: [expand,] depthwise, se, project
    before, after = [k for k in convs if k < se[0]], [k for k in convs if k > se[0]]
    if len(after) != 1 or len(before) not in (1, 2):
      raise UserError(f'features.{stage}.{block}: unexpected MBConv layout; expected [expand,] depthwise, se, project')
    roles = dict(zip(before, ('expand', 'depthwise') if len(before) == 2 else ('depthwise',)))
    return {**roles, se[0]: 'se', after[0]: 'project'}
  if len(convs) not in (1, 2):  # FusedMBConv: [expand,] project
    raise UserError(f'features.{stage}.{block}: unexpected FusedMBConv layout; expected [expand,] project')
  return dict(zip(convs, ('expand', 'project') if len(convs) == 2 else ('project',)))


def flax_names(state: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
  """torch key -> flat Flax variable path, for every tensor of `state` but `num_batches_tracked`.

  Raises:
    UserError: a timm-named file, or a key that is not a torchvision EfficientNetV2 name (named).
  """
  keys = [k for k in state if not k.endswith('num_batches_tracked')]
  timm = next((k for k in keys if k.startswith(_TIMM_PREFIXES)), None)
  if timm is not None:
    raise UserError(
      f"key {timm!r} is timm's EfficientNetV2 naming; only torchvision-named EfficientNetV2 files are supported"
      f" ({EXPECTED}, e.g. torchvision's efficientnet_v2_s-dd5fe13b.pth)"
    )
  blocks: dict[tuple[int, int], dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
  for key in keys:
    if match := _BLOCK.fullmatch(key):
      stage, block, position, part, _ = match.groups()
      blocks[int(stage), int(block)][int(position)].add(part)
  roles = {where: _block_roles(*where, positions) for where, positions in blocks.items()}
  last_stage = max((stage for stage, _ in blocks), default=0)

  names = {}
  for key in keys:
    if key in ('classifier.1.weight', 'classifier.1.bias'):
      names[key] = ('params', 'head', 'kernel' if key.endswith('weight') else 'bias')
    elif match := _CONV_NORM.fullmatch(key):
      index, part, leaf = match.groups()
      if int(index) == 0:
        names[key] = _conv_or_norm('stem', part, leaf, key)
      elif int(index) == last_stage + 1:
        names[key] = _conv_or_norm('head', part, leaf, key)
      else:
        raise _unknown(key)
    elif match := _BLOCK.fullmatch(key):
      stage, block, position, part, leaf = match.groups()
      role = roles[int(stage), int(block)][int(position)]
      module = f'stage{stage}_block{int(block) + 1}'
      if role == 'se':
        if leaf not in ('weight', 'bias'):
          raise _unknown(key)
        sub = 'reduce' if part == 'fc1' else 'expand'
        names[key] = ('params', module, 'se', sub, 'kernel' if leaf == 'weight' else 'bias')
      else:
        collection, *rest = _conv_or_norm(role, part, leaf, key)
        names[key] = (collection, module, *rest)
    else:
      raise _unknown(key)
  return names


def torch_to_flax(state: dict[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
  """A torchvision EfficientNetV2 state_dict -> flat Flax variables {('params', 'stem_conv', 'kernel'): ...}.

  Raises:
    UserError: a timm-named file or an unknown key (named; the loader adds the file).
  """
  return {path: to_flax_layout(np.asarray(state[key])) for key, path in flax_names(state).items()}
