"""Benchmarks of cxrjax against PyTorch, kept outside the package: run from the repository root.

  python -m benchmarks ...                   the JAX-vs-PyTorch table (`benchmarks.run`)
  python -m benchmarks.ab --before C ...     this checkout against commit C, alternated (`benchmarks.ab`)
  python -m benchmarks.conv_profile ...      ResNet-18's convolutions, layer by layer
  python -m benchmarks.dcgan_upsampling ...  the DCGAN's step per upsampling and kernels
  python -m benchmarks.torch_reference ...   the plain PyTorch accuracy reference

Not installed with cxrjax, and cxrjax never imports it (nor PyTorch, the `bench` extra).
"""
