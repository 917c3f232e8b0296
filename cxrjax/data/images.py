"""Decoding, resizing and channel conversion for uint8 images."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from cxrjax.data import medical

PIL_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.gif', '.pgm', '.ppm', '.webp')
# DICOM and NIfTI (cxrjax.data.medical) also count as images; so do extensionless DICOM files.
IMAGE_EXTENSIONS = PIL_EXTENSIONS + medical.EXTENSIONS


def is_image_file(path: str | os.PathLike) -> bool:
  """An image by its name (IMAGE_EXTENSIONS), or a DICOM file by its preamble."""
  return str(path).lower().endswith(IMAGE_EXTENSIONS) or medical.kind(str(path)) == 'dicom'


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """[N,H,W] or [N,H,W,C] uint8 -> [N,H,W,channels] (ITU-R 601 luma for gray)."""
  if images.ndim == 3:
    images = images[..., None]
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if c in (3, 4) and channels == 1:
    rgb = images[..., :3].astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
  if c == 4 and channels == 3:
    return images[..., :3]
  raise ValueError(f'cannot convert {c} channels to {channels}')


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [N,H,W,C] to [N,size,size,C] with PIL's antialiased bilinear filter."""
  n, h, w, c = images.shape
  if h == size and w == size:
    return images
  out = np.empty((n, size, size, c), np.uint8)
  for i in range(n):
    for k in range(c):
      im = Image.fromarray(images[i, :, :, k])
      out[i, :, :, k] = np.asarray(im.resize((size, size), Image.BILINEAR))
  return out


class Decoded(NamedTuple):
  """One decoded image and what it was before it was normalised."""

  suffix: str  # what the image's name adds to its file's: '' or '#slice<k>' / '#frame<k>'
  image: np.ndarray  # uint8 [size, size, channels]
  original: str  # '<width>x<height> <PIL mode>' as decoded, before squashing and conversion


def decode_images(path: str, size: int, channels: int, options: medical.Options = medical.DEFAULT) -> list[Decoded]:
  """Reads an image file as a list of `Decoded`.

  One image with suffix '' for PIL's formats and single-frame DICOM; for NIfTI
  volumes and multi-frame DICOM the slices or frames that `options` picks, with
  suffixes '#slice<k>' or '#frame<k>'. All are squashed and converted alike.

  Raises:
    cxrjax.errors.UserError: a DICOM or NIfTI file without pydicom or nibabel installed.
    Exception: the file is not a readable image (the decoder's message).
  """
  if medical.kind(path):
    return [_decoded(suffix, Image.fromarray(arr), size, channels) for suffix, arr in medical.read(path, options)]
  with Image.open(path) as im:
    im.load()  # forces full decoding, so truncated files fail here
    return [_decoded('', im, size, channels)]


def _decoded(suffix: str, im: Image.Image, size: int, channels: int) -> Decoded:
  return Decoded(suffix, _to_array(im, size, channels), f'{im.size[0]}x{im.size[1]} {im.mode}')


def normalisation_summary(originals, size: int, channels: int) -> dict:
  """What squashing to `size` and converting to `channels` did to images of these `Decoded.original`s.

  Returns counts: images, resized, converted (mode other than the target's 'L'
  or 'RGB'), and the most common original sizes and the modes seen.
  """
  target = 'L' if channels == 1 else 'RGB'
  sizes: dict[str, int] = {}
  modes: dict[str, int] = {}
  for o in map(str, originals):
    wh, _, mode = o.partition(' ')
    sizes[wh] = sizes.get(wh, 0) + 1
    modes[mode] = modes.get(mode, 0) + 1
  common = dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
  return dict(
    images=int(sum(sizes.values())),
    resized=int(sum(n for wh, n in sizes.items() if wh != f'{size}x{size}')),
    distinct_sizes=len(sizes),
    common_sizes=common,
    converted=int(sum(n for m, n in modes.items() if m != target)),
    modes=dict(sorted(modes.items())),
    target=f'{size}x{size} {target}',
  )


def _to_array(im: Image.Image, size: int, channels: int) -> np.ndarray:
  """A decoded PIL image in any mode -> uint8 [size, size, channels]."""
  mode = 'L' if channels == 1 else 'RGB'
  if im.mode not in ('L', 'RGB'):
    # 16-bit grayscale (I;16) and other modes: scale to 8 bits first.
    if im.mode.startswith('I'):
      arr = np.asarray(im, dtype=np.float64)
      lo, hi = float(arr.min()), float(arr.max())
      arr = (arr - lo) / max(hi - lo, 1e-9) * 255.0
      im = Image.fromarray(np.rint(arr).astype(np.uint8))
    else:
      im = im.convert('RGB')
  im = im.convert(mode)
  if im.size != (size, size):
    # Squash to a square, as MedMNIST and the shared Kermany copy do.
    im = im.resize((size, size), Image.BILINEAR)
  arr = np.asarray(im, dtype=np.uint8)
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr
