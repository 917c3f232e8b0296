"""Grad-CAM and Grad-CAM++ for the Flax classifiers, a lung-field estimate, and CAM figures.

Where does a classifier look? The classifiers mark their last feature map A
(right before global pooling) with

  x = self.perturb('cam_features', x)
  self.sow('intermediates', 'cam_features', x)

`perturb` adds a zero-valued entry of the 'perturbations' collection to A, so
the gradient of a logit with respect to that entry is exactly dlogit/dA,
obtained in one backward pass without rewriting the model; `sow` hands back A
itself. `feature_gradients` returns both, `cam_from_gradients` turns them into
a coarse map, and `make_cam_fn` wraps everything into one jitted function that
returns maps at input resolution.

`lung_mask` estimates the lung fields of a frontal chest X-ray with classical
image processing (no trained segmenter; see its docstring for the method and
its limits), and `focus_score` measures the share of CAM mass inside it: a
crude check that a model attends to the lungs rather than to text markers,
borders or the abdomen.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from cxrjax import fileio

CAM_NAME = 'cam_features'
METHODS = ('gradcam', 'gradcam++')


# --------------------------------------------------------------------------- Grad-CAM


def _find_leaf(tree, name: str):
  """The single leaf of `tree` whose path passes through the key `name` (at any depth)."""
  hits = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    if any(getattr(k, 'key', None) == name for k in path)
  ]
  if len(hits) != 1:
    raise ValueError(f'expected one {name!r} entry, found {len(hits)}: does the model call perturb/sow({name!r})?')
  return hits[0]


def zero_perturbations(model, images):
  """Zeros shaped like the model's 'perturbations' collection for this batch shape.

  Uses `jax.eval_shape` on `model.init`, so nothing is computed and it works
  under `jax.jit` (the shapes depend only on the static input shape).
  """
  spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), spec)
  if 'perturbations' not in shapes:
    raise ValueError(f'the model has no perturb({CAM_NAME!r}) call, so Grad-CAM cannot read its feature map')
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])


def _targets(logits, target_class):
  if target_class is None:
    return jnp.argmax(logits, axis=-1)
  return jnp.broadcast_to(jnp.asarray(target_class, jnp.int32), logits.shape[:1])


def feature_gradients(model, variables, images, target_class=None):
  """Last feature map A, dlogit_target/dA, the logits and the targets used.

  Args:
    model: a linen classifier with `perturb`/`sow` of 'cam_features'.
    variables: {'params': ..., 'batch_stats': ...} (other collections are ignored).
    images: [B, H, W, C] model inputs, preprocessed as in training.
    target_class: None for each image's predicted class (arg-max logit), or
      an int / int array [B] of classes to explain.

  Returns:
    (activations [B, h, w, K], gradients [B, h, w, K], logits [B, classes],
    targets [B]), features and gradients in float32.
  """
  base = {k: v for k, v in variables.items() if k not in ('perturbations', 'intermediates')}
  perts = zero_perturbations(model, images)

  def score(p):
    logits, state = model.apply({**base, 'perturbations': p}, images, train=False, mutable=['intermediates'])
    # The arg-max is piecewise constant, so choosing the target inside the
    # differentiated function does not change the gradient of the chosen logit.
    targets = _targets(jax.lax.stop_gradient(logits), target_class)
    chosen = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    # Images do not interact in eval mode (BatchNorm uses running statistics),
    # so the gradient of the sum holds each image's own gradient.
    return chosen.astype(jnp.float32).sum(), (state['intermediates'], logits, targets)

  grads, (inter, logits, targets) = jax.grad(score, has_aux=True)(perts)
  acts = _find_leaf(inter, CAM_NAME).astype(jnp.float32)
  g = _find_leaf(grads, CAM_NAME).astype(jnp.float32)
  return acts, g, logits, targets


def cam_from_gradients(acts, grads, method: str = 'gradcam', eps: float = 1e-7):
  """Coarse class-activation maps [B, h, w] (not normalised) from A and dY/dA.

  Grad-CAM (Selvaraju et al., 2017): w_k = mean_ij dY/dA_ijk and
  cam = ReLU(sum_k w_k A_k).

  Grad-CAM++ (Chattopadhay et al., 2018): with Y replaced by exp(Y), the
  second and third derivatives reduce to powers of g = dY/dA (their eq. 19),
  alpha_ijk = g^2 / (2 g^2 + sum_ab A_abk g^3), zero where g = 0, and
  w_k = sum_ij alpha_ijk ReLU(g_ijk); cam = ReLU(sum_k w_k A_k). This is the
  same simplification pytorch-grad-cam uses.
  """
  if method == 'gradcam':
    weights = grads.mean(axis=(1, 2))
  elif method == 'gradcam++':
    g2 = grads**2
    g3 = g2 * grads
    sum_a = acts.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + eps)
    alpha = jnp.where(grads != 0, alpha, 0.0)
    weights = (alpha * jax.nn.relu(grads)).sum(axis=(1, 2))
  else:
    raise ValueError(f'unknown CAM method {method!r}; expected one of {METHODS}')
  return jax.nn.relu(jnp.einsum('bhwk,bk->bhw', acts, weights))


def normalise_cams(cams, size: tuple[int, int]):
  """Bilinear upsampling to `size` and division by each map's maximum (all-zero maps stay zero)."""
  cams = jax.image.resize(cams, (cams.shape[0], *size), method='bilinear')
  # Bilinear weights are non-negative, but keep the maps exactly >= 0 anyway.
  cams = jnp.maximum(cams, 0.0)
  peak = cams.max(axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cams / jnp.where(peak > 0, peak, 1.0), 0.0)


