"""Pretrained weights (`cxrjax.pretrained`): torchvision's own models give the same logits as ours on their weights.

torchvision's ResNet-18 and EfficientNetV2-S (its model code, through
`conftest.torchvision_models`) are built without downloading anything, given random
BatchNorm statistics and affine parameters so that every tensor matters, and saved with
`torch.save` (and as safetensors). The public loader puts them into our models built by
`build_classifier`, and eval-mode logits must agree. The rest covers the file reader
(the safetensors format against the `safetensors` package, truncated files), the
sources ('torchvision' in torch's hub cache, export folders), the head for K classes,
and the one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from cxrjax import checkpoint, config_lib, models, pretrained
from cxrjax.errors import UserError
from cxrjax.models import build_classifier
from cxrjax.pretrained import efficientnet_v2, files, merge, resnet, sources

from conftest import ROOT, normal, torchvision_models

SIZE = 64  # small inputs keep both networks fast; every layer still runs


def one_line_error(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message
  return message


def randomise_batch_norms(model: torch.nn.Module, seed: int) -> None:
  """Non-trivial BatchNorm statistics and affine parameters, kept near the identity so deep nets stay finite."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(7)


def model_config(name: str, **overrides):
  config = config_lib.base_config().model
  config.name, config.stem = name, 'imagenet'
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def template_for(model, channels: int = 3, seed: int = 0):
  """Random variables of `model`'s shapes: no init program to compile, and a head that is recognisably the template's."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, channels)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(s.dtype), {k: shapes[k] for k in ('params', 'batch_stats')}
  )


def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class Arch:
  """One architecture: torchvision's randomised model, its .pth, our 1000-class model and a jitted forward."""

  def __init__(self, name: str, builder: str, folder, seed: int):
    self.name = name
    self.torch_model = getattr(torchvision_models(), builder)(weights=None).eval()
    randomise_batch_norms(self.torch_model, seed)
    self.pth = str(folder / f'{name}.pth')
    torch.save(self.torch_model.state_dict(), self.pth)
    self.model = build_classifier(model_config(name), 1000, (SIZE, SIZE, 3))
    self.template = template_for(self.model)
    self.forward = jax.jit(lambda v, x: self.model.apply(v, x, train=False))


@pytest.fixture(scope='module')
def tv_resnet(tmp_path_factory):
  return Arch('resnet18', 'resnet18', tmp_path_factory.mktemp('resnet18'), 1)


@pytest.fixture(scope='module')
def tv_effnet(tmp_path_factory):
  return Arch('efficientnet_v2_s', 'efficientnet_v2_s', tmp_path_factory.mktemp('effnet'), 2)


@pytest.fixture
def arch(request):
  return request.getfixturevalue(request.param)


def leaves(tree) -> dict:
  return merge.flatten(tree)


# ----------------------------------------------------------------------------- same weights, same logits


