"""Orbax checkpoints: the train state, extra pytrees and JSON metadata, atomically.

One checkpoint step holds everything a run needs to continue as if it had
never stopped: the train state (parameters, optimizer state, step), any extra
pytrees (e.g. the best-so-far parameters) and a JSON record (history, best
metric, config hash). The data position needs no saving: the input pipeline
is a pure function of the step. Orbax writes to a temporary folder and renames
it when complete, so a kill during a save leaves the previous step intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cxrjax.errors import UserError


def abstract(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) for restoring `tree` in place."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Keeps the latest `max_to_keep` steps of (pytrees..., meta) under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 1, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, trees: dict[str, Any], meta: dict[str, Any]) -> None:
    """Saves pytrees and a JSON-able `meta` dict as one step (replacing it if present)."""
    if step in self.manager.all_steps():
      return  # deterministic runs re-save identical content after a resume
    args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    args['meta'] = ocp.args.JsonSave(meta)
    self.manager.save(step, args=ocp.args.Composite(**args))

  def restore(self, step: int, abstract_trees: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the named pytrees into the given shapes/shardings, and the meta dict.

    Raises:
      UserError: the checkpoint does not fit the model (another config or model).
    """
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_trees.items()}
    args['meta'] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(
        f'{self.directory}/{step}: checkpoint does not match this model/config ({str(e).splitlines()[0][:160]});'
        ' use another workdir or --overwrite'
      ) from e
    trees = {name: out[name] for name in abstract_trees}
    return trees, dict(out['meta'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_tree(path: str, tree) -> None:
  """Saves one pytree to `path` (replacing it), synchronously and atomically."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree, force=True)
  ckptr.wait_until_finished()


def load_tree(path: str, abstract_tree=None):
  """Restores a pytree saved by `save_tree` (onto `abstract_tree`'s shapes/shardings if given)."""
  if not os.path.isdir(path):
    raise UserError(f'{path}: no saved model here')
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore(os.path.abspath(path), abstract_tree)
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path}: saved variables do not fit the model ({str(e).splitlines()[0][:160]})') from e
