r"""Weight import: PyTorch / timm / DINOv2 checkpoints -> Orbax backbone checkpoints.

python -m qaff_jax.convert --from resnet101.safetensors --arch resnet101 \
    --out weights/resnet101

The output folder is what `python -m qaff_jax.train --init_from` takes. One
converter per backbone family, each with a key map and a parity test:

  torch_resnet   torchvision / timm ResNets  -> models.resnet
  vit            timm ViT / DINOv2           -> models.vit
  spca           official SpCa checkpoints   -> a whole head='spca' model
                 (--arch spca_r101 / spca_r50; backbone + SC-GeM head)

`.safetensors` files need no PyTorch; `.pth`/`.pt` need the `torch` extra and
are read with `torch.load(weights_only=True)` (no code runs from the file).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from qaff_jax.convert.common import ConversionError
from qaff_jax.convert.common import Converted
from qaff_jax.convert.common import materialize
from qaff_jax.convert.common import read_state_dict
from qaff_jax.convert.common import save_backbone
from qaff_jax.convert import spca
from qaff_jax.convert.torch_resnet import convert_resnet
from qaff_jax.convert.vit import convert_vit


def converter_for(arch: str):
  """The converter function for a `models.BACKBONES` name or an SpCa arch."""
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  if spca.backbone_for(arch) is not None:
    return spca.convert_spca
  if arch not in models.BACKBONES:
    raise ConversionError(f"unknown --arch {arch!r}; choose one of "
                          f"{sorted(models.BACKBONES) + sorted(spca.ARCHS)}")
  if arch.startswith("resnet"):
    return convert_resnet
  if arch.startswith("vit"):
    return convert_vit
  raise ConversionError(f"--arch {arch}: no PyTorch weight import for this "
                        f"backbone family (ResNet and ViT only)")


def convert_tensors(tensors: Mapping[str, Any], arch: str, *,
                    source: str = "<state dict>", allow_unused: bool = False
                    ) -> Converted:
  """Converts an in-memory state dict for the backbone `arch`."""
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  convert = converter_for(arch)
  if convert is spca.convert_spca:
    return convert(tensors, backbone=spca.backbone_for(arch), source=source,
                   arch=arch, allow_unused=allow_unused)
  return convert(tensors, models.BACKBONES[arch], source=source, arch=arch,
                 allow_unused=allow_unused)


def convert_file(path: str, arch: str, out: str, *, step: int = 0,
                 strip_prefix: str = "", allow_unused: bool = False
                 ) -> tuple[Converted, str]:
  """Reads `path`, converts it for `arch`, writes the Orbax checkpoint to `out`.

  Returns:
    (the conversion, the absolute checkpoint folder).

  Raises:
    ConversionError: the file cannot be read or does not fit `arch`; the
      message names the file and every problem.
  """
  converter_for(arch)  # fail on a bad --arch before reading a big file
  tensors = read_state_dict(path, strip_prefix=strip_prefix)
  converted = convert_tensors(tensors, arch, source=path,
                              allow_unused=allow_unused)
  folder = save_backbone(out, converted, step=step, info={
      "source": os.path.abspath(path), "arch": arch},
      whole_net=spca.backbone_for(arch) is not None)
  return converted, folder


def load_backbone(folder: str, arch: str, **kwargs):
  """The backbone `arch` (`models.BACKBONES`) holding a converted checkpoint.

  `folder` is what `convert_file` wrote; `kwargs` go to the backbone builder
  (e.g. `output_stride=16`). The module starts in train mode; call `.eval()`
  for inference.
  """
  from qaff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from qaff_jax import models  # pylint: disable=import-outside-toplevel

  tree = checkpoint.restore_params_from(folder)
  return materialize(models.BACKBONES[arch],
                     tree["params"]["net"]["backbone"],
                     tree["model_state"]["net"]["backbone"], **kwargs)


__all__ = [
    "ConversionError", "Converted", "convert_file", "convert_resnet",
    "convert_tensors", "convert_vit", "converter_for", "load_backbone",
    "materialize", "read_state_dict", "save_backbone", "spca",
]
