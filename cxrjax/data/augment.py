"""Augmentation for chest X-rays, on the host, one uint8 image at a time.

One affine warp (rotation, scale, translation, and the random crop after edge
padding, which is an integer translation) with bilinear sampling and edge
clamping, then brightness/contrast (and, strong, gamma and noise). No
horizontal flip by default: the heart is on the left. With every magnitude at
zero the output equals the input exactly. Randomness comes from the
`np.random.Generator` that Grain derives per element from the pipeline seed,
so an element's augmentation depends only on the seed and its position.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  crop_pad: int = 0
  pad_mode: str = 'edge'  # what the crop/affine reveals beyond the border: 'edge' or 'zero' (black)
  rotate_deg: float = 0.0
  scale: float = 0.0
  translate: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  hflip: bool = False
  gamma: float = 0.0
  noise: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> AugmentParams:
    if not cfg.enabled:
      return cls()
    return cls(
      crop_pad=int(cfg.crop_pad),
      pad_mode=str(cfg.pad_mode),
      rotate_deg=float(cfg.rotate_deg),
      scale=float(cfg.scale),
      translate=float(cfg.translate),
      brightness=float(cfg.brightness),
      contrast=float(cfg.contrast),
      hflip=bool(cfg.hflip),
    )

  def strong(self) -> AugmentParams:
    """Stronger magnitudes, for the minority duplicates of the 'augment' method."""
    return dataclasses.replace(
      self,
      crop_pad=max(self.crop_pad, 2),
      rotate_deg=max(2 * self.rotate_deg, 12.0),
      scale=max(2 * self.scale, 0.12),
      translate=max(self.translate, 0.06),
      brightness=max(2 * self.brightness, 0.12),
      contrast=max(2 * self.contrast, 0.15),
      gamma=0.2,
      noise=0.02,
    )


def _warp(img: np.ndarray, inv: np.ndarray, offset: np.ndarray, zero_fill: bool = False) -> np.ndarray:
  """Samples img at inv @ (out - c) + c + offset, bilinear; beyond the border: edge or zero."""
  h, w, _ = img.shape
  c = np.array([(h - 1) / 2, (w - 1) / 2])
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  pts = np.stack([yy.ravel() - c[0], xx.ravel() - c[1]])
  src = inv @ pts + (c + offset)[:, None]
  outside = (src[0] < -1e-6) | (src[0] > h - 1 + 1e-6) | (src[1] < -1e-6) | (src[1] > w - 1 + 1e-6)
  sy = np.clip(src[0], 0, h - 1)
  sx = np.clip(src[1], 0, w - 1)
  y0 = np.floor(sy).astype(np.int64)
  x0 = np.floor(sx).astype(np.int64)
  y1 = np.minimum(y0 + 1, h - 1)
  x1 = np.minimum(x0 + 1, w - 1)
  wy = (sy - y0)[:, None]
  wx = (sx - x0)[:, None]
  out = (
    img[y0, x0] * (1 - wy) * (1 - wx)
    + img[y0, x1] * (1 - wy) * wx
    + img[y1, x0] * wy * (1 - wx)
    + img[y1, x1] * wy * wx
  )
  if zero_fill:
    out[outside] = 0.0
  return out.reshape(img.shape)


def augment_image(image: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
  """Augments one uint8 [H, W, C] image; returns uint8 of the same shape."""
  h, w, _ = image.shape
  geometric = p.rotate_deg or p.scale or p.translate or p.crop_pad
  out = image
  if geometric:
    th = np.deg2rad(rng.uniform(-p.rotate_deg, p.rotate_deg)) if p.rotate_deg else 0.0
    s = rng.uniform(1 - p.scale, 1 + p.scale) if p.scale else 1.0
    # inverse of (rotate by th, scale by s), acting on (y, x)
    inv = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]]) / s
    shift = np.zeros(2)
    if p.translate:
      shift += rng.uniform(-p.translate, p.translate, 2) * np.array([h, w])
    if p.crop_pad:
      shift += rng.integers(-p.crop_pad, p.crop_pad + 1, 2)
    out = _warp(image.astype(np.float32), inv, -shift, zero_fill=p.pad_mode == 'zero')
  if p.hflip and rng.random() < 0.5:
    out = out[:, ::-1]
  photometric = p.brightness or p.contrast or p.gamma or p.noise
  if photometric:
    x = np.asarray(out, np.float32) / 255.0
    if p.gamma:
      x = np.clip(x, 0, 1) ** np.exp(rng.uniform(-p.gamma, p.gamma))
    if p.contrast:
      m = x.mean()
      x = (x - m) * rng.uniform(1 - p.contrast, 1 + p.contrast) + m
    if p.brightness:
      x = x + rng.uniform(-p.brightness, p.brightness)
    if p.noise:
      x = x + rng.normal(0, p.noise, x.shape)
    out = x * 255.0
  if out is image:
    return image
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
