"""Trainers: each exposes `train_and_evaluate(config, workdir)`; `TRAINERS` maps names to them.

'gan' and 'ldm' are the generative-oversampling pipeline (`generative.py`) with
the generator backend of that name (`GENERATORS`): a module with
`train(config, gen_dir, data, mesh, needed) -> (record, handle)` and
`synthesize(config, handle, data, labels) -> uint8 images`.
"""

from cxrjax.trainers import classifier, gan, generative, ldm

GENERATORS = {
  'gan': gan,
  'ldm': ldm,
}

TRAINERS = {
  'classifier': classifier.train_and_evaluate,
  'gan': generative.train_and_evaluate,
  'ldm': generative.train_and_evaluate,
}
