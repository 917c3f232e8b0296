"""The benchmarks (`python -m benchmarks`, outside the package) time the trainers' programs against twins.

Parameter counts of every PyTorch twin equal the Flax model's for the benchmarked settings (and the
published ones); ResNet-18 with the same weights gives the same logits in both frameworks, which is what
makes the throughput comparison one of frameworks, not of networks. Each case's JAX side is the program
its trainer's factory builds; the variants planned per platform are checked as plans (the GPU ones
cannot run here); two `--quick` runs of the command cover the rest. PyTorch is installed by `./dev test`
(the `bench` extra): these tests fail without it rather than skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cxrjax import backends
from cxrjax.models import build_classifier, dcgan, efficientnet_v2, resnet, unet
from cxrjax.trainers import gan, ldm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: it is found from the repository root
  sys.path.insert(0, str(ROOT))

from benchmarks import cases, conv_profile, plan, report, run, torch_process, torch_steps  # noqa: E402
from benchmarks import torch_models as tm  # noqa: E402


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


# ----------------------------------------------------------------------------- the cases time the trainers' programs


@pytest.mark.parametrize('kernels', ['stock', 'cpu'])
@pytest.mark.parametrize('name', cases.MODELS)
def test_cases_time_the_programs_of_the_trainers_factories(name, kernels):
  backend = backends.select(kernels)
  built = cases.cases_for(name, quick=True, backend=backend)
  assert [c.kind for c in built] == (['train', 'sample'] if name in ('dcgan', 'unet') else ['train'])
  for case in built:
    program = case.program
    # The program the trainer runs, compiled with the backend's options for it (sampling rows read its modules).
    assert program.name == cases.program_name(name)
    assert program.step_options == backend.compile_options(program.name)
    assert program.init_options == backend.compile_options('init')
    assert case.program_for(case.config.model.dtype) is program
    # Built from the case's config on the backend's layers: the modules the factory's builders make.
    c = case.config
    if name in cases.CLASSIFIERS:
      assert program.modules == {
        'classifier': build_classifier(c.model, cases.NUM_CLASSES, case.input_shape, backend.layers)
      }
    elif name == 'dcgan':
      g, d = gan.build(c, c.data.channels, cases.NUM_CLASSES, backend.layers)
      assert program.modules == {'generator': g, 'discriminator': d}
    else:
      assert program.modules == {'unet': ldm.build_unet(c, cases.NUM_CLASSES, backend.layers)}
    # bfloat16 (planned on GPUs): the same factory with config.model.dtype = 'bfloat16'.
    bf16 = case.program_for('bfloat16')
    assert bf16.name == program.name and bf16.step_options == program.step_options
    assert all(m.dtype == jnp.bfloat16 for m in bf16.modules.values())
    if case.kind == 'train':  # fed as the trainer's input pipeline feeds it
      assert sorted(case.jax_batch) == ['image', 'label', 'weight']
      assert case.jax_batch['label'].dtype == np.int32 and case.jax_batch['weight'].dtype == np.float32
      assert len(case.jax_batch['image']) == case.batch
      assert case.jax_batch['image'].dtype == (np.float32 if name == 'unet' else np.uint8)  # unet: latents
    else:
      assert case.jax_batch is None and case.sampler is not None


# ----------------------------------------------------------------------------- what is planned per platform


def _names(variants) -> list[str]:
  return [v.name for v in variants]


def test_cpu_plan_is_the_eager_formats_by_threads_and_torch_compile():
  train = types.SimpleNamespace(kind='train')
  variants, _ = run.plan_case(train, 'cpu', 'cpu', (2, 1), compile_torch=True, cpu_bf16=False)
  assert _names(variants) == [
    'jax',
    'contiguous, 2 threads',
    'channels_last, 2 threads',
    'contiguous, 1 thread',
    'channels_last, 1 thread',
    'torch.compile (fastest eager setting)',
  ]
  assert all(v.device == 'cpu' and v.dtype == 'float32' for v in variants)
  sample, note = run.plan_case(types.SimpleNamespace(kind='sample'), 'cpu', 'cpu', (1,), True, False)
  assert _names(sample) == ['jax', 'contiguous, 1 thread', 'channels_last, 1 thread']
  assert note == 'n/a: not measured for sampling'
  quick, note = run.plan_case(train, 'cpu', 'cpu', (1,), compile_torch=False, cpu_bf16=False)
  assert _names(quick) == ['jax', 'contiguous, 1 thread', 'channels_last, 1 thread'] and 'skipped' in note
  alone, note = run.plan_case(train, 'cpu', None, (2, 1), True, False)
  assert _names(alone) == ['jax'] and 'not installed' in note
  # A CPU with native bfloat16 adds JAX bfloat16 and PyTorch autocast.
  bf16 = plan.plan_variants('cpu', 'cpu', torch_threads=(1,), cpu_bf16=True)
  assert _names(bf16) == [
    'jax',
    'jax bfloat16',
    'contiguous, 1 thread',
    'channels_last, 1 thread',
    'contiguous, 1 thread, amp bf16',
    'channels_last, 1 thread, amp bf16',
    'torch.compile (fastest eager setting)',
  ]
  # --dtypes=float32 (a before/after comparison of float32 rows): no bfloat16 program on either side.
  f32 = plan.plan_variants('cpu', 'cpu', torch_threads=(1,), cpu_bf16=True, dtypes=('float32',))
  assert _names(f32) == _names(quick) + ['torch.compile (fastest eager setting)']
  gpu32, _ = run.plan_case(train, 'gpu', 'cuda', (1,), True, False, dtypes=('float32',))
  assert all(v.dtype == 'float32' for v in gpu32) and 'jax' in _names(gpu32)


def test_dtypes_flag_needs_float32(capsys):
  for bad in ('bfloat16', 'float16,float32', ''):
    with pytest.raises(SystemExit) as e:
      run.main(['--dtypes', bad, '--models', 'resnet18_28'])
    assert e.value.code == 2
    assert f'--dtypes: expected float32, optionally with bfloat16 (from float32,bfloat16), got {bad!r}' in (
      capsys.readouterr().err
    )


def test_gpu_plan_is_jax_in_two_dtypes_against_eager_amp_and_compile():
  variants, _ = run.plan_case(types.SimpleNamespace(kind='train'), 'gpu', 'cuda', (2, 1), True, cpu_bf16=False)
  assert _names(variants) == [
    'jax',
    'jax bfloat16',
    'contiguous, cuda',
    'channels_last, cuda',
    'contiguous, cuda, amp bf16',
    'channels_last, cuda, amp bf16',
    'torch.compile (fastest eager setting)',
  ]
  torch_variants = [v for v in variants if v.framework == 'torch']
  assert all(v.device == 'cuda' and v.threads is None for v in torch_variants)
  eager = [v for v in torch_variants if v.eager]
  compiled = variants[-1].like(eager[1])
  assert compiled.name == 'torch.compile channels_last, cuda' and compiled.dtype == 'float32'
  sample, _ = run.plan_case(types.SimpleNamespace(kind='sample'), 'gpu', 'cuda', (2, 1), True, False)
  assert 'torch.compile (fastest eager setting)' not in _names(sample) and 'jax bfloat16' in _names(sample)


def test_cuda_variants_synchronize_and_read_cuda_memory(monkeypatch):
  # The CUDA path as far as it goes without a GPU: the runner ends every block on the device and takes
  # its peak memory from CUDA's allocator; the step's autocast is CUDA's, to bfloat16.
  calls = []
  allocated = iter([1 << 20, 0])
  monkeypatch.setattr(torch.cuda, 'synchronize', lambda: calls.append('sync'))
  monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: None)
  monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda: calls.append('reset'))
  monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda: next(allocated))
  monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda: 5 << 20)
  monkeypatch.setattr(torch, 'set_num_threads', lambda n: pytest.fail('threads are not set on CUDA'))
  variant = plan.Variant('torch', 'bfloat16', 'channels_last', device='cuda')
  steps = []
  runner = torch_process.torch_runner(lambda v: lambda: steps.append(v), variant)
  assert runner.mem_method == 'cuda_max_memory_allocated' and runner.peak_mem_mb == 4.0
  assert steps == [variant, variant] and calls == ['sync', 'reset', 'sync', 'sync', 'sync']  # meter, 2 warm-up steps
  seconds, _ = runner.timed_run(3)
  assert len(steps) == 5 and calls[-1] == 'sync' and seconds >= 0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # no CUDA here: PyTorch disables the autocast it constructs
    amp = torch_steps.autocast(variant)
  assert isinstance(amp, torch.autocast) and amp.device == 'cuda' and amp.fast_dtype == torch.bfloat16


def test_jax_side_never_imports_torch_and_benchmarks_is_not_installed(tmp_path):
  script = f"""
