"""`python -m cxrjax.bench`: JAX against PyTorch on CPU; see `cxrjax.bench.harness`."""

import cxrjax  # noqa: F401 - sets XLA flags before JAX starts
from cxrjax.bench import harness

if __name__ == '__main__':
  harness.main()
