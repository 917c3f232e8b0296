"""The Grain pipeline: epochs are permutations, resume is exact, process shards tile the batch."""

import numpy as np

from cxrjax.data import pipeline
from cxrjax.data.augment import AugmentParams
from cxrjax.data.dataset import Split
from cxrjax.data.rebalance import TrainingSet


def training_set(n=50):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(8, 1).repeat(8, 2)
  labels = (np.arange(n) % 2).astype(np.int32)
  names = np.array([f'r{i}' for i in range(n)])
  pool = Split(images, labels, names, names)
  return TrainingSet(pool, np.arange(n), np.zeros(n, bool), np.full(n, 'real'), np.array([1.0, 3.0], np.float32), 'x')


def ids(batch):
  return batch['image'][:, 0, 0, 0].astype(int)


def test_each_epoch_is_a_fresh_permutation_without_remainder():
  ts = training_set(50)
  ds = pipeline.make_train_dataset(ts, global_batch=8, num_epochs=3, seed=0, augment=AugmentParams())
  assert len(ds) == 3 * 6  # 50 // 8 = 6 steps per epoch, remainder dropped
  epochs = [np.concatenate([ids(ds[e * 6 + s]) for s in range(6)]) for e in range(3)]
  for e in epochs:
    assert len(set(e)) == 48
  assert not np.array_equal(epochs[0], epochs[1])


def test_weights_follow_labels():
  ts = training_set(20)
  ds = pipeline.make_train_dataset(ts, global_batch=4, num_epochs=1, seed=0, augment=AugmentParams())
  b = ds[0]
  np.testing.assert_array_equal(b['weight'], np.where(b['label'] == 1, 3.0, 1.0))


def test_resume_from_step_equals_uninterrupted():
  ts = training_set(40)
  aug = AugmentParams(crop_pad=2, rotate_deg=10, brightness=0.1)
  ds = pipeline.make_train_dataset(ts, global_batch=8, num_epochs=3, seed=3, augment=aug)
  full = list(pipeline.train_iterator(ds, 0, num_threads=2))
  resumed = list(pipeline.train_iterator(ds, 7, num_threads=1))
  assert len(full) == 15 and len(resumed) == 8
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_process_shards_tile_the_global_batch():
  ts = training_set(40)
  aug = AugmentParams(crop_pad=2, rotate_deg=10)
  one = pipeline.make_train_dataset(ts, global_batch=8, num_epochs=2, seed=1, augment=aug)
  parts = [
    pipeline.make_train_dataset(ts, global_batch=8, num_epochs=2, seed=1, augment=aug, process_index=p, process_count=2)
    for p in range(2)
  ]
  for step in range(len(one)):
    joined = np.concatenate([parts[0][step]['image'], parts[1][step]['image']])
    np.testing.assert_array_equal(joined, one[step]['image'])


def test_eval_batches_cover_split_once_with_padding():
  ts = training_set(21)
  seen = []
  for images, _, mask in pipeline.eval_batches(ts.pool, 8):
    assert len(images) == 8
    seen += list(images[mask][:, 0, 0, 0])
  assert seen == list(range(21))
