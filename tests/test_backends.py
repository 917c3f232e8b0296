"""The backend seam: a pure core, stock models free of custom calls, and where each backend is chosen.

- Importing cxrjax changes nothing in the process (environment, allocator, JAX's
  configuration); only an entry point configures it.
- With the stock backend every model is plain Flax on `jax.lax`: no custom call in a
  lowered training step, no custom VJP in any `apply`, and forward-mode autodiff works.
- The CPU backend's layers create the same variables as the stock ones (checkpoints
  move freely between them).
- `select` decides from the environment before JAX starts: GPU/TPU platforms, several
  devices and multi-process runs get the stock backend, and so do the launch scripts.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrjax import backends, config_lib
from cxrjax.backends.base import Backend
from cxrjax.backends.cpu import layers as cpu_layers
from cxrjax.backends.cpu.backend import CpuBackend
from cxrjax.errors import UserError
from cxrjax.models import autoencoder, dcgan, efficientnet_v2, inception, resnet, unet
from cxrjax.models.layers import STOCK

from conftest import ROOT, init_variables, normal, run_cli

PACKAGE = ROOT / 'cxrjax'

# In a fresh interpreter: import the whole package and report what changed. The third-party
# libraries are imported first (jax and numpy set variables of their own on import). ctypes raises
# an audit event for every symbol it looks up, so a `mallopt` call cannot go unseen; `os.exec*` and
# `os.putenv` raise one too.
_IMPORT_EVERYTHING = """
import json, os, sys
import jax, numpy, scipy, sklearn, flax.linen, optax, orbax.checkpoint, grain, ml_collections, absl, matplotlib, PIL
events = []
sys.addaudithook(lambda e, a: events.append([e, str(a[1] if e == 'ctypes.dlsym' else a[0])]) if e in ('ctypes.dlsym', 'os.exec', 'os.putenv', 'os.unsetenv') else None)
before = dict(os.environ)
cache_before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
import cxrjax, cxrjax.models, cxrjax.trainers, cxrjax.data, cxrjax.eval, cxrjax.sweep, cxrjax.sweep.plan
import cxrjax.sweep.report, cxrjax.trainers.reference
from jax._src import xla_bridge
print(json.dumps(dict(
  env_changed=sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
  cache=[cache_before, [jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs]],
  events=events,
  jax_started=xla_bridge.backends_are_initialized(),
  torch='torch' in sys.modules,
)))
"""


def test_importing_cxrjax_changes_nothing_in_the_process():
  r = subprocess.run([sys.executable, '-c', _IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['env_changed'] == [], out  # XLA_FLAGS, NPROC, LD_PRELOAD, JAX_* untouched
  assert out['cache'][0] == out['cache'][1], out  # no compilation cache configured
  assert not [e for e in out['events'] if e[0] != 'ctypes.dlsym' or 'mallopt' in e[1]], out  # no exec, no mallopt
  assert out['jax_started'] is False  # and no JAX backend started
  assert out['torch'] is False  # PyTorch is for the benchmarks and weight-import tests only


# ----------------------------------------------------------------------------- stock models


def _loss(module, collections, *args, **kwargs):
  """(params, other variables) -> a scalar of the module's output (in training: batch statistics updated)."""
  mutable = [k for k in collections if k != 'params']
  rngs = {'dropout': jax.random.key(1), 'sample': jax.random.key(2)}

  def loss(params, rest):
    out = module.apply({**rest, 'params': params}, *args, **kwargs, mutable=mutable, rngs=rngs)
    out = out[0] if mutable else out
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(out))

  return loss


