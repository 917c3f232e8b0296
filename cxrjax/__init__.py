"""cxrjax: generative oversampling against class imbalance in medical images.

Importing cxrjax changes nothing in the process (environment, allocator, JAX's
configuration): the command-line entry points configure it (`cxrjax.entry`).
Everything is imported from submodules explicitly.
"""

__version__ = '0.1.0'