@pytest.mark.parametrize('arch', ['tv_resnet', 'tv_effnet'], indirect=True)
def test_torchvision_pth_gives_torchvision_logits(arch):
  variables, record = pretrained.load_pretrained(arch.name, arch.template, arch.pth, keep_head=True)
  x = normal(0, (2, SIZE, SIZE, 3))
  ours = np.asarray(arch.forward(variables, x))
  with torch.no_grad():
    theirs = arch.torch_model(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).numpy()
  assert ours.shape == theirs.shape == (2, 1000)
  assert np.abs(theirs).max() > 1e-2  # a real signal, not a vanished one
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())

  with open(arch.pth, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  n_tensors = sum(1 for k in arch.torch_model.state_dict() if not k.endswith('num_batches_tracked'))
  assert record == {
    'model': arch.name,
    'source': arch.pth,
    'path': arch.pth,
    'format': 'torch',
    'sha256': digest,
    'bytes': os.path.getsize(arch.pth),
    'sha256_matches_name': None,
    'tensors': n_tensors,
    'head': 'loaded',
    'head_reason': None,
    'reinitialised': [],
    'ignored': [],
  }
  json.dumps(record)  # goes into run records as is


@pytest.mark.parametrize('arch', ['tv_resnet', 'tv_effnet'], indirect=True)
def test_safetensors_file_loads_the_same_variables(arch, tmp_path):
  state = state_arrays(arch.torch_model)  # num_batches_tracked included, as int64
  path = str(tmp_path / f'{arch.name}.safetensors')
  safetensors.numpy.save_file(state, path, metadata={'source': 'test'})

  ours, meta = files.read_safetensors(path)
  theirs = safetensors.numpy.load_file(path)
  assert meta == {'source': 'test'} and ours.keys() == theirs.keys()
  for key in theirs:
    assert ours[key].dtype == theirs[key].dtype
    np.testing.assert_array_equal(ours[key], theirs[key])

  from_st, record = pretrained.load_pretrained(arch.name, arch.template, path, keep_head=True)
  from_pth, _ = pretrained.load_pretrained(arch.name, arch.template, arch.pth, keep_head=True)
  assert record['format'] == 'safetensors'
  a, b = leaves(from_st), leaves(from_pth)
  assert a.keys() == b.keys()
  for path_ in a:
    np.testing.assert_array_equal(a[path_], b[path_])


def test_safetensors_reader_reads_half_precision_as_the_library_does(tmp_path):
  g = torch.Generator().manual_seed(0)
  tensors = {
    'f32': torch.randn(3, 5, generator=g),
    'f16': torch.randn(4, 2, generator=g).half(),
    'bf16': torch.randn(2, 3, 2, generator=g).bfloat16(),
    'f64': torch.randn(3, generator=g).double(),
    'i64': torch.arange(6).reshape(2, 3),
    'u8': torch.arange(4, dtype=torch.uint8),
    'scalar': torch.tensor(2.5),
    'empty': torch.zeros(0, 3),
  }
  path = str(tmp_path / 'mixed.safetensors')
  safetensors.torch.save_file(tensors, path)
  ours, _ = files.read_safetensors(path)
  theirs = safetensors.torch.load_file(path)
  assert ours.keys() == theirs.keys()
  for key, tensor in theirs.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    assert ours[key].dtype == expected.dtype, key
    np.testing.assert_array_equal(ours[key], expected)
  assert ours['bf16'].dtype == np.float32  # widened exactly

  state, info = files.read_state(path)
  assert info['format'] == 'safetensors' and info['skipped'] == ['i64', 'u8']
  assert all(v.dtype == np.float32 for v in state.values())
  np.testing.assert_array_equal(state['f16'], tensors['f16'].float().numpy())


def test_pth_checkpoint_wrappers_and_data_parallel_prefix(tv_resnet, tmp_path):
  state = tv_resnet.torch_model.state_dict()
  wrapped = str(tmp_path / 'checkpoint.pt')
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in state.items()}}, wrapped)
  got, info = files.read_state(wrapped)
  want, _ = files.read_state(tv_resnet.pth)
  assert got.keys() == want.keys() and info['format'] == 'torch'
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert 'bn1.num_batches_tracked' in info['skipped']


# ----------------------------------------------------------------------------- the head for K classes


def test_two_class_model_keeps_the_body_and_reinitialises_the_head(tv_resnet):
  model = build_classifier(model_config('resnet18'), 2, (SIZE, SIZE, 3))
  template = template_for(model, seed=5)
  file_flat = resnet.torch_to_flax(files.read_state(tv_resnet.pth)[0])
  for keep_head in (False, True):
    variables, record = pretrained.load_pretrained('resnet18', template, tv_resnet.pth, keep_head=keep_head)
    got, init = leaves(variables), leaves(template)
    assert got.keys() == init.keys()
    for path, value in got.items():
      if path[1] == 'head':
        assert value is init[path]  # the template's own fresh head
      else:
        assert value.dtype == np.float32 and np.array_equal(value, file_flat[path]), path
    assert record['head'] == 'reinitialised'
    assert sorted(record['reinitialised']) == ['params/head/bias', 'params/head/kernel']
    assert record['tensors'] == len(got) - 2
    assert ('keep_head is off' in record['head_reason']) != keep_head
  assert "'fc.weight'" in record['head_reason'] and '(512, 1000)' in record['head_reason']


def test_unused_file_variables_are_listed_not_an_error():
  template = {'params': {'conv': {'kernel': np.zeros((3, 3, 1, 2))}, 'head': {'bias': np.zeros(2)}}}
  flat = {('params', 'conv', 'kernel'): np.ones((3, 3, 1, 2)), ('params', 'aux', 'kernel'): np.ones(4)}
  variables, record = merge.merge(template, flat, 'w.pth', names={('params', 'aux', 'kernel'): 'AuxLogits.fc.weight'})
  assert record['ignored'] == ['AuxLogits.fc.weight'] and record['tensors'] == 1
  assert np.array_equal(variables['params']['conv']['kernel'], np.ones((3, 3, 1, 2)))


# ----------------------------------------------------------------------------- errors


def test_wrong_architecture_names_the_file_and_a_key(tv_resnet, tv_effnet):
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('efficientnet_v2_s', tv_effnet.template, tv_resnet.pth)
  message = one_line_error(e)
  assert message.startswith(tv_resnet.pth) and "'conv1.weight'" in message and 'efficientnet_v2_s' in message
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', tv_resnet.template, tv_effnet.pth)
  message = one_line_error(e)
  assert message.startswith(tv_effnet.pth) and "'features.0.0.weight'" in message


