"""`python -m cxrjax.bench`: JAX against PyTorch on CPU; see `cxrjax.bench.harness`."""

from cxrjax import _xla_env

if __name__ == '__main__':
  # Before anything starts; the worker processes (JAX and PyTorch alike) inherit the preload.
  _xla_env.reexec_with_block_cache()
  from cxrjax.bench import harness  # after the restart

  harness.main()
