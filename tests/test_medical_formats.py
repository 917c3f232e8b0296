"""DICOM and NIfTI in class-per-folder trees: decoding conventions, slice rules, grouping, errors.

Files are written here with pydicom and nibabel; the expected pixels are computed
from the formulas (DICOM PS3.3 C.11.2.1.2 window, rescale, MONOCHROME1 inversion;
percentile scaling and the radiological display of canonical slices), not with
the code under test.
"""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrjax import config_lib
from cxrjax.data import images, medical, sources
from cxrjax.errors import UserError

# ----------------------------------------------------------------------------- writers


def write_dicom(path, stored, photometric='MONOCHROME2', slope=None, intercept=None, center=None, width=None,
                function=None, part10=True):  # fmt: skip
  """`stored`: [H, W] (u)int16, [F, H, W] frames, or [H, W, 3] uint8 RGB."""
  stored = np.asarray(stored)
  rgb = stored.ndim == 3 and stored.shape[-1] == 3 and stored.dtype == np.uint8
  ds = Dataset()
  if part10:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.Rows, ds.Columns = stored.shape[-3:-1] if rgb else stored.shape[-2:]
  if not rgb and stored.ndim == 3:
    ds.NumberOfFrames = stored.shape[0]
  ds.SamplesPerPixel = 3 if rgb else 1
  ds.PhotometricInterpretation = 'RGB' if rgb else photometric
  if rgb:
    ds.PlanarConfiguration = 0
  bits = 8 if rgb else 16
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
  ds.PixelRepresentation = int(stored.dtype == np.int16)
  for key, value in (('RescaleSlope', slope), ('RescaleIntercept', intercept), ('WindowCenter', center),
                     ('WindowWidth', width), ('VOILUTFunction', function)):  # fmt: skip
    if value is not None:
      setattr(ds, key, value)
  ds.PixelData = stored.tobytes()
  if part10:
    ds.save_as(path, enforce_file_format=True)
  else:  # no preamble, no file meta: as files written before DICOM Part 10
    ds.save_as(path, implicit_vr=True, little_endian=True)
  return path


# Voxel (i, j, k) lies at world (x, y, z) = (-j, i, -k): axes swapped, x and z flipped.
NON_CANONICAL = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], float)


def canonical_by_hand(v):
  """The RAS+ array of a volume stored with NON_CANONICAL: C[a, b, c] = v[b, J-1-a, K-1-c]."""
  return v.transpose(1, 0, 2)[::-1, :, ::-1]


def write_nifti(path, volume, affine=NON_CANONICAL):
  nib.save(nib.Nifti1Image(volume, affine), str(path))
  return path


def linear_window(x, c, w):
  """PS3.3 C.11.2.1.2.1 to [0, 255], as the standard writes it (piecewise)."""
  lo_edge, hi_edge = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
  mid = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
  return np.rint(np.select([x <= lo_edge, x > hi_edge], [0.0, 255.0], mid)).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize('photometric', ['MONOCHROME2', 'MONOCHROME1'])
def test_dicom_rescale_window_and_inversion(tmp_path, photometric):
  rng = np.random.default_rng(0)
  stored = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
  # modality = 2 * stored - 1024; window 40/400 (the first of two) spans -160 .. 239.
  stored[0, :4] = [432, 532, 0, 4000]  # modality -160 (lower edge), 40 (centre), -1024, 6976
  path = write_dicom(tmp_path / 'a.dcm', stored, photometric, slope='2', intercept='-1024',
                     center=['40', '100'], width=['400', '800'])  # fmt: skip
  [(suffix, got)] = medical.read_dicom(str(path))
  assert suffix == ''
  want = linear_window(stored * 2.0 - 1024, 40.0, 400.0)
  by_hand = np.array([0, 128, 0, 255], np.uint8)  # ((40 - 39.5) / 399 + 0.5) * 255 = 127.8
  if photometric == 'MONOCHROME1':
    want, by_hand = 255 - want, 255 - by_hand
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[0, :4], by_hand)
  # The same pixels through the folder pipeline at the file's own size.
  [(_, full, _)] = images.decode_images(str(path), 16, 1)
  np.testing.assert_array_equal(full[..., 0], want)
  assert images.decode_images(str(path), 8, 3)[0].image.shape == (8, 8, 3)