def make_cam_fn(model, method: str = 'gradcam'):
  """A jitted `fn(variables, images, target_class=None) -> cams [B, H, W]` in [0, 1].

  Each map is upsampled bilinearly to the input size (H, W) and divided by
  its maximum, so 1 marks the most important location of each image. A map
  is all zero when no location has positive evidence for the target class
  (e.g. explaining a class the model argues against).

  Target choice: `target_class=None` explains each image's predicted class;
  an int, or an int array [B], explains the given classes (e.g. 1 =
  pneumonia for every image, to see the evidence for disease whatever the
  prediction). A Python int is traced, so changing it does not recompile.
  """
  if method not in METHODS:
    raise ValueError(f'unknown CAM method {method!r}; expected one of {METHODS}')

  def cam_fn(variables, images, target_class=None):
    acts, grads, _, _ = feature_gradients(model, variables, images, target_class)
    return normalise_cams(cam_from_gradients(acts, grads, method), tuple(images.shape[1:3]))

  return jax.jit(cam_fn)


def focus_score(cams, masks) -> np.ndarray:
  """Share of CAM mass inside the mask, sum(cam * mask) / sum(cam), per image [B].

  NaN for an all-zero map (no mass to place).
  """
  cams = np.asarray(cams, np.float64)
  masks = np.asarray(masks, bool)
  total = cams.sum(axis=(1, 2))
  inside = (cams * masks).sum(axis=(1, 2))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


# --------------------------------------------------------------------------- lung fields

# Fractions of the image (x from the image's left, y from the top) of the two
# lung ellipses of the prior: the lungs of a frontal film centred on the chest,
# as in the Kermany/PneumoniaMNIST crops (checked against the average estimated mask).
PRIOR_CENTRES_X = (0.28, 0.72)
PRIOR_CENTRE_Y = 0.46
PRIOR_RADIUS_X = 0.15
PRIOR_RADIUS_Y = 0.32
# Lung candidates are searched in the prior's ellipses enlarged by this factor.
SEARCH_SCALE = 1.35
# Plausible total lung area, as a fraction of the image; outside it -> prior.
MIN_AREA, MAX_AREA = 0.10, 0.60
# A lung smaller than this fraction of the other is treated as missed (e.g.
# whited out by consolidation) and replaced by the mirror image of the other.
MIRROR_RATIO = 0.4


def lung_prior(h: int, w: int, scale: float = 1.0) -> np.ndarray:
  """Two ellipses at the standard lung positions of a frontal chest film, bool [h, w].

  `scale` enlarges the radii (1.0 is the fallback mask, about 28% of the image).
  """
  y = (np.arange(h)[:, None] + 0.5) / h
  x = (np.arange(w)[None, :] + 0.5) / w
  rx, ry = PRIOR_RADIUS_X * scale, PRIOR_RADIUS_Y * scale
  out = np.zeros((h, w), bool)
  for cx in PRIOR_CENTRES_X:
    out |= ((x - cx) / rx) ** 2 + ((y - PRIOR_CENTRE_Y) / ry) ** 2 <= 1.0
  return out


def _otsu(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
  v = np.asarray(values, np.float64).ravel()
  lo, hi = float(v.min()), float(v.max())
  if hi <= lo:
    return lo
  hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist).astype(np.float64)
  w1 = w0[-1] - w0
  s0 = np.cumsum(hist * centres)
  m0 = s0 / np.maximum(w0, 1)
  m1 = (s0[-1] - s0) / np.maximum(w1, 1)
  between = w0 * w1 * (m0 - m1) ** 2
  # The cut lies at the upper edge of the last bin of the dark class.
  return float(edges[int(np.argmax(between[:-1])) + 1])


