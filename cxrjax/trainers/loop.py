"""A step-based training loop shared by the generator trainers (GAN, autoencoder, diffusion).

It does what every such trainer needs and nothing model-specific: parameters born
sharded (`eval_shape` -> shardings -> jitted init with `out_shardings`), one
jitted step with explicit shardings and donation, global batches from the Grain
pipeline, periodic logging with a NaN/Inf guard, orbax checkpoints with automatic
resume, optional sample and health callbacks, and a `done.json` marker so a
finished stage is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from cxrjax import checkpoint, faults, fileio, progress
from cxrjax import mesh as mesh_lib
from cxrjax.backends.base import Backend
from cxrjax.errors import UserError


class TrainingDiverged(UserError):
  """The loss or parameters became NaN/Inf, or the GAN collapsed: the run stops here."""


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  wall_time_s: float
  history: list[dict]
  resumed_from: int | None
  skipped: bool


def run(
  *,
  name: str,
  workdir: str,
  init_fn: Callable[[], Any],
  step_fn: Callable,
  mesh,
  make_batches: Callable[[int], Iterator[dict]],
  total_steps: int,
  rng: jax.Array,
  log_every: int,
  checkpoint_every: int,
  fsdp_min_size: int,
  config_hash: str,
  writer=None,
  callbacks: list[Callable[[int, Any, dict], None]] | None = None,
  batch_size: int = 0,
  backend: Backend | None = None,
  program: str = '',
) -> LoopResult:
  """Trains `total_steps` steps of `step_fn(state, batch, rng) -> (state, metrics)`.

  Args:
    name: for logs and metric names.
    workdir: this stage's folder (ckpt/ and done.json live here).
    init_fn: () -> initial state pytree (jitted with the state's shardings).
    step_fn: the pure train step; `rng` is passed as is (fold in the step inside).
    mesh: the device mesh.
    make_batches: start_step -> iterator of per-process host batches.
    total_steps: steps to train.
    rng: the base key handed to every step.
    log_every: steps between metric reports (and NaN checks).
    checkpoint_every: steps between checkpoints (the last step is always saved).
    fsdp_min_size: parameters smaller than this stay replicated under FSDP.
    config_hash: recorded in done.json; a different hash means retrain.
    writer: optional MetricWriter.
    callbacks: fn(step, state, metrics) after each report (samples, collapse checks);
      they may raise TrainingDiverged.
    batch_size: global batch size, for images/s.
    backend: the platform backend, for the programs' compile options (stock when None).
    program: the step's name for `backend.compile_options` (the model it trains).

  Returns:
    A LoopResult with the final state.
  """
  backend = backend or Backend()
  os.makedirs(workdir, exist_ok=True)
  abstract = jax.eval_shape(init_fn)
  state_sh = mesh_lib.state_shardings(abstract, mesh, fsdp_min_size)
  repl = mesh_lib.replicated(mesh)
  batch_sh = mesh_lib.batch_sharding(mesh)
  done_path = os.path.join(workdir, 'done.json')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'))
  latest = ckpt.latest_step()
  meta: dict[str, Any] = dict(history=[], wall_time=0.0, config_hash=config_hash)
  try:
    if latest is not None:
      trees, meta = ckpt.restore(latest, {'state': checkpoint.abstract(abstract, state_sh)})
      state = trees['state']
      if meta.get('config_hash') not in (None, config_hash):
        raise UserError(f'{workdir}: checkpoint was made with another config; use another workdir or --overwrite')
      start = int(latest)
      done = fileio.read_json(done_path) if os.path.isfile(done_path) else None
      if done is not None and done.get('config_hash') == config_hash and start >= total_steps:
        progress.log(f'[{name}] already trained ({start} steps); skipping')
        return LoopResult(state, start, float(meta.get('wall_time', 0.0)), meta.get('history', []), start, True)
      progress.log(f'[{name}] resumed from {workdir}/ckpt at step {start}')
    else:
      state = jax.jit(init_fn, out_shardings=state_sh, compiler_options=backend.compile_options('init'))()
      start = 0

    step_jit = jax.jit(
      step_fn,
      in_shardings=(state_sh, batch_sh, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
      compiler_options=backend.compile_options(program),
    )
    prog = progress.Progress(name, total_steps, start)
    wall0, t0 = float(meta.get('wall_time', 0.0)), time.time()
    last_good = start if latest is not None else None
    pending: list[tuple[int, dict]] = []
    batches = make_batches(start)
    step = start
    t_int, n_int = time.time(), 0
    while step < total_steps:
      batch = mesh_lib.to_global(next(batches), mesh)
      state, m = step_jit(state, batch, rng)
      pending.append((step + 1, m))
      step += 1
      n_int += batch_size
      faults.maybe_fail(f'{name}-step', step, before_kill=ckpt.wait)
      if step % log_every == 0 or step == total_steps:
        host = jax.device_get([x for _, x in pending])
        for (s, _), h in zip(pending, host):
          bad = [k for k, v in h.items() if not np.all(np.isfinite(v))]
          if bad:
            raise TrainingDiverged(
              f'[{name}] {", ".join(bad)} became NaN/Inf at step {s}; last good checkpoint: '
              + (f'{workdir}/ckpt/{last_good}' if last_good is not None else 'none (diverged before the first save)')
            )
        avg = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        pending.clear()
        dt = time.time() - t_int
        avg_line = {k: round(v, 4) for k, v in avg.items()}
        prog.report(step, **avg_line, img_s=round(n_int / max(dt, 1e-9), 1))
        t_int, n_int = time.time(), 0
        meta['history'].append(dict(step=step, **avg))
        if writer is not None:
          writer.scalars(step, {f'{name}/{k}': v for k, v in avg.items()})
        for cb in callbacks or ():
          cb(step, state, avg)
      if step % checkpoint_every == 0 or step == total_steps:
        meta['wall_time'] = wall0 + time.time() - t0
        ckpt.save(step, {'state': state}, meta)
        faults.maybe_fail(f'{name}-checkpoint', step)
        last_good = step
    ckpt.wait()
    wall = wall0 + time.time() - t0
    if jax.process_index() == 0:
      fileio.atomic_write_json(done_path, dict(step=step, wall_time_s=wall, config_hash=config_hash))
    return LoopResult(state, step, wall, meta['history'], latest, False)
  finally:
    ckpt.close()
