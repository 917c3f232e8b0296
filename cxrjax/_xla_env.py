"""XLA flags that cxrjax needs for speed, set before the JAX backend starts.

Measured on a 2-core x86 CPU (see BUILD_NOTES.md): the YNN fusion of dots,
elementwise ops and reductions more than doubles ResNet-18 training throughput
on CPU, with gradients unchanged against a float64 reference. Users should not
have to know this, so the package sets it on import unless told not to
(`CXRJAX_KEEP_XLA_FLAGS=1`). The flag only affects the CPU backend.
"""

import os

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',)


def configure() -> None:
  """Appends cxrjax's CPU flags to XLA_FLAGS, keeping any the user set."""
  if os.environ.get('CXRJAX_KEEP_XLA_FLAGS'):
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_FLAGS:
    name = flag.split('=')[0]
    if name not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
