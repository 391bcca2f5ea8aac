r"""RGLDv2-clean: GLDv2-clean without the classes that overlap ROxf/RPar.

python -m qaff_jax.train --config configs/rgldv2.py --workdir /runs/rgld \
    --config.data.train_files='/data/gldv2/train/train-*-of-*' \
    --config.data.class_allowlist=rgldv2_clean_labels.txt

The allowlist is a text file with one kept GLDv2-clean label per line; records of
other classes are dropped and the kept labels are relabelled 0..N-1.
Same variants and recipe as configs/gldv2.py.
"""

import os

from qaff_jax import config_lib


def _gldv2():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "gldv2.py"))


def get_config(arg=None):
  c = _gldv2().get_config(arg)
  c.data.class_allowlist = "rgldv2_clean_labels.txt"
  c.data.relabel = True
  c.data.num_classes = 0         # counted from the allowlist at start-up
  c.data.num_train_images = 1_200_000  # approximate; sets epoch length only
  return c