def _models(layers):
  """(name, module, init args, train kwargs, eval kwargs) for every model cxrjax trains, tiny."""
  x28, x32, x64 = normal(0, (2, 28, 28, 1)), normal(1, (2, 32, 32, 1)), normal(2, (2, 64, 64, 3))
  z, y = normal(3, (2, 16)), jnp.array([0, 1], jnp.int32)
  lat, t = normal(4, (2, 8, 8, 4)), jnp.array([3, 7], jnp.int32)
  ae = autoencoder.KLAutoencoder(1, 4, base_channels=8, channel_mults=(1, 2), mid_attention=True, layers=layers)
  # Full size (it has no width option) at the auxiliary head's minimum input: traced and lowered only.
  x299 = normal(5, (2, 299, 299, 1))
  incep = inception.inception_v3(2, aux_logits=True, input_norm='imagenet', rgb_input=True, layers=layers)
  return [
    ('resnet18_cifar', resnet.resnet18(2, width=8, layers=layers), (x28,), dict(train=True), dict(train=False)),
    ('resnet18_imagenet', resnet.resnet18(2, 8, 'imagenet', layers=layers), (x64,), {'train': True}, {'train': False}),
    (
      'efficientnet_v2_b0',
      efficientnet_v2.efficientnet_v2(2, 'b0', width=0.25, depth=0.25, stem_stride=1, layers=layers),
      (x32,),
      dict(train=True),
      dict(train=False),
    ),
    (
      'generator_transpose',
      dcgan.Generator(28, 1, 16, 8, num_classes=2, layers=layers),
      (z, y),
      dict(train=True),
      dict(train=False),
    ),
    (
      'generator_resize',
      dcgan.Generator(32, 1, 16, 8, upsample='resize', layers=layers),
      (z,),
      dict(train=True),
      dict(train=False),
    ),
    ('discriminator', dcgan.Discriminator(28, 1, 8, num_classes=2, layers=layers), (x28, y), {'train': True}, {}),
    ('discriminator_no_norm', dcgan.Discriminator(32, 1, 8, norm='none', layers=layers), (x32,), {}, {}),
    ('unet', unet.UNet(4, 2, 8, (1, 2), 1, (-1,), 2, dropout=0.1, layers=layers), (lat, t, y), {'train': True}, {}),
    ('autoencoder', ae, (x32,), {}, {}),
    ('inception_v3', incep, (x299,), {'train': True}, {'train': False}),
  ]


MODEL_NAMES = [m[0] for m in _models(STOCK)]


def _abstract_variables(module, *args):
  return jax.eval_shape(lambda: module.init({'params': jax.random.key(0), 'sample': jax.random.key(0)}, *args))


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_stock_model_is_plain_jax_and_supports_forward_mode(name):
  """Traced and lowered only (nothing is compiled): each property is decided at trace or lowering time."""
  _, module, args, train_kw, eval_kw = next(m for m in _models(STOCK) if m[0] == name)
  variables = _abstract_variables(module, *args)
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  # No custom VJP anywhere in the forward passes (jax.nn's custom JVPs are allowed).
  for kw in (train_kw, eval_kw):
    jaxpr = str(jax.make_jaxpr(_loss(module, variables, *args, **kw))(params, rest))
    assert 'custom_vjp_call' not in jaxpr, f'{name}: a custom VJP in {kw}'
  # The lowered training step (value and gradient) holds no custom call.
  loss = _loss(module, variables, *args, **train_kw)
  hlo = jax.jit(jax.value_and_grad(loss)).lower(params, rest).as_text()
  assert 'custom_call' not in hlo, name
  # Forward mode goes through (a custom VJP would raise here, while tracing).
  jvp = jax.make_jaxpr(lambda p, r, t: jax.jvp(lambda p: loss(p, r), (p,), (t,)))(params, rest, params)
  assert 'custom_vjp_call' not in str(jvp)


def test_inception_feature_network_is_plain_jax():
  model = inception.InceptionV3()
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v, t, x: jax.jvp(lambda v: model.apply(v, x), (v,), (t,)))(variables, variables, x)
  assert 'custom_vjp_call' not in str(jaxpr)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_cpu_layers_create_the_stock_variables(name):
  """Checkpoints move freely between backends: the same variable paths, shapes and dtypes.

  Flax derives each parameter's initialisation key from its path, and both backends use
  the same initialisers, so the same tree also means the same initial values.
  """
  (_, stock, args, _, _), (_, ours, _, _, _) = (
    next(m for m in _models(STOCK) if m[0] == name),
    next(m for m in _models(cpu_layers.LAYERS) if m[0] == name),
  )
  a, b = _abstract_variables(stock, *args), _abstract_variables(ours, *args)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.leaves(a) == jax.tree.leaves(b)  # ShapeDtypeStructs: shapes and dtypes