def _disk(radius: float) -> np.ndarray:
  r = max(int(round(radius)), 1)
  yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
  return xx**2 + yy**2 <= r * r + 0.5


def _convex_hull(mask: np.ndarray) -> np.ndarray:
  """Pixels whose centres lie in the convex hull of the mask's pixel squares."""
  pts = np.argwhere(mask).astype(np.float64)
  if len(pts) < 3:
    return mask
  corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
  try:
    hull = ConvexHull(corners)
  except QhullError:
    return mask
  # Only the mask's bounding box can be inside; inside a convex polygon = on
  # the inner side of every facet's line.
  (r0, c0), (r1, c1) = pts.min(0).astype(int), pts.max(0).astype(int) + 1
  grid = np.stack(np.mgrid[r0:r1, c0:c1], -1).reshape(-1, 2).astype(np.float64)
  inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1)
  out = mask.copy()
  out[r0:r1, c0:c1] |= inside.reshape(r1 - r0, c1 - c0)
  return out


def _to_gray(images) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim == 4:
    x = x[..., :3].mean(axis=-1) if x.shape[-1] > 1 else x[..., 0]
  if x.ndim != 3:
    raise ValueError(f'expected images [B, H, W] or [B, H, W, C], got shape {np.asarray(images).shape}')
  return x.astype(np.float64)


def _lung_mask_one(img: np.ndarray) -> tuple[np.ndarray, bool]:
  h, w = img.shape
  size = max(h, w)
  # 1. Contrast: films differ in exposure, so stretch the 0.5-99.5 percentiles to [0, 1].
  lo, hi = np.percentile(img, [0.5, 99.5])
  if hi - lo < 1e-6:
    return lung_prior(h, w), True
  g = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
  # 2. Smooth away rib edges and noise (sigma ~ 3.5 px at 224, 0.5 px at 28).
  blur = ndi.gaussian_filter(g, max(size / 64, 0.5), mode='nearest')
  core = lung_prior(h, w)
  search = lung_prior(h, w, SEARCH_SCALE)
  # 3. Air outside the body: the darkest class of a two-level Otsu split
  # (Otsu on the whole image, then Otsu again on its dark side), keeping only
  # components that touch the image border and lie mostly outside the prior,
  # so that dark lungs reaching the border of tightly cropped films survive.
  t0 = _otsu(blur)
  dark0 = blur < t0
  t_air = _otsu(blur[dark0]) if dark0.sum() > 10 else -np.inf
  labels, _ = ndi.label(blur < t_air)
  border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
  air = np.zeros((h, w), bool)
  for k in border[border > 0]:
    comp = labels == k
    if (comp & core).sum() < 0.5 * comp.sum():
      air |= comp
  body = search & ~air
  if body.sum() < 10:
    return core, True
  # 4. Lungs are the darker-than-body regions: Otsu within the body part of the search region.
  lungs = (blur < _otsu(blur[body])) & body
  # 5. Cleanup: an opening cuts thin bridges (e.g. to the trachea or a dark
  # corner); per side keep the largest component, take its convex hull (so a
  # bright consolidation inside the lung counts as lung) and fill holes.
  lungs = ndi.binary_opening(lungs, _disk(size / 56))
  labels, n = ndi.label(lungs)
  cols = np.arange(w)[None, :]
  halves = (cols < w / 2, cols >= w / 2)
  sides = []
  for half in halves:
    side = np.zeros((h, w), bool)
    if n:
      areas = ndi.sum(lungs & half, labels, np.arange(1, n + 1))
      k = int(np.argmax(areas))
      if areas[k] > 0:
        side = (labels == k + 1) & half
    sides.append(ndi.binary_fill_holes(_convex_hull(side) & half))
  # 6. A missed lung (whited out by disease, or merged into the mediastinum) is
  # replaced by the mirror image of the other one, about the image's centre line.
  a0, a1 = sides[0].sum(), sides[1].sum()
  if a0 < MIRROR_RATIO * a1:
    sides[0] = sides[1][:, ::-1] & halves[0]
  elif a1 < MIRROR_RATIO * a0:
    sides[1] = sides[0][:, ::-1] & halves[1]
  mask = sides[0] | sides[1]
  # 7. Degenerate estimate -> the prior.
  area = mask.mean()
  if not MIN_AREA <= area <= MAX_AREA:
    return core, True
  return mask, False


