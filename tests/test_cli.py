"""The command line end to end: smoke runs on the real data, and one-line errors for bad input."""

import json
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from cxrjax.backends.cpu import process

from conftest import run_cli

pytestmark = pytest.mark.e2e

METRIC_KEYS = ('accuracy', 'balanced_accuracy', 'precision', 'recall', 'sensitivity', 'specificity', 'f1', 'mcc',
               'kappa', 'youden_j', 'auroc', 'auprc', 'confusion_matrix')  # fmt: skip


def assert_outputs(workdir):
  for name in ('metrics.json', 'report.md', 'confusion.png', 'curves.png', 'config.json', 'predictions.npz'):
    assert (workdir / name).is_file(), name
  assert any((workdir / 'tb').iterdir()), 'TensorBoard events'
  m = json.loads((workdir / 'metrics.json').read_text())
  for split in ('val', 'test'):
    for thr in ('threshold_0.5', 'youden'):
      for key in METRIC_KEYS:
        assert key in m[split][thr], (split, thr, key)
  assert m['run']['versions']['jax']
  # One CPU device and the `onednn` extra installed (the test command installs it): the CPU backend.
  backend = m['run']['backend']
  assert backend['kernels'] == 'cpu', backend
  assert backend['process']['malloc'].startswith(('glibc', 'unchanged'))  # what the CPU backend did to malloc
  for flag in process.CPU_FLAGS:
    assert flag in backend['process']['xla_flags'] and flag in m['run']['xla_flags']
  # Per-program XLA options: ResNet-18's step keeps YNN's elementwise fusion (the flags alone), the
  # initialization programs compile at optimization level 1.
  assert backend['compile_options'] == {'init': process.INIT_OPTIONS, 'resnet18': None}
  assert backend['process']['xla_cpu_pool'] == 'one XLA thread (NPROC=1)'  # asked for by ResNet-18's runs
  assert m['run']['seed'] == 0
  assert m['train']['wall_time_s'] > 0
  return m


@pytest.fixture(scope='module')
def baseline_smoke(tmp_path_factory):
  """One smoke baseline run, shared: its outputs are checked below and its export is fine-tuned."""
  wd = tmp_path_factory.mktemp('baseline') / 'run'
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={wd}'])
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


def test_smoke_baseline_on_pneumoniamnist(baseline_smoke):
  wd, r = baseline_smoke
  m = assert_outputs(wd)
  assert m['data']['source']['kind'] == 'npz' and not m['phantom']
  assert m['data']['imbalance']['counts_after'] == [1214, 405]  # before the smoke profile's cap
  assert m['data']['counts']['trained_on'] == m['data']['counts']['train_imbalanced']
  assert 'PHANTOM' not in (wd / 'report.md').read_text()
  assert 'pneumoniamnist.npz' in r.stderr  # the banner names the data
  with np.load(wd / 'predictions.npz') as z:  # each test image's source beside its name
    assert set(z['test_sources']) == {'pneumoniamnist'} and len(z['test_sources']) == len(z['test_names'])
  assert m['data']['per_source']['pneumoniamnist']['test'] == m['data']['counts']['test']
  malloc = m['run']['backend']['process']['malloc']
  if malloc.startswith('glibc'):  # and the malloc setting that trades memory for speed
    assert f'malloc: {malloc}' in r.stderr
    # The command restarted itself with the block cache preloaded (tests/test_cpu_process.py).
    if shutil.which('cc') or shutil.which('gcc'):
      assert malloc.endswith("blocks >= 64 MB from cxrjax's block cache (LD_PRELOAD)"), m['run']
  # The kernels in use, said in both places.
  assert m['run']['backend']['description'].startswith('cpu (oneDNN 3.'), m['run']['backend']
  assert f'kernels: {m["run"]["backend"]["description"]}' in r.stderr


def test_finetune_from_an_export_with_a_frozen_backbone_epoch(baseline_smoke, tmp_path):
  # The fine-tuning machinery end to end: the baseline's export as the pretrained network, a new
  # head, one epoch with the backbone frozen, then all layers at half the learning rate.
  export = baseline_smoke[0] / 'export'
  wd = tmp_path / 'finetune'
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={wd}', f'--config.model.pretrained={export}',
               '--config.num_epochs=2', '--config.optim.freeze_backbone_epochs=1',
               '--config.optim.backbone_lr_mult=0.5'])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  m = assert_outputs(wd)
  ft = m['finetune']
  p = ft['pretrained']
  assert p['format'] == 'export' and p['path'] == str(export) and len(p['sha256']) == 64
  assert p['head'] == 'reinitialised' and p['reinitialised'] == ['params/head/bias', 'params/head/kernel']
  assert p['tensors'] > 50 and not p['ignored']
  assert ft['input_norm'] == 'none'  # the export's own input path (a from-scratch grayscale run)
  assert ft['freeze_backbone_steps'] == m['train']['steps_per_epoch']
  assert ft['trained'].startswith('the head only for') and '0.5x the learning rate' in ft['trained']
  report = (wd / 'report.md').read_text()
  assert f'- Started from: `{export}` (export' in report and p['sha256'] in report
  assert '[classifier] starting from' in r.stderr


def test_smoke_on_kermany_folder(tmp_path, chest_xray):
  wd = tmp_path / 'run'
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={wd}', f'--config.data.path={chest_xray}',
               f'--config.data.cache_dir={tmp_path / "cache"}'])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  m = assert_outputs(wd)
  assert m['data']['source']['kind'] == 'folder'
  assert m['data']['class_names'] == ['NORMAL', 'PNEUMONIA']


