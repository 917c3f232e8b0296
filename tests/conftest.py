"""Shared fixtures: the real data folder, small configs, and a CLI runner."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from cxrjax import entry
from cxrjax.backends.cpu import process

# The test session is an entry point: it caches compiled programs as the command line does.
entry.enable_compilation_cache(os.path.expanduser(entry.DEFAULT_COMPILATION_CACHE))

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
  """End-to-end and multi-device tests first: with two workers, a long test that starts last
  leaves one core idle until it ends."""
  slow = [i for i in items if i.get_closest_marker('e2e') or i.get_closest_marker('multidevice')]
  items[:] = slow + [i for i in items if i not in slow]


def data_dir() -> Path:
  """$CXRJAX_DATA_DIR, else ../shared/data beside the checkout (as in CI)."""
  env = os.environ.get('CXRJAX_DATA_DIR')
  path = Path(env) if env else ROOT.parent / 'shared' / 'data'
  if not (path / 'pneumoniamnist.npz').is_file():
    pytest.fail(
      f'real test data not found at {path}: set CXRJAX_DATA_DIR to the folder with pneumoniamnist.npz and chest_xray/'
    )
  return path


@pytest.fixture(scope='session')
def shared_data() -> Path:
  path = data_dir()
  os.environ['CXRJAX_DATA_DIR'] = str(path)
  return path


@pytest.fixture(scope='session')
def npz_path(shared_data) -> Path:
  return shared_data / 'pneumoniamnist.npz'


@pytest.fixture(scope='session')
def chest_xray(shared_data) -> Path:
  path = shared_data / 'chest_xray'
  if not path.is_dir():
    pytest.fail(f'{path} not found: the Kermany chest_xray folder is part of the test data')
  return path


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs `python -m cxrjax.main ARGS` in a fresh process."""
  # The caller's NPROC would size XLA's thread pool and override what the run asks for (the CPU backend).
  full_env = {k: v for k, v in os.environ.items() if k not in ('NPROC', 'PJRT_NPROC')}
  full_env.setdefault('CXRJAX_DATA_DIR', str(data_dir()))
  full_env.update(env or {})
  return subprocess.run(
    [sys.executable, '-m', 'cxrjax.main', *args],
    cwd=ROOT,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@dataclasses.dataclass
class SmokeRun:
  workdir: Path
  reference_dir: Path  # the reference feature network the run trained (quality.reference_dir)
  returncode: int
  stderr: str  # its last 3,000 characters


CDCGAN_SMOKE_ARGS = ['--config=configs/cdcgan.py:smoke', '--config.gan.alpha=0.25']


@pytest.fixture(scope='session')
def cdcgan_smoke_run(request, tmp_path_factory, shared_data) -> SmokeRun:
  """One finished `configs/cdcgan.py:smoke` run (gan.alpha=0.25) for the whole session, not one per user.

  tests/test_generative.py checks its outputs and tests/test_reader_study.py builds a
  reader study from it. Under pytest-xdist each worker has its own session fixtures, so
  the run lives in the folder the workers share (the parent of each worker's base temp):
  the first worker to ask trains it under an flock, the others wait for the lock and read
  the recorded result. Nothing may write into the run afterwards.
  """
  base = tmp_path_factory.getbasetemp()
  folder = (base.parent if hasattr(request.config, 'workerinput') else base) / 'shared-cdcgan-smoke'
  folder.mkdir(exist_ok=True)
  done = folder / 'result.json'
  with open(folder / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.is_file():
      r = run_cli(
        [*CDCGAN_SMOKE_ARGS, f'--workdir={folder / "run"}', f'--config.quality.reference_dir={folder / "ref"}']
      )
      done.write_text(json.dumps(dict(returncode=r.returncode, stderr=r.stderr[-3000:])))
    result = json.loads(done.read_text())
  return SmokeRun(folder / 'run', folder / 'ref', result['returncode'], result['stderr'])


def torchvision_models():
  """`torchvision.models`, imported without running `torchvision/__init__.py`.

  The torchvision wheel on the package index is built against CUDA PyTorch; with the CPU
  PyTorch installed here its compiled operators (`torchvision/_C.so`) cannot load, and
  `import torchvision` fails while registering them (`torchvision::nms`). The model
  definitions, weight enums and preprocessing presets are pure Python and need none of
  them, so the package is entered through a bare module that only carries its path: the
  model code under test is torchvision's own.
  """
  if 'torchvision' not in sys.modules:
    spec = importlib.util.find_spec('torchvision')
    if spec is None:
      pytest.fail('torchvision is not installed: `./dev test` installs it (the bench extra)')
    package = types.ModuleType('torchvision')
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules['torchvision'] = package
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Failed to load image Python extension": the compiled operators
    import torchvision.models  # noqa: PLC0415  (torch only for the tests that compare with it)

  return torchvision.models


def random_split(counts, size=6, seed=0, prefix='r'):
  """A Split of random [size, size, 1] images, `counts[k]` of class k, named '<prefix><i>', two rows per group."""
  from cxrjax.data.dataset import Split  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(counts)])
  n = len(labels)
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  names = np.array([f'{prefix}{i}' for i in range(n)])
  return Split(images, labels, np.array([f'p{i // 2}' for i in range(n)]), names)


def init_variables(module, rng, *args, **static_kwargs):
  """`module.init(rng, *args, **static_kwargs)` as one jitted program, compiled as the trainers compile theirs.

  Eager flax init dispatches (and compiles) every initializer and every op of the forward
  pass separately: 12 s for a width-8 ResNet-18 on a cold compilation cache (CI's), against
  4 s for one program at the CPU backend's init options (`process.INIT_OPTIONS`, which give the same bits).
  """
  init = functools.partial(module.init, **static_kwargs)
  return jax.jit(init, compiler_options=dict(process.INIT_OPTIONS))(rng, *args)


def normal(seed: int, shape) -> jax.Array:
  """Standard normal float32 test inputs from NumPy: an eager `jax.random.normal` compiles a program per shape."""
  return jax.numpy.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
