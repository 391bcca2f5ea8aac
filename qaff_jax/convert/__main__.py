r"""Convert a PyTorch / timm / DINOv2 checkpoint into an `--init_from` folder.

python -m qaff_jax.convert --from resnet101.safetensors --arch resnet101 \
    --out weights/resnet101
python -m qaff_jax.train --config configs/gldv2.py:backbone=resnet101 \
    --workdir runs/r101 --init_from weights/resnet101
python -m qaff_jax.convert --from spca.pth --arch spca_r101 --out weights/spca_r101
"""

import sys

from absl import flags
from absl import logging

from qaff_jax import cli_util

_FROM = flags.DEFINE_string(
    "from", None, "Source weights: .safetensors (no PyTorch needed) or "
    ".pth/.pt (needs the torch extra).")
_ARCH = flags.DEFINE_string("arch", None, "Backbone name (models.BACKBONES), or "
                            "spca_r101 / spca_r50 for an official SpCa checkpoint "
                            "(backbone + head).")
_OUT = flags.DEFINE_string("out", None, "Output checkpoint folder (new).")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step number to write.")
_STRIP = flags.DEFINE_string(
    "strip_prefix", "", "Key prefix to remove, e.g. 'backbone.' ('module.' "
    "is always removed).")
_ALLOW_UNUSED = flags.DEFINE_bool(
    "allow_unused", False, "Drop unexpected extra keys instead of failing.")
flags.mark_flags_as_required(["from", "arch", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's INFO chatter
  from qaff_jax import convert  # pylint: disable=import-outside-toplevel
  from qaff_jax.convert import common  # pylint: disable=import-outside-toplevel

  try:
    converted, folder = convert.convert_file(
        _FROM.value, _ARCH.value, _OUT.value, step=_STEP.value,
        strip_prefix=_STRIP.value, allow_unused=_ALLOW_UNUSED.value)
  except convert.ConversionError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
  print(f"converted {len(converted.used)} tensors from {_FROM.value} "
        f"for --arch {_ARCH.value}")
  print(f"left out {len(converted.unused)}: "
        f"{common.summarize_keys(converted.unused)}")
  for note in converted.notes:
    print(f"note: {note}")
  print(f"wrote {folder} (use --init_from {folder})")


if __name__ == "__main__":
  cli_util.run(main, example="python -m qaff_jax.convert --from resnet101.safetensors "
               "--arch resnet101 --out weights/resnet101")