def test_timm_efficientnet_v2_is_refused(tmp_path):
  path = str(tmp_path / 'tf_efficientnetv2_s.safetensors')
  safetensors.numpy.save_file({'conv_stem.weight': np.zeros((24, 3, 3, 3), np.float32)}, path)
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('efficientnet_v2_s', {'params': {}}, path)
  message = one_line_error(e)
  assert path in message and 'timm' in message and 'only torchvision-named EfficientNetV2' in message


@pytest.mark.parametrize(
  'overrides,channels,expected',
  [
    (
      {},
      1,
      ["'conv1.weight' (params/stem_conv/kernel)", '(7, 7, 3, 64) in the file', '(7, 7, 1, 64)', 'model.input_norm'],
    ),
    ({'stem': 'cifar'}, 3, ['(7, 7, 3, 64) in the file', '(3, 3, 3, 64)', "model.stem='imagenet'"]),
    ({'width': 32}, 3, ['(7, 7, 3, 64) in the file', '(7, 7, 3, 32)', 'width']),
  ],
)
def test_shape_mismatch_names_file_key_and_both_shapes(tv_resnet, overrides, channels, expected):
  model = build_classifier(model_config('resnet18', **overrides), 2, (SIZE, SIZE, channels))
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', template_for(model, channels), tv_resnet.pth)
  message = one_line_error(e)
  assert message.startswith(tv_resnet.pth)
  for part in expected:
    assert part in message


def test_missing_variable_is_named(tv_resnet, tmp_path):
  state = state_arrays(tv_resnet.torch_model)
  del state['layer3.1.bn2.running_var']
  path = str(tmp_path / 'partial.safetensors')
  safetensors.numpy.save_file(state, path)
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', tv_resnet.template, path)
  message = one_line_error(e)
  assert path in message and 'batch_stats/stage3_block2/BatchNorm_1/var' in message


def test_truncated_pth(tv_resnet, tmp_path):
  data = open(tv_resnet.pth, 'rb').read()
  path = tmp_path / 'cut.pth'
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(UserError) as e:
    files.read_state(str(path))
  message = one_line_error(e)
  assert message.startswith(str(path)) and 'truncated or corrupt' in message


def test_truncated_and_corrupt_safetensors(tmp_path):
  path = tmp_path / 'w.safetensors'
  safetensors.numpy.save_file({'a': np.ones((4, 4), np.float32), 'b': np.zeros(3, np.float16)}, str(path))
  data = path.read_bytes()
  header_len = int.from_bytes(data[:8], 'little')
  cases = {
    'in the data': (data[:-5], 'truncated'),
    'in the header': (data[: 8 + header_len // 2], 'truncated'),
    'in the length': (data[:5], 'truncated'),
    'extra bytes': (data + b'\0' * 4, 'after the last tensor'),
    'not JSON': (data[:8] + b'!' * header_len + data[8 + header_len :], 'not valid JSON'),
  }
  for case, (content, expected) in cases.items():
    bad = tmp_path / f'{case.replace(" ", "_")}.safetensors'
    bad.write_bytes(content)
    with pytest.raises(UserError) as e:
      files.read_state(str(bad))
    message = one_line_error(e)
    assert message.startswith(str(bad)) and expected in message, (case, message)
  header = json.loads(data[8 : 8 + header_len])
  header['a']['data_offsets'][1] -= 4  # disagrees with dtype and shape
  raw = json.dumps(header).encode()
  bad = tmp_path / 'offsets.safetensors'
  bad.write_bytes(len(raw).to_bytes(8, 'little') + raw + data[8 + header_len :])
  with pytest.raises(UserError, match='expected a span of 64 bytes'):
    files.read_state(str(bad))


def test_unknown_suffix_and_missing_file(tmp_path):
  with pytest.raises(UserError, match='unknown weights file type'):
    files.read_state(__file__)
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', {}, str(tmp_path / 'nothing.pth'))
  assert one_line_error(e).endswith('weights file not found')
  # Named as one of torchvision's files: the error says where to get it.
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', {}, str(tmp_path / 'resnet18-f37072fd.pth'))
  message = one_line_error(e)
  assert f'curl -L --create-dirs -o {tmp_path / "resnet18-f37072fd.pth"}' in message
  assert 'https://download.pytorch.org/models/resnet18-f37072fd.pth' in message
  with pytest.raises(UserError, match='no converter of weight files'):
    pretrained.load_pretrained('efficientnet_v2_b0', {}, __file__)


# ----------------------------------------------------------------------------- sources


def test_torch_home_follows_torch_hub(monkeypatch, tmp_path):
  for env in ({'TORCH_HOME': str(tmp_path / 'th')}, {'XDG_CACHE_HOME': str(tmp_path / 'xdg')}, {}):
    monkeypatch.delenv('TORCH_HOME', raising=False)
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    assert sources.torchvision_path('resnet18') == os.path.join(
      torch.hub.get_dir(), 'checkpoints', 'resnet18-f37072fd.pth'
    )


def test_torchvision_file_names_are_torchvision_s():
  models = torchvision_models()
  enums = {
    'resnet18': 'ResNet18_Weights',
    'efficientnet_v2_s': 'EfficientNet_V2_S_Weights',
    'inception_v3': 'Inception_V3_Weights',
  }
  for name, weights in sources.TORCHVISION.items():
    assert models.get_weight(f'{enums[name]}.{weights.weights}').url == weights.url
    assert callable(getattr(models, weights.builder))


def test_torchvision_source_missing_then_found(tv_resnet, monkeypatch, tmp_path):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path))
  expected = tmp_path / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', tv_resnet.template, 'torchvision')
  message = one_line_error(e)
  assert message.startswith(str(expected))
  assert f'curl -L --create-dirs -o {expected} https://download.pytorch.org/models/resnet18-f37072fd.pth' in message
  assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in message

  expected.parent.mkdir(parents=True)
  expected.write_bytes(open(tv_resnet.pth, 'rb').read())
  variables, record = pretrained.load_pretrained('resnet18', tv_resnet.template, 'torchvision')
  assert record['source'] == 'torchvision' and record['path'] == str(expected)
  assert record['sha256_matches_name'] is False  # random weights under the published name: warned, not refused
  with pytest.raises(UserError, match="torchvision has no ImageNet weights for model 'efficientnet_v2_b0'"):
    pretrained.load_pretrained('efficientnet_v2_b0', {}, 'torchvision')


