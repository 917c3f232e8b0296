"""Near-duplicates across sources (cxrjax.data.near_duplicates): synthetic twins through the
MedMNIST and Kermany geometries, look-alikes that must not pair, one-to-one, the command line,
and one small check on the real PneumoniaMNIST / Kermany test images."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxrjax.data import near_duplicates as nd
from cxrjax.errors import UserError

from conftest import ROOT

# Original sizes (height, width): wider and taller than square, one square, aspect ratios to 1:1.7.
SHAPES = ((224, 320), (300, 224), (224, 224), (240, 400), (400, 256), (256, 300))


def field(rng, h: int, w: int) -> np.ndarray:
  """A uint8 image with a 1/f spectrum: detail at every scale, as in a radiograph."""
  spectrum = np.fft.fft2(rng.standard_normal((h, w)))
  f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
  x = np.real(np.fft.ifft2(spectrum / np.maximum(f, 1.0 / max(h, w))))
  return np.rint(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)


def jpeg(x: np.ndarray, quality: int = 75) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, 'JPEG', quality=quality)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def medmnist_like(original: np.ndarray, size: int = 28) -> np.ndarray:
  """A central crop to the short edge's square, resized: how MedMNIST made its images."""
  h, w = original.shape
  s = min(h, w)
  y, x = (h - s) // 2, (w - s) // 2
  return np.asarray(Image.fromarray(original[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC))


def squashed(original: np.ndarray, size: int = 224) -> np.ndarray:
  """Squashed to a square, not cropped: how the shared Kermany copy was made."""
  return np.asarray(Image.fromarray(original).resize((size, size), Image.BILINEAR))


def expected_crop(shape) -> tuple[float, float]:
  h, w = shape
  return (min(h, w) / w, min(h, w) / h)


@pytest.fixture(scope='module')
def twins():
  """Originals; their Kermany-like copies (squashed, RGB JPEG q75); MedMNIST-like copies (28x28, brighter, less contrast)."""
  rng = np.random.default_rng(0)
  originals = [field(rng, *s) for s in SHAPES * 2]
  large = np.stack([np.repeat(jpeg(squashed(o))[..., None], 3, axis=-1) for o in originals])
  small = np.stack([np.clip(medmnist_like(o) * 0.85 + 20, 0, 255).astype(np.uint8) for o in originals])
  return originals, large, small


def test_twins_found_through_crop_resize_jpeg_and_brightness(twins):
  originals, large, small = twins
  order = np.random.default_rng(1).permutation(len(large))  # partners not at the same index
  matches = nd.find_near_duplicates(small, large[order])
  assert [m.a for m in matches] == list(range(len(small)))
  for m, o in zip(matches, originals):
    assert order[m.b] == m.a
    assert nd.DEFAULT_THRESHOLD <= m.score <= 1.0
    np.testing.assert_allclose(m.crop, expected_crop(o.shape), atol=0.011)


def test_either_side_may_hold_the_larger_field(twins):
  """The crop is searched on both sides: larger-field images as images_a, and the 28x28 ones JPEG'd too."""
  originals, large, small = twins
  small_jpeg = np.stack([jpeg(x) for x in small])
  matches = nd.find_near_duplicates(large, small_jpeg[:, :, :, None])
  assert [(m.a, m.b) for m in matches] == [(i, i) for i in range(len(large))]
  for m, o in zip(matches, originals):
    np.testing.assert_allclose(m.crop, expected_crop(o.shape), atol=0.011)


def test_look_alikes_and_unrelated_images_do_not_pair(twins):
  """Images sharing their overall shape (as chests do) but not their detail score below the threshold."""
  _, large, _ = twins
  rng = np.random.default_rng(2)
  shape = field(rng, 224, 300).astype(np.float64)
  shape = np.asarray(Image.fromarray(shape.astype(np.float32)).resize((30, 22), Image.BOX).resize((300, 224)))
  look_alikes = []
  for _ in range(8):
    detail = field(rng, 224, 300).astype(np.float64)
    look_alikes.append(np.clip(0.75 * shape + 0.25 * detail, 0, 255).astype(np.uint8))
  small = np.stack([medmnist_like(x) for x in look_alikes[:4]])
  large_alikes = np.stack([jpeg(squashed(x)) for x in look_alikes[4:]])
  assert nd.find_near_duplicates(small, large_alikes) == []
  best = nd.find_near_duplicates(small, large_alikes, threshold=0.0)
  assert len(best) == 4 and max(m.score for m in best) < nd.DEFAULT_THRESHOLD - 0.02
  assert nd.find_near_duplicates(small, large[..., 0]) == []  # unrelated fields


def test_one_to_one(twins):
  """Two copies of one image in images_a: both name its twin, or with one_to_one only the first does;
  with two copies in images_b as well, one_to_one pairs them off."""
  _, large, small = twins
  a = np.concatenate([small[:3], small[:1]])  # image 3 is a copy of image 0
  plain = nd.find_near_duplicates(a, large)
  assert [(m.a, m.b) for m in plain] == [(0, 0), (1, 1), (2, 2), (3, 0)]
  one = nd.find_near_duplicates(a, large, one_to_one=True)
  assert [(m.a, m.b) for m in one] == [(0, 0), (1, 1), (2, 2)]
  b = np.concatenate([large, large[:1]])  # and a second copy of its twin in images_b
  one = nd.find_near_duplicates(a, b, one_to_one=True)
  assert [(m.a, m.b) for m in one] == [(0, 0), (1, 1), (2, 2), (3, len(large))]


def test_deterministic_and_independent_of_the_chunking(twins, monkeypatch):
  _, large, small = twins
  whole = nd.find_near_duplicates(small, large, threshold=0.0)
  monkeypatch.setattr(nd, 'CHUNK', 5)  # blocks of 5 images: the candidate lists are merged across blocks
  chunked = nd.find_near_duplicates(small, large, threshold=0.0)
  assert [(m.a, m.b, m.crop) for m in chunked] == [(m.a, m.b, m.crop) for m in whole]
  np.testing.assert_allclose([m.score for m in chunked], [m.score for m in whole], atol=1e-5)


def test_bad_arrays_are_refused():
  with pytest.raises(ValueError, match='images_a'):
    nd.find_near_duplicates(np.zeros((0, 28, 28), np.uint8), np.zeros((1, 28, 28), np.uint8))
  with pytest.raises(ValueError, match='images_b'):
    nd.find_near_duplicates(np.zeros((1, 28, 28), np.uint8), np.zeros((28, 28), np.uint8))


def _tree(tmp_path, twins):
  """An npz with MedMNIST keys (the 28x28 copies as test, two of them also as val) and a folder of JPEGs."""
  _, large, small = twins
  npz = tmp_path / 'small.npz'
  labels = (np.arange(len(small)) % 2).astype(np.uint8)[:, None]
  np.savez(npz, test_images=small, test_labels=labels, val_images=small[:2], val_labels=labels[:2])
  for i, x in enumerate(large[:8]):
    folder = tmp_path / 'tree' / ('odd' if i % 2 else 'even')
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).save(folder / f'img{i:02d}.jpeg', quality=90)
  (tmp_path / 'tree' / 'notes.txt').write_text('not an image')
  return npz, tmp_path / 'tree'


