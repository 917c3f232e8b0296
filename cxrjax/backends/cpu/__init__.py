"""The CPU backend: oneDNN kernels, a fused Adam and the process settings they want.

Everything CPU-specific in cxrjax lives in this package and nowhere else:
`backend.py` (`CpuBackend`), the oneDNN custom calls and their C++ source
(`onednn.py`, `onednn_conv.cc`), layers built on them and on CPU-friendly XLA
formulations (`layers.py`, `strided_conv.py`, `subpixel_conv.py`), and the process
settings (`process.py`: XLA CPU flags, glibc malloc, XLA's pool size, the block cache
and its restart). This file and `process.py` import nothing heavy: an entry point
decides and configures the process before JAX, flax and optax are imported.
"""
