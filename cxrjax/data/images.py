"""Decoding, resizing and channel conversion for uint8 images."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.gif', '.pgm', '.ppm', '.webp')


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


def decode_file(path: str, size: int, channels: int) -> np.ndarray:
  """Reads an image file (any size, gray or RGB) as uint8 [size, size, channels].

  Raises:
    OSError, ValueError: the file is not a readable image (PIL's message).
  """
  with Image.open(path) as im:
    im.load()  # forces full decoding, so truncated files fail here
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
