"""FID Inception-V3: parameter count, pytorch-fid key mapping, loader errors, features against a PyTorch twin.

The real weights cannot be downloaded here, so a fake state_dict with the real
keys and random values stands in. The PyTorch twin below is pytorch-fid's FID
network (torchvision's Inception3 with the FIDInceptionA/C/E patches, no `fc`)
rebuilt from torch.nn primitives, independently of cxrjax, so key names, shapes,
the parameter count and the forward pass are all checked against it.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cxrjax.errors import UserError
from cxrjax.eval import inception_features as inc
from cxrjax.models import inception

torch = pytest.importorskip('torch')
nn, F = torch.nn, torch.nn.functional

# torchvision's Inception_V3_Weights meta: num_params 27,161,264, less the aux head
# (3,326,696) and the 1000-way fc (2,049,000); the twin below counts it again.
FID_INCEPTION_PARAMS = 21_785_568


class Conv(nn.Module):
  def __init__(self, cin, cout, k=1, s=1, p=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=1e-3)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Block(nn.Module):
  """Named convolutions (cin, cout, kernel, stride, padding) and a forward written as a function."""

  def __init__(self, convs, fwd):
    super().__init__()
    for name, args in convs.items():
      self.add_module(name, Conv(*args))
    self.fwd = fwd

  def forward(self, x):
    return torch.cat(self.fwd(self, x), 1)


def chain(m, x, *names):
  for name in names:
    x = getattr(m, name)(x)
  return x


def avg_no_pad(x):  # TensorFlow's SAME average pool
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def block_a(cin, pool):
  convs = dict(branch1x1=(cin, 64), branch5x5_1=(cin, 48), branch5x5_2=(48, 64, 5, 1, 2), branch3x3dbl_1=(cin, 64),
               branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1), branch_pool=(cin, pool))  # fmt: skip
  return Block(convs, lambda m, x: [
    m.branch1x1(x), chain(m, x, 'branch5x5_1', 'branch5x5_2'),
    chain(m, x, 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'), m.branch_pool(avg_no_pad(x)),
  ])  # fmt: skip


def block_b(cin):
  convs = dict(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64), branch3x3dbl_2=(64, 96, 3, 1, 1),
               branch3x3dbl_3=(96, 96, 3, 2))  # fmt: skip
  return Block(convs, lambda m, x: [
    m.branch3x3(x), chain(m, x, 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'), F.max_pool2d(x, 3, 2),
  ])  # fmt: skip


def block_c(c7):
  r, c = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
  convs = dict(branch1x1=(768, 192), branch7x7_1=(768, c7), branch7x7_2=(c7, c7, *r), branch7x7_3=(c7, 192, *c),
               branch7x7dbl_1=(768, c7), branch7x7dbl_2=(c7, c7, *c), branch7x7dbl_3=(c7, c7, *r),
               branch7x7dbl_4=(c7, c7, *c), branch7x7dbl_5=(c7, 192, *r), branch_pool=(768, 192))  # fmt: skip
  dbl = [f'branch7x7dbl_{i}' for i in range(1, 6)]
  return Block(convs, lambda m, x: [
    m.branch1x1(x), chain(m, x, 'branch7x7_1', 'branch7x7_2', 'branch7x7_3'), chain(m, x, *dbl),
    m.branch_pool(avg_no_pad(x)),
  ])  # fmt: skip


def block_d():
  convs = dict(branch3x3_1=(768, 192), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(768, 192),
               branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)), branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
               branch7x7x3_4=(192, 192, 3, 2))  # fmt: skip
  return Block(convs, lambda m, x: [
    chain(m, x, 'branch3x3_1', 'branch3x3_2'), chain(m, x, *[f'branch7x7x3_{i}' for i in range(1, 5)]),
    F.max_pool2d(x, 3, 2),
  ])  # fmt: skip


def block_e(cin, max_pool):
  r, c = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
  convs = dict(branch1x1=(cin, 320), branch3x3_1=(cin, 384), branch3x3_2a=(384, 384, *r), branch3x3_2b=(384, 384, *c),
               branch3x3dbl_1=(cin, 448), branch3x3dbl_2=(448, 384, 3, 1, 1), branch3x3dbl_3a=(384, 384, *r),
               branch3x3dbl_3b=(384, 384, *c), branch_pool=(cin, 192))  # fmt: skip

  def fwd(m, x):
    a = m.branch3x3_1(x)
    d = chain(m, x, 'branch3x3dbl_1', 'branch3x3dbl_2')
    pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else avg_no_pad(x)
    return [m.branch1x1(x), m.branch3x3_2a(a), m.branch3x3_2b(a), m.branch3x3dbl_3a(d), m.branch3x3dbl_3b(d),
            m.branch_pool(pooled)]  # fmt: skip

  return Block(convs, fwd)


def torch_twin():
  layers = [
    ('Conv2d_1a_3x3', Conv(3, 32, 3, 2)), ('Conv2d_2a_3x3', Conv(32, 32, 3)), ('Conv2d_2b_3x3', Conv(32, 64, 3, 1, 1)),
    ('maxpool1', nn.MaxPool2d(3, 2)), ('Conv2d_3b_1x1', Conv(64, 80)), ('Conv2d_4a_3x3', Conv(80, 192, 3)),
    ('maxpool2', nn.MaxPool2d(3, 2)), ('Mixed_5b', block_a(192, 32)), ('Mixed_5c', block_a(256, 64)),
    ('Mixed_5d', block_a(288, 64)), ('Mixed_6a', block_b(288)), ('Mixed_6b', block_c(128)),
    ('Mixed_6c', block_c(160)), ('Mixed_6d', block_c(160)), ('Mixed_6e', block_c(192)), ('Mixed_7a', block_d()),
    ('Mixed_7b', block_e(1280, False)), ('Mixed_7c', block_e(2048, True)),
    ('avgpool', nn.AdaptiveAvgPool2d(1)), ('flatten', nn.Flatten()),
  ]  # fmt: skip
  return nn.Sequential(collections.OrderedDict(layers)).eval()


def random_variables(abstract, seed=0):
  """Random Flax variables of the right shapes, scaled so activations stay O(1) through all 94 convolutions."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, spec in abstract.items():
    shape, leaf = spec.shape, path[-1]
    if leaf == 'kernel':
      v = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape)  # He init for ReLU layers
    elif leaf in ('scale', 'var'):
      v = rng.uniform(0.8, 1.2, shape)
    else:  # bias, mean
      v = rng.normal(0, 0.1, shape)
    out[path] = v.astype(np.float32)
  return out


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  """Random Flax variables and the pytorch-fid-style file made from them with the inverse mapping."""
  model = inception.InceptionV3()
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
  variables = traverse_util.unflatten_dict(random_variables(traverse_util.flatten_dict(dict(abstract))))
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inc.to_torch_state_dict(variables).items()}
  # Also in the real file: the 1008-way classifier, which the features do not use.
  state['fc.weight'], state['fc.bias'] = torch.zeros(1008, 2048), torch.zeros(1008)
  path = tmp_path_factory.mktemp('inception') / 'pt_inception-fake.pth'
  torch.save(state, path)
  return dict(model=model, abstract=abstract, variables=variables, state=state, path=str(path))


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_parameter_count_keys_and_shapes_match_pytorch_fid(fake):
  twin = torch_twin()
  assert sum(p.numel() for p in twin.parameters()) == FID_INCEPTION_PARAMS
  assert count(fake['abstract']['params']) == FID_INCEPTION_PARAMS
  want = {k: tuple(v.shape) for k, v in twin.state_dict().items() if not k.endswith('num_batches_tracked')}
  got = {k: tuple(v.shape) for k, v in inc.to_torch_state_dict(fake['variables']).items()}
  assert got == want


