"""The fine-tuning recipe of the classifier trainer: pretrained start, input path, backbone learning rate.

A classifier starts from `config.model.pretrained` (a torchvision/timm weights file,
torchvision's cache, or a cxrjax export; `cxrjax.pretrained` reads and converts it)
with a new head for the task's classes. What the weights expect of their input
(`model.input_norm: 'auto'`) follows the weights: ImageNet statistics for ResNet and
EfficientNetV2, [-1, 1] for Inception-V3, an export's own setting for an export.
The backbone (every parameter outside the model's head) can learn at a fraction of
the head's learning rate and be held still for the first epochs, through
`optax.multi_transform`; BatchNorm can keep the imported statistics (`model.batch_norm`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from cxrjax import pretrained, progress
from cxrjax.models import HEADS, build_classifier
from cxrjax.trainers import common

# What torchvision's and timm's ImageNet weights expect of their input (cxrjax.models.preprocess).
WEIGHTS_INPUT_NORM = {
  'resnet18': 'imagenet',
  'efficientnet_v2_b0': 'imagenet',
  'efficientnet_v2_s': 'imagenet',
  'inception_v3': 'inception',
}


def input_norm(model_config) -> str:
  """`model.input_norm`, with 'auto' resolved from the pretrained weights (see the module docstring)."""
  if model_config.input_norm != 'auto':
    return model_config.input_norm
  if not model_config.pretrained:
    return 'none'
  resolved = pretrained.sources.resolve(model_config.name, model_config.pretrained)
  if resolved.kind == 'export':  # the input path the export was trained with
    with open(os.path.join(resolved.path, 'model.json')) as f:
      return json.load(f).get('model', {}).get('input_norm', 'none')
  return WEIGHTS_INPUT_NORM[model_config.name]


def model_config(config) -> ml_collections.ConfigDict:
  """`config.model` as the classifier is built and exported: `input_norm` resolved, and the ImageNet
  stem for weights files."""
  resolved = ml_collections.ConfigDict(config.model.to_dict())
  resolved.input_norm = input_norm(config.model)
  if config.model.pretrained and resolved.stem == 'auto' and not _is_export(config.model):
    # ImageNet weights belong to the ImageNet stem at any image size; EfficientNetV2's stride-1
    # stem has the same shapes, so the weights would load into another network without an error.
    resolved.stem = 'imagenet'
  return resolved


def _is_export(m) -> bool:
  return pretrained.sources.resolve(m.name, m.pretrained).kind == 'export'


def is_head(path: tuple[str, ...], heads) -> bool:
  return any(path[: len(h)] == tuple(h) for h in heads)


def param_labels(params, heads) -> dict:
  """The tree of `params` with 'head' on the classification head's leaves and 'backbone' elsewhere."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: 'head' if is_head(p, heads) else 'backbone' for p in flat})


def is_split(optim) -> bool:
  """Whether the backbone learns differently from the head."""
  return optim.backbone_lr_mult != 1.0 or optim.freeze_backbone_epochs > 0


def make_optimizer(optim, total_steps: int, steps_per_epoch: int, backend, heads):
  """(optax transform, head learning-rate schedule): `common.make_optimizer`, with the backbone's rate
  scaled by `optim.backbone_lr_mult` and zero for the first `optim.freeze_backbone_epochs`.

  Clipping, when asked for, applies to the global norm of all gradients, before the split.
  """
  if not is_split(optim):
    return common.make_optimizer(optim, total_steps, steps_per_epoch, backend)
  schedule = common.make_schedule(optim, total_steps, steps_per_epoch)
  frozen_steps = int(round(optim.freeze_backbone_epochs * steps_per_epoch))
  mult = optim.backbone_lr_mult

  def backbone_schedule(step):
    return jnp.where(step < frozen_steps, 0.0, mult * schedule(step))

  tx = optax.multi_transform(
    {
      'head': common.make_update(optim, schedule, backend),
      'backbone': common.make_update(optim, backbone_schedule, backend),
    },
    lambda params: param_labels(params, heads),
  )
  return common.clip(optim, tx), schedule


def record(config, steps_per_epoch: int, pretrained_record: dict | None) -> dict:
  """What the run started from and what it trained, for `metrics.json` and `report.md`."""
  m, o = config.model, config.optim
  frozen_steps = int(round(o.freeze_backbone_epochs * steps_per_epoch))
  trained = 'all layers'
  if o.freeze_backbone_epochs >= config.num_epochs or o.backbone_lr_mult == 0:
    trained = 'the head only (backbone frozen throughout)'
  elif frozen_steps:
    trained = f'the head only for {frozen_steps} steps ({o.freeze_backbone_epochs:g} epochs), then all layers'
  if o.backbone_lr_mult not in (0.0, 1.0):
    trained += f'; backbone at {o.backbone_lr_mult:g}x the learning rate'
  if m.batch_norm == 'frozen':
    trained += '; BatchNorm statistics frozen'
  return dict(
    pretrained=pretrained_record,
    input_norm=input_norm(m),
    head=list('/'.join(h) for h in HEADS[m.name]),
    trained=trained,
    backbone_lr_mult=o.backbone_lr_mult,
    freeze_backbone_epochs=o.freeze_backbone_epochs,
    freeze_backbone_steps=frozen_steps,
    batch_norm=m.batch_norm,
  )


def abstract_variables(model, image_shape) -> dict:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def check_pretrained(config, num_classes: int, image_shape) -> dict | None:
  """The record of `model.pretrained` (None when training from scratch), read and checked in full
  against the model before a run writes anything: a missing, unreadable or mismatched file is
  the one-line `UserError` of `cxrjax.pretrained.load_pretrained`.
  """
  if not config.model.pretrained:
    return None
  model = build_classifier(model_config(config), num_classes, image_shape)
  _, rec = pretrained.load_pretrained(
    config.model.name, abstract_variables(model, image_shape), config.model.pretrained, config.model.pretrained_head
  )
  return rec


def start_variables(model, model_config, image_shape, rng) -> dict:
  """The variables a fine-tuning run starts from: the pretrained file's, with a fresh head from `rng`."""
  fresh = jax.jit(lambda: model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False))()
  template = {'params': fresh['params'], 'batch_stats': fresh.get('batch_stats', {})}
  variables, rec = pretrained.load_pretrained(
    model_config.name, template, model_config.pretrained, keep_head=model_config.pretrained_head
  )
  progress.log(
    f'[classifier] starting from {rec["source"]} ({rec["format"]}, sha256 {rec["sha256"][:12]}): {rec["tensors"]}'
    f' variables; head {rec["head"]}' + (f'; not used: {len(rec["ignored"])} tensors' if rec['ignored'] else '')
  )
  return variables
