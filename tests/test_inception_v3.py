"""Inception-V3 classifier: torchvision's parameter count, name-for-name weight conversion, logits against torchvision.

torchvision's own `inception_v3` (random weights, randomised batch-norm statistics)
is the reference: its state_dict goes through `cxrjax.pretrained.inception_v3.torch_to_flax`
and the Flax logits must equal torchvision's in evaluation and in training (batch
statistics, auxiliary head). The FID variant of the same module is tested in
test_inception_features.py.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cxrjax.errors import UserError
from cxrjax.models import build_classifier, inception
from cxrjax.pretrained import inception_v3 as weights

from conftest import torchvision_models

TORCHVISION_PARAMS = 27_161_264  # torchvision's Inception_V3_Weights meta num_params (aux head included)


def count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract(model, shape=(1, 299, 299, 3)):
  """The model's variables as shapes (traced only: nothing is compiled or computed)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def torch_inception(aux_logits=True):
  import torch  # noqa: PLC0415 - PyTorch is only for the tests that compare with it

  torch.manual_seed(0)
  return torchvision_models().inception_v3(weights=None, aux_logits=aux_logits, init_weights=False)


def numpy_state(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize('aux_logits', [True, False])
def test_parameter_count_and_names_match_torchvision(aux_logits):
  net = torch_inception(aux_logits)
  want = sum(p.numel() for p in net.parameters())
  assert want == (TORCHVISION_PARAMS if aux_logits else TORCHVISION_PARAMS - 3_326_696)
  shapes = abstract(inception.inception_v3(1000, aux_logits=aux_logits))
  assert count(shapes['params']) == want
  # Name for name: every variable comes from one torchvision key, with its shape.
  flat = weights.torch_to_flax(numpy_state(net))
  ours = traverse_util.flatten_dict({k: shapes[k] for k in ('params', 'batch_stats')})
  assert {p: v.shape for p, v in flat.items()} == {p: v.shape for p, v in ours.items()}
  for path in weights.HEAD[: 2 if aux_logits else 1]:
    assert ('params', *path, 'kernel') in flat


@pytest.fixture(scope='module')
def reference():
  return make_reference()


def make_reference():
  """torchvision's Inception-V3 with non-trivial batch-norm statistics and the Flax variables converted from it."""
  import torch  # noqa: PLC0415

  net = torch_inception(aux_logits=True)
  net.dropout.p = 0.0  # compared in training: dropout off on both sides
  rng = np.random.default_rng(0)
  # Running statistics of a calibration batch (momentum 1), so activations stay O(1) through the
  # 94 batch norms in evaluation, then perturbed per channel; random affine parameters too.
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.momentum = 1.0
  net.train()
  with torch.no_grad():
    net(torch.from_numpy(rng.uniform(-1, 1, (4, 3, 299, 299)).astype(np.float32)))
    for bn in bns:
      c = bn.num_features
      bn.momentum = 0.1
      bn.running_mean += torch.from_numpy(rng.normal(0, 0.1, c).astype(np.float32)) * bn.running_var.sqrt()
      bn.running_var *= torch.from_numpy(rng.uniform(0.7, 1.3, c).astype(np.float32))
      bn.weight.copy_(torch.from_numpy(rng.uniform(0.8, 1.2, c).astype(np.float32)))
      bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, c).astype(np.float32)))
  net.eval()
  variables = traverse_util.unflatten_dict(
    {p: jnp.asarray(v) for p, v in weights.torch_to_flax(numpy_state(net)).items()}
  )
  model = inception.inception_v3(1000, aux_logits=True, dropout_rate=0.0)
  return dict(net=net, variables=variables, model=model)


