"""TensorBoard scalars: written, and without importing PyTorch (2 s of every run's start when it is installed)."""

import importlib.util
import json
import subprocess
import sys

import pytest

_WRITE_SCALARS = """
import json, sys
from pathlib import Path
from cxrjax import progress
w = progress.MetricWriter(sys.argv[1])
w.scalars(3, {'train/loss': 0.25, 'val/auroc': float('nan')})
w.close()
imported = 'torch' in sys.modules
import torch  # still importable afterwards
events = b''.join(p.read_bytes() for p in Path(sys.argv[1]).glob('events.out.tfevents.*'))
print(json.dumps(dict(torch_imported_by_writer=imported, torch_ok=torch.ones(1).item() == 1.0,
                      loss_logged=b'train/loss' in events, nan_skipped=b'val/auroc' not in events)))
"""


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='the point is PyTorch being installed')
def test_metric_writer_logs_scalars_without_importing_torch(tmp_path):
  proc = subprocess.run([sys.executable, '-c', _WRITE_SCALARS, str(tmp_path)], capture_output=True, text=True,
                        timeout=120)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == dict(torch_imported_by_writer=False, torch_ok=True, loss_logged=True, nan_skipped=True)