def test_cpu_layers_initialise_the_stock_values():
  x = normal(0, (2, 28, 28, 1))
  a = init_variables(resnet.resnet18(2, width=4), jax.random.key(0), x)
  b = init_variables(resnet.resnet18(2, width=4, layers=cpu_layers.LAYERS), jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stock_backend_is_optax_and_xla_defaults():
  import optax  # noqa: PLC0415 - only this test compares with it directly

  b = backends.stock()
  assert b.layers is STOCK
  assert b.compile_options('init') is None and b.compile_options('resnet18') is None
  assert b.configure_process('resnet18') == {}
  params = {'w': jnp.arange(3.0)}
  ours, theirs = b.adam(1e-2), optax.adam(1e-2)
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
  g = {'w': jnp.array([0.1, -0.2, 0.3])}
  np.testing.assert_array_equal(
    ours.update(g, ours.init(params))[0]['w'], theirs.update(g, theirs.init(params))[0]['w']
  )


# ----------------------------------------------------------------------------- where each backend is chosen


@pytest.mark.parametrize(
  'env, distributed, why',
  [
    ({'JAX_PLATFORMS': 'cuda'}, False, 'JAX_PLATFORMS=cuda'),
    ({'JAX_PLATFORMS': 'tpu'}, False, 'JAX_PLATFORMS=tpu'),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, False, 'JAX_PLATFORMS=cuda,cpu'),
    ({}, True, 'a multi-process (distributed) run'),
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, False, '8 forced CPU devices'),
    ({'JAX_NUM_CPU_DEVICES': '4'}, False, '4 forced CPU devices'),
  ],
)
def test_auto_is_stock_off_a_single_cpu_device_and_cpu_is_refused_there(env, distributed, why):
  b = backends.select('auto', env=env, distributed=distributed)
  assert type(b) is Backend and why in b.why
  with pytest.raises(UserError, match=f'kernels=cpu is not available: {re.escape(why)}'):
    backends.select('cpu', env=env, distributed=distributed)
  assert type(backends.select('stock', env=env, distributed=distributed)) is Backend


def test_auto_is_cpu_on_one_cpu_device_and_stock_when_an_accelerator_plugin_is_installed(monkeypatch):
  # The test command installs the `onednn` extra, so the extension is available here.
  assert isinstance(backends.select('auto', env={'JAX_PLATFORMS': 'cpu'}), CpuBackend)
  assert isinstance(backends.select('auto', env={}), CpuBackend)
  assert backends.accelerator_plugins() == []  # this machine has none
  monkeypatch.setattr(backends, 'accelerator_plugins', lambda: ['cuda12'])
  b = backends.select('auto', env={})
  assert type(b) is Backend and 'an accelerator plugin for JAX is installed (cuda12)' in b.why
  # Told to use the CPU, the plugin does not matter.
  assert isinstance(backends.select('auto', env={'JAX_PLATFORMS': 'cpu'}), CpuBackend)


def _launch_env(script: Path) -> dict[str, str]:
  """The JAX_PLATFORMS a launch script sets for its runs."""
  m = re.search(r'JAX_PLATFORMS=(\w+)', script.read_text())
  assert m, f'{script} does not say which platform JAX runs on'
  return {'JAX_PLATFORMS': m.group(1)}


# In a fresh interpreter: what the entry point configures for a launch script's environment.
_ENTRY_DECISION = """
import json, os, sys
events = []
sys.addaudithook(lambda e, a: events.append(e) if e in ('os.exec', 'os.posix_spawn', 'subprocess.Popen') else None)
before = dict(os.environ)
from cxrjax import config_lib, entry
backend = entry.start(config_lib.finalize(config_lib.base_config()), distributed=True, compilation_cache='')
print(json.dumps(dict(kernels=backend.name, why=backend.why, process=backend.process, events=events,
  env_changed=sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))))
"""


