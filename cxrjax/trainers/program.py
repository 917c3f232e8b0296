"""`Program`: one training program as the loop runs it and the benchmarks time it.

Each trainer module has one factory per program it trains (`classifier.program`,
`gan.program`, `ldm.autoencoder_program`, `ldm.diffusion_program`): the models, the
optimizer, the pure step, the initial state and the compile options of both, from
the config and the backend. The trainer hands the program to `loop.run`; the
benchmarks (`benchmarks/`) build the same program with the same factory, so they
measure exactly what the trainer runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Program:
  """A training program.

  Attributes:
    name: the model it trains ('resnet18', 'efficientnet_v2_b0', 'dcgan', 'unet', 'autoencoder', ...),
      the key of the backend's per-program compile options.
    init: `(start=None) -> the initial state pytree` (it closes over its key); jit it with
      `init_options`. `start`, when given, holds variables to begin from instead of a fresh
      initialisation (pretrained weights: what `start` below returns).
    step: the pure `(state, batch, rng) -> (state, metrics)`; jit it with `step_options`.
    init_options: XLA options for compiling `init` (`backend.compile_options('init')`).
    step_options: XLA options for compiling `step` (`backend.compile_options(name)`).
    modules: the Flax modules it trains, by role ('classifier'; 'generator', 'discriminator'; ...).
    schedule: the learning rate as a function of the step, when there is one to log.
    start: `() -> variables` (host arrays) to begin a fresh run from, or None. Called once when
      a run starts, never when it resumes from a checkpoint; the loop passes the result to
      `init` as an argument (not a constant baked into the compiled program).
  """

  name: str
  init: Callable[[], Any]
  step: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
  init_options: dict[str, Any] | None
  step_options: dict[str, Any] | None
  modules: dict[str, Any]
  schedule: Callable[[int], Any] | None = None
  start: Callable[[], Any] | None = None

  def num_params(self) -> int:
    """Trainable parameters of the state (leaves of its `params` / `*_params` fields), without running init."""
    state = jax.eval_shape(self.init)
    return count_params([getattr(state, f.name) for f in dataclasses.fields(state) if f.name.endswith('params')])


def count_params(tree) -> int:
  """The number of scalars in the leaves of `tree` (arrays or shape structs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