def lung_mask(images, return_fallback: bool = False):
  """Estimated lung fields of frontal chest X-rays, bool [B, H, W], without a trained segmenter.

  Method, per image (deterministic; scale-dependent sizes are fractions of
  the image side, so 28x28 and 224x224 inputs both work):

  1. Stretch the 0.5-99.5 intensity percentiles to [0, 1] and smooth with a
     Gaussian (sigma = side / 64).
  2. Remove air outside the body: pixels of the darkest class of a two-level
     Otsu split, in border-touching components lying mostly outside the
     standard lung positions (`lung_prior`).
  3. Lungs are darker than the surrounding body (they hold air): Otsu
     threshold within the body, restricted to the lung prior enlarged by
     `SEARCH_SCALE` (this excludes the mediastinum's centre, shoulders,
     abdomen and corners).
  4. Morphology: binary opening (radius side / 56), keep the largest
     component in each half of the image, its convex hull, fill holes.
  5. If one lung is much smaller than the other (< `MIRROR_RATIO`), mirror
     the other one across the vertical midline.
  6. If the total area is outside [`MIN_AREA`, `MAX_AREA`] of the image, or
     the image is flat, fall back to `lung_prior(H, W)`.

  Limits: this is a heuristic for scoring CAM focus, not a segmentation. It
  assumes an upright PA/AP film roughly centred on the chest; it tends to
  miss the apices and the costophrenic angles, and the hull can include some
  mediastinum. Dense bilateral opacities often trigger the prior fallback.

  Args:
    images: [B, H, W] or [B, H, W, C] (uint8 or float, any range; colour is averaged).
    return_fallback: also return a bool [B] marking images that got the prior.

  Returns:
    masks bool [B, H, W], or (masks, used_prior) when `return_fallback`.
  """
  gray = _to_gray(images)
  pairs = [_lung_mask_one(img) for img in gray]
  masks = np.stack([m for m, _ in pairs]) if pairs else np.zeros(gray.shape, bool)
  if return_fallback:
    return masks, np.array([f for _, f in pairs], bool)
  return masks


# --------------------------------------------------------------------------- figures


def _display(image: np.ndarray) -> tuple[np.ndarray, dict]:
  """An image ready for imshow: gray 2-D arrays get a gray colormap and their own range."""
  x = np.asarray(image)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 2:
    return x, dict(cmap='gray', vmin=float(x.min()), vmax=float(max(x.max(), x.min() + 1e-6)))
  x = x.astype(np.float64)
  x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
  return x[..., :3], {}


def cam_grid(
  images,
  cams_by_method: dict[str, np.ndarray],
  path: str,
  titles: Sequence[str] | None = None,
  masks=None,
  dpi: int = 100,
  alpha: float = 0.45,
) -> None:
  """Writes a PNG grid: one row per image; the input, then one CAM overlay per method.

  Overlays use the jet colormap on [0, 1] at `alpha` over the gray image;
  `masks` (bool [B, H, W], e.g. from `lung_mask`) are drawn as a white
  contour on every panel. The figure is rendered with Agg, without pyplot's
  global state, and written atomically.

  Args:
    images: [B, H, W] or [B, H, W, C].
    cams_by_method: {method name: cams [B, H, W] in [0, 1]}, in column order.
    path: output .png path.
    titles: optional per-row labels (e.g. 'y=1 p=0.93'), shown on the input panel.
    masks: optional bool [B, H, W].
    dpi: resolution of the PNG.
    alpha: opacity of the heat map.
  """
  images = np.asarray(images)
  b = len(images)
  names = list(cams_by_method)
  for name, cams in cams_by_method.items():
    if len(cams) != b:
      raise ValueError(f'{name}: {len(cams)} maps for {b} images')
  if titles is not None and len(titles) != b:
    raise ValueError(f'{len(titles)} titles for {b} images')
  cols = 1 + len(names)
  fig = Figure(figsize=(2.0 * cols, 2.0 * b + 0.3), layout='constrained')
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(b, cols, squeeze=False))
  for i in range(b):
    shown, kw = _display(images[i])
    panels = [('input', None)] + [(n, np.asarray(cams_by_method[n][i])) for n in names]
    for j, (name, cam) in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(shown, **kw)
      if cam is not None:
        ax.imshow(cam, cmap='jet', alpha=alpha, vmin=0.0, vmax=1.0, interpolation='bilinear')
      if masks is not None and np.asarray(masks[i]).any():
        ax.contour(np.asarray(masks[i], np.float64), levels=[0.5], colors='white', linewidths=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(name, fontsize=9)
      if j == 0 and titles is not None:
        ax.set_ylabel(titles[i], fontsize=8)
  fileio.atomic_savefig(fig, path, dpi=dpi)
