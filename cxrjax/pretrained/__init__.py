"""Pretrained weights for cxrjax's classifiers: find the file, read it, convert it, fill the model.

`load_pretrained(model_name, template, pretrained, keep_head)` is the whole path:

1. `sources.resolve`: `pretrained` is a weights file, 'torchvision' (the file
   torchvision caches for its ImageNet weights; cxrjax never downloads, a missing file's
   error gives the command), or a cxrjax export folder.
2. `files.read_state`: the file's float tensors as NumPy arrays (PyTorch files through
   `torch.load(weights_only=True)` when PyTorch is installed; safetensors without it),
   with the file's SHA-256 for the record.
3. `convert`: the model's converter (`CONVERTERS`) renames PyTorch keys to Flax
   variable paths and changes layouts (pure NumPy).
4. `merge.merge`: every variable of the freshly initialised model outside the
   classifier head is replaced by the file's, with exactly matching shapes; the head
   comes from the file only with `keep_head` and the same number of classes.

Export folders skip 2-3: their orbax variables already have Flax names (`export.py`).

A converter is a module with
  `torch_to_flax(state: dict[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]`
    (flat Flax paths such as ('params', 'stem_conv', 'kernel'); raises `UserError`
    naming an unknown key; the file name is added here),
  `HEAD`: module prefixes of the classifier head under 'params', e.g. (('head',),),
and optionally `flax_names(state) -> dict[str, tuple[str, ...]]` (torch key -> path),
which lets errors and the record name the file's own keys.

Importing this package loads NumPy (and absl logging) only; PyTorch is imported when a PyTorch file is
read, orbax when an export folder is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from cxrjax.errors import UserError
from cxrjax.pretrained import efficientnet_v2, files, inception_v3, merge, resnet, sources

# config.model.name -> converter of torchvision-named state_dicts into that model.
CONVERTERS = {
  'resnet18': resnet,
  'efficientnet_v2_s': efficientnet_v2,
  'inception_v3': inception_v3,
}


def converter(model_name: str):
  """The converter module for `model_name`.

  Raises:
    UserError: no converter (weights files are supported for `CONVERTERS` only).
  """
  if model_name not in CONVERTERS:
    raise UserError(
      f'model.pretrained: no converter of weight files for model {model_name!r}; expected one of'
      f' {", ".join(CONVERTERS)} (a cxrjax export folder works for any classifier)'
    )
  return CONVERTERS[model_name]


def convert(
  model_name: str, state: dict[str, np.ndarray], where: str
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[tuple[str, ...], str]]:
  """(flat Flax variables, Flax path -> torch key) of a state_dict, with `where` (the file) in errors.

  Raises:
    UserError: no converter for the model, or a key the converter does not know.
  """
  module = converter(model_name)
  try:
    flat = module.torch_to_flax(state)
    names = {path: key for key, path in module.flax_names(state).items()} if hasattr(module, 'flax_names') else {}
  except UserError as e:
    raise UserError(f'{where}: {e} (model.name={model_name!r})') from e
  return flat, names


def load_file(
  model_name: str, template: Mapping[str, Any], path: str, keep_head: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The template's variables filled from a weights file; see `load_pretrained`."""
  head = converter(model_name).HEAD  # before reading: no converter, no point in reading the file
  state, info = files.read_state(path)
  flat, names = convert(model_name, state, path)
  variables, record = merge.merge(template, flat, path, head, keep_head, names)
  prefix = sources.hash_prefix(path)
  matches = None if prefix is None else info['sha256'].startswith(prefix)
  if matches is False:
    logging.warning(
      '%s: SHA-256 %s... does not start with the %s its name promises: not the published file (or damaged)',
      path,
      info['sha256'][:12],
      prefix,
    )
  record.update(path=path, format=info['format'], sha256=info['sha256'], bytes=info['bytes'])
  record['sha256_matches_name'] = matches
  return variables, record


def load_pretrained(
  model_name: str, template: Mapping[str, Any], pretrained: str, keep_head: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The model's initialised variables with pretrained ones put in.

  Args:
    model_name: `config.model.name` ('resnet18', 'efficientnet_v2_s', 'inception_v3'; any classifier for
      an export folder).
    template: the model's freshly initialised variables, {'params': ..., 'batch_stats':
      ...}, for any number of classes.
    pretrained: a weights file (.pth, .pt, .bin, .safetensors), 'torchvision', or a cxrjax
      export folder (see `sources`).
    keep_head: keep the file's classifier head when the model has as many classes;
      otherwise (and by default) the head is the template's fresh initialisation.

  Returns:
    (variables, record). `variables` has the template's structure; leaves taken from the
    file are float32 NumPy arrays (put them on devices as the template's would be), the
    others are the template's own. `record` (JSON-able) is
      'model': `model_name`; 'source': `pretrained` as given; 'path': the file or export
      folder read; 'format': 'torch', 'safetensors' or 'export'; 'sha256', 'bytes': of
      the file (of all the folder's files for an export); 'sha256_matches_name': for
      torchvision's file names, whether the hash agrees with the name (None otherwise;
      absent for exports); 'tensors': variables loaded from the file; 'head': 'loaded' or
      'reinitialised', 'head_reason' (None when loaded) and 'reinitialised' (the head
      variables kept from the template, as 'params/head/kernel'); 'ignored': the file's
      keys the model has no place for (announced with a warning);
      for exports also 'export_model' (the export's model.json 'model' settings, its
      input_norm included) and 'export_num_classes'.

  Raises:
    UserError: one line naming the file and what is wrong: not found (with the download
      command for torchvision's files), unreadable or truncated, PyTorch missing for a
      PyTorch file, another architecture (the first unknown key), or a variable of
      another shape (both shapes, and the setting to change when known).
  """
  resolved = sources.resolve(model_name, pretrained)
  if resolved.kind == 'export':
    from cxrjax.pretrained import export  # noqa: PLC0415 - orbax is needed for export folders only

    head = CONVERTERS[model_name].HEAD if model_name in CONVERTERS else merge.DEFAULT_HEAD
    variables, record = export.load_export(model_name, template, resolved.path, keep_head, head)
  else:
    variables, record = load_file(model_name, template, resolved.path, keep_head)
  return variables, {'model': model_name, 'source': resolved.source, **record}


__all__ = ['CONVERTERS', 'convert', 'converter', 'files', 'load_file', 'load_pretrained', 'merge', 'sources']
