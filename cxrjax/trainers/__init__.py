"""Trainers: each exposes `train_and_evaluate(config, workdir, backend)`; `TRAINERS` maps names to them.

'gan' and 'ldm' are the generative-oversampling pipeline (`generative.py`) with
the generator of that kind (`generative.GENERATORS`). The classifier is
given the reference network's encoder (`reference.py`) for SMOTE in feature
space: the trainer and the data layer sit below that network and do not import it.
"""

import functools

from cxrjax.trainers import classifier, generative, reference

TRAINERS = {
  'classifier': functools.partial(classifier.train_and_evaluate, feature_encoder=reference.feature_encoder),
  'gan': generative.train_and_evaluate,
  'ldm': generative.train_and_evaluate,
}
