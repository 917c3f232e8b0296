"""Sharded training equals single-device training (8 forced CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_dir

pytestmark = pytest.mark.multidevice
HERE = Path(__file__).resolve().parent


def run_worker(script: str, *args: str) -> dict:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', CXRJAX_DATA_DIR=str(data_dir()))
  r = subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_classifier_step_data_parallel_and_fsdp_match_single_device():
  out = run_worker('sharding_worker.py', 'classifier')
  ref = out['single']['losses']
  for name in ('data8', 'fsdp'):
    # Tolerance from the arithmetic: both sides run the same stock kernels in float64, and
    # sharding changes only the order of reductions (BatchNorm statistics, gradient
    # all-reduces over 8 shards), each rounding at ~1e-16 relative. Even amplified a
    # million-fold by three training steps that stays below 1e-9; the float32 losses agree
    # to their own rounding (~1e-7). A wrong sharding (per-shard BatchNorm statistics, a
    # missing gradient all-reduce) changes the loss at the 1e-2 level.
    for a, b in zip(out[name]['losses'], ref):
      assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (name, out[name]['losses'], ref)
    assert out[name]['max_param_diff'] <= 1e-9 * out[name]['param_scale'], (name, out[name])
  assert out['data8']['sharded_leaves'] == 0, 'data parallel replicates parameters'
  # FSDP shards every large parameter and its momentum (the worker counts them; at least one pair).
  assert out['fsdp']['sharded_leaves'] == out['fsdp']['large_leaves'] >= 2, out['fsdp']


def test_gan_step_data_parallel_and_fsdp_match_single_device():
  sharded_out = run_worker('sharding_worker.py', 'gan')
  ref = sharded_out['gan_single']['losses']
  for name in ('gan_data8', 'gan_fsdp'):
    # Same reasoning as above: float64, only the order of reductions changes (BatchNorm
    # statistics of G and D, gradient all-reduces).
    for (d, g), (rd, rg) in zip(sharded_out[name]['losses'], ref):
      assert abs(d - rd) <= 1e-6 * max(1.0, abs(rd)) and abs(g - rg) <= 1e-6 * max(1.0, abs(rg)), (
        name,
        sharded_out[name],
      )
    assert sharded_out[name]['max_param_diff'] <= 1e-9, (name, sharded_out[name])
