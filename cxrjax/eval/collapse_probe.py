r"""Calibrate the per-class collapse check: its numbers for a run's synthetic set and for sets of known kind.

The check (`genquality.collapse_verdicts`) judges a class by the within-class recall of the
generated images against the real ones and by their diversity relative to the real ones,
on the reference network's features. This prints both (and precision, and pixel
diversity) for each synthesized class of a finished generative run: its synthetic set;
real subsets of several sizes (what a healthy generator should look like); one real image
repeated; a few real images plus Gaussian pixel noise (near-copies); uniform noise.

  python -m cxrjax.eval.collapse_probe RUN_DIR [--data NPZ] [--seed 0]

RUN_DIR: a finished generative run (its `gen_metrics.json` names the reference network,
its `synthetic.npz` the set). NPZ: the real images, in MedMNIST layout (default
`$CXRJAX_DATA_DIR/pneumoniamnist.npz`); their training split is the reference set.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from cxrjax import fileio
from cxrjax import main as cli
from cxrjax.data import synthetic
from cxrjax.errors import UserError
from cxrjax.eval import features, genquality

SUBSET_SIZES = (809, 160, 50, 12)
NOISE_SD = (3, 10, 20)  # of 255
NOISE_MODES = (1, 4, 16)  # real images the noisy copies are made from


def probe_sets(real: np.ndarray, generated: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
  """(name, uint8 images) of every probed set for one class, `len(generated)` images each unless named otherwise."""
  m = len(generated)
  sets = [('synthetic set of the run', generated)]
  sets += [
    (f'real subset of {n}', real[rng.choice(len(real), n, replace=False)]) for n in SUBSET_SIZES if n <= len(real)
  ]
  sets.append(('one real image repeated', np.repeat(real[rng.integers(len(real))][None], m, 0)))
  for sd in NOISE_SD:
    for modes in NOISE_MODES:
      base = real[rng.choice(len(real), modes, replace=False)][rng.integers(modes, size=m)].astype(np.float32)
      noisy = np.clip(base + rng.normal(0, sd, base.shape), 0, 255).astype(np.uint8)
      sets.append((f'{modes} real image(s) + pixel noise sd {sd}', noisy))
  sets.append(('uniform noise', rng.integers(0, 256, size=(m, *real.shape[1:]), dtype=np.uint8)))
  return sets


def probe(run_dir: str, data_path: str, seed: int = 0) -> list[dict]:
  quality_path = os.path.join(run_dir, 'gen_metrics.json')
  if not os.path.isfile(quality_path):
    raise UserError(f'{run_dir}: no gen_metrics.json; expected a finished generative run')
  ref = fileio.read_json(quality_path)['features']['path']
  model, variables, _ = features.load_classifier(os.path.join(ref, 'export'))
  syn, _ = synthetic.load(os.path.join(run_dir, 'synthetic.npz'))
  with np.load(data_path, allow_pickle=False) as z:
    images, labels = z['train_images'], z['train_labels'].ravel()
  if images.ndim == 3:
    images = images[..., None]
  rng = np.random.default_rng(seed)
  out = []
  for c in sorted(set(syn.labels.tolist())):
    real = images[labels == c]
    f_real = features.extract(model, variables, real)
    px_real = genquality.pixel_rows(real)
    for name, imgs in probe_sets(real, syn.images[syn.labels == c], rng):
      f = features.extract(model, variables, imgs)
      pr = genquality.precision_recall(f_real, f)
      out.append(dict(
        cls=c, set=name, n=int(len(imgs)), precision=pr['precision'], recall=pr['recall'],
        diversity_features=genquality.diversity(f_real, f)['ratio'],
        diversity_pixels=genquality.diversity(px_real, genquality.pixel_rows(imgs))['ratio'],
      ))  # fmt: skip
  return out


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog='python -m cxrjax.eval.collapse_probe', description=__doc__.split('\n')[0])
  p.add_argument('run_dir')
  p.add_argument('--data', default=os.path.join(os.environ.get('CXRJAX_DATA_DIR', '.'), 'pneumoniamnist.npz'))
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  try:
    rows = probe(args.run_dir, args.data, args.seed)
  except UserError as e:
    cli.fail(str(e))
  print('| class | set | n | precision | recall | diversity (features) | diversity (pixels) |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["cls"]} | {r["set"]} | {r["n"]} | {r["precision"]:.3f} | {r["recall"]:.3f} |'
          f' {r["diversity_features"]:.2f} | {r["diversity_pixels"]:.2f} |')  # fmt: skip


if __name__ == '__main__':
  main(sys.argv[1:])
