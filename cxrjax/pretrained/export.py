"""Starting a classifier from a cxrjax export folder (`model.json` + orbax `variables/`).

An export is what the classifier trainer leaves in a run's `export/`: the tested
variables and the model settings that rebuild the network (`model.json`, written by
`cxrjax.trainers.classifier.export_classifier`). Loading one into a new model is
fine-tuning from an earlier run: same architecture (`model.name` must match and every
variable outside the head must have the same shape), any number of classes (the head
follows the same rules as for weight files). The export's 'model' settings go into the
record, since the new run must prepare its input as the exported one did (its
`input_norm`, channels, stem).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cxrjax import checkpoint, fileio
from cxrjax.errors import UserError
from cxrjax.pretrained import merge


def folder_digest(folder: str) -> tuple[str, int]:
  """(SHA-256 over the folder's files, total bytes): each file's relative path and bytes, in sorted order."""
  digest, total = hashlib.sha256(), 0
  files = sorted(
    os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
  )
  for rel in files:
    digest.update(rel.encode('utf-8') + b'\0')
    with open(os.path.join(folder, rel), 'rb') as f:
      while block := f.read(1 << 20):
        digest.update(block)
        total += len(block)
  return digest.hexdigest(), total


def load_export(
  model_name: str,
  template: Mapping[str, Any],
  folder: str,
  keep_head: bool = False,
  head: Sequence[merge.Path] = merge.DEFAULT_HEAD,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The template's variables filled from the export in `folder` (see `merge.merge` for the rules).

  Returns:
    (variables, record): `record` is `merge.merge`'s plus 'path', 'format' ('export'),
    'sha256' and 'bytes' of the folder's files, 'export_model' (model.json's 'model'
    settings) and 'export_num_classes'.

  Raises:
    UserError: model.json is unreadable or names another model, the variables cannot be
      read, or their shapes do not fit the model (first offending variable named).
  """
  info_path = os.path.join(folder, 'model.json')
  info = fileio.read_json(info_path)
  exported = (
    info.get('model', {}).get('name') if isinstance(info, dict) and isinstance(info.get('model'), dict) else None
  )
  if exported is None:
    raise UserError(f"{info_path}: no 'model' settings with a 'name'; expected the model.json of a cxrjax export")
  if exported != model_name:
    raise UserError(f'{info_path}: an export of model {exported!r}; expected {model_name!r} (model.name)')
  variables_dir = os.path.join(folder, 'variables')
  try:
    tree = checkpoint.load_tree(variables_dir)
  except UserError:
    raise
  except Exception as e:  # orbax raises many types for a damaged folder
    first = (str(e).strip().splitlines() or [''])[0][:160]
    raise UserError(f'{variables_dir}: cannot read the exported variables ({type(e).__name__}: {first})') from e
  flat = merge.flatten({k: tree[k] for k in ('params', 'batch_stats') if k in tree})
  variables, record = merge.merge(template, flat, variables_dir, head=head, keep_head=keep_head)
  sha, size = folder_digest(folder)
  record.update(
    path=folder,
    format='export',
    sha256=sha,
    bytes=size,
    export_model=info['model'],
    export_num_classes=info.get('num_classes'),
  )
  return variables, record