def assert_close(got, want, tol=1e-4):
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_eval_logits_match_torchvision(reference):
  import torch  # noqa: PLC0415

  # Not square, and smaller than native (the auxiliary head is not run in evaluation, as in torchvision).
  x = np.random.default_rng(1).uniform(-1, 1, (2, 131, 96, 3)).astype(np.float32)
  apply = jax.jit(functools.partial(reference['model'].apply, train=False, mutable=['intermediates']))
  logits, state = apply(reference['variables'], x)
  with torch.no_grad():
    want = reference['net'](torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert want.std() > 0.1  # informative logits: the comparison means something
  assert_close(np.asarray(logits), want)
  (fmap,) = state['intermediates']['cam_features']  # Grad-CAM's feature map, before pooling
  assert fmap.shape == (2, 2, 1, 2048)
  assert 'aux_logits' not in state['intermediates']


def test_training_forward_matches_torchvision_with_aux_logits(reference):
  """Batch statistics and the auxiliary head (which needs the native 299x299).

  The tolerance is wider than in evaluation because normalising with the statistics of two
  images (the auxiliary head's last batch norm sees two values per channel) amplifies
  rounding: here torch's own float32 logits differ from its float64 ones by 0.9e-4 (main)
  and 2.1e-4 (auxiliary) of their largest magnitude, and ours from torch's float64 ones by
  0.4e-4 and 0.9e-4.
  """
  import copy  # noqa: PLC0415

  import torch  # noqa: PLC0415

  x = np.random.default_rng(2).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  apply = jax.jit(functools.partial(reference['model'].apply, train=True, mutable=['batch_stats', 'intermediates']))
  logits, state = apply(reference['variables'], x)
  net = copy.deepcopy(reference['net']).train()  # updates its running statistics
  with torch.no_grad():
    want, want_aux = net(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert_close(np.asarray(logits), want.numpy(), 5e-4)
  (aux,) = state['intermediates']['aux_logits']
  assert aux.shape == (2, 1000) and aux.dtype == jnp.float32
  assert want_aux.std() > 0.1
  assert_close(np.asarray(aux), want_aux.numpy(), 5e-4)
  # Running means updated as torch's momentum 0.1 does (the variances differ by design: torch
  # updates them with the unbiased batch variance, flax with the biased one).
  torch_state = net.state_dict()
  for path, value in traverse_util.flatten_dict(state['batch_stats']).items():
    if path[-1] == 'mean':
      assert_close(np.asarray(value), torch_state[weights.torch_key(('batch_stats', *path))].numpy(), 5e-4)


def test_too_small_input_is_refused_with_the_minimum():
  import torch  # noqa: PLC0415

  model = inception.inception_v3(2)
  with pytest.raises(UserError, match=r'at least 75x75 pixels, got 74x80; set data.image_size >= 75 \(its native'):
    abstract(model, (1, 74, 80, 1))
  assert abstract(model, (1, 75, 75, 1))['params']  # 75 is enough
  aux = inception.inception_v3(2, aux_logits=True)
  with pytest.raises(
    UserError, match=r'auxiliary head \(aux_logits\) needs images of at least 299x299 pixels, got 298'
  ):
    abstract(aux, (1, 298, 298, 3))
  # The same limits as torchvision's own network.
  net = torch_inception(aux_logits=False).eval()
  with torch.no_grad():
    assert net(torch.zeros(1, 3, 75, 75)).shape == (1, 1000)
    with pytest.raises(RuntimeError):
      net(torch.zeros(1, 3, 74, 74))


def test_fid_variant_refuses_classifier_options():
  with pytest.raises(ValueError, match="need variant='torchvision'"):
    abstract(inception.InceptionV3(num_classes=2))
  with pytest.raises(ValueError, match='unknown Inception-V3 variant'):
    abstract(inception.InceptionV3(variant='keras'))


def test_torch_to_flax_names_unknown_missing_and_misshaped_keys():
  state = numpy_state(torch_inception(aux_logits=False))
  with pytest.raises(UserError, match=r"x.pth: unknown key 'Mixed_5b\.branch9x9\.conv\.weight'"):
    weights.torch_to_flax({**state, 'Mixed_5b.branch9x9.conv.weight': np.zeros((1,))}, 'x.pth')
  partial = dict(state)
  del partial['Mixed_6c.branch7x7dbl_3.bn.running_var']
  with pytest.raises(UserError, match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var' \(1 missing\)"):
    weights.torch_to_flax(partial)
  with pytest.raises(UserError, match=r"key 'Mixed_7c\.branch3x3_2a\.conv\.weight' has shape \(384, 384, 3, 1\)"):
    weights.torch_to_flax({**state, 'Mixed_7c.branch3x3_2a.conv.weight': np.zeros((384, 384, 3, 1), np.float32)})
  # A new head and grayscale input are read off the arrays.
  flat = weights.torch_to_flax({
    **state,
    'fc.weight': np.ones((2, 2048), np.float32),
    'fc.bias': np.zeros(2, np.float32),
    'Conv2d_1a_3x3.conv.weight': np.ones((32, 1, 3, 3), np.float32),
  })  # fmt: skip
  assert flat['params', 'head', 'kernel'].shape == (2048, 2)
  assert flat['params', 'Conv2d_1a_3x3', 'conv', 'kernel'].shape == (3, 3, 1, 32)


def test_registered_classifier_takes_the_model_config():
  config = ml_collections.ConfigDict(dict(name='inception_v3', dtype='bfloat16', aux_logits=True, dropout_rate=0.2,
                                          input_norm='inception', rgb_input=True))  # fmt: skip
  model = build_classifier(config, 3, (299, 299, 1))
  assert isinstance(model, inception.InceptionV3)
  assert (model.variant, model.num_classes, model.aux_logits, model.dropout_rate) == ('torchvision', 3, True, 0.2)
  assert (model.dtype, model.input_norm, model.rgb_input) == (jnp.bfloat16, 'inception', True)
  plain = build_classifier(ml_collections.ConfigDict(dict(name='inception_v3', dtype='float32')), 2, (128, 128, 1))
  assert (plain.aux_logits, plain.dropout_rate, plain.input_norm, plain.rgb_input) == (False, 0.5, 'none', False)
