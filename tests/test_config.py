"""Configs: every experiment file loads in every profile and validates; bad values are named."""

import importlib.util
from pathlib import Path

import pytest

from cxrjax import config_lib
from cxrjax.errors import UserError
from cxrjax.sweep import plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / 'configs').glob('*.py'))


def load(path: Path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize('profile', [None, 'cpu', 'smoke'])
def test_every_config_finalizes(path, profile):
  config = load(path, profile)
  if 'experiment' in config:  # a sweep: its template experiment and every method's config
    for method in plan.methods_of(config):
      for seed in config.seeds:
        c = plan.method_config(config, method, seed, '/tmp/sweep')
        assert c.profile == (profile or 'full') and c.imbalance.seed == config.data_seed
    return
  config = config_lib.finalize(config)
  assert config.profile == (profile or 'full')


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_docstring_has_run_command(path):
  text = path.read_text()
  assert 'python -m cxrjax.' in text.split('"""')[1], f'{path.name}: docstring must hold the run command'


def test_unknown_profile_is_named():
  with pytest.raises(UserError, match="'fast'"):
    config_lib.with_profile(config_lib.base_config(), 'fast')


@pytest.mark.parametrize(
  'key,value,fragment',
  [
    ('imbalance.ratio', 0.5, 'imbalance.ratio'),
    ('rebalance.target_ratio', 1.5, 'rebalance.target_ratio'),
    ('data.image_size', 4, 'data.image_size'),
    ('model.name', 'vgg', 'model.name'),
    ('batch_size', 0, 'batch_size'),
    ('data.source', 'web', 'data.source'),
    ('quality.reference_limit_train', -1, 'quality.reference_limit_train'),
  ],
)
def test_bad_values_are_named(key, value, fragment):
  config = config_lib.base_config()
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError, match=fragment.replace('.', r'\.')):
    config_lib.finalize(config)


def test_finalized_config_rejects_new_keys():
  config = config_lib.finalize(config_lib.base_config())
  with pytest.raises(AttributeError):
    config.data.pth = 'x'


def test_config_hash_ignores_runtime_keys_only():
  a = config_lib.base_config()
  b = config_lib.base_config()
  b.log_every_steps = 999
  b.data.num_threads = 1
  assert config_lib.config_hash(a) == config_lib.config_hash(b)
  b.seed = 1
  assert config_lib.config_hash(a) != config_lib.config_hash(b)


def test_differences_from_full_list_every_profile_change():
  assert config_lib.differences_from_full(config_lib.with_profile(config_lib.base_config(), 'full')) == []
  cpu = config_lib.with_profile(config_lib.base_config(), 'cpu')
  diffs = {k: (full, this) for k, full, this in config_lib.differences_from_full(cpu)}
  assert diffs['model.width'] == (64, 16) and diffs['gan.g_width'] == (64, 32) and 'profile' not in diffs
  cpu.num_epochs = 3  # an override is a difference too
  assert ('num_epochs', 15, 3) in config_lib.differences_from_full(cpu)


def test_reference_network_trains_on_the_whole_split_except_in_smoke_runs():
  from cxrjax.trainers import reference  # noqa: PLC0415

  for profile, rows in (('full', 0), ('cpu', 0), ('smoke', 1024)):
    config = config_lib.finalize(config_lib.with_profile(config_lib.base_config(), profile))
    ref = reference.reference_config(config)
    assert ref.data.limit_train == rows, profile  # 0: the whole real training split
    assert ref.data.limit_eval == 0 and ref.imbalance.ratio == 0.0
