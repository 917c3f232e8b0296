"""The poster's two-source protocol: Kermany's tree plus extra normals from PneumoniaMNIST.

Sources (`data.sources`, read under $CXRJAX_DATA_DIR, e.g. ../shared/data):
  chest_xray          Kermany's tree: normals and pneumonia, its own train and test splits,
                      val carved from its train (10%, grouped by patient)
  pneumoniamnist.npz  extra normals: label 0 of its train split only
Classes are normal, pneumonia (first appearance in the class maps). Training is made 3:1
normal:pneumonia by dropping pneumonia images (imbalance.minority_class=1, ratio=3); the
test split is Kermany's test split, untouched.

PneumoniaMNIST is Kermany's own images, centre-cropped and shrunk, so its "extra" normals
are mostly copies of Kermany's: near-duplicates across the sources are found and dropped
(a copy of a val or test image is never trained on; between two training copies Kermany's
stays) and counted in the banner, metrics.json and report.md. The source-shortcut check
says how well 16x16 thumbnails alone tell the sources apart within a class.

Image size 28: the extra normals exist only at 28 px, and upsampling them to a larger size
would make them blurrier than Kermany's normals, a resolution cue that marks the source (and
so the class) by itself; at 28 px both sources are at the same native resolution.

Run:
  python -m cxrjax.main --config=configs/poster_protocol.py:cpu --workdir=runs/poster-protocol-cpu
  python -m cxrjax.main --config=configs/poster_protocol.py:smoke  # capped data, one epoch
"""

from cxrjax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.sources = (
    'chest_xray | NORMAL:normal,PNEUMONIA:pneumonia | train,val,test; pneumoniamnist.npz | 0:normal | train'
  )
  config.data.image_size = 28
  config.data.source_duplicates = 'drop'
  config.data.source_check = True
  config.imbalance.minority_class = 1  # pneumonia
  config.imbalance.ratio = 3.0  # normal:pneumonia in train, as in the poster
  return config_lib.with_profile(config, arg)
