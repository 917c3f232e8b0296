"""The PyTorch baselines of `python -m cxrjax.bench` are the same networks as cxrjax's, and the harness runs.

Parameter counts of every PyTorch twin equal the Flax model's for the benchmarked settings (and the
published ones); ResNet-18 with the same weights gives the same logits in both frameworks, which is what
makes the throughput comparison one of frameworks, not of networks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cxrjax  # noqa: F401 - sets XLA flags before JAX starts
from cxrjax import _xla_env, models
from cxrjax.models import dcgan, efficientnet_v2, resnet, unet

torch = pytest.importorskip('torch')

from cxrjax.bench import harness  # noqa: E402 - after the importorskip
from cxrjax.bench import torch_models as tm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def jax_count(module, *args, **kwargs) -> int:
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize(
  'stem,width,channels,classes,size,expected',
  [
    ('cifar', 64, 1, 2, 28, 11_168_706),  # benchmarked (28 and 64 px have the same parameters)
    ('imagenet', 64, 3, 1000, 224, 11_689_512),  # torchvision.models.resnet18()
    ('cifar', 16, 3, 10, 32, None),
  ],
)
def test_resnet18_parameter_counts(stem, width, channels, classes, size, expected):
  n_jax = jax_count(resnet.resnet18(classes, width, stem), jnp.zeros((1, size, size, channels)))
  assert tm.count_params(tm.ResNet18(classes, width, stem, channels)) == n_jax
  if expected is not None:
    assert n_jax == expected


@pytest.mark.parametrize('size', [64, 28])
@pytest.mark.parametrize('num_classes', [0, 2])
@pytest.mark.parametrize('upsample', ['transpose', 'resize'])
def test_dcgan_parameter_counts(size, num_classes, upsample):
  labels = jnp.zeros((2,), jnp.int32) if num_classes else None
  g = dcgan.Generator(size, 1, 100, 64, num_classes, upsample)
  d = dcgan.Discriminator(size, 1, 64, num_classes)
  assert tm.count_params(tm.Generator(size, 1, 100, 64, num_classes, upsample)) == jax_count(
    g, jnp.zeros((2, 100)), labels, train=False
  )
  assert tm.count_params(tm.Discriminator(size, 1, 64, num_classes)) == jax_count(
    d, jnp.zeros((2, size, size, 1)), labels, train=False
  )


def test_dcgan_tutorial_parameter_counts():
  # The PyTorch DCGAN tutorial's netG / netD (nz=100, ngf=ndf=64, nc=3).
  assert tm.count_params(tm.Generator(64, 3, 100, 64)) == 3_576_704
  assert tm.count_params(tm.Discriminator(64, 3, 64)) == 2_765_568


@pytest.mark.parametrize(
  'base,mults,blocks,attn,heads,hw',
  [
    (64, (1, 2), 2, (-1,), 4, 14),  # the LDM config's denoiser, benchmarked
    (32, (1, 2, 2), 1, (1, -1), 2, 16),
  ],
)
def test_unet_parameter_counts(base, mults, blocks, attn, heads, hw):
  model = unet.UNet(4, 2, base, mults, blocks, attn, heads)
  n_jax = jax_count(model, jnp.zeros((1, hw, hw, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  assert tm.count_params(tm.UNet(4, 2, base, mults, blocks, attn, heads)) == n_jax


@pytest.mark.parametrize('variant', ['b0', 's'])
@pytest.mark.parametrize('channels,classes,stem_stride', [(1, 2, 1), (3, 1000, 2)])
def test_efficientnet_v2_parameter_counts(variant, channels, classes, stem_stride):
  model = efficientnet_v2.efficientnet_v2(classes, variant, stem_stride=stem_stride)
  n_jax = jax_count(model, jnp.zeros((1, 64, 64, channels)))
  twin = tm.EfficientNetV2(classes, variant, stem_stride=stem_stride, in_channels=channels)
  assert tm.count_params(twin) == n_jax
  if (channels, classes) == (3, 1000):
    assert n_jax == {'b0': 7_139_704, 's': 21_458_488}[variant]  # published


def _randomize_bn(variables, rng):
  """Non-trivial BatchNorm parameters and running statistics, so the copy of every field is tested."""

  def fill(path, x):
    name = path[-1].key
    if name == 'mean':
      return jnp.asarray(rng.normal(0.0, 0.2, x.shape), jnp.float32)
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    if name == 'scale':
      return jnp.asarray(rng.uniform(0.8, 1.2, x.shape), jnp.float32)
    if name == 'bias' and x.ndim == 1 and path[-2].key != 'head':
      return jnp.asarray(rng.normal(0.0, 0.1, x.shape), jnp.float32)
    return x

  return jax.tree_util.tree_map_with_path(fill, variables)


# The benchmarked network, and the ImageNet stem (narrower, to keep the test fast).
@pytest.mark.parametrize('stem,width,channels,size', [('cifar', 64, 1, 28), ('imagenet', 16, 3, 64)])
def test_resnet18_same_weights_same_logits(stem, width, channels, size):
  model = resnet.resnet18(2, width, stem)
  x = np.random.default_rng(0).uniform(-1, 1, (4, size, size, channels)).astype(np.float32)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, channels))))(jax.random.key(0))
  variables = _randomize_bn(dict(variables), np.random.default_rng(1))
  twin = tm.load_resnet_from_flax(tm.ResNet18(2, width, stem, channels), variables).eval()
  with torch.no_grad():
    out_torch = twin(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  out_jax = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  assert np.abs(out_jax).max() > 0.1  # a real signal, not two zero vectors
  np.testing.assert_allclose(out_torch, out_jax, atol=1e-4, rtol=1e-4)

  # Training mode normalises with the batch's statistics in both.
  twin.train()
  with torch.no_grad():
    train_torch = twin(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  train_jax, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  np.testing.assert_allclose(train_torch, np.asarray(train_jax), atol=1e-4, rtol=1e-4)


def test_cli_quick_writes_rows_and_table(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'cxrjax.bench', '--quick', '--models', 'resnet18_28', '--reps', '2', '--steps', '1',
         '--out', str(out)]  # fmt: skip
  # One CPU device and cxrjax's own settings, whatever the caller forces.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'CXRJAX_KEEP_MALLOC', 'NPROC', 'PJRT_NPROC')}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert isinstance(rows, list) and len(rows) == 1
  row = rows[0]
  for key in (*harness.REQUIRED_KEYS, 'torch_setting', 'torch_compile_images_per_s', 'batch', 'image_size'):
    assert key in row, key
  assert row['model'] == 'resnet18_28'
  assert row['jax_images_per_s'] > 0 and row['torch_images_per_s'] > 0
  assert row['ratio'] == pytest.approx(row['jax_images_per_s'] / row['torch_images_per_s'], rel=0.01)
  assert row['compile_s'] > 0 and row['peak_mem_mb'] is not None
  assert row['params_jax'] == row['params_torch']
  assert row['torch_setting'] in row['torch_variants']
  assert row['torch_compile_images_per_s'] is None and row['torch_compile'].startswith('n/a')
  assert row['steps_per_rep'] == 1 and row['reps'] == 2
  assert row['jax_mesh_devices'] == 1 and row['jax_batch_split'] is False
  assert row['jax_convolution'].startswith('oneDNN 3.')  # one CPU device: `--convolution auto` picks oneDNN
  assert row['jax_compiler_options'] is None  # the classifier step keeps the process's XLA flags
  assert row['jax_cpu_pool'] == 'one XLA thread (NPROC=1, set by cxrjax)'  # as ResNet-18's runs set it
  assert row['torch_in_jax_process'] is False  # PyTorch ran in its own process, with its own heap
  assert row['peak_mem_mb'] > 0 and row['torch_peak_mem_mb'] > 0  # each measured in its own process
  assert row['warmup_rounds'] == 1  # an untimed round first, then the 2 timed repetitions
  assert len(row['jax_minor_faults_per_rep']) == 2 and len(row['torch_minor_faults_per_rep']) == 2
  assert all(f >= 0 for f in row['jax_minor_faults_per_rep'] + row['torch_minor_faults_per_rep'])
  table = out.with_suffix('.md').read_text()
  assert '| resnet18_28 | train |' in table and 'JAX / PyTorch' in table and 'Machine:' in table
  assert '| resnet18_28 | train |' in proc.stdout and 'XLA_FLAGS' in proc.stdout and 'malloc: ' in proc.stdout
  assert 'convolutions (ResNet-18, EfficientNetV2, DCGAN, UNet): oneDNN 3.' in proc.stdout


def test_cli_survives_a_crashing_pytorch_variant(tmp_path):
  # A native crash in the PyTorch process (injected: it aborts when building this variant) stops the
  # worker; the model is measured again without that variant, and the row says which one crashed and how.
  out = tmp_path / 'bench.json'
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'CXRJAX_KEEP_MALLOC')}
  env['CXRJAX_BENCH_ABORT_VARIANT'] = 'channels_last, 1 thread'
  cmd = [sys.executable, '-m', 'cxrjax.bench', '--quick', '--models', 'resnet18_28', '--reps', '1', '--steps', '1',
         '--out', str(out)]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())
  crashed = row['torch_variants']['channels_last, 1 thread']
  assert crashed.startswith('error: crashed the process (the PyTorch process died (signal SIGABRT)'), crashed
  assert row['torch_setting'] == 'contiguous, 1 thread' and row['torch_images_per_s'] > 0
  assert row['jax_images_per_s'] > 0 and row['torch_channels_last_images_per_s'] is None
  assert 'measuring again without it' in proc.stderr


def test_cli_times_the_data_parallel_step_on_forced_cpu_devices(tmp_path):
  # The JAX step runs as the trainers run it: on a mesh of every device, batch split, state replicated.
  out = tmp_path / 'bench.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, '-m', 'cxrjax.bench', '--quick', '--models', 'resnet18_28', '--reps', '1', '--steps', '1',
         '--out', str(out)]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())
  # Read from the compiled step's input sharding: the batch really is split over both devices.
  assert row['jax_mesh_devices'] == 2 and row['jax_batch_split'] is True and row['jax_images_per_s'] > 0
  assert row['jax_convolution'].startswith('xla (oneDNN not used: 2 devices')  # not partitioned: XLA's
  assert 'xla_force_host_platform_device_count=2' in out.with_suffix('.md').read_text()


def test_generator_steps_are_timed_with_their_trainers_compiler_options(monkeypatch):
  monkeypatch.delenv('CXRJAX_KEEP_XLA_FLAGS', raising=False)
  for name in ('dcgan', 'unet'):
    cases = harness.cases_for(name, quick=True)
    assert [c.kind for c in cases] == ['train', 'sample']
    assert cases[0].compiler_options == _xla_env.NO_ELEMENTWISE_YNN  # as gan.py / ldm.py compile their steps
    assert cases[1].compiler_options is None
  assert harness.cases_for('resnet18_28', quick=True)[0].compiler_options is None
  # EfficientNetV2's many small SiLU / squeeze-excitation maps: compiled as the classifier trainer does, without it.
  (effnet,) = harness.cases_for('efficientnet_v2_b0', quick=True)
  assert effnet.compiler_options == _xla_env.NO_ELEMENTWISE_YNN == models.classifier_step_options('efficientnet_v2_b0')


@pytest.mark.parametrize('stride,k', [(1, 3), (2, 3), (2, 1)])
def test_conv_profile_times_autograds_gradients(stride, k):
  # The per-layer profile times one gradient at a time through aten::convolution_backward; it
  # must be the gradient autograd computes for the layer PyTorch's ResNet-18 runs.
  from cxrjax.bench import conv_profile  # noqa: PLC0415

  g = torch.Generator().manual_seed(0)
  conv = torch.nn.Conv2d(8, 16, k, stride, padding=k // 2, bias=False)
  x = torch.randn(2, 8, 9, 9, generator=g, requires_grad=True)
  dy = torch.randn(conv(x).shape, generator=g)
  gx, gw = torch.autograd.grad(conv(x), (x, conv.weight), dy)
  w = conv.weight.detach()
  torch.testing.assert_close(conv_profile.torch_conv_backward(torch, dy, x.detach(), w, stride, 'input'), gx)
  torch.testing.assert_close(conv_profile.torch_conv_backward(torch, dy, x.detach(), w, stride, 'weight'), gw)


def test_conv_profile_layers_are_resnet18s_convolutions():
  from cxrjax.bench import conv_profile  # noqa: PLC0415

  convs = conv_profile.resnet18_convs(28, 64)
  assert sum(convs.values()) == 20  # stem + 16 in the blocks + 3 downsampling shortcuts
  weights = sum(n * k * k * cin * cout for (_, cin, cout, k, _), n in convs.items())
  model = resnet.resnet18(2, width=64, stem='cifar')
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), False))
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(variables['params']) if x.ndim == 4]
  assert weights == sum(int(np.prod(x.shape)) for x in kernels)
  # Spatial sizes: 28 (stem, stage 1), 14, 7, 4 px at the inputs of the stages' stride-1 convolutions.
  assert {h for (h, _, _, _, s) in convs if s == 1} == {28, 14, 7, 4}
