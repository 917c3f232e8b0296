"""Fault injection for crash-safety tests: SIGKILL the process at a named point.

`CXRJAX_FAULT='classifier-checkpoint@20'` kills the run right after the checkpoint
of step 20 was started (while orbax may still be writing it); `classifier-step@7`
after step 7 (`<name>-step` and `<name>-checkpoint` for every loop: `gan:<class>`,
`autoencoder`, `diffusion`); `final-eval` after the predictions were written but
before the metrics. Unset in normal use; the check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def maybe_fail(point: str, step: int | None = None, before_kill=None) -> None:
  """SIGKILLs this process if CXRJAX_FAULT names `point` (at `step`).

  `before_kill` (e.g. waiting for an asynchronous checkpoint) runs first, so a
  'step' fault models a kill some time after the last save completed, while a
  'checkpoint' fault (no before_kill) models a kill during the write.
  """
  spec = os.environ.get('CXRJAX_FAULT')
  if not spec:
    return
  for item in spec.split(','):
    name, _, at = item.strip().partition('@')
    if name == point and (not at or (step is not None and int(at) == int(step))):
      if before_kill is not None:
        before_kill()
      os.kill(os.getpid(), signal.SIGKILL)