import importlib.util, sys
assert importlib.util.find_spec('benchmarks') is None, 'benchmarks/ must not be installed with cxrjax'
sys.path.insert(0, {str(ROOT)!r})
import cxrjax, cxrjax.backends, cxrjax.trainers.classifier, cxrjax.trainers.gan, cxrjax.trainers.ldm
from benchmarks import cases, plan, report, run, timing, torch_process
assert 'torch' not in sys.modules, 'the JAX worker imported torch'
"""
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- the command, --quick


def _bench(out: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, '-m', 'benchmarks', '--quick', '--models', 'resnet18_28', '--steps', '1', '--out', str(out),
         *args]  # fmt: skip
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_cli_quick_writes_rows_and_table(tmp_path):
  out = tmp_path / 'bench.json'
  # One CPU device and the backend's own settings, whatever the caller forces.
  drop = ('XLA_FLAGS', 'NPROC', 'PJRT_NPROC', torch_process.ABORT_VARIANT)
  env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith('CXRJAX_KEEP_')}
  proc = _bench(out, env, '--reps', '2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert isinstance(rows, list) and len(rows) == 1
  row = rows[0]
  for key in (*report.REQUIRED_KEYS, 'torch_setting', 'torch_compile_images_per_s', 'batch', 'image_size'):
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
  # The backend the worker selected (`--kernels auto` on one CPU device: the CPU backend) and what its
  # configure_process('resnet18') did before JAX started, as a ResNet-18 run's entry point does.
  backend = row['jax_backend']
  assert backend['kernels'] == 'cpu' and backend['description'].startswith('cpu (oneDNN 3.')
  assert backend['compile_options'] == {'resnet18': None}  # the classifier step keeps the process's XLA flags
  assert backend['process']['xla_cpu_pool'] == 'one XLA thread (NPROC=1)'
  assert backend['process']['malloc'].startswith('glibc') and 'block cache' in backend['process']['malloc']
  assert 'ynn_fusion_type' in backend['process']['xla_flags']
  assert row['jax_platform'] == 'cpu' and row['torch_device'] == 'cpu'
  # On a CPU, bfloat16 variants are planned only where it computes in bfloat16 natively (AVX512-BF16, AMX).
  if run.cpu_has_bf16():
    assert list(row['jax_variants']) == ['jax', 'jax bfloat16'] and row['jax_bfloat16_images_per_s'] > 0
  else:
    assert list(row['jax_variants']) == ['jax'] and row['jax_bfloat16_images_per_s'] is None
  assert row['torch_in_jax_process'] is False  # PyTorch ran in its own process, with its own heap
  assert row['peak_mem_mb'] > 0 and row['torch_peak_mem_mb'] > 0  # each measured in its own process
  assert row['mem_method'] == row['torch_mem_method'] == 'rss_hwm'
  assert row['warmup_rounds'] == 1  # an untimed round first, then the 2 timed repetitions
  assert len(row['jax_minor_faults_per_rep']) == 2 and len(row['torch_minor_faults_per_rep']) == 2
  assert all(f >= 0 for f in row['jax_minor_faults_per_rep'] + row['torch_minor_faults_per_rep'])
  table = out.with_suffix('.md').read_text()
  assert '| resnet18_28 | train |' in table and 'JAX / PyTorch' in table and 'Machine:' in table
  assert '| resnet18_28 | train |' in proc.stdout and 'XLA_FLAGS' in proc.stdout and 'malloc: glibc' in proc.stdout
  assert 'JAX backend: cpu (oneDNN 3.' in proc.stdout and 'Command: `python -m benchmarks --quick' in proc.stdout


def test_cli_forced_cpu_devices_and_a_crashing_pytorch_variant(tmp_path):
  # One run, two checks. (1) The JAX step runs as the trainers run it: on a mesh of every device, batch
  # split, state replicated; with 2 devices `--kernels auto` picks the stock backend. (2) A native crash
  # in the PyTorch process (injected: it aborts when building this variant) stops the worker; the model
  # is measured again without that variant, and the row says which one crashed and how.
  out = tmp_path / 'bench.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  env[torch_process.ABORT_VARIANT] = 'channels_last, 1 thread'
  proc = _bench(out, env, '--reps', '1', '--dtypes', 'float32')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())
  # --dtypes reaches the worker (on any CPU), and plans float32 only, also on a CPU with native bfloat16.
  assert row['dtypes'] == ['float32']
  assert list(row['jax_variants']) == ['jax'] and not any('bf16' in v for v in row['torch_variants'])
  # Read from the compiled step's input sharding: the batch really is split over both devices.
  assert row['jax_mesh_devices'] == 2 and row['jax_batch_split'] is True and row['jax_images_per_s'] > 0
  assert row['jax_backend']['kernels'] == 'stock' and 'forced CPU devices' in row['jax_backend']['description']
  assert row['jax_backend']['process'] == {}  # stock configures nothing
  assert 'xla_force_host_platform_device_count=2' in out.with_suffix('.md').read_text()
  crashed = row['torch_variants']['channels_last, 1 thread']
  assert crashed.startswith('error: crashed the process (the PyTorch process died (signal SIGABRT)'), crashed
  assert row['torch_setting'] == 'contiguous, 1 thread' and row['torch_images_per_s'] > 0
  assert row['torch_channels_last_images_per_s'] is None
  assert 'measuring again without it' in proc.stderr


# ----------------------------------------------------------------------------- conv_profile


@pytest.mark.parametrize('stride,k', [(1, 3), (2, 3), (2, 1)])
def test_conv_profile_times_autograds_gradients(stride, k):
  # The per-layer profile times one gradient at a time through aten::convolution_backward; it
  # must be the gradient autograd computes for the layer PyTorch's ResNet-18 runs.
  g = torch.Generator().manual_seed(0)
  conv = torch.nn.Conv2d(8, 16, k, stride, padding=k // 2, bias=False)
  x = torch.randn(2, 8, 9, 9, generator=g, requires_grad=True)
  dy = torch.randn(conv(x).shape, generator=g)
  gx, gw = torch.autograd.grad(conv(x), (x, conv.weight), dy)
  w = conv.weight.detach()
  torch.testing.assert_close(conv_profile.torch_conv_backward(torch, dy, x.detach(), w, stride, 'input'), gx)
  torch.testing.assert_close(conv_profile.torch_conv_backward(torch, dy, x.detach(), w, stride, 'weight'), gw)


def test_conv_profile_layers_are_resnet18s_convolutions():
  convs = conv_profile.resnet18_convs(28, 64)
  assert sum(convs.values()) == 20  # stem + 16 in the blocks + 3 downsampling shortcuts
  weights = sum(n * k * k * cin * cout for (_, cin, cout, k, _), n in convs.items())
  model = resnet.resnet18(2, width=64, stem='cifar')
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), False))
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(variables['params']) if x.ndim == 4]
  assert weights == sum(int(np.prod(x.shape)) for x in kernels)
  # Spatial sizes: 28 (stem, stage 1), 14, 7, 4 px at the inputs of the stages' stride-1 convolutions.
  assert {h for (h, _, _, _, s) in convs if s == 1} == {28, 14, 7, 4}


# ----------------------------------------------------------------------------- the alternated A/B


def test_ab_alternates_sides_and_picks_each_trees_harness(tmp_path):
  from benchmarks import ab  # noqa: PLC0415

  assert ab.schedule(['m1', 'm2'], 2) == [
    (1, 'm1', 'before'), (1, 'm1', 'after'), (1, 'm2', 'before'), (1, 'm2', 'after'),
    (2, 'm1', 'after'), (2, 'm1', 'before'), (2, 'm2', 'after'), (2, 'm2', 'before'),
  ]  # fmt: skip
  # This checkout's harness, with --dtypes=float32; the in-package harness of a commit before the seam.
  assert ab.harness_command(ROOT, ['--reps=3'])[1:] == ['-m', 'benchmarks', '--reps=3', '--dtypes=float32']
  old = tmp_path / 'old'
  (old / 'cxrjax' / 'bench').mkdir(parents=True)
  (old / 'cxrjax' / 'bench' / '__main__.py').write_text('')
  assert ab.harness_command(old, ['--reps=3'])[1:] == ['-m', 'cxrjax.bench', '--reps=3']
  with pytest.raises(SystemExit, match='has neither benchmarks/ nor cxrjax/bench/'):
    ab.harness_command(tmp_path, [])


def _ab_row(model, ips, lo, hi, torch_ips=10.0):
  return dict(model=model, jax_images_per_s=ips, jax_images_per_s_range=[lo, hi], torch_images_per_s=torch_ips)


def test_ab_table_reads_ratios_overlap_and_verdicts():
  from benchmarks import ab  # noqa: PLC0415

  def m(r, side, *rows):
    return dict(round=r, model='x', side=side, rows=list(rows))

  measurements = [
    m(1, 'before', _ab_row('a', 10, 9, 11), _ab_row('b', 10, 9.5, 10.5), _ab_row('c', 10, 9, 11),
      _ab_row('d', 10, 9.5, 10.5)),
    m(1, 'after', _ab_row('a', 12, 10.5, 12.5), _ab_row('b', 9.6, 9.4, 9.8), _ab_row('c', 7, 6.5, 7.5),
      _ab_row('d', 13, 12.5, 13.5)),
    m(2, 'after', _ab_row('a', 11, 10, 12), _ab_row('b', 9.0, 8.8, 9.2), _ab_row('c', 7, 6.8, 7.2),
      _ab_row('d', 12, 11, 12.5)),
    m(2, 'before', _ab_row('a', 10, 9.8, 10.2), _ab_row('b', 10, 9.9, 10.1), _ab_row('c', 10, 9.5, 10.5),
      _ab_row('d', 10, 9.8, 10.2)),
  ]  # fmt: skip
  rows, summary = ab.pair_table(measurements)
  by = {(r['model'], r['round']): r for r in rows}
  assert by[('a', 1)]['after_over_before'] == 1.2 and by[('a', 1)]['ranges_overlap'] is True
  assert by[('b', 2)]['ranges_overlap'] is False and by[('b', 1)]['ranges_overlap'] is True
  verdicts = {s['model']: (s['median_after_over_before'], s['rounds_overlapping'], s['verdict']) for s in summary}
  # Overlapping ranges in half the rounds or more: within spread, whichever way the median leans;
  # otherwise the median decides.
  assert verdicts == {'a': (1.15, 2, 'within spread'), 'b': (0.93, 1, 'within spread'), 'c': (0.7, 0, 'slower'),
                      'd': (1.25, 0, 'faster')}  # fmt: skip
  md = ab.markdown(rows, summary, 'a' * 40, 'b' * 40, 'python -m benchmarks.ab --before X')
  assert '| c | 1 | 10.0 (9.0-11.0) | 7.0 (6.5-7.5) | 0.700 | no | 10.0 / 10.0 |' in md
  assert '| b | 2 | 0.930 | 1 | within spread |' in md


def test_ab_command_runs_the_schedule_once_and_resumes(tmp_path, monkeypatch):
  # The harness is a stand-in that writes a row (what is measured is the harness's business, tested above);
  # the command's part is the order, the log that makes a rerun skip what is done, and the table.
  from benchmarks import ab  # noqa: PLC0415

  calls = tmp_path / 'calls.txt'
  fake = (
    'import json, sys; out = [a for a in sys.argv if a.startswith("--out=")][0][6:];'
    f' open({str(calls)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n");'
    ' json.dump([dict(model="resnet18_28", jax_images_per_s=10.0, jax_images_per_s_range=[9.0, 11.0],'
    ' torch_images_per_s=8.0)], open(out, "w"))'
  )
  monkeypatch.setattr(ab, 'checkout', lambda commit, worktree: tmp_path)
  monkeypatch.setattr(ab, 'harness_command', lambda tree, args: [sys.executable, '-c', fake, str(tree), *args])
  out = tmp_path / 'ab' / 'ab.json'
  argv = ['--before', 'HEAD', '--out', str(out), '--models', 'resnet18_28', '--rounds', '2']
  summary = ab.main(argv)
  assert summary == [dict(model='resnet18_28', rounds=2, median_after_over_before=1.0, rounds_overlapping=2,
                          verdict='within spread')]  # fmt: skip
  trees = [line.split()[0] for line in calls.read_text().splitlines()]
  assert trees == [str(tmp_path), str(ROOT), str(ROOT), str(tmp_path)]  # before, after; after, before
  assert len(out.with_suffix('.jsonl').read_text().splitlines()) == 4
  ab.main(argv)  # a rerun only re-tabulates
  assert len(calls.read_text().splitlines()) == 4
  assert '| resnet18_28 | 2 | 1.000 | 2 | within spread |' in out.with_suffix('.md').read_text()
  with pytest.raises(SystemExit) as e:
    ab.main(['--before', 'HEAD', '--out', str(out), '--models', 'nope'])
  assert e.value.code == 2
