"""Two processes on localhost (jax.distributed, gloo collectives) match a single-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, data_dir, run_cli

pytestmark = pytest.mark.multidevice


def test_two_processes_match_single_process(tmp_path):
  args = ['--config=configs/baseline.py:smoke']
  single = tmp_path / 'single'
  r = run_cli([*args, f'--workdir={single}'])
  assert r.returncode == 0, r.stderr[-2000:]
  multi = tmp_path / 'multi'
  env = dict(os.environ, PYTHON=sys.executable, CXRJAX_DATA_DIR=str(data_dir()), CXRJAX_LOG_DIR=str(tmp_path / 'logs'))
  r = subprocess.run(
    [str(ROOT / 'launch' / 'local_multiprocess.sh'), '2', *args, f'--workdir={multi}'],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  logs = ''.join((tmp_path / 'logs' / f'process_{i}.log').read_text()[-1500:] for i in range(2))
  assert r.returncode == 0, logs
  m = json.loads((multi / 'metrics.json').read_text())
  assert m['run']['process_count'] == 2
  ref = json.loads((single / 'metrics.json').read_text())
  with np.load(multi / 'predictions.npz') as a, np.load(single / 'predictions.npz') as b:
    np.testing.assert_array_equal(a['test_labels'], b['test_labels'])
    # Two processes split each batch: BatchNorm statistics and gradients are
    # all-reduced over gloo, which reorders float32 sums (measured: 1.5e-7).
    np.testing.assert_allclose(a['test_probs'], b['test_probs'], atol=1e-5)
  for key in ('auroc', 'f1', 'sensitivity', 'specificity'):
    assert m['test']['youden'][key] == pytest.approx(ref['test']['youden'][key], abs=1e-4)
