"""The classifier trainer: `train_and_evaluate(config, workdir, backend)`, and its program factory.

Trains a classifier (ResNet-18 by default) on the rebalanced training set,
validates every epoch, keeps the best parameters by `config.select_metric`,
and evaluates them on the real test split at threshold 0.5 and at the Youden
threshold chosen on validation. Resumes from `workdir/ckpt` automatically.
The imbalance method never appears here: it arrives as the TrainingSet's
sampling plan, extra rows and per-class loss weights.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cxrjax import checkpoint, config_lib, faults, fileio, losses, progress
from cxrjax import mesh as mesh_lib
from cxrjax.backends.base import Backend
from cxrjax.data import pipeline
from cxrjax.data.augment import AugmentParams
from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.eval import metrics as metrics_lib
from cxrjax.eval import report
from cxrjax.models import HEADS, build_classifier
from cxrjax.trainers import common, finetune, loop
from cxrjax.trainers.program import Program, count_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any  # {'params', 'batch_stats'} moving average, or None when model.ema_decay == 0


def normalize(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], on device (4x less host->device traffic).

  [-1, 1] rather than [0, 1]: the latter gave lower test specificity on PneumoniaMNIST
  (BUILD_NOTES.md).
  """
  return images.astype(jnp.float32) / 127.5 - 1.0


def create_state(model, tx, image_shape, rng, use_ema: bool = False, start=None) -> TrainState:
  """The initial state: fresh variables from `rng`, or `start` (variables to begin from, e.g. pretrained)."""
  variables = start if start is not None else model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    ema={'params': params, 'batch_stats': batch_stats} if use_ema else None,
  )


def eval_variables(state: TrainState) -> dict:
  """The variables that are validated and tested: the EMA when kept, else the raw ones."""
  if state.ema is not None:
    return state.ema
  return {'params': state.params, 'batch_stats': state.batch_stats}


def update_ema(ema, params, batch_stats, step, decay: float):
  # TF-style warm-up of the decay, so early averages are not dominated by the init.
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  new = {'params': params, 'batch_stats': batch_stats}
  return jax.tree.map(lambda e, x: d * e + (1.0 - d) * x, ema, new)


def make_train_step(model, tx, loss_config, ema_decay: float = 0.0, aux_loss_weight: float = 0.0):
  """A pure `train_step(state, batch, rng) -> (state, metrics)`.

  With `aux_loss_weight > 0` the model's auxiliary logits (sown as
  `intermediates/aux_logits`, Inception-V3's auxiliary classifier) add their loss at that weight.
  """

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    x = normalize(batch['image'])

    def loss_of(logits):
      return losses.classification_loss(
        logits,
        batch['label'],
        batch['weight'],
        name=loss_config.name,
        focal_gamma=loss_config.focal_gamma,
        label_smoothing=loss_config.label_smoothing,
      )

    def loss_fn(params):
      logits, mutated = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        mutable=['batch_stats', 'intermediates'] if aux_loss_weight else ['batch_stats'],
        rngs={'dropout': rng},
      )
      loss = loss_of(logits)
      if aux_loss_weight:
        loss = loss + aux_loss_weight * loss_of(mutated['intermediates']['aux_logits'][0])
      return loss, (logits, mutated['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = update_ema(ema, params, batch_stats, state.step.astype(jnp.float32), ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
    out = dict(
      loss=loss,
      accuracy=jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)),
      grad_norm=optax.global_norm(grads),
    )
    return new_state, out

  return train_step


def make_predict(model):
  def predict(variables: dict, images: jax.Array) -> jax.Array:
    logits = model.apply(variables, normalize(images), train=False)
    return jax.nn.softmax(logits, axis=-1)

  return predict


def predict_split(predict_fn, variables, split: Split, batch_size: int, mesh) -> np.ndarray:
  """[N, K] class probabilities for a whole split (sharded batches, gathered)."""
  outs = []
  for images, _, mask in pipeline.eval_batches(split, batch_size, jax.process_index(), jax.process_count()):
    g = mesh_lib.to_global({'image': images, 'mask': mask}, mesh)
    probs = mesh_lib.to_host(predict_fn(variables, g['image']))
    outs.append(probs[mesh_lib.to_host(g['mask'])])
  return np.concatenate(outs)[: len(split)]


