"""`python -m benchmarks`, from the repository root: JAX against PyTorch; see `benchmarks.run`."""

from benchmarks import run

if __name__ == '__main__':
  run.main()
