"""Trainers: each exposes `train_and_evaluate(config, workdir)`; `TRAINERS` maps names to them."""

from cxrjax.trainers import classifier

TRAINERS = {
  'classifier': classifier.train_and_evaluate,
}
