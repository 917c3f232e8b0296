"""PneumoniaMNIST (all MedMNIST+ sizes) through TFDS, without TensorFlow.

The TFDS catalog builder `pneumonia_mnist` needs TensorFlow to prepare (it
reads with tf.io.gfile and encodes Image features). This builder of our own
stores uint8 `Tensor` features in array_record files, which prepare and read
back (`tfds.data_source`) with no TensorFlow installed. It downloads the
official MedMNIST npz from Zenodo, or reads it from a manual folder
(`$CXRJAX_DATA_DIR` or `data.tfds_dir/downloads/manual`) when offline.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse

import numpy as np

from cxrjax.data.dataset import Dataset, Split
from cxrjax.errors import UserError

# Official MedMNIST v2/+ files (Zenodo record 10519652).
URLS = {
  28: 'https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1',
  64: 'https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1',
  128: 'https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1',
  224: 'https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1',
}
MD5 = {28: '28209eda62fecd6e6a2d98b1501bb15f'}
CLASS_NAMES = ('normal', 'pneumonia')


@functools.cache  # TFDS registers builder classes by name: define it once
def _builder_class():
  import tensorflow_datasets as tfds  # noqa: PLC0415 - slow import, only when used

  class CxrjaxPneumoniaMnist(tfds.core.GeneratorBasedBuilder):
    """MedMNIST PneumoniaMNIST with uint8 Tensor images (no TensorFlow needed)."""

    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f's{s}', description=f'{s}x{s} pixels') for s in URLS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place pneumoniamnist[_SIZE].npz from MedMNIST in the manual folder.'

    def _info(self):
      s = int(self.builder_config.name[1:])
      return tfds.core.DatasetInfo(
        builder=self,
        description='PneumoniaMNIST (MedMNIST v2), uint8 images as Tensor features.',
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
          }
        ),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # keep the npz order, so row i is the npz's row i
        homepage='https://medmnist.com/',
        citation='Yang et al., MedMNIST v2, Scientific Data 10, 41 (2023)',
      )

    def _split_generators(self, dl_manager):
      s = int(self.builder_config.name[1:])
      fname = 'pneumoniamnist.npz' if s == 28 else f'pneumoniamnist_{s}.npz'
      manual = None
      try:
        manual = dl_manager.manual_dir
      except Exception:  # noqa: BLE001 - no manual dir configured
        manual = None
      if manual is not None and os.path.isfile(os.path.join(manual, fname)):
        path = os.path.join(manual, fname)
      else:
        path = dl_manager.download(URLS[s])
      return {split: self._generate_examples(path, split) for split in ('train', 'val', 'test')}

    def _generate_examples(self, path, split):
      with np.load(path, allow_pickle=False) as z:
        images = z[f'{split}_images']
        labels = z[f'{split}_labels'].reshape(-1)
      for i, (img, lab) in enumerate(zip(images, labels)):
        yield i, {'image': img.reshape(img.shape[0], img.shape[1], 1), 'label': int(lab)}

  return CxrjaxPneumoniaMnist


def _reachable(url: str, timeout: float = 3.0) -> bool:
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  try:
    socket.create_connection((parts.hostname, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _data_dir(tfds_dir: str) -> str:
  return tfds_dir or os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def make_builder(size: int, tfds_dir: str = ''):
  if size not in URLS:
    raise UserError(f'data.image_size={size}: PneumoniaMNIST exists at {sorted(URLS)} px through TFDS')
  cls = _builder_class()
  return cls(config=f's{size}', data_dir=_data_dir(tfds_dir), file_format='array_record')


def is_prepared(name: str, size: int, tfds_dir: str = '') -> bool:
  if size not in URLS or name != 'cxrjax_pneumonia_mnist':
    return False
  path = os.path.join(_data_dir(tfds_dir), name, f's{size}', '1.0.0')
  return os.path.isfile(os.path.join(path, 'dataset_info.json'))


def prepare(size: int, tfds_dir: str = '', manual_dir: str = '') -> str:
  """Downloads (or reads from `manual_dir`) and prepares the dataset; returns its folder."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  builder = make_builder(size, tfds_dir)
  manual = manual_dir or os.environ.get('CXRJAX_DATA_DIR', '') or None
  fname = 'pneumoniamnist.npz' if size == 28 else f'pneumoniamnist_{size}.npz'
  if not (manual and os.path.isfile(os.path.join(manual, fname))) and not _reachable(URLS[size]):
    # Fail in seconds: TFDS would retry an unreachable download for minutes.
    raise UserError(
      f'TFDS cannot download PneumoniaMNIST-{size} ({urllib.parse.urlsplit(URLS[size]).netloc} unreachable: offline?);'
      f' point data.path (or $CXRJAX_DATA_DIR) at a local {fname} from https://medmnist.com/'
    )
  config = tfds.download.DownloadConfig(manual_dir=manual)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:
    raise UserError(
      f'TFDS could not prepare PneumoniaMNIST-{size} ({type(e).__name__}: {str(e)[:120]}); offline, point'
      ' data.path (or $CXRJAX_DATA_DIR) at a local pneumoniamnist npz from https://medmnist.com/'
    ) from e
  return builder.data_dir


def load(name: str, size: int, channels: int, tfds_dir: str = '', download: bool = True) -> Dataset:
  """Reads the prepared array_record dataset through `tfds.data_source` (no TensorFlow)."""
  if name != 'cxrjax_pneumonia_mnist':
    raise UserError(f'data.tfds_name={name!r}: expected cxrjax_pneumonia_mnist (other TFDS datasets need TensorFlow)')
  if size not in URLS:
    raise UserError(f'data.image_size={size}: PneumoniaMNIST exists at {sorted(URLS)} px through TFDS')
  if not is_prepared(name, size, tfds_dir):
    if not download:
      raise UserError(f'TFDS dataset {name}/s{size} is not prepared in {_data_dir(tfds_dir)}')
    prepare(size, tfds_dir)
  builder = make_builder(size, tfds_dir)
  splits = {}
  for split in ('train', 'val', 'test'):
    src = builder.as_data_source(split=split)
    n = len(src)
    images = np.empty((n, size, size, 1), np.uint8)
    labels = np.empty(n, np.int32)
    batch = 512
    for start in range(0, n, batch):
      records = src.__getitems__(list(range(start, min(start + batch, n))))
      for j, r in enumerate(records):
        images[start + j] = r['image']
        labels[start + j] = r['label']
    if channels == 3:
      images = np.repeat(images, 3, axis=-1)
    names = np.array([f'tfds:{split}[{i}]' for i in range(n)])
    splits[split] = Split(images, labels, names.copy(), names)
  source = dict(
    kind='tfds',
    path=builder.data_dir,
    phantom=False,
    description=f'TFDS {name}/s{size} at {builder.data_dir} (array_record, read without TensorFlow)',
  )
  return Dataset(splits, CLASS_NAMES, source)