def test_state_dict_round_trip_is_exact(fake):
  model, variables = inc.load_inception(fake['path'])
  assert isinstance(model, inception.InceptionV3)
  want, got = traverse_util.flatten_dict(fake['variables']), traverse_util.flatten_dict(variables)
  assert got.keys() == want.keys()
  for path, value in want.items():
    assert got[path].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=str(path))


def test_missing_or_misshaped_key_is_named(fake, tmp_path):
  state = dict(fake['state'])
  del state['Mixed_6c.branch7x7dbl_3.bn.running_var']
  path = tmp_path / 'missing.pth'
  torch.save(state, path)
  with pytest.raises(UserError, match=r"missing.pth: missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'"):
    inc.load_inception(str(path))
  arrays = {k: v.numpy() for k, v in fake['state'].items()}
  arrays['Mixed_7c.branch3x3_2a.conv.weight'] = np.zeros((384, 384, 3, 1), np.float32)  # 1x3 kernel transposed
  with pytest.raises(
    UserError, match=r"'Mixed_7c\.branch3x3_2a\.conv\.weight' has shape \(384, 384, 3, 1\), expected \(384, 384, 1, 3\)"
  ):
    inc.from_torch_state_dict(arrays, 'x.pth')
  arrays = {k: v.numpy() for k, v in fake['state'].items()}
  arrays['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(UserError, match="torchvision's ImageNet Inception"):
    inc.from_torch_state_dict(arrays, 'x.pth')
  with pytest.raises(UserError, match='file not found'):
    inc.load_inception(str(tmp_path / 'nope.pth'))
  (tmp_path / 'junk.pth').write_bytes(b'not a zip')
  with pytest.raises(UserError, match='junk.pth: not a readable torch state_dict'):
    inc.load_inception(str(tmp_path / 'junk.pth'))


@pytest.mark.parametrize('src,dst', [((5, 7), 13), ((40, 23), 9)])
def test_resize_matches_torch_bilinear(src, dst):
  x = np.random.default_rng(0).uniform(size=(2, *src, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x), dst))
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(dst, dst), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_features_match_the_pytorch_twin(fake):
  rng = np.random.default_rng(1)
  # Smooth grayscale images (upsampled noise), not 299 square: the resize and channel repeat are exercised.
  small = rng.integers(0, 256, size=(2, 8, 6)).astype(np.float32)
  images = np.clip(np.kron(small, np.ones((5, 5))) + rng.normal(0, 8, (2, 40, 30)), 0, 255).astype(np.uint8)
  feats = inc.extract_inception(fake['model'], fake['variables'], images)  # the one (slow) compile
  assert feats.shape == (2, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
  twin = torch_twin()
  missing, unexpected = twin.load_state_dict({k: v for k, v in fake['state'].items() if k[:3] != 'fc.'}, strict=False)
  assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
  # pytorch-fid's path: ToTensor ([0, 1]), RGB, bilinear resize to 299, then 2x - 1.
  x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].repeat(1, 3, 1, 1)
  x = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
  with torch.no_grad():
    want = twin(x).numpy()
  assert want.std() > 0.1  # the random weights keep the features informative, so the comparison means something
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