@pytest.mark.parametrize('script', ['gpu_slurm.sbatch', 'tpu_pod.sh'])
def test_launch_scripts_run_the_stock_backend_with_nothing_preloaded(script):
  path = ROOT / 'launch' / script
  text = path.read_text()
  assert 'LD_PRELOAD' not in text and 'block_cache' not in text
  assert '--distributed' in text
  extra = {'gpu_slurm.sbatch': "'.[cuda]'", 'tpu_pod.sh': "'.[tpu]'"}[script]
  assert extra in text, f'{script} installs JAX for its platform through the {extra} extra'
  env = {**os.environ, **_launch_env(path)}
  r = subprocess.run([sys.executable, '-c', _ENTRY_DECISION], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  platform = env['JAX_PLATFORMS']
  assert out == dict(kernels='stock', why=f'kernels=auto: CPU kernels not used (JAX_PLATFORMS={platform})',
                     process={}, events=[], env_changed=[]), out  # fmt: skip


def test_pyproject_has_accelerator_extras():
  text = (ROOT / 'pyproject.toml').read_text()
  assert re.search(r'^cuda = \["jax\[cuda12\]', text, re.M) and re.search(r'^tpu = \["jax\[tpu\]', text, re.M)


def test_the_old_convolution_key_is_refused_with_its_new_name(tmp_path):
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={tmp_path / "run"}', '--config.convolution=xla'])
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
    'cxrjax: error: --config.convolution: this key was renamed; use --config.kernels'
    ' (auto, stock or cpu; was auto, xla or onednn)'
  )
  assert not (tmp_path / 'run').exists()


def test_the_old_key_is_refused_in_a_config_file_and_nested(tmp_path):
  c = config_lib.base_config()
  c.convolution = 'xla'
  with pytest.raises(UserError, match=r'^config.convolution: this key was renamed; use config.kernels'):
    config_lib.finalize(c)
  r = run_cli(['--config=configs/sweep.py:smoke', f'--workdir={tmp_path / "s"}', '--config.experiment.convolution=xla'])
  assert r.returncode == 2
  assert (
    r.stderr.strip()
    .splitlines()[-1]
    .startswith('cxrjax: error: --config.experiment.convolution: this key was renamed; use --config.experiment.kernels')
  )


def test_cpu_backend_refuses_to_run_off_one_cpu_device():
  assert backends.stock().check_devices() is None  # stock fits any device list
  CpuBackend().check_devices()  # this test process: one CPU device


def test_config_hash_is_unchanged_by_the_kernels_rename():
  """Workdirs made when the key was `convolution` still resume: the hash of a config is what it was."""
  c = config_lib.finalize(config_lib.base_config())
  assert config_lib.config_hash(c) == 'f1e4d8f8fc5124db'  # base_config()'s hash at 549ac1d
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.kernels = 'stock'
  assert config_lib.config_hash(c2) != config_lib.config_hash(c)


# ----------------------------------------------------------------------------- the seam's walls


def _imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return out


def test_platform_kernels_stay_inside_the_backend_package():
  """Deleting cxrjax/backends/cpu/ costs only CPU speed: nothing outside it names its pieces."""
  for folder in ('models', 'trainers', 'data', 'eval', 'sweep'):
    for path in sorted((PACKAGE / folder).rglob('*.py')):
      text = path.read_text()
      for word in ('onednn', '_xla_env', 'block_cache', 'backends.cpu'):
        assert word not in text, f'{path.relative_to(ROOT)} mentions {word}'
  for path in sorted((PACKAGE / 'models').rglob('*.py')):
    assert not [m for m in _imports(path) if m.startswith('cxrjax.backends')], f'{path} imports a backend'
  for path in sorted(PACKAGE.rglob('*.py')):
    if 'backends' not in path.parts:
      assert not [m for m in _imports(path) if m.startswith('cxrjax.backends.cpu')], path
