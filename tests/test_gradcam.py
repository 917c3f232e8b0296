"""Grad-CAM(++) on toy and ResNet models, the lung-field estimate, focus scores and the CAM figure."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from cxrjax import config_lib
from cxrjax.eval import gradcam
from cxrjax.models import build_classifier, resnet

from conftest import init_variables, normal


class QuadrantNet(nn.Module):
  """Features exist only in the top-left quadrant of the (stride-2) feature map."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    h, w = x.shape[1:3]
    gate = (jnp.arange(h)[:, None] < h // 2) & (jnp.arange(w)[None, :] < w // 2)
    x = x * gate[None, :, :, None]
    x = self.perturb('cam_features', x)
    self.sow('intermediates', 'cam_features', x)
    return nn.Dense(2)(x.mean(axis=(1, 2)))


class SquareHead(nn.Module):
  """A head that is non-linear in the feature map, for a finite-difference check."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.tanh(nn.Conv(3, (3, 3))(x))
    x = self.perturb('cam_features', x)
    self.sow('intermediates', 'cam_features', x)
    return nn.Dense(2)((x**2).mean(axis=(1, 2)))


def _quadrant_variables():
  model = QuadrantNet()
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  variables = init_variables(model, jax.random.key(1), x, train=False)
  params = dict(variables['params'])
  kernel = jnp.abs(params['Dense_0']['kernel']) + 0.1
  # Class 1 gains from every feature, class 0 loses: class 1 is predicted and
  # has positive evidence exactly where the features live.
  params['Dense_0'] = {'kernel': kernel.at[:, 0].set(-kernel[:, 0]), 'bias': jnp.zeros(2)}
  return model, {'params': params, 'batch_stats': variables['batch_stats']}, x


@pytest.mark.parametrize('method', gradcam.METHODS)
def test_cam_finds_the_informative_quadrant(method):
  model, variables, x = _quadrant_variables()
  cam_fn = gradcam.make_cam_fn(model, method)
  cams = np.asarray(cam_fn(variables, x, 1))
  assert cams.shape == (4, 16, 16)
  assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
  quadrant = np.zeros((16, 16), bool)
  quadrant[:8, :8] = True
  assert (gradcam.focus_score(cams, np.broadcast_to(quadrant, cams.shape)) > 0.9).all()
  # None explains the predicted class, which is 1 here.
  np.testing.assert_allclose(np.asarray(cam_fn(variables, x)), cams, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cam_fn(variables, x, jnp.ones(4, jnp.int32))), cams, atol=1e-6)
  # Class 0 has only negative evidence: all-zero maps, not NaN.
  zero = np.asarray(cam_fn(variables, x, 0))
  assert np.isfinite(zero).all() and (zero == 0).all()


def test_perturbation_gradient_matches_explicit_resnet_gradient():
  # Global average pooling then a dense head: dlogit_c/dA_ijk = W_kc / (h w) exactly.
  model = resnet.ResNet(num_classes=2, width=4, stage_sizes=(1, 1))
  x = normal(0, (2, 28, 28, 1))
  variables = init_variables(model, jax.random.key(1), x, train=False)
  grad_fn = jax.jit(functools.partial(gradcam.feature_gradients, model))
  acts, grads, logits, targets = grad_fn(variables, x, jnp.array([1, 0]))
  h, w = acts.shape[1:3]
  kernel = variables['params']['head']['kernel']
  expect = jnp.stack([jnp.broadcast_to(kernel[:, c] / (h * w), acts.shape[1:]) for c in (1, 0)])
  np.testing.assert_allclose(grads, expect, rtol=1e-6, atol=1e-9)
  ref_logits, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(variables, x)
  np.testing.assert_allclose(acts, state['intermediates']['cam_features'][0], atol=1e-6)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  assert targets.tolist() == [1, 0]
  # Both methods against NumPy transcriptions of their formulas.
  a, g = np.asarray(acts, np.float64), np.asarray(grads, np.float64)
  ref = np.maximum(np.einsum('bhwk,bk->bhw', a, g.mean(axis=(1, 2))), 0)
  np.testing.assert_allclose(gradcam.cam_from_gradients(acts, grads, 'gradcam'), ref, rtol=1e-5, atol=1e-7)
  alpha = g**2 / (2 * g**2 + a.sum(axis=(1, 2), keepdims=True) * g**3 + 1e-7)
  weights = (np.where(g != 0, alpha, 0) * np.maximum(g, 0)).sum(axis=(1, 2))
  ref = np.maximum(np.einsum('bhwk,bk->bhw', a, weights), 0)
  np.testing.assert_allclose(gradcam.cam_from_gradients(acts, grads, 'gradcam++'), ref, rtol=1e-4, atol=1e-7)
  # The jitted full pipeline on the real architecture: input-sized maps in [0, 1].
  cams = np.asarray(gradcam.make_cam_fn(model, 'gradcam++')(variables, x))
  assert cams.shape == (2, 28, 28) and 0 <= cams.min() and cams.max() <= 1 + 1e-6


def test_perturbation_gradient_matches_finite_differences():
  model = SquareHead()
  x = normal(2, (2, 6, 6, 1))
  variables = init_variables(model, jax.random.key(3), x, train=False)
  variables = {'params': variables['params']}
  _, grads, _, _ = gradcam.feature_gradients(model, variables, x, 1)
  zeros = gradcam.zero_perturbations(model, x)
  eps = 1e-2
  logit = jax.jit(lambda p: model.apply({**variables, 'perturbations': {'cam_features': p}}, x, train=False))
  rng = np.random.default_rng(0)
  for _ in range(5):
    b, i, j, k = (int(rng.integers(0, n)) for n in (2, 6, 6, 3))
    bump = zeros['cam_features'].at[b, i, j, k].set(eps)

    fd = (logit(bump)[b, 1] - logit(-bump)[b, 1]) / (2 * eps)
    assert float(grads[b, i, j, k]) == pytest.approx(float(fd), rel=1e-3, abs=1e-5)


def test_unknown_method_and_missing_perturb():
  with pytest.raises(ValueError):
    gradcam.make_cam_fn(QuadrantNet(), 'scorecam')

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  with pytest.raises(ValueError, match='perturb'):
    gradcam.zero_perturbations(Plain(), jnp.zeros((1, 4, 4, 1)))


def test_focus_score():
  masks = np.zeros((3, 8, 8), bool)
  masks[:, 2:6, 2:6] = True
  cams = np.zeros((3, 8, 8))
  cams[0, 3:5, 3:5] = 1.0  # inside
  cams[1, 0, :] = 0.7  # outside
  cams[2] = 0.0  # no mass
  score = gradcam.focus_score(cams, masks)
  assert score[0] == 1.0 and score[1] == 0.0 and np.isnan(score[2])
  half = np.zeros((1, 8, 8))
  half[0, 3, 3] = half[0, 0, 0] = 0.5
  assert gradcam.focus_score(half, masks[:1])[0] == pytest.approx(0.5)


def test_lung_prior():
  prior = gradcam.lung_prior(28, 28)
  assert 0.2 < prior.mean() < 0.4
  np.testing.assert_array_equal(prior, prior[:, ::-1])  # left-right symmetric
  assert not prior[:, 13:15].any()  # the mediastinum is outside
  assert ndi.label(prior)[1] == 2


def _check_masks(masks, images_shape):
  b, h, w = images_shape[:3]
  assert masks.shape == (b, h, w) and masks.dtype == bool
  area = masks.mean(axis=(1, 2))
  assert ((area > 0.1) & (area < 0.7)).all(), area
  central = np.zeros((h, w), bool)
  central[int(0.03 * h) : int(0.95 * h), int(0.05 * w) : int(0.95 * w)] = True
  inside = (masks & central).sum(axis=(1, 2)) / masks.sum(axis=(1, 2))
  assert (inside > 0.9).all(), inside
  # Both sides of the chest are represented.
  assert masks[:, :, : w // 2].any(axis=(1, 2)).all() and masks[:, :, w // 2 :].any(axis=(1, 2)).all()


def test_lung_mask_on_real_images(npz_path):
  with np.load(npz_path) as data:
    images = data['test_images'][:24]
  masks, used_prior = gradcam.lung_mask(images, return_fallback=True)
  _check_masks(masks, images.shape)
  # Mostly estimated, not the prior, and deterministic.
  assert used_prior.mean() <= 0.25
  np.testing.assert_array_equal(gradcam.lung_mask(images), masks)
  # Channels-last input gives the same result.
  np.testing.assert_array_equal(gradcam.lung_mask(images[..., None]), masks)
  # 224 x 224 (the Kermany resolution) works too, and agrees with the 28 px masks.
  big = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in images[:6]])
  big_masks = gradcam.lung_mask(big)
  _check_masks(big_masks, big.shape)
  small_from_big = big_masks.reshape(6, 28, 8, 28, 8).mean(axis=(2, 4)) > 0.5
  iou = (small_from_big & masks[:6]).sum((1, 2)) / (small_from_big | masks[:6]).sum((1, 2))
  assert iou.mean() > 0.5, iou


def test_lung_mask_falls_back_to_prior():
  flat = np.full((2, 28, 28), 128, np.uint8)
  masks, used_prior = gradcam.lung_mask(flat, return_fallback=True)
  assert used_prior.all()
  np.testing.assert_array_equal(masks[0], gradcam.lung_prior(28, 28))


def test_cam_grid_writes_png(tmp_path, npz_path):
  with np.load(npz_path) as data:
    images = data['test_images'][:3]
  rng = np.random.default_rng(0)
  cams = {'gradcam': rng.random((3, 28, 28)), 'gradcam++': rng.random((3, 28, 28))}
  path = tmp_path / 'figs' / 'cams.png'
  masks = gradcam.lung_mask(images)
  gradcam.cam_grid(images, cams, str(path), titles=['y=0', 'y=1', 'y=1'], masks=masks)
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
  assert [p.name for p in path.parent.iterdir()] == ['cams.png']  # no temporary file left behind
  with pytest.raises(ValueError):
    gradcam.cam_grid(images, {'gradcam': cams['gradcam'][:2]}, str(path))


# Inception-V3 at 139 px: its last feature map is 3x3 (at its 75-px minimum it is 1x1, a constant map).
@pytest.mark.parametrize('name,size', [('inception_v3', 139), ('efficientnet_v2_s', 32)])
def test_cam_on_the_pretrainable_classifiers(name, size):
  # The classifiers a fine-tuning run trains expose their last feature map too: Grad-CAM explains
  # them as it does ResNet-18 (maps at image size, each scaled to a maximum of 1, or all zero).
  c = config_lib.base_config().model
  c.name, c.width_mult, c.depth_mult = name, 0.25, 0.25
  model = build_classifier(c, 2, (size, size, 1))
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 1), minval=-1, maxval=1)
  variables = init_variables(model, jax.random.key(1), x, train=False)
  # Running statistics of these images (fresh ones are 0 / 1, which blows Inception-V3's activations up).
  _, stats = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
  )(variables, x)
  variables = {'params': variables['params'], **stats}
  cam_fn = gradcam.make_cam_fn(model)
  cams = np.stack([np.asarray(cam_fn(variables, x, c)) for c in (0, 1)])
  assert cams.shape == (2, 2, size, size) and np.isfinite(cams).all()
  assert all(np.isclose(m.max(), 1.0) or (m == 0).all() for m in cams.reshape(4, size, size))
  assert max(m.std() for m in cams.reshape(4, size, size)) > 0, 'some class has evidence that varies in space'
