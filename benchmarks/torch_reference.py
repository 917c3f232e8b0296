r"""The plain PyTorch script that issue 2's accuracy target was measured with, rerun here.

ResNet-18 (CIFAR stem, base width 16 by default), Adam 1e-3, batch 128, random crop
with 2-pixel zero padding (torchvision's RandomCrop(28, padding=2)), 15 epochs, the
epoch with the best validation AUROC tested at threshold 0.5, on all of
PneumoniaMNIST-28. It exists so that cxrjax is compared with the same script on the
same machine over the same seeds, not with one lucky run.

  python -m benchmarks.torch_reference --seeds 0,1,2 [--width 16] [--epochs 15] [--out ref.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.torch_models import ResNet18
from cxrjax.eval import metrics


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
  b, _, h, w = x.shape
  padded = F.pad(x, (pad, pad, pad, pad))
  oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
  ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
  return torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(b)])


def run(seed: int, width: int, epochs: int, data: str) -> dict:
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  with np.load(data) as z:
    split = {s: (z[f'{s}_images'], z[f'{s}_labels'][:, 0].astype(np.int64)) for s in ('train', 'val', 'test')}

  def tensor(images):  # ToTensor + Normalize(0.5, 0.5): [-1, 1]
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]

  xtr, ytr = tensor(split['train'][0]), torch.from_numpy(split['train'][1])
  model = ResNet18(2, width, 'cifar', 1)
  opt = torch.optim.Adam(model.parameters(), 1e-3)

  def probs(images):
    model.eval()
    with torch.no_grad():
      return torch.cat([F.softmax(model(tensor(images[i : i + 512])), 1) for i in range(0, len(images), 512)]).numpy()

  best, best_state, t0 = -1.0, None, time.time()
  for _ in range(epochs):
    model.train()
    perm = torch.randperm(len(xtr), generator=gen)
    for i in range(0, len(perm), 128):
      idx = perm[i : i + 128]
      loss = F.cross_entropy(model(random_crop(xtr[idx], 2, gen)), ytr[idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
    auc = metrics.auroc(split['val'][1], probs(split['val'][0])[:, 1])
    if auc > best:
      best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
  model.load_state_dict(best_state)
  p = probs(split['test'][0])[:, 1]
  m = metrics.binary_metrics(split['test'][1], p, 0.5)
  return dict(seed=seed, width=width, epochs=epochs, val_auroc=best, test_auroc=m['auroc'],
              test_accuracy=m['accuracy'], test_specificity=m['specificity'], wall_time_s=time.time() - t0)  # fmt: skip


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--width', type=int, default=16)
  ap.add_argument('--epochs', type=int, default=15)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--data', default=os.path.join(os.environ.get('CXRJAX_DATA_DIR', '.'), 'pneumoniamnist.npz'))
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  rows = []
  for s in [int(x) for x in args.seeds.split(',')]:
    rows.append(run(s, args.width, args.epochs, args.data))
    print(json.dumps(rows[-1]), flush=True)
  for key in ('test_auroc', 'test_accuracy'):
    print(f'median {key}: {np.median([r[key] for r in rows]):.4f}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
