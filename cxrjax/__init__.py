"""cxrjax: generative oversampling against class imbalance in medical images.

Importing the package sets the XLA flags, glibc malloc options and compilation
cache that it needs for CPU speed (see `cxrjax._xla_env`); everything else is
imported from submodules explicitly.
"""

from cxrjax import _xla_env

_xla_env.configure()

__version__ = '0.1.0'