def test_dicom_window_from_config_or_minmax(tmp_path):
  stored = np.arange(-128, 128, dtype=np.int16).reshape(16, 16)
  path = str(write_dicom(tmp_path / 'a.dcm', stored, slope='1.5', intercept='10', center='0', width='100'))
  x = stored * 1.5 + 10
  got = medical.read_dicom(path, medical.Options(dicom_window='-50,300'))[0][1]
  np.testing.assert_array_equal(got, linear_window(x, -50.0, 300.0))
  got = medical.read_dicom(path, medical.Options(dicom_window='minmax'))[0][1]
  np.testing.assert_array_equal(got, np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8))
  # A file without a window: min-max of the image.
  bare = str(write_dicom(tmp_path / 'b.dcm', stored))
  got = medical.read_dicom(bare)[0][1]
  np.testing.assert_array_equal(got, np.rint((stored + 128.0) / 255 * 255).astype(np.uint8))


def test_dicom_linear_exact_and_file_without_preamble(tmp_path):
  stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
  path = str(write_dicom(tmp_path / 'a.dcm', stored, center='100', width='50', function='LINEAR_EXACT'))
  want = np.rint(np.clip((stored - 100.0) / 50 + 0.5, 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(medical.read_dicom(path)[0][1], want)
  old = str(write_dicom(tmp_path / 'old.dcm', stored, part10=False))
  assert not medical.has_dicom_preamble(old)
  np.testing.assert_array_equal(medical.read_dicom(old)[0][1], stored.astype(np.uint8))


def test_dicom_rgb_stays_rgb(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)
  path = str(write_dicom(tmp_path / 'c.dcm', rgb))
  np.testing.assert_array_equal(medical.read_dicom(path)[0][1], rgb)
  np.testing.assert_array_equal(images.decode_images(path, 16, 3)[0].image, rgb)
  assert images.decode_images(path, 16, 1)[0].image.shape == (16, 16, 1)


def test_dicom_frames_follow_the_slice_rule(tmp_path):
  frames = np.stack([np.full((8, 8), 100 * f, np.uint16) for f in range(5)])
  frames[:, 0, :2] = [0, 1000]  # min-max per frame: 100 f -> 255 * 100 f / 1000
  path = str(write_dicom(tmp_path / 'cine.dcm', frames))
  [(suffix, got)] = medical.read_dicom(path)
  assert suffix == '#frame2' and got[1, 1] == round(255 * 200 / 1000)
  assert [s for s, _ in medical.read_dicom(path, medical.Options(nifti_slices='all'))] == [
    f'#frame{k}' for k in range(5)
  ]


def test_extensionless_dicom_is_listed_dicomdir_is_not(tmp_path):
  write_dicom(tmp_path / 'IM0001', np.zeros((8, 8), np.uint16))
  write_dicom(tmp_path / '1.2.840.113619.2.5', np.zeros((8, 8), np.uint16))
  write_dicom(tmp_path / 'DICOMDIR', np.zeros((8, 8), np.uint16))
  (tmp_path / 'README').write_text('not an image')
  files, ignored = sources._list_images(tmp_path)
  assert [f.name for f in files] == ['1.2.840.113619.2.5', 'IM0001'] and ignored == 2


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_reorientation_percentiles_and_display(tmp_path):
  rng = np.random.default_rng(0)
  v = rng.integers(-500, 3000, (16, 12, 8)).astype(np.int16)  # I, J, K
  path = str(write_nifti(tmp_path / 'v.nii.gz', v))
  got = dict(medical.read_nifti(path, medical.Options(nifti_slices='all')))
  c = canonical_by_hand(v)  # [x: right, y: anterior, z: superior] = [12, 16, 8]
  lo, hi = np.percentile(v, [0.5, 99.5])
  scaled = np.rint(np.clip((c - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  nx, ny, nz = c.shape
  assert list(got) == [f'#slice{k}' for k in range(nz)]
  rows, cols = np.indices((ny, nx))
  for k in range(nz):
    # Axial, radiological: row 0 is anterior, column 0 the patient's right.
    np.testing.assert_array_equal(got[f'#slice{k}'], scaled[nx - 1 - cols, ny - 1 - rows, k])


@pytest.mark.parametrize(
  'axis,voxel,slice_index',
  [
    (2, (15, 0, 5), 8 - 1 - 5),  # right, anterior: axial slice at z = -5, top left
    (1, (15, 0, 0), 15),  # right, superior: coronal slice at the front, top left
    (0, (15, 2, 0), 12 - 1 - 2),  # anterior, superior: sagittal, top left
  ],
)
def test_nifti_slices_display_upright(tmp_path, axis, voxel, slice_index):
  """One bright voxel at the named corner lands at the top left of its slice."""
  v = np.zeros((16, 12, 8), np.float32)
  v[voxel] = 1000.0
  path = str(write_nifti(tmp_path / 'm.nii', v))
  got = dict(medical.read_nifti(path, medical.Options(nifti_axis=axis, nifti_slices='all')))
  img = got[f'#slice{slice_index}']
  assert img[0, 0] == 255 and img.sum() == 255


def test_slice_rules():
  assert medical.select_slices(8, 'middle') == [4]
  assert medical.select_slices(8, 'all') == list(range(8))
  assert medical.select_slices(8, 'every:3') == [0, 3, 6]
  assert medical.select_slices(8, 'range:0.3-0.7') == [2, 3, 4, 5]  # centres 0.3125 .. 0.6875
  assert medical.select_slices(8, 'range:0.5-0.5') == [3]  # none inside: the nearest
  assert medical.select_slices(1, 'every:4') == [0]
  for bad in ('', 'first', 'every:0', 'every:x', 'range:0.7-0.3', 'range:0.2-1.5'):
    with pytest.raises(ValueError, match='every:K'):
      medical.parse_slices(bad)


def test_nifti_4d_uses_the_first_volume(tmp_path):
  v = np.stack([np.arange(4 * 4 * 6, dtype=np.float32).reshape(4, 4, 6) * (t + 1) for t in range(3)], axis=-1)
  path = str(write_nifti(tmp_path / 'bold.nii.gz', v, affine=np.eye(4)))
  [(suffix, got)] = medical.read_nifti(path)
  lo, hi = np.percentile(v[..., 0], [0.5, 99.5])
  want = np.rint(np.clip((v[:, :, 3, 0] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  assert suffix == '#slice3'
  np.testing.assert_array_equal(got, want.T[::-1, ::-1])


# ----------------------------------------------------------------------------- folders


def folder_config(path, cache, **kw):
  c = config_lib.base_config()
  c.data.source = 'folder'
  c.data.path = str(path)
  c.data.image_size = 16
  c.data.cache_dir = str(cache)
  c.data.group_regex = r'(patient\d+)'
  for k, v in kw.items():
    c.data[k] = v
  return config_lib.finalize(c).data


def dicom_tree(root, per_class=6):
  rng = np.random.default_rng(2)
  for cls, photometric in (('normal', 'MONOCHROME2'), ('nodule', 'MONOCHROME1')):
    (root / cls).mkdir(parents=True)
    for i in range(per_class):
      shape = (20, 16) if i % 2 else (16, 16)  # mixed sizes are squashed like PNGs
      write_dicom(root / cls / f'patient{i}_{cls}.dcm', rng.integers(0, 4096, shape).astype(np.uint16), photometric,
                  center='2048', width='4096')  # fmt: skip
  return root


def nifti_tree(root, patients=6, scans=2, depth=8):
  rng = np.random.default_rng(3)
  for cls in ('healthy', 'tumour'):
    (root / cls).mkdir(parents=True)
    for p in range(patients):
      for s in range(scans):
        v = rng.normal(100, 20, (16, 16, depth)).astype(np.float32)
        write_nifti(root / cls / f'patient{p}_scan{s}.nii.gz', v)
    (root / cls / 'notes.json').write_text('{}')
  return root


def test_dicom_tree_loads_with_classes_counts_and_mixed_sizes(tmp_path):
  root = dicom_tree(tmp_path / 'dcm')
  ds = sources.load_dataset(folder_config(root, tmp_path / 'c', val_fraction=0.0), seed=0)
  assert ds.class_names == ('nodule', 'normal')
  assert sum(sum(c) for c in ds.counts().values()) == 12
  assert ds.image_shape == (16, 16, 1)
  assert not any('slices' in n for n in ds.source['notes'])


def test_nifti_tree_slices_never_straddle_splits(tmp_path):
  root = nifti_tree(tmp_path / 'nii')
  data = folder_config(root, tmp_path / 'c', nifti_slices='every:2', val_fraction=0.25, test_fraction=0.25)
  ds = sources.load_dataset(data, seed=0)
  assert ds.class_names == ('healthy', 'tumour')
  counts = ds.counts()
  assert [sum(x) for x in zip(*counts.values())] == [6 * 2 * 4, 6 * 2 * 4]  # slices 0, 2, 4, 6 of 12 volumes
  assert all(min(c) > 0 for c in counts.values())
  assert any('96 slices/frames of 24 volume(s)' in n for n in ds.source['notes'])
  assert any('ignored 2 non-image' in n for n in ds.source['notes'])
  where = {}
  for split, s in ds.splits.items():
    for name, group in zip(s.names, s.groups):
      file, _, k = name.partition('#slice')
      assert k in ('0', '2', '4', '6')
      cls, base = file.split('/')
      assert group == f'{cls}/{base.split("_")[0]}'  # the patient id from data.group_regex
      where.setdefault(group, set()).add(split)
  assert len(where) == 12 and all(len(v) == 1 for v in where.values())  # both scans of a patient together
  # Without a patient id in the name the volume file is the group.
  ds = sources.load_dataset(folder_config(root, tmp_path / 'c', group_regex='', test_fraction=0.25), seed=0)
  for s in ds.splits.values():
    np.testing.assert_array_equal(s.groups, [n.partition('#')[0] for n in s.names])
  files = {}
  for split, s in ds.splits.items():
    for g in s.groups:
      files.setdefault(g, set()).add(split)
  assert len(files) == 24 and all(len(v) == 1 for v in files.values())


def test_decoded_cache_follows_the_decoding_keys(tmp_path):
  root = nifti_tree(tmp_path / 'nii', patients=2, scans=1, depth=4)
  first = sources.load_dataset(folder_config(root, tmp_path / 'c'), seed=0)
  again = sources.load_dataset(folder_config(root, tmp_path / 'c'), seed=0)
  assert not first.source['cache'] and again.source['cache']
  other = sources.load_dataset(folder_config(root, tmp_path / 'c', nifti_slices='all'), seed=0)
  assert not other.source['cache']
  assert sum(map(sum, other.counts().values())) == 4 * sum(map(sum, first.counts().values()))
  axis = sources.load_dataset(folder_config(root, tmp_path / 'c', nifti_axis=0), seed=0)
  assert not axis.source['cache']


# ----------------------------------------------------------------------------- errors


def test_corrupt_files_are_named_or_skipped(tmp_path):
  root = nifti_tree(tmp_path / 'mixed', patients=3, scans=1, depth=4)
  dicom_tree(tmp_path / 'd', per_class=2)
  for f in (tmp_path / 'd' / 'normal').iterdir():
    f.rename(root / 'healthy' / f.name)
  victims = [root / 'tumour' / 'patient0_scan0.nii.gz', root / 'healthy' / 'patient0_normal.dcm']
  for victim in victims:
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
  with pytest.raises(UserError) as e:
    sources.load_dataset(folder_config(root, tmp_path / 'c'), seed=0)
  msg = str(e.value)
  assert any(str(v) in msg for v in victims) and 'unreadable image' in msg and '\n' not in msg
  ds = sources.load_dataset(folder_config(root, tmp_path / 'c', on_bad_image='skip'), seed=0)
  assert ds.source['skipped_images'] == 2
  assert sum(map(sum, ds.counts().values())) == 3 + 2 + 3 - 2  # volumes and DICOMs, less the two victims


@pytest.mark.parametrize('module,suffix', [('pydicom', '.dcm'), ('nibabel', '.nii')])
def test_missing_library_says_how_to_install(tmp_path, monkeypatch, module, suffix):
  root = dicom_tree(tmp_path / 'dcm', per_class=1) if suffix == '.dcm' else nifti_tree(tmp_path / 'nii', 1, 1, 2)
  monkeypatch.setitem(sys.modules, module, None)  # `import pydicom` raises ImportError
  # Not a bad image to skip: the run stops with the install command.
  with pytest.raises(
    UserError, match=rf"needs {module}, which is not installed .*; pip install 'cxrjax\[medical\]'"
  ) as e:
    sources.load_dataset(folder_config(root, tmp_path / 'c', on_bad_image='skip'), seed=0)
  assert str(e.value).startswith(str(root)) and suffix in str(e.value)


def test_config_keys_are_validated_and_hash_like_their_absence():
  c = config_lib.base_config()
  h, g = config_lib.config_hash(c), config_lib.generator_hash(c)
  assert h == 'f1e4d8f8fc5124db' and g == 'bda4a1f8a071a945'  # base_config()'s hashes before these keys
  c.data.nifti_slices = 'all'
  assert config_lib.config_hash(c) != h and config_lib.generator_hash(c) != g
  for key, value, fragment in (
    ('dicom_window', '40', 'CENTER,WIDTH'),
    ('dicom_window', '40,0', 'WIDTH >= 1'),
    ('nifti_axis', 3, 'one of 0, 1, 2'),
    ('nifti_slices', 'range:0.7-0.3', 'range:A-B'),
  ):
    c = config_lib.base_config()
    c.data[key] = value
    with pytest.raises(UserError, match=f'config.data.{key}=.*{fragment}'):
      config_lib.finalize(c)


def test_importing_the_library_does_not_import_pydicom_or_nibabel():
  code = (
    'import sys, cxrjax.config_lib, cxrjax.data.sources; print([m for m in ("pydicom", "nibabel") if m in sys.modules])'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'
