"""One device mesh per run, built from `config.mesh` and passed explicitly.

Axes are ('data', 'fsdp'). Batches are split over both axes; parameters and
optimizer state are replicated by default and, when `mesh.fsdp > 1`, sharded
along their largest divisible dimension over 'fsdp' (ZeRO-3 style: XLA
all-gathers them for the forward pass). Host data becomes global arrays with
`jax.make_array_from_process_local_data`: each process contributes its rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh; one axis may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1:
    if n % fsdp:
      raise UserError(f'config.mesh.fsdp={fsdp}: expected a divisor of the {n} devices')
    data = n // fsdp
  elif fsdp == -1:
    if n % data:
      raise UserError(f'config.mesh.data={data}: expected a divisor of the {n} devices')
    fsdp = n // data
  if data * fsdp != n:
    raise UserError(f'config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices; this run has {n}')
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = 'batch_size') -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise UserError(f'config.{key}={batch_size}: expected a multiple of the {n} devices in the mesh')
  if batch_size % jax.process_count():
    raise UserError(f'config.{key}={batch_size}: expected a multiple of the {jax.process_count()} processes')


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp` (if the leaf is big enough)."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, min_size: int = 2**14):
  """A sharding for every leaf of a (train-state) pytree, by the rule above."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp, min_size)), abstract_state)


def to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process host batches -> global arrays split along the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as a NumPy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