def test_export_folder_round_trip(tmp_path):
  config = model_config('resnet18', width=8, stem='cifar')
  exported = build_classifier(config, 3, (SIZE, SIZE, 1))
  variables = template_for(exported, channels=1, seed=1)
  export_dir = tmp_path / 'run' / 'export'
  checkpoint.save_tree(str(export_dir / 'variables'), variables)
  info = {'model': config.to_dict(), 'num_classes': 3, 'image_shape': [SIZE, SIZE, 1], 'class_names': ['a', 'b', 'c']}
  (export_dir / 'model.json').write_text(json.dumps(info))

  model = build_classifier(config, 2, (SIZE, SIZE, 1))
  template = template_for(model, channels=1, seed=2)
  # The run folder stands for its export/.
  loaded, record = pretrained.load_pretrained('resnet18', template, str(tmp_path / 'run'))
  assert record['format'] == 'export' and record['path'] == str(export_dir)
  assert record['export_model'] == config.to_dict() and record['export_num_classes'] == 3
  assert record['head'] == 'reinitialised' and len(record['sha256']) == 64
  want, got, init = leaves(variables), leaves(loaded), leaves(template)
  for path, value in got.items():
    assert np.array_equal(value, init[path] if path[1] == 'head' else want[path]), path

  same, record = pretrained.load_pretrained(
    'resnet18', template_for(exported, channels=1), str(export_dir), keep_head=True
  )
  assert record['head'] == 'loaded'
  assert all(np.array_equal(v, want[p]) for p, v in leaves(same).items())

  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('efficientnet_v2_s', template, str(export_dir))
  assert "an export of model 'resnet18'" in one_line_error(e)
  wide = build_classifier(model_config('resnet18', width=16, stem='cifar'), 2, (SIZE, SIZE, 1))
  with pytest.raises(UserError) as e:
    pretrained.load_pretrained('resnet18', template_for(wide, channels=1), str(export_dir))
  assert re.search(
    r'variables: params/\S+ has shape \((\d+, )*8,?\) in the file, expected \((\d+, )*16,?\)', one_line_error(e)
  )


def test_import_is_light():
  # PyTorch and orbax only when a .pth file or an export is read. (JAX is imported: the Inception-V3
  # converter checks a file against the model's own variable tree.)
  code = "import sys, cxrjax.pretrained; print([m for m in ('torch', 'orbax', 'safetensors') if m in sys.modules])"
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True)
  assert out.stdout.strip() == '[]'


def test_converters_registry():
  assert pretrained.CONVERTERS == {'resnet18': resnet, 'efficientnet_v2_s': efficientnet_v2,
                                   'inception_v3': pretrained.inception_v3}  # fmt: skip
  for name, module in pretrained.CONVERTERS.items():
    assert module.HEAD == models.HEADS[name]  # the head the fine-tuning optimizer sees is the one re-initialised


def test_pth_without_pytorch_says_what_to_do(tv_resnet, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(UserError) as e:
    files.read_state(tv_resnet.pth)
  message = one_line_error(e)
  assert message.startswith(tv_resnet.pth) and 'pip install torch' in message and '.safetensors' in message
