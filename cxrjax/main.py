r"""Command line: parse flags, validate the config, dispatch on `config.trainer`.

  python -m cxrjax.main --config=configs/baseline.py[:cpu|:smoke] \
      [--workdir=DIR] [--config.a.b=value ...] [--overwrite]

Multi-host: `--distributed` (or CXRJAX_DISTRIBUTED=1) calls
`jax.distributed.initialize()`, which finds the coordinator on TPU pods and
under Slurm; for N processes on one machine give `--coordinator=host:port
--num_processes=N --process_id=i` (see launch/local_multiprocess.sh).

Before any JAX work the entry point picks the platform backend from
`config.kernels` (`cxrjax.backends`), lets it configure the process, and turns on
JAX's compilation cache (`--compilation_cache`); the backend is passed to the trainer.

Problems the user can fix end the run with one line on stderr (after a blank
line), `cxrjax: error: ...`, and exit status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cxrjax import config_lib, entry
from cxrjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:profile]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<config name>[-<profile>]).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Reuse a workdir that holds a run with a different config.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'host:port of process 0 (with --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --distributed).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --distributed).')
_COMPILATION_CACHE = flags.DEFINE_string(
  'compilation_cache', entry.DEFAULT_COMPILATION_CACHE, "JAX's persistent compilation cache folder ('' turns it off)."
)


def fail(message: str) -> None:
  # Background threads (orbax's checkpoint I/O after a failed restore) can be printing to
  # stderr at this moment, and a traceback is written in pieces. So: one write, always on
  # a fresh line, and the error stays a line of its own. (A fresh line only while other
  # threads were alive still failed once in `./dev test`.)
  line = f'\ncxrjax: error: {" ".join(str(message).split())}\n'
  sys.stderr.flush()
  try:
    os.write(sys.stderr.fileno(), line.encode())
  except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file descriptor
    sys.stderr.write(line)
    sys.stderr.flush()
  sys.exit(2)


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else str(text)


def _config_keys(config, prefix: str = '') -> list[str]:
  keys = []
  for k, v in config.items():
    keys += _config_keys(v, f'{prefix}{k}.') if hasattr(v, 'items') else [f'{prefix}{k}']
  return keys


def _refuse_renamed(key: str) -> None:
  parent, _, leaf = key.rpartition('.')
  if leaf in config_lib.RENAMED_KEYS:
    new = config_lib.RENAMED_KEYS[leaf]
    fail(f'--config.{key}: this key was renamed; use --config.{parent + "." if parent else ""}{new}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors and exit status 2 (absl would exit 1 with usage)."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, 'flagname', '') or str(e)
    if name.startswith('config.'):
      key = name[len('config.') :]
      _refuse_renamed(key)
      hint = ''
      try:
        known = _config_keys(flags.FLAGS['config'].value)
        close = difflib.get_close_matches(key, known, n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
      except Exception:  # noqa: BLE001 - hints are best effort
        pass
      fail(f'--config.{key}: unknown config key {key!r}{hint}')
    fail(f'unknown flag --{name}')
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (not flags.Error) for --config.<unknown key>.
    overrides = [a.split('=', 1)[0][len('--config.') :] for a in argv if a.startswith('--config.')]
    for key in overrides:
      _refuse_renamed(key)
    text = str(e)
    key = next((k for k in overrides if repr(k.split('.')[-1]) in text or k.split('.')[-1] in text), None)
    key = key or (overrides[0] if overrides else '?')
    m = re.search(r'Did you mean "([^"]+)"', text)
    parent = key.rsplit('.', 1)[0] + '.' if '.' in key else ''
    fail(f'--config.{key}: unknown config key {key!r}' + (f'; did you mean {parent}{m.group(1)}?' if m else ''))
  except (TypeError, ValueError) as e:
    fail(f'bad --config override: {_last_line(str(e))}')
  except UserError as e:  # raised by a config file's get_config (e.g. an unknown profile)
    fail(str(e))
  except flags.Error as e:
    msg = _last_line(str(e))
    if msg.startswith('cxrjax.errors.UserError: '):
      msg = msg[len('cxrjax.errors.UserError: ') :]
    fail(msg)
  except (OSError, SyntaxError, ImportError) as e:  # an unreadable or broken config file
    fail(f'--config: {type(e).__name__}: {e}')
  return argv


def distributed() -> bool:
  """Whether this run is multi-process (--distributed or CXRJAX_DISTRIBUTED=1)."""
  return _DISTRIBUTED.value or os.environ.get('CXRJAX_DISTRIBUTED') == '1'


def compilation_cache() -> str:
  """The --compilation_cache folder ('' for none)."""
  return _COMPILATION_CACHE.value


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when --distributed or CXRJAX_DISTRIBUTED=1 (before any JAX work)."""
  if not distributed():
    return
  import jax  # noqa: PLC0415

  kwargs = {}
  if _COORDINATOR.value:
    kwargs = dict(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  jax.distributed.initialize(**kwargs)
  logging.info('process %d of %d', jax.process_index(), jax.process_count())


def _workdir(config_arg: str) -> str:
  path, _, profile = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + (f'-{profile}' if profile else ''))


def main(argv: list[str]) -> None:
  del argv
  # Our own progress lines are the log; library INFO chatter (orbax logs every
  # file it renames) would bury them. --verbosity=0 brings it back.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if _CONFIG.value is None:
      raise UserError('--config is required, e.g. --config=configs/baseline.py')
    try:
      config = _CONFIG.value
      config.overwrite = bool(_OVERWRITE.value) or config.get('overwrite', False)
    except (OSError, AttributeError, ImportError, SyntaxError) as e:
      raise UserError(f'--config={flags.FLAGS["config"].serialize()}: {e}') from e
    config = config_lib.finalize(config)
    # Before any JAX work: the CPU backend sets XLA flags and malloc, and may restart the process.
    backend = entry.start(config, distributed=distributed(), compilation_cache=compilation_cache())
    maybe_initialize_distributed()
    backend.check_devices()  # the decision was made from the environment: confirm it against JAX's devices
    from cxrjax.trainers import TRAINERS  # noqa: PLC0415 - heavy (JAX, flax, orbax): after the process is set up

    workdir = _WORKDIR.value or _workdir(flags.FLAGS['config'].serialize().split('=', 1)[-1])
    TRAINERS[config.trainer](config, workdir, backend)
  except UserError as e:
    fail(str(e))


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