def evaluate(probs: np.ndarray, split: Split, config, class_names, threshold: float = 0.5) -> dict:
  m = metrics_lib.evaluate_predictions(
    split.labels, probs, positive_class=config.data.positive_class, threshold=threshold, class_names=class_names
  )
  m['loss'] = metrics_lib.log_loss(split.labels, probs)
  return m


def _select_value(m: dict, key: str) -> float:
  v = m[key]
  return -v if key == 'loss' else v


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, backend: Backend | None = None, feature_encoder=None
) -> dict:
  """Trains, validates, checkpoints and tests a classifier; writes the workdir outputs.

  Args:
    config: a finalized config (see `cxrjax.config_lib`).
    workdir: output folder; an existing run there is resumed.
    backend: the platform kernels (`cxrjax.backends.select`); stock when None.
    feature_encoder: for SMOTE in feature space, `(config, workdir, backend) -> encoder`
      (see `common.prepare_data`); `cxrjax.trainers.TRAINERS` passes the reference network's,
      which then trains on `backend` too.

  Returns:
    The metrics record written to `workdir/metrics.json`.
  """
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch_size(config.batch_size, mesh)
  mesh_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  backend = backend or Backend()
  encoder = functools.partial(feature_encoder, backend=backend) if feature_encoder else None
  data = common.prepare_data(config, workdir, encoder)
  ts = data.training_set
  spe = pipeline.steps_per_epoch(ts, config.batch_size)
  if spe == 0:
    raise UserError(
      f'config.batch_size={config.batch_size} is larger than the {len(ts.plan)} training examples; lower it'
    )
  total_steps = spe * config.num_epochs

  # A missing or mismatched weights file stops here, before the run writes anything.
  pretrained_record = finetune.check_pretrained(config, data.dataset.num_classes, data.dataset.image_shape)
  run = common.Run(config, workdir).open()
  try:
    done = common.completed_record(run)
    if done is not None:
      return done
    return _train(config, run, mesh, data, spe, total_steps, backend, pretrained_record)
  finally:
    run.close()


def program(config, num_classes: int, image_shape, backend: Backend, total_steps: int, steps_per_epoch: int) -> Program:
  """The classifier's training program: `config.model` on `backend`'s layers, `config.optim`, `config.loss`."""
  model = build_classifier(finetune.model_config(config), num_classes, image_shape, backend.layers)
  heads = HEADS[config.model.name]
  tx, schedule = finetune.make_optimizer(config.optim, total_steps, steps_per_epoch, backend, heads)
  init_rng = common.base_key(config, 'classifier/init')
  start = None
  if config.model.pretrained:
    start = functools.partial(finetune.start_variables, model, config.model, image_shape, init_rng)
  aux_weight = config.model.aux_loss_weight if config.model.aux_logits else 0.0
  return Program(
    name=config.model.name,
    init=functools.partial(create_state, model, tx, image_shape, init_rng, config.model.ema_decay > 0),
    step=make_train_step(model, tx, config.loss, config.model.ema_decay, aux_weight),
    init_options=backend.compile_options('init'),
    step_options=backend.compile_options(config.model.name),
    modules={'classifier': model},
    schedule=schedule,
    start=start,
  )


