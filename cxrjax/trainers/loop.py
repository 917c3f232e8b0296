"""The one training loop: every trainer (classifier, GAN, autoencoder, diffusion) runs its program here.

It does what every trainer needs and nothing model-specific: parameters born
sharded (`eval_shape` -> shardings -> jitted init with `out_shardings`), one
jitted step with explicit shardings and donation, global batches from the Grain
pipeline, periodic logging with a NaN/Inf guard, orbax checkpoints with automatic
resume, callbacks after each report (samples, collapse checks), optional
per-epoch validation with best-checkpoint selection (`Validation`), and a
`done.json` marker so a finished stage is skipped. What runs is a `Program`
(`cxrjax.trainers.program`): its init, its step and their compile options.
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
from cxrjax.errors import UserError
from cxrjax.trainers.program import Program


class TrainingDiverged(UserError):
  """The loss or parameters became NaN/Inf, or the GAN collapsed: the run stops here."""


@dataclasses.dataclass(frozen=True)
class Validation:
  """Validation every `every` steps (an epoch), keeping the best variables: the classifier's hook into `run`.

  Attributes:
    every: steps between validations (the last step need not be one).
    evaluate: (step, state, averaged train metrics) -> (value, record): the selection value
      (higher is better; NaN never improves) and the record kept in the history.
    keep: state -> the tree kept when it is the best so far (a jitted copy: the state is donated).
    shardings: the shardings of that tree (it is checkpointed beside the state as 'best').
    metric: the selection metric's name, kept with the best record.
    report: optional (step, record, improved) -> None, after the selection.
  """

  every: int
  evaluate: Callable[[int, Any, dict], tuple[float, dict]]
  keep: Callable[[Any], Any]
  shardings: Any
  metric: str
  report: Callable[[int, dict, bool], None] | None = None


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  wall_time_s: float
  history: list[dict]  # averaged metrics of every report
  resumed_from: int | None
  skipped: bool
  best: Any = None  # with a Validation: the best variables
  meta: dict = dataclasses.field(default_factory=dict)  # the checkpointed metadata (validation, best, input wait)


def _diverged(name: str, what: str, last_good: int | None, workdir: str) -> TrainingDiverged:
  where = f'{workdir}/ckpt/{last_good}' if last_good is not None else 'none (diverged before the first save)'
  return TrainingDiverged(f'[{name}] {what}; last good checkpoint: {where}')


def run(
  program: Program,
  *,
  name: str,
  workdir: str,
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
  validation: Validation | None = None,
  metric_prefix: str | None = None,
) -> LoopResult:
  """Trains `total_steps` steps of `program.step(state, batch, rng) -> (state, metrics)`.

  Args:
    program: what to train: its init, step and their compile options.
    name: for logs, fault points (`<name>-step`, `<name>-checkpoint`) and metric names.
    workdir: this stage's folder (ckpt/ and done.json live here).
    mesh: the device mesh.
    make_batches: start_step -> iterator of per-process host batches.
    total_steps: steps to train.
    rng: the base key handed to every step (the step folds in its own counter).
    log_every: steps between metric reports (and NaN checks); with a Validation,
      every validation step reports too.
    checkpoint_every: steps between checkpoints (0: none between validations); the
      last step and every validation step are always saved.
    fsdp_min_size: parameters smaller than this stay replicated under FSDP.
    config_hash: recorded in done.json; a different hash means retrain.
    writer: optional MetricWriter.
    callbacks: fn(step, state, metrics) after each report (samples, collapse checks);
      they may raise TrainingDiverged.
    batch_size: global batch size, for images/s.
    validation: per-epoch validation with best-checkpoint selection.
    metric_prefix: prefix of the writer's metric names (default: `name`).

  Returns:
    A LoopResult with the final state (and the best variables with a Validation).
  """
  os.makedirs(workdir, exist_ok=True)
  prefix = name if metric_prefix is None else metric_prefix
  abstract = jax.eval_shape(program.init)
  state_sh = mesh_lib.state_shardings(abstract, mesh, fsdp_min_size)
  repl = mesh_lib.replicated(mesh)
  batch_sh = mesh_lib.batch_sharding(mesh)
  done_path = os.path.join(workdir, 'done.json')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'))
  latest = ckpt.latest_step()
  meta: dict[str, Any] = dict(history=[], wall_time=0.0, config_hash=config_hash, input_wait_s=0.0)
  if validation is not None:
    meta.update(validation=[], best=None)
  keep = jax.jit(validation.keep, out_shardings=validation.shardings) if validation is not None else None
  try:
    if latest is not None:
      targets = {'state': checkpoint.abstract(abstract, state_sh)}
      if validation is not None:
        best_abstract = jax.eval_shape(validation.keep, abstract)
        targets['best'] = checkpoint.abstract(best_abstract, validation.shardings)
      trees, restored = ckpt.restore(latest, targets)
      meta.update(restored)
      if validation is not None and not meta.get('validation') and meta['history'] and 'epoch' in meta['history'][0]:
        # Classifier checkpoints written before the loop was shared kept epoch records under 'history'.
        meta['validation'], meta['history'] = meta['history'], []
      state, best = trees['state'], trees.get('best')
      if meta.get('config_hash') not in (None, config_hash):
        raise UserError(f'{workdir}: checkpoint was made with another config; use another workdir or --overwrite')
      start = int(latest)
      done = fileio.read_json(done_path) if os.path.isfile(done_path) else None
      if done is not None and done.get('config_hash') == config_hash and start >= total_steps:
        progress.log(f'[{name}] already trained ({start} steps); skipping')
        return LoopResult(state, start, float(meta.get('wall_time', 0.0)), meta['history'], start, True, best, meta)
      progress.log(f'[{name}] resumed from {workdir}/ckpt at step {start}')
    else:
      start_variables = program.start() if program.start is not None else None
      init = jax.jit(program.init, out_shardings=state_sh, compiler_options=program.init_options)
      state = init(start_variables) if start_variables is not None else init()
      best = keep(state) if keep is not None else None
      start = 0

    step_jit = jax.jit(
      program.step,
      in_shardings=(state_sh, batch_sh, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
      compiler_options=program.step_options,
    )
    prog = progress.Progress(name, total_steps, start)
    batches = make_batches(start)
    wall0, t_session = float(meta.get('wall_time', 0.0)), time.time()
    wait0, wait_s = float(meta.get('input_wait_s', 0.0)), 0.0
    last_good = start if latest is not None else None
    pending: list[tuple[int, dict]] = []
    avg: dict[str, float] = {}
    step = start
    t_int, n_int = time.time(), 0

    def save(step: int) -> None:
      meta['wall_time'] = wall0 + time.time() - t_session
      meta['input_wait_s'] = wait0 + wait_s
      ckpt.save(step, {'state': state} | ({'best': best} if validation is not None else {}), meta)

    while step < total_steps:
      t0 = time.time()
      local = next(batches)  # time blocked here is time the step waits on input
      wait_s += time.time() - t0
      batch = mesh_lib.to_global(local, mesh)
      state, m = step_jit(state, batch, rng)
      pending.append((step + 1, m))
      step += 1
      n_int += batch_size
      faults.maybe_fail(f'{name}-step', step, before_kill=ckpt.wait)
      validate = validation is not None and step % validation.every == 0
      if step % log_every == 0 or step == total_steps or validate:
        host = jax.device_get([x for _, x in pending])
        for (s, _), h in zip(pending, host):
          bad = [k for k, v in h.items() if not np.all(np.isfinite(v))]
          if bad:
            raise _diverged(name, f'{", ".join(bad)} became NaN/Inf at step {s}', last_good, workdir)
        avg = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        pending.clear()
        dt = time.time() - t_int
        ips = n_int / max(dt, 1e-9)
        t_int, n_int = time.time(), 0
        meta['history'].append(dict(step=step, **avg))
        line = {k: round(v, 4) for k, v in avg.items()}
        scalars = {f'{prefix}/{k}': v for k, v in avg.items()} | {f'{prefix}/images_per_s': ips}
        if program.schedule is not None:
          line['lr'] = scalars[f'{prefix}/lr'] = float(program.schedule(step))
        if validation is not None:
          line = {'epoch': f'{(step - 1) // validation.every + 1}/{-(-total_steps // validation.every)}', **line}
        wait = 100 * wait_s / max(time.time() - t_session, 1e-9)
        prog.report(step, **line, img_s=round(ips, 1), input_wait=f'{wait:.1f}%')
        if writer is not None:
          writer.scalars(step, scalars)
        for cb in callbacks or ():
          cb(step, state, avg)
      if validate:
        try:
          value, record = validation.evaluate(step, state, avg)
        except TrainingDiverged as e:  # e.g. parameters NaN/Inf: name the last good checkpoint
          raise _diverged(name, str(e), last_good, workdir) from e
        meta['validation'].append(record)
        improved = meta['best'] is None or (value == value and value > meta['best']['value'])
        if improved:
          best = keep(state)
          meta['best'] = dict(epoch=step // validation.every, step=step, value=float(value), metric=validation.metric)
        if validation.report is not None:
          validation.report(step, record, improved)
      if validate or step == total_steps or (checkpoint_every and step % checkpoint_every == 0):
        save(step)
        faults.maybe_fail(f'{name}-checkpoint', step)
        last_good = step
    ckpt.wait()
    meta['wall_time'] = wall0 + time.time() - t_session
    meta['input_wait_s'] = wait0 + wait_s
    if jax.process_index() == 0:
      fileio.atomic_write_json(done_path, dict(step=step, wall_time_s=meta['wall_time'], config_hash=config_hash))
    return LoopResult(state, step, meta['wall_time'], meta['history'], latest, False, best, meta)
  finally:
    ckpt.close()
