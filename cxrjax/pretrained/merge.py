"""Filling a model's freshly initialised variables from converted pretrained ones.

`merge` takes the model's own variables as the template (their names and shapes are
the truth) and the file's variables as flat Flax paths, and checks before it copies:

- every template leaf outside the head must come from the file with exactly its
  shape; the first one that does not is reported with the file, the torch key where
  there is one, both shapes, and a hint when the cause is a known setting (a
  one-channel stem under three-channel ImageNet weights, a CIFAR stem under an
  ImageNet one);
- the head (the classifier layer, `HEAD` prefixes under 'params') is taken from the
  file only when asked to (`keep_head`) and when all its shapes match, i.e. the
  model has as many classes as the file; otherwise the template's fresh
  initialisation for K classes is kept, and the record says which leaves and why;
- file variables the model has no place for (e.g. an auxiliary classifier the model
  is built without) are listed and announced, not an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from cxrjax.errors import UserError

Path = tuple[str, ...]
DEFAULT_HEAD: tuple[Path, ...] = (('head',),)
# The collections weights fill; others a template may carry (e.g. 'perturbations' from an init
# with every collection) are kept as they are.
COLLECTIONS = ('params', 'batch_stats')


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Nested mappings -> {(key, ..., leaf name): leaf}, in the mappings' order."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """The inverse of `flatten`, as plain dicts."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def is_head(path: Path, head: Sequence[Path]) -> bool:
  """Whether `path` ((collection, module, ...)) lies under one of the `head` module prefixes."""
  return any(tuple(path[1 : 1 + len(prefix)]) == tuple(prefix) for prefix in head)


def path_name(path: Path) -> str:
  return '/'.join(path)


def _shape_hint(path: Path, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
  """What setting makes the model's shape differ from the file's, when it is a known one."""
  if path[-1] == 'kernel' and len(found) == len(expected) == 4:
    if found[:2] != expected[:2] and any('stem' in p for p in path):
      return (
        f"; the file's stem convolution is {found[0]}x{found[1]}, the model's {expected[0]}x{expected[1]}: build the"
        " model with model.stem='imagenet'"
      )
    if found[2] == 3 and expected[2] != 3 and (found[:2], found[3]) == (expected[:2], expected[3]):
      return (
        "; pretrained ImageNet weights take 3-channel input: set model.input_norm to 'auto' or 'imagenet' (a"
        ' grayscale image is repeated to RGB)'
      )
  return "; the model must have the file network's width and depth (model.width, model.width_mult, model.depth_mult)"


def merge(
  template: Mapping[str, Any],
  flat: Mapping[Path, np.ndarray],
  where: str,
  head: Sequence[Path] = DEFAULT_HEAD,
  keep_head: bool = False,
  names: Mapping[Path, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The template's variables with every leaf taken from `flat`, the head only on request.

  Args:
    template: the model's initialised variables ({'params': ..., 'batch_stats': ...}),
      for any number of classes.
    flat: the file's variables, {(collection, module, ..., leaf): array}, in Flax layout.
    where: the file (or folder) they came from, for messages.
    head: module prefixes (under 'params') of the classifier head.
    keep_head: take the head from the file when its shapes match the model's.
    names: Flax path -> the file's own key (torch name), for messages and the record.

  Returns:
    (variables, record): `variables` has the template's structure; leaves from the file
    are NumPy arrays of the template leaf's dtype, the others the template's own.
    `record` is {'tensors': leaves loaded from the file, 'head': 'loaded' or
    'reinitialised', 'head_reason': why not loaded (None if loaded), 'reinitialised':
    head leaves kept from the template, 'ignored': the file's keys the model has no
    place for}.

  Raises:
    UserError: one line naming `where`, the first template leaf missing from the file or
      of another shape there, both shapes, and a hint for a known cause.
  """
  names = names or {}

  def label(path: Path) -> str:
    key = names.get(path)
    return f'{key!r} ({path_name(path)})' if key else path_name(path)

  def shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))

  model = flatten(template)
  # Checked in the file's order (a state_dict's is the network's, stem first), then what it lacks.
  position = {p: i for i, p in enumerate(flat)}
  ordered = sorted((p for p in model if p[0] in COLLECTIONS), key=lambda p: position.get(p, len(position)))
  body = [p for p in ordered if not is_head(p, head)]
  missing = [p for p in body if p not in flat]
  for path in body:
    if path not in flat:
      raise UserError(
        f'{where}: the file has no tensor for {label(path)} (first of {len(missing)} model variables missing); expected'
        ' weights of the same architecture'
      )
    found, expected = shape(flat[path]), shape(model[path])
    if found != expected:
      raise UserError(
        f'{where}: {label(path)} has shape {found} in the file, expected {expected} (Flax layout)'
        + _shape_hint(path, found, expected)
      )

  head_paths = [p for p in ordered if is_head(p, head)]
  reason = None
  if not keep_head:
    reason = "keep_head is off: a fresh head for the model's classes"
  else:
    for path in head_paths:
      if path not in flat:
        reason = f'the file has no {path_name(path)}'
        break
      if shape(flat[path]) != shape(model[path]):
        reason = f'{label(path)} has shape {shape(flat[path])} in the file, {shape(model[path])} in the model'
        break
  take = set(body) | (set() if reason else set(head_paths))
  out = {p: np.asarray(flat[p], dtype=model[p].dtype) if p in take else v for p, v in model.items()}
  ignored = [names.get(p, path_name(p)) for p in flat if p not in model]
  reinitialised = [] if not reason else [path_name(p) for p in head_paths]
  if ignored:
    logging.warning('%s: %d tensors of the file are not used by the model: %s', where, len(ignored), ', '.join(ignored))
  if reinitialised:
    logging.info('%s: head %s re-initialised (%s)', where, ', '.join(reinitialised), reason)
  record = {
    'tensors': len(take),
    'head': 'reinitialised' if reason else 'loaded',
    'head_reason': reason,
    'reinitialised': reinitialised,
    'ignored': ignored,
  }
  return unflatten(out), record