def test_command_line_summary_and_pairs(tmp_path, twins, capsys):
  npz, tree = _tree(tmp_path, twins)
  out = tmp_path / 'pairs.json'
  nd.main([f'{npz}:test', str(tree), '--out', str(out)])
  printed = capsys.readouterr().out
  assert '8 of 12 images of A (66.7%) have a twin in B' in printed
  assert 'B: 8 images claimed (even 4, odd 4), 0 by more than one image of A' in printed
  record = json.loads(out.read_text())
  assert record['matched'] == 8 and record['threshold'] == nd.DEFAULT_THRESHOLD
  assert [(p['a_name'], p['b_name']) for p in record['pairs']] == [
    (f'test[{i}]', f'{"odd" if i % 2 else "even"}/img{i:02d}.jpeg') for i in range(8)
  ]
  assert all(len(p['crop']) == 2 and p['score'] >= nd.DEFAULT_THRESHOLD for p in record['pairs'])
  # All splits, in MedMNIST's order (val before test): one-to-one, the val copies of test[0] and test[1]
  # take their twins (ties go to the lower index).
  nd.main([str(npz), str(tree), '--one-to-one'])
  printed = capsys.readouterr().out
  assert f'A: {npz}: 14 images (val 2, test 12)' in printed
  assert '  val: 2 of 2 (100.0%)\n  test: 6 of 12 (50.0%)\n' in printed


@pytest.mark.parametrize(
  'args,fragment',
  [
    (['{npz}:train', '{tree}'], "no split 'train'; it has val, test"),
    (['{tree}:test', '{tree}'], 'a split (:test) is for npz files'),
    (['{tree}/notes.txt', '{tree}'], 'expected an .npz file'),
    (['{npz}', '{tmp}'], 'not a readable image'),  # the npz itself lies in that folder
    (['{npz}', '{tree}', '--threshold', '1.5'], 'expected a score in [0, 1]'),
  ],
)
def test_command_line_refusals(args, fragment, tmp_path, twins, capsys):
  npz, tree = _tree(tmp_path, twins)
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(SystemExit) as e:
    nd.main([a.format(npz=npz, tree=tree, tmp=tmp_path) for a in args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('cxrjax: error: ') and fragment in err


def test_command_line_missing_file_is_one_line_exit_2(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  r = subprocess.run(
    [sys.executable, '-m', 'cxrjax.data.near_duplicates', str(tmp_path / 'missing.npz'), str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2 and r.stdout == ''
  assert r.stderr == f'cxrjax: error: {tmp_path / "missing.npz"}: no such file or folder\n'


def test_read_source_refuses_an_npz_without_images(tmp_path):
  path = tmp_path / 'other.npz'
  np.savez(path, x=np.zeros(3))
  with pytest.raises(UserError, match='no <split>_images arrays'):
    nd.read_source(str(path))


def test_real_kermany_test_images_find_their_pneumoniamnist_twins(npz_path, chest_xray):
  """50 Kermany test pneumonia images (224x224 RGB JPEG, the larger field) against the 390 PneumoniaMNIST
  test pneumonia images: every one has its twin there, and one-to-one they pair off."""
  files = sorted((chest_xray / 'test' / 'PNEUMONIA').glob('*.jpeg'))[:50]
  large = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
  with np.load(npz_path) as z:
    small = z['test_images'][z['test_labels'][:, 0] == 1]
  matches = nd.find_near_duplicates(large, small, one_to_one=True)
  assert len(matches) == 50 and len({m.b for m in matches}) == 50
  assert min(m.score for m in matches) >= nd.DEFAULT_THRESHOLD
  assert all(m.crop[1] == 1.0 and 0.3 <= m.crop[0] < 1.0 for m in matches)  # wider than tall: cut in width
