"""Run in a subprocess with 8 forced CPU devices: sharded vs single-device training steps.

Both sides use the stock layers (the same kernels), in float64: sharding changes only
the order of reductions (BatchNorm statistics, gradient all-reduces), whose rounding in
float64 is ~1e-16 relative, so any difference above the tolerance is a sharding error
(per-shard statistics, a missing all-reduce), not arithmetic. Models cast their outputs
to float32, so losses carry float32 rounding of values that agree to ~1e-15.

Prints one JSON line: per mesh, the losses of each step and the final parameters' max
abs difference from the single-device run.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrjax import config_lib
from cxrjax import mesh as mesh_lib
from cxrjax.models import resnet
from cxrjax.models.dcgan import Discriminator, Generator
from cxrjax.trainers import classifier, gan

jax.config.update('jax_enable_x64', True)


def float64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def run(mesh_shape, images, labels, steps, fsdp_min_size, devices):
  mesh = mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict(dict(data=mesh_shape[0], fsdp=mesh_shape[1])), devices)
  # A two-stage ResNet (one block each): every kind of layer of ResNet-18 (stem, residual
  # blocks, strided projection, BatchNorm, head) at a quarter of its compile time.
  model = resnet.ResNet(2, width=16, stem='cifar', stage_sizes=(1, 1), dtype=jnp.float64)
  tx = optax.sgd(0.01, momentum=0.9)
  cfg = config_lib.base_config().loss
  init = lambda rng: float64(classifier.create_state(model, tx, images.shape[1:], rng))  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = mesh_lib.state_shardings(abstract, mesh, fsdp_min_size)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  step_fn = jax.jit(
    classifier.make_train_step(model, tx, cfg),
    in_shardings=(state_sh, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
    out_shardings=(state_sh, mesh_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
  sharded_leaves = sum(1 for s in jax.tree.leaves(state_sh) if s.spec != jax.sharding.PartitionSpec())
  losses = []
  for i in range(steps):
    sl = slice(16 * i, 16 * (i + 1))
    batch = mesh_lib.to_global({'image': images[sl], 'label': labels[sl], 'weight': np.ones(16, np.float32)}, mesh)
    state, m = step_fn(state, batch, jax.random.key(1))
    losses.append(float(m['loss']))
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  return losses, params, sharded_leaves


def run_gan(mesh_shape, images, labels, steps, fsdp_min_size, devices):
  mesh = mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict(dict(data=mesh_shape[0], fsdp=mesh_shape[1])), devices)
  cfg = config_lib.with_profile(config_lib.base_config(), 'smoke')
  cfg.trainer = 'gan'
  cfg.gan.conditional = True
  cfg = config_lib.finalize(cfg)
  g = cfg.gan
  gen = Generator(image_size=28, channels=1, latent_dim=g.latent_dim, base_width=g.g_width, num_classes=2,
                  dtype=jnp.float64)  # fmt: skip
  disc = Discriminator(image_size=28, channels=1, base_width=g.d_width, num_classes=2, norm=g.d_norm, dtype=jnp.float64)
  g_tx, d_tx = optax.sgd(0.01), optax.sgd(0.01)

  def init():
    y = jnp.zeros((2,), jnp.int32)
    gv = gen.init(jax.random.key(0), jnp.zeros((2, cfg.gan.latent_dim)), y, train=False)
    dv = disc.init(jax.random.key(1), jnp.zeros((2, 28, 28, 1)), y, train=False)
    return float64(
      gan.GANState(
        step=jnp.zeros((), jnp.int32),
        g_params=gv['params'],
        g_stats=gv['batch_stats'],
        d_params=dv['params'],
        d_stats=dv.get('batch_stats', {}),
        g_opt=g_tx.init(gv['params']),
        d_opt=d_tx.init(dv['params']),
        g_ema={'params': gv['params'], 'batch_stats': gv['batch_stats']},
      )
    )

  abstract = jax.eval_shape(init)
  state_sh = mesh_lib.state_shardings(abstract, mesh, fsdp_min_size)
  state = jax.jit(init, out_shardings=state_sh)()
  step_fn = jax.jit(
    gan.make_gan_step(gen, disc, g_tx, d_tx, cfg, 2),
    in_shardings=(state_sh, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
    out_shardings=(state_sh, mesh_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
  losses = []
  for i in range(steps):
    sl = slice(16 * i, 16 * (i + 1))
    batch = mesh_lib.to_global({'image': images[sl], 'label': labels[sl]}, mesh)
    state, m = step_fn(state, batch, jax.random.key(2))
    losses.append([float(m['d_loss']), float(m['g_loss'])])
  return losses, jax.tree.map(np.asarray, jax.device_get(state.g_params))


def main(part: str):
  """`part`: 'classifier' or 'gan' (each test runs its own, so two test workers share the work)."""
  assert jax.device_count() == 8, jax.devices()
  with np.load(os.path.join(os.environ['CXRJAX_DATA_DIR'], 'pneumoniamnist.npz')) as z:
    images = z['train_images'][:48, :, :, None]
    labels = z['train_labels'][:48, 0].astype(np.int32)
  out = {}
  if part == 'classifier':
    ref_losses, ref_params, _ = run((1, 1), images, labels, 3, 2**14, jax.devices()[:1])
    out['single'] = {'losses': ref_losses}
    for name, shape in (('data8', (8, 1)), ('fsdp', (2, 4))):
      losses, params, n_sharded = run(shape, images, labels, 3, 256, jax.devices())
      diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params))
      scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_params))
      out[name] = {'losses': losses, 'max_param_diff': max(diffs), 'param_scale': scale, 'sharded_leaves': n_sharded}
    # Leaves FSDP should shard at fsdp_min_size 256: parameters that large, and their momenta.
    out['fsdp']['large_leaves'] = 2 * sum(1 for x in jax.tree.leaves(ref_params) if x.size >= 256)
  else:
    ref_losses, ref_g = run_gan((1, 1), images, labels, 3, 2**14, jax.devices()[:1])
    out['gan_single'] = {'losses': ref_losses}
    for name, shape in (('gan_data8', (8, 1)), ('gan_fsdp', (2, 4))):
      losses, g = run_gan(shape, images, labels, 3, 256, jax.devices())
      diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), g, ref_g))
      out[name] = {'losses': losses, 'max_param_diff': max(diffs)}
  print(json.dumps(out))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