def _train(
  config, run: common.Run, mesh, data: common.PreparedData, spe: int, total_steps: int, backend, pretrained_record
) -> dict:
  ds, ts = data.dataset, data.training_set
  k = ds.num_classes
  common.banner(data, config, backend)
  prog = program(config, k, ds.image_shape, backend, total_steps, spe)
  model = prog.modules['classifier']
  state_sh = mesh_lib.state_shardings(jax.eval_shape(prog.init), mesh, config.mesh.fsdp_min_size)
  variables_sh = {'params': state_sh.params, 'batch_stats': state_sh.batch_stats}
  batch_sh = mesh_lib.batch_sharding(mesh)
  predict = jax.jit(make_predict(model), in_shardings=(variables_sh, batch_sh), out_shardings=batch_sh)

  val_syn = data.val_synthetic  # rebalance.synthetic_val: validation with synthetic rows too
  select_syn = val_syn is not None and config.rebalance.get('synthetic_val_select', False)

  def validate(step: int, state, train_avg: dict) -> tuple[float, dict]:
    variables = eval_variables(state)
    if not all(common.finite(x) for x in jax.tree.leaves(jax.device_get(variables['params']))):
      raise loop.TrainingDiverged(f'parameters became NaN/Inf by step {step}')
    val_probs = predict_split(predict, variables, ds.splits['val'], config.eval_batch_size, mesh)
    vm = evaluate(val_probs, ds.splits['val'], config, ds.class_names)
    keys = config_select_keys(vm)
    record = dict(epoch=step // spe, step=step, train_loss=train_avg.get('loss'),
                  train_accuracy=train_avg.get('accuracy'), lr=float(prog.schedule(step)),
                  **{f'val_{key}': vm[key] for key in keys})  # fmt: skip
    run.writer.scalars(step, {f'val/{key}': vm[key] for key in keys})
    if val_syn is not None:
      sm = evaluate(predict_split(predict, variables, val_syn, config.eval_batch_size, mesh), val_syn, config,
                    ds.class_names)  # fmt: skip
      record.update({f'valsyn_{key}': sm[key] for key in config_select_keys(sm)})
      run.writer.scalars(step, {f'val_with_synthetic/{key}': sm[key] for key in config_select_keys(sm)})
      if select_syn:
        return _select_value(sm, config.select_metric), record
    return _select_value(vm, config.select_metric), record

  def report_epoch(step: int, record: dict, improved: bool) -> None:
    metric = config.select_metric
    syn = f' | val+synthetic {metric} {record[f"valsyn_{metric}"]:.4f}' if val_syn is not None else ''
    progress.log(
      f'[classifier] epoch {step // spe}/{config.num_epochs} val {metric} {record[f"val_{metric}"]:.4f}'
      f' auroc {record["val_auroc"]:.4f} f1 {record["val_f1"]:.4f}{syn}' + (' (best)' if improved else '')
    )

  augment = AugmentParams.from_config(config.data.augment)
  train_ds = pipeline.make_train_dataset(
    ts,
    global_batch=config.batch_size,
    num_epochs=config.num_epochs,
    seed=config.seed,
    augment=augment,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  result = loop.run(
    prog,
    name='classifier',
    workdir=run.workdir,
    mesh=mesh,
    make_batches=lambda start: pipeline.train_iterator(
      train_ds,
      start,
      num_threads=config.data.num_threads,
      prefetch=config.data.prefetch,
      num_workers=config.data.num_workers,
    ),  # fmt: skip
    total_steps=total_steps,
    rng=common.base_key(config, 'classifier/step'),
    log_every=config.log_every_steps,
    checkpoint_every=config.checkpoint_every_steps,
    fsdp_min_size=config.mesh.fsdp_min_size,
    config_hash=config_lib.config_hash(config),
    writer=run.writer,
    batch_size=config.batch_size,
    validation=loop.Validation(
      every=spe,
      evaluate=validate,
      keep=eval_variables,
      shardings=variables_sh,
      metric=config.select_metric,
      report=report_epoch,
    ),  # fmt: skip
    metric_prefix='train',
  )
  best_vars, meta = result.best, result.meta

  # Test the best checkpoint: threshold 0.5 and the Youden threshold chosen on validation.
  val_probs = predict_split(predict, best_vars, ds.splits['val'], config.eval_batch_size, mesh)
  test_probs = predict_split(predict, best_vars, ds.splits['test'], config.eval_batch_size, mesh)
  out_val = {'threshold_0.5': evaluate(val_probs, ds.splits['val'], config, ds.class_names)}
  out_test = {'threshold_0.5': evaluate(test_probs, ds.splits['test'], config, ds.class_names)}
  out_val_syn, syn_probs = None, None
  if val_syn is not None:
    syn_probs = predict_split(predict, best_vars, val_syn, config.eval_batch_size, mesh)
    out_val_syn = {'threshold_0.5': evaluate(syn_probs, val_syn, config, ds.class_names)}
  if k == 2:
    pos = config.data.positive_class
    # The Youden threshold comes from the validation set that selects the checkpoint.
    sel_split, sel_probs = (val_syn, syn_probs) if select_syn else (ds.splits['val'], val_probs)
    thr = metrics_lib.youden_threshold(sel_split.labels == pos, sel_probs[:, pos])
    out_val['youden'] = evaluate(val_probs, ds.splits['val'], config, ds.class_names, thr)
    out_test['youden'] = evaluate(test_probs, ds.splits['test'], config, ds.class_names, thr)
    if out_val_syn is not None:
      out_val_syn['youden'] = evaluate(syn_probs, val_syn, config, ds.class_names, thr)
  record = dict(
    kind='classifier',
    phantom=ds.is_phantom,
    run=common.run_info(config, backend),
    data=data.record(),
    model=dict(name=config.model.name, width=config.model.width, num_params=count_params(best_vars['params'])),
    finetune=finetune.record(config, spe, pretrained_record),
    train=dict(
      steps=total_steps,
      steps_per_epoch=spe,
      epochs=config.num_epochs,
      wall_time_s=meta['wall_time'],
      input_wait_fraction=float(meta.get('input_wait_s', 0.0)) / max(meta['wall_time'], 1e-9),
      images_per_s=total_steps * config.batch_size / max(meta['wall_time'], 1e-9),
      best=meta['best'],
      history=meta['validation'],
    ),
    val=out_val,
    test=out_test,
  )
  if out_val_syn is not None:
    record['val_with_synthetic'] = out_val_syn
    record['selected_on'] = 'val+synthetic' if select_syn else 'val'
  # Every process takes part in the orbax save (it synchronises them); only
  # process 0 writes the files beside it.
  export_classifier(run.path('export'), best_vars, config, ds)
  if jax.process_index() == 0:
    fileio.atomic_save_npz(
      run.path('predictions.npz'),
      dict(
        val_probs=val_probs.astype(np.float32),
        val_labels=ds.splits['val'].labels,
        test_probs=test_probs.astype(np.float32),
        test_labels=ds.splits['test'].labels,
        test_names=ds.splits['test'].names.astype(str),
        test_sources=ds.splits['test'].sources.astype(str),
      ),
    )
    faults.maybe_fail('final-eval')
    report.write_classifier_outputs(run.workdir, record, ds.class_names)
  # Every process reads these back (the reference network: export and metrics.json; TRTS: the export).
  common.sync(f'classifier outputs {run.workdir}')
  t = out_test.get('youden', out_test['threshold_0.5'])
  progress.log(
    f'[classifier] test ({"youden" if k == 2 else "argmax"}): auroc {t["auroc"]:.4f} f1 {t["f1"]:.4f}'
    f' sensitivity {t["sensitivity"]:.4f} specificity {t["specificity"]:.4f} -> {run.path("metrics.json")}'
  )
  return record


def export_classifier(path: str, variables, config, ds) -> None:
  """The tested (best) variables and what is needed to rebuild the model, for reuse.

  Used for Grad-CAM and as the reference feature network of the generator quality
  metrics. Orbax writes it atomically; the JSON beside it names the model.
  """
  info = dict(
    model=finetune.model_config(config).to_dict(),  # input_norm resolved: the export rebuilds as trained
    num_classes=ds.num_classes,
    image_shape=list(ds.image_shape),
    class_names=list(ds.class_names),
    data=ds.source.get('description', ''),
    config_hash=config_lib.config_hash(config),
  )
  checkpoint.save_tree(os.path.join(path, 'variables'), variables)
  if jax.process_index() == 0:
    fileio.atomic_write_json(os.path.join(path, 'model.json'), info)


def config_select_keys(m: dict) -> list[str]:
  return [key for key in ('loss', 'accuracy', 'balanced_accuracy', 'f1', 'mcc', 'kappa', 'youden_j', 'auroc', 'auprc',
                          'sensitivity', 'specificity') if key in m]  # fmt: skip
