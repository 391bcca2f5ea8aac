r"""GLDv2-clean, ResNet-101 + QAFF head, ArcFace (the DELG/DOLG/SpCa training recipe).

python -m qaff_jax.train --config configs/gldv2.py --workdir /runs/r101 \
    --config.data.train_files='/data/gldv2/train/train-*-of-*'

Variants after the colon: `configs/gldv2.py:backbone=resnet50`, `:head=gem` (or any
head in qaff_jax.models.HEADS),
`configs/gldv2.py:runlocal` (tiny model, few steps: the same code path on a laptop).
Recipe: 512 px crops, global batch 256, SGD nesterov 0.9, lr 0.01, wd 1e-4,
5 warm-up epochs then cosine, ArcFace s=30 m=0.15 (SpCa, DOLG, MadaCos papers).
"""

from qaff_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, backbone="resnet101", head="qaff",
                             runlocal=False, epochs=50.0)
  c = config_lib.base_config()
  c.model.backbone = arg.backbone
  c.model.head = arg.head
  c.num_epochs = arg.epochs
  if arg.head == "qaff":
    c.loss.aux_weight = 0.25     # one auxiliary ArcFace per feature type
  c.eval.at_end = True
  if arg.runlocal:
    config_lib.shrink_for_local_run(c)
  return c
