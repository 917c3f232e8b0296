"""Where pretrained weights come from: a `model.pretrained` value resolved to a file or an export folder.

Three kinds of value:

- A weights file: a path to a `.pth`/`.pt`/`.bin` (torch.save) or `.safetensors`
  file (`~` expanded, relative to the working directory).
- `'torchvision'`: torchvision's ImageNet weights (IMAGENET1K_V1), read from the very
  file torchvision keeps in its cache when a model is built with
  `weights='IMAGENET1K_V1'`: `<hub>/checkpoints/<file name>`, with `<hub>` the default
  of `torch.hub.get_dir()`, `$TORCH_HOME/hub`, where `TORCH_HOME` defaults to
  `$XDG_CACHE_HOME/torch` and `XDG_CACHE_HOME` to `~/.cache`. A machine that has
  used these weights from PyTorch already has the file; cxrjax itself never
  downloads, and when the file is missing the error gives a command that fetches it
  to that place (`curl`, or torchvision's own download).
- A cxrjax classifier export: a folder holding `model.json` (and the orbax
  `variables/` beside it), as the classifier trainer writes to a run's `export/`.
  A folder whose `export/` subfolder is one (a run folder) stands for it.

torchvision's files (https://download.pytorch.org/models/):
  resnet18            resnet18-f37072fd.pth              (ResNet18_Weights.IMAGENET1K_V1)
  efficientnet_v2_s   efficientnet_v2_s-dd5fe13b.pth     (EfficientNet_V2_S_Weights.IMAGENET1K_V1)
  inception_v3        inception_v3_google-0cc3c7bd.pth   (Inception_V3_Weights.IMAGENET1K_V1)
The hex part of each name is the start of the file's SHA-256, which torch.hub checks
when it downloads; `hash_prefix` returns it so the loader can warn about a file that
does not match its name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

from cxrjax.errors import UserError

TORCHVISION_BASE_URL = 'https://download.pytorch.org/models/'


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
  """One of torchvision's pretrained weight files.

  Attributes:
    builder: the `torchvision.models` function that builds the network.
    weights: the weights' enum value (`weights=` of `builder`).
    file_name: the file under torchvision's download folder and cache.
  """

  builder: str
  weights: str
  file_name: str

  @property
  def url(self) -> str:
    return TORCHVISION_BASE_URL + self.file_name


# cxrjax model name -> torchvision's ImageNet weights for the same architecture.
TORCHVISION = {
  'resnet18': TorchvisionWeights('resnet18', 'IMAGENET1K_V1', 'resnet18-f37072fd.pth'),
  'efficientnet_v2_s': TorchvisionWeights('efficientnet_v2_s', 'IMAGENET1K_V1', 'efficientnet_v2_s-dd5fe13b.pth'),
  'inception_v3': TorchvisionWeights('inception_v3', 'IMAGENET1K_V1', 'inception_v3_google-0cc3c7bd.pth'),
}

_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,})\.[A-Za-z]+$')


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A resolved `model.pretrained` value.

  Attributes:
    source: the value as given.
    path: absolute path of the weights file, or of the export folder.
    kind: 'file' (read with `files.read_state`) or 'export' (a cxrjax export folder,
      loaded with orbax by the caller).
  """

  source: str
  path: str
  kind: str


def torch_home() -> str:
  """PyTorch's cache root as `torch.hub` computes it: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch."""
  xdg = os.getenv('XDG_CACHE_HOME', '~/.cache')
  return os.path.expanduser(os.getenv('TORCH_HOME', os.path.join(xdg, 'torch')))


def torchvision_path(model_name: str) -> str:
  """Where torchvision caches the ImageNet weights of `model_name` (`<torch home>/hub/checkpoints/<file>`).

  Raises:
    UserError: torchvision has no weights for this model.
  """
  if model_name not in TORCHVISION:
    raise UserError(
      f"model.pretrained='torchvision': torchvision has no ImageNet weights for model {model_name!r}; expected one"
      f' of {", ".join(TORCHVISION)} (or give a weights file or a cxrjax export folder)'
    )
  return os.path.join(torch_home(), 'hub', 'checkpoints', TORCHVISION[model_name].file_name)


def download_command(path: str, weights: TorchvisionWeights) -> str:
  """Shell commands that put torchvision's file at `path`: curl, or torchvision itself (into its cache)."""
  fetch = f'curl -L --create-dirs -o {shlex.quote(path)} {weights.url}'
  python = f'import torchvision; torchvision.models.{weights.builder}(weights={weights.weights!r})'
  return f'{fetch} (or, to torchvision\'s cache: python -c "{python}")'


def known_weights(path: str) -> TorchvisionWeights | None:
  """torchvision's weights whose file name `path` has, if any."""
  name = os.path.basename(path)
  return next((w for w in TORCHVISION.values() if w.file_name == name), None)


def download_hint(path: str) -> str:
  """'; download it with: <command>' when `path` is named as one of torchvision's files, else ''."""
  weights = known_weights(path)
  return f'; download it with: {download_command(path, weights)}' if weights else ''


def hash_prefix(path: str) -> str | None:
  """The SHA-256 prefix in a torchvision-style file name ('resnet18-f37072fd.pth' -> 'f37072fd'), if any."""
  if known_weights(path) is None:
    return None
  match = _HASH_IN_NAME.search(os.path.basename(path))
  return match.group(1) if match else None


def resolve(model_name: str, pretrained: str) -> Resolved:
  """Resolves a `model.pretrained` value (see the module docstring); the file or folder must exist.

  Args:
    model_name: `config.model.name` (selects torchvision's file for 'torchvision').
    pretrained: a weights file, 'torchvision', or a cxrjax export folder.

  Raises:
    UserError: the value is empty, the file or folder does not exist (with the
      download command when the file is one of torchvision's), or a folder is not an export.
  """
  if not pretrained or not str(pretrained).strip():
    raise UserError('model.pretrained is empty; expected a weights file, torchvision or a cxrjax export folder')
  if pretrained == 'torchvision':
    path = torchvision_path(model_name)
    if not os.path.isfile(path):
      weights = TORCHVISION[model_name]
      raise UserError(
        f"{path}: torchvision's {model_name} weights ({weights.weights}) not found in the torch hub cache;"
        f' download them with: {download_command(path, weights)}'
      )
    return Resolved(pretrained, path, 'file')
  path = os.path.abspath(os.path.expanduser(pretrained))
  if os.path.isdir(path):
    for folder in (path, os.path.join(path, 'export')):
      if os.path.isfile(os.path.join(folder, 'model.json')):
        return Resolved(pretrained, folder, 'export')
    raise UserError(
      f'{path}: a folder without model.json; expected a weights file (.pth, .pt, .bin or .safetensors) or a cxrjax'
      ' export folder (model.json and variables/)'
    )
  if not os.path.isfile(path):
    raise UserError(f'{path}: weights file not found{download_hint(path)}')
  return Resolved(pretrained, path, 'file')
