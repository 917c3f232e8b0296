"""Augmentation: exact identity at zero magnitude, exact integer crops, determinism."""

import numpy as np

from cxrjax.data.augment import AugmentParams, augment_image


def image(seed=0, shape=(28, 28, 1)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_zero_magnitudes_is_identity():
  img = image()
  out = augment_image(img, np.random.default_rng(0), AugmentParams())
  np.testing.assert_array_equal(out, img)


def test_crop_only_is_an_edge_padded_integer_shift():
  img = image(1)
  p = AugmentParams(crop_pad=2)
  for seed in range(10):
    out = augment_image(img, np.random.default_rng(seed), p)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode='edge')
    matches = [
      (dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy : dy + 28, dx : dx + 28], out)
    ]
    assert matches, 'crop must equal some window of the edge-padded image'


def test_same_rng_same_output_and_shape_dtype():
  img = image(2, (32, 32, 3))
  p = AugmentParams(crop_pad=2, rotate_deg=10, scale=0.1, translate=0.05, brightness=0.1, contrast=0.1)
  a = augment_image(img, np.random.default_rng(5), p)
  b = augment_image(img, np.random.default_rng(5), p)
  c = augment_image(img, np.random.default_rng(6), p)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == img.shape and a.dtype == np.uint8


def test_strong_is_stronger():
  p = AugmentParams(crop_pad=2, rotate_deg=5)
  s = p.strong()
  assert s.rotate_deg > p.rotate_deg and s.noise > 0 and s.gamma > 0


def test_zero_pad_crop_is_a_black_bordered_integer_shift():
  img = image(3)
  p = AugmentParams(crop_pad=2, pad_mode='zero')
  for seed in range(10):
    out = augment_image(img, np.random.default_rng(seed), p)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    assert any(np.array_equal(padded[dy : dy + 28, dx : dx + 28], out) for dy in range(5) for dx in range(5)), (
      'crop must equal some window of the zero-padded image'
    )