def test_phantom_is_labelled_everywhere(tmp_path):
  wd = tmp_path / 'run'
  r = run_cli(['--config=configs/baseline.py:smoke', f'--workdir={wd}', '--config.data.source=phantom'])
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((wd / 'metrics.json').read_text())
  assert m['phantom'] is True
  assert 'PHANTOM' in (wd / 'report.md').read_text()
  assert 'PHANTOM' in r.stderr


def _bad_npz(tmp_path, mutate):
  rng = np.random.default_rng(0)
  arrays = {}
  for s, n in (('train', 40), ('val', 10), ('test', 10)):
    arrays[f'{s}_images'] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    arrays[f'{s}_labels'] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
  mutate(arrays)
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  return path


def _corrupt_tree(tmp_path, chest_xray):
  root = tmp_path / 'tree'
  for split in ('train', 'test'):
    for cls in ('NORMAL', 'PNEUMONIA'):
      (root / split / cls).mkdir(parents=True)
      for f in sorted((chest_xray / split / cls).iterdir())[:4]:
        (root / split / cls / f.name).write_bytes(f.read_bytes())
  victim = sorted((root / 'train' / 'PNEUMONIA').iterdir())[0]
  victim.write_bytes(victim.read_bytes()[:500])
  return root, victim.name


def _ambiguous_tree(tmp_path):
  """root/{part1,part2}/<class>/*.png: split folders under names that are not recognised."""
  root = tmp_path / 'ambiguous'
  for split in ('part1', 'part2'):
    for cls in ('glioma', 'notumor'):
      (root / split / cls).mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / split / cls / f'{i}.png')
  return root


BAD_INPUTS = {
  'missing path': (lambda tmp, cx: ['--config.data.path=/no/such/file.npz'], "'/no/such/file.npz': no such file"),
  'npz without key': (
    lambda tmp, cx: [f'--config.data.path={_bad_npz(tmp, lambda a: a.pop("train_labels"))}'],
    'missing key train_labels',
  ),
  'npz wrong shape': (
    lambda tmp, cx: [
      f'--config.data.path={_bad_npz(tmp, lambda a: a.update(val_images=a["val_images"][:, :, :, None, None]))}'
    ],
    'val_images: shape',
  ),
  'labels out of range': (
    lambda tmp, cx: [
      f'--config.data.path={_bad_npz(tmp, lambda a: a.update(test_labels=a["test_labels"] + 7))}',
      '--config.data.num_classes=2',
    ],
    'test_labels: labels range',
  ),
  'corrupt jpeg': (
    lambda tmp, cx: [f'--config.data.path={_corrupt_tree(tmp, cx)[0]}', f'--config.data.cache_dir={tmp / "c"}'],
    'unreadable image',
  ),
  'ambiguous folder tree': (
    lambda tmp, cx: [f'--config.data.path={_ambiguous_tree(tmp)}', f'--config.data.cache_dir={tmp / "c"}'],
    "holds the same ones: if those are splits, say which is which with data.split_dirs='train=part1,test=part2'",
  ),
  'missing source path': (
    lambda tmp, cx: ['--config.data.sources=nowhere | *:normal; pneumoniamnist.npz | 1:pneumonia'],
    "config.data.sources entry 1 path 'nowhere': no such file or folder",
  ),
  'source class mapped twice': (
    lambda tmp, cx: ['--config.data.sources=chest_xray | NORMAL:normal,NORMAL:pneumonia'],
    "class 'NORMAL' mapped twice (to 'normal' and 'pneumonia')",
  ),
  'unknown config key': (
    lambda tmp, cx: ['--config.data.pth=x'],
    "unknown config key 'data.pth'; did you mean data.path",
  ),
  'mistyped value': (lambda tmp, cx: ['--config.num_epochs=many'], 'num_epochs'),
  'missing weights file': (
    lambda tmp, cx: [f'--config.model.pretrained={tmp / "resnet18.pth"}'],
    'resnet18.pth: weights file not found',
  ),
  'bad profile': (lambda tmp, cx: [], 'expected one of full, cpu, smoke'),
  'batch vs devices': (
    lambda tmp, cx: ['--config.batch_size=30'],
    'batch_size=30: expected a multiple of the 8 devices',
  ),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_outputs(case, tmp_path, chest_xray):
  make_args, fragment = BAD_INPUTS[case]
  wd = tmp_path / 'out'
  config = '--config=configs/baseline.py:turbo' if case == 'bad profile' else '--config=configs/baseline.py:smoke'
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'} if case == 'batch vs devices' else None
  r = run_cli([config, f'--workdir={wd}', *make_args(tmp_path, chest_xray)], env=env)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('cxrjax: error:')]
  assert len(errors) == 1, r.stderr[-2000:]
  assert fragment in errors[0], errors[0]
  assert 'Traceback' not in r.stderr
  assert not wd.exists() or not os.listdir(wd), 'no outputs may be written for bad input'


def test_error_is_one_whole_line_while_other_threads_print(capfd):
  # orbax's background threads can still be writing tracebacks when a failed restore ends the
  # run; the error goes out in one write, on a line of its own, so it is never split or prefixed.
  # (The thread is the original scenario; fail() now starts a fresh line with or without it.)
  from cxrjax import main  # noqa: PLC0415

  stop = threading.Event()
  thread = threading.Thread(target=stop.wait)
  thread.start()
  try:
    with pytest.raises(SystemExit) as e:
      main.fail('ckpt/10: checkpoint does not\n   match this model')
  finally:
    stop.set()
    thread.join()
  assert e.value.code == 2
  assert capfd.readouterr().err == '\ncxrjax: error: ckpt/10: checkpoint does not match this model\n'
