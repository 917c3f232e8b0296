"""DICOM and NIfTI files as 2-D uint8 images, for class-per-folder trees.

Hospital data comes as DICOM (`.dcm`, `.dicom`, or extensionless files with the
'DICM' preamble), research MRI and CT as NIfTI volumes (`.nii`, `.nii.gz`). Each
file becomes one or more uint8 images at its own size, gray [H, W] or RGB
[H, W, 3], which then follow the same path as a PNG (squashed to
`data.image_size`, converted to `data.channels`).

DICOM conventions:

* stored values -> modality values with RescaleSlope and RescaleIntercept;
* modality values -> [0, 255] by a window: `data.dicom_window=''` takes the file's
  first WindowCenter/WindowWidth (and its VOILUTFunction: LINEAR as the standard
  defines it, LINEAR_EXACT or SIGMOID), or the image's min-max when the file has
  none; 'minmax' always uses the min-max; 'C,W' is an explicit LINEAR window;
* MONOCHROME1 (low values bright) is inverted after windowing, so that higher means
  brighter as in MONOCHROME2;
* RGB files (SamplesPerPixel 3) stay RGB: 8-bit values as they are, others min-max;
* multi-frame files: frames picked by the `data.nifti_slices` rule (default the
  middle frame), named `<file>#frame<k>`.

NIfTI conventions:

* 4-D (or higher) files: the first volume;
* reoriented with `nibabel.as_closest_canonical` (RAS+: the axes run to the
  patient's right, anterior and superior), so that axis and slice numbers mean the
  same in every file; `data.nifti_axis` 0, 1, 2 = sagittal, coronal, axial;
* intensities to [0, 255] by the volume's 0.5th and 99.5th percentiles (robust to
  a few hot voxels; every slice of a volume shares the scale, so slices stay
  comparable);
* slices picked by `data.nifti_slices` and named `<file>#slice<k>` (k counted in
  the canonical volume, from the patient's right, posterior or inferior end);
* each slice displayed as radiologists read it: the patient's right on the image's
  left (axial, coronal), anterior on the left (sagittal), anterior at the top
  (axial) or superior at the top (coronal, sagittal). Voxel spacing is not
  corrected: the slice is squashed to a square like every other image.

pydicom and nibabel are imported only when such a file is read (the `medical`
extra); without them a `UserError` says how to install them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re

import numpy as np

from cxrjax.errors import UserError

DICOM_EXTENSIONS = ('.dcm', '.dicom')
NIFTI_EXTENSIONS = ('.nii', '.nii.gz')
EXTENSIONS = DICOM_EXTENSIONS + NIFTI_EXTENSIONS
INSTALL_HINT = "pip install 'cxrjax[medical]'"
NIFTI_PERCENTILES = (0.5, 99.5)
SLICE_RULES = "'middle', 'all', 'every:K' (K >= 1) or 'range:A-B' (fractions 0 <= A <= B <= 1)"
WINDOW_RULES = "'' (the file's window, else min-max), 'minmax' or 'CENTER,WIDTH' (WIDTH >= 1)"
# What a slice or frame adds to its file's name; `source_file` takes it off again.
_PART = re.compile(r'#(slice|frame)\d+$')


@dataclasses.dataclass(frozen=True)
class Options:
  """The config keys that change how DICOM and NIfTI files are decoded (config.data)."""

  dicom_window: str = ''
  nifti_axis: int = 2
  nifti_slices: str = 'middle'


DEFAULT = Options()


def kind(path: str) -> str:
  """'dicom', 'nifti' or '' (another format) from the name, or from the DICOM preamble
  when the name has no extension (or a numeric one, as UID-named files do)."""
  name = os.path.basename(path).lower()
  if name.endswith(NIFTI_EXTENSIONS):
    return 'nifti'
  if name.endswith(DICOM_EXTENSIONS):
    return 'dicom'
  suffix = os.path.splitext(name)[1]
  if (not suffix or suffix[1:].isdigit()) and name != 'dicomdir' and has_dicom_preamble(path):
    return 'dicom'
  return ''


def has_dicom_preamble(path: str) -> bool:
  """True if bytes 128-131 are 'DICM' (a DICOM Part 10 file); reads 132 bytes."""
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b'DICM'


def source_file(name: str) -> str:
  """The file a decoded image came from: `name` without '#slice<k>' or '#frame<k>'."""
  return _PART.sub('', name)


def parse_window(spec: str) -> str | tuple[float, float]:
  """'' | 'minmax' | (center, width); ValueError naming the accepted forms."""
  spec = spec.strip()
  if spec in ('', 'minmax'):
    return spec
  parts = spec.split(',')
  try:
    center, width = (float(p) for p in parts)
  except ValueError:
    raise ValueError(f'expected {WINDOW_RULES}') from None
  if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
    raise ValueError(f'expected {WINDOW_RULES}')
  return center, width


def parse_slices(spec: str) -> tuple[str, float, float]:
  """(rule, a, b): ('middle', 0, 0), ('all', 0, 0), ('every', K, 0) or ('range', A, B)."""
  spec = spec.strip()
  if spec in ('middle', 'all'):
    return spec, 0.0, 0.0
  rule, _, arg = spec.partition(':')
  if rule == 'every' and arg.isdigit() and int(arg) >= 1:
    return 'every', float(int(arg)), 0.0
  if rule == 'range':
    m = re.fullmatch(r'\s*([0-9.]+)\s*-\s*([0-9.]+)\s*', arg)
    try:
      a, b = (float(x) for x in m.groups()) if m else (-1.0, -1.0)
    except ValueError:
      a, b = -1.0, -1.0
    if 0 <= a <= b <= 1:
      return 'range', a, b
  raise ValueError(f'expected {SLICE_RULES}')


def select_slices(n: int, spec: str) -> list[int]:
  """The slice indices in [0, n) that rule `spec` picks, in increasing order (never empty for n > 0).

  'middle': n // 2; 'all': every slice; 'every:K': 0, K, 2K, ...; 'range:A-B': the
  slices whose centres (k + 0.5) / n lie in [A, B], or the one nearest (A + B) / 2
  when the range falls between two centres.
  """
  rule, a, b = parse_slices(spec)
  if n <= 0:
    return []
  if rule == 'middle':
    return [n // 2]
  if rule == 'all':
    return list(range(n))
  if rule == 'every':
    return list(range(0, n, int(a)))
  centres = (np.arange(n) + 0.5) / n
  picked = np.flatnonzero((centres >= a) & (centres <= b))
  if len(picked) == 0:
    picked = [int(np.argmin(np.abs(centres - (a + b) / 2)))]
  return [int(k) for k in picked]


# ----------------------------------------------------------------------------- intensity


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = 'LINEAR') -> np.ndarray:
  """Modality values -> uint8 through a DICOM VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3).

  LINEAR maps (center - 0.5) +- (width - 1) / 2 onto [0, 255]; LINEAR_EXACT maps
  center +- width / 2; SIGMOID is the logistic curve with slope 4 / width.
  """
  x = np.asarray(values, np.float64)
  if function == 'SIGMOID':
    y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  elif function == 'LINEAR_EXACT':
    y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
  elif width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
    y = (x > center - 0.5).astype(np.float64)
  else:
    y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
  return np.rint(y * 255.0).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
  """Linear map of the image's min..max onto 0..255 (a constant image gives zeros)."""
  x = np.asarray(values, np.float64)
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.rint((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def percentile_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Linear map of lo..hi onto 0..255, clipped (NaN -> 0)."""
  x = np.nan_to_num(np.asarray(values, np.float64), nan=lo)
  if hi <= lo:
    return np.where(x > lo, 255, 0).astype(np.uint8)
  return np.rint(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM


def _missing(path: str, what: str, module: str, error: ImportError) -> UserError:
  return UserError(f'{path}: reading {what} files needs {module}, which is not installed ({error}); {INSTALL_HINT}')


def _pydicom(path: str):
  try:
    import pydicom  # noqa: PLC0415 - optional dependency, imported on the first DICOM file
  except ImportError as e:
    raise _missing(path, 'DICOM', 'pydicom', e) from e
  return pydicom


def _nibabel(path: str):
  try:
    import nibabel  # noqa: PLC0415 - optional dependency, imported on the first NIfTI file
  except ImportError as e:
    raise _missing(path, 'NIfTI', 'nibabel', e) from e
  return nibabel


def _first(value) -> float | None:
  """A DICOM number or the first of a multi-valued one; None when absent or empty."""
  if value is None or value == '':
    return None
  if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue
    if len(value) == 0:
      return None
    value = value[0]
  return float(value)


def _dicom_attr(ds, name: str, sequence: str, frame: int):
  """`name` from the top level, else from the shared or the frame's functional groups
  (enhanced multi-frame files keep rescale and window there)."""
  if name in ds:
    return ds.get(name)
  groups = []
  if 'SharedFunctionalGroupsSequence' in ds and len(ds.SharedFunctionalGroupsSequence):
    groups.append(ds.SharedFunctionalGroupsSequence[0])
  per_frame = ds.get('PerFrameFunctionalGroupsSequence')
  if per_frame is not None and frame < len(per_frame):
    groups.append(per_frame[frame])
  for g in groups:
    seq = g.get(sequence)
    if seq is not None and len(seq) and name in seq[0]:
      return seq[0].get(name)
  return None


def read_dicom(path: str, options: Options = DEFAULT) -> list[tuple[str, np.ndarray]]:
  """A DICOM file -> [(name suffix, uint8 [H, W] or [H, W, 3])]: one image, or the frames
  that `options.nifti_slices` picks ('#frame<k>').

  Raises:
    UserError: pydicom is not installed.
    Exception: the file is not a readable DICOM image (pydicom's error, or a ValueError
      naming the unsupported attribute).
  """
  pydicom = _pydicom(path)
  try:
    ds = pydicom.dcmread(path)
  except pydicom.errors.InvalidDicomError:
    # Files written before Part 10 have no preamble; read them if they carry pixels.
    ds = pydicom.dcmread(path, force=True)
    if 'PixelData' not in ds:
      raise ValueError("no 'DICM' preamble and no pixel data; expected a DICOM image") from None
    if 'TransferSyntaxUID' not in ds.file_meta:  # uncompressed: the encoding the reader found
      implicit, little = ds.original_encoding
      ds.file_meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
      )
  photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip().upper()
  samples = int(ds.get('SamplesPerPixel', 1) or 1)
  if samples not in (1, 3) or (samples == 1 and photometric not in ('MONOCHROME1', 'MONOCHROME2')):
    raise ValueError(
      f'PhotometricInterpretation {photometric} with SamplesPerPixel {samples}; expected MONOCHROME1,'
      ' MONOCHROME2 or 3-sample RGB/YBR'
    )
  pixels = ds.pixel_array  # YBR is converted to RGB
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames == 1:
    pixels = pixels[None]
  want = (frames, int(ds.Rows), int(ds.Columns)) + ((3,) if samples == 3 else ())
  if pixels.shape != want:
    raise ValueError(f'pixel array of shape {pixels.shape}; expected {want} from Rows, Columns, NumberOfFrames')
  picked = select_slices(frames, options.nifti_slices) if frames > 1 else [0]
  window = parse_window(options.dicom_window)
  out = []
  for k in picked:
    x = pixels[k]
    if samples == 3:
      img = x.astype(np.uint8) if x.dtype == np.uint8 else minmax_to_uint8(x)
    else:
      slope = _first(_dicom_attr(ds, 'RescaleSlope', 'PixelValueTransformationSequence', k))
      intercept = _first(_dicom_attr(ds, 'RescaleIntercept', 'PixelValueTransformationSequence', k))
      x = x.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
      center = _first(_dicom_attr(ds, 'WindowCenter', 'FrameVOILUTSequence', k))
      width = _first(_dicom_attr(ds, 'WindowWidth', 'FrameVOILUTSequence', k))
      function = str(_dicom_attr(ds, 'VOILUTFunction', 'FrameVOILUTSequence', k) or 'LINEAR').strip().upper()
      if isinstance(window, tuple):
        img = window_to_uint8(x, *window)
      elif window == '' and center is not None and width is not None and width > 0:
        img = window_to_uint8(x, center, width, function if function in ('LINEAR_EXACT', 'SIGMOID') else 'LINEAR')
      else:
        img = minmax_to_uint8(x)
      if photometric == 'MONOCHROME1':
        img = 255 - img
    out.append((f'#frame{k}' if frames > 1 else '', np.ascontiguousarray(img)))
  return out


# ----------------------------------------------------------------------------- NIfTI


def upright(plane: np.ndarray) -> np.ndarray:
  """A canonical (RAS+) slice [first axis, second axis] -> the displayed image [rows, columns].

  The slice's first remaining axis runs to the patient's right (or anterior), the
  second to anterior (or superior); transposing and flipping both puts the second
  axis top-down from anterior/superior and the first from the patient's right (or
  anterior) on the left.
  """
  return np.ascontiguousarray(np.flip(plane.T, (0, 1)))


def read_nifti(path: str, options: Options = DEFAULT) -> list[tuple[str, np.ndarray]]:
  """A NIfTI file -> [('#slice<k>', uint8 [H, W])] for the slices `options` picks.

  Raises:
    UserError: nibabel is not installed.
    Exception: the file is not a readable NIfTI volume (nibabel's error, or a
      ValueError naming the shape).
  """
  nib = _nibabel(path)
  img = nib.load(path)
  if len(img.shape) < 3:
    raise ValueError(f'shape {tuple(img.shape)}; expected a 3-D volume (or 4-D: the first volume is used)')
  if len(img.shape) > 3:
    img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
  img = nib.as_closest_canonical(img)
  volume = np.asanyarray(img.dataobj)
  if volume.ndim != 3 or min(volume.shape) < 1:
    raise ValueError(f'volume of shape {volume.shape}; expected 3 non-empty axes')
  finite = volume[np.isfinite(volume)] if np.issubdtype(volume.dtype, np.floating) else volume
  if finite.size == 0:
    raise ValueError('no finite voxel values')
  lo, hi = (float(v) for v in np.percentile(finite, NIFTI_PERCENTILES))
  axis = options.nifti_axis
  out = []
  for k in select_slices(volume.shape[axis], options.nifti_slices):
    plane = np.take(volume, k, axis=axis)
    out.append((f'#slice{k}', upright(percentile_to_uint8(plane, lo, hi))))
  return out


def read(path: str, options: Options = DEFAULT) -> list[tuple[str, np.ndarray]]:
  """A DICOM or NIfTI file -> [(name suffix, uint8 [H, W] or [H, W, 3])]; ValueError otherwise."""
  k = kind(path)
  if k == 'dicom':
    return read_dicom(path, options)
  if k == 'nifti':
    return read_nifti(path, options)
  raise ValueError(f'{path}: not a DICOM or NIfTI file')
