"""Training guards and hidden-transfer checks: NaN/Inf stops naming the step, checkpoints must fit, no implicit transfers."""

import re

import jax
import numpy as np
import optax
import pytest

from cxrjax import config_lib
from cxrjax import mesh as mesh_lib
from cxrjax.data.dataset import Dataset, Split, concat
from cxrjax.models import resnet
from cxrjax.trainers import classifier, common

from conftest import run_cli


def error_line(r):
  lines = [x for x in r.stderr.splitlines() if x.startswith('cxrjax: error:')]
  assert len(lines) == 1, r.stderr[-2000:]
  return lines[0]


@pytest.mark.e2e
def test_nan_stops_the_run_naming_step_and_checkpoint(tmp_path):
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={tmp_path / "w"}', '--config.optim.lr=1e30'])
  assert r.returncode == 2
  line = error_line(r)
  # The first metric to turn NaN/Inf (here the gradient norm, after the first huge update) names its step.
  m = re.search(r'became NaN/Inf at step (\d+); last good checkpoint: ', line)
  assert m and 1 <= int(m.group(1)) <= 10, line


@pytest.mark.e2e
def test_generator_checkpoint_from_another_model_is_refused(tmp_path):
  shared = tmp_path / 'generator'
  args = ['--config=configs/dcgan.py:smoke', f'--config.generator_dir={shared}',
          f'--config.quality.reference_dir={tmp_path / "ref"}']  # fmt: skip
  r = run_cli([*args, f'--workdir={tmp_path / "a"}', '--config.gan.steps=10'])
  assert r.returncode == 0, r.stderr[-2000:]
  r = run_cli([*args, f'--workdir={tmp_path / "b"}', '--config.gan.steps=10', '--config.gan.g_width=16'])
  assert r.returncode == 2
  line = error_line(r)
  assert str(shared) in line and 'does not match this model/config' in line


def test_train_step_makes_no_implicit_transfers(npz_path):
  """Batches become global arrays explicitly; inside the loop nothing is copied implicitly."""
  mesh = mesh_lib.make_mesh(config_lib.base_config().mesh)
  model = resnet.resnet18(2, width=4)
  tx = optax.adam(1e-3)
  with np.load(npz_path) as z:
    local = {'image': z['train_images'][:8, :, :, None], 'label': z['train_labels'][:8, 0].astype(np.int32),
             'weight': np.ones(8, np.float32)}  # fmt: skip
  init = lambda: classifier.create_state(model, tx, (28, 28, 1), jax.random.key(0))  # noqa: E731
  state_sh = mesh_lib.state_shardings(jax.eval_shape(init), mesh)
  state = jax.jit(init, out_shardings=state_sh)()
  step = jax.jit(
    classifier.make_train_step(model, tx, config_lib.base_config().loss),
    in_shardings=(state_sh, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
    out_shardings=(state_sh, mesh_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
  rng = jax.device_put(jax.random.key(1), mesh_lib.replicated(mesh))
  batch = mesh_lib.to_global(local, mesh)
  state, _ = step(state, batch, rng)  # compile outside the guard
  with jax.transfer_guard('disallow'):
    for _ in range(2):
      state, m = step(state, batch, rng)
  assert np.isfinite(float(m['loss']))


def test_leakage_check_counts_training_images_seen_in_val_or_test():
  rng = np.random.default_rng(0)

  def split(images):
    n = len(images)
    return Split(images, np.arange(n, dtype=np.int32) % 2, np.array([f'g{i}' for i in range(n)]),
                 np.array([f'n{i}' for i in range(n)]))  # fmt: skip

  imgs = lambda n: rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)  # noqa: E731
  train, val, test = imgs(20), imgs(6), imgs(6)
  ds = Dataset({'train': split(train), 'val': split(val), 'test': split(test)}, ('a', 'b'), {'kind': 'test'})
  assert common.check_leakage(ds, ds.splits['train']) == {'train_in_val': 0, 'train_in_test': 0}
  # Two test images copied into the real training rows, one val image among added (synthetic) rows.
  pool = concat(split(np.concatenate([train, test[[1, 4]]])), split(val[[2]]))
  assert common.check_leakage(ds, pool) == {'train_in_val': 1, 'train_in_test': 2}
  # A one-pixel change is a different image.
  near = test[[0]].copy()
  near[0, 0, 0, 0] ^= 1
  assert common.check_leakage(ds, concat(ds.splits['train'], split(near)))['train_in_test'] == 0
