"""torchvision / timm ResNet state dict -> `qaff_jax.models.resnet.ResNet`.

timm's plain ResNets (resnet18..152, including the `a1_in1k`-style recipes)
use torchvision's key names, so one map serves both. The Flax module tree
mirrors torchvision (see `models/resnet.py`), so a key is the Flax path joined
by dots with the leaf renamed:

  Flax (params / model_state)           torch key                 transform
  conv1/kernel      [7, 7, 3, 64]       conv1.weight [64, 3, 7, 7]  OIHW -> HWIO
  bn1/scale, bn1/bias                   bn1.weight, bn1.bias
  bn1/mean, bn1/var  (model_state)      bn1.running_mean, bn1.running_var
  layer1/0/downsample/0/kernel          layer1.0.downsample.0.weight
  layer1/0/downsample/1/mean            layer1.0.downsample.1.running_mean

Left out on purpose: the classifier `fc.*` and BatchNorm's
`num_batches_tracked` counters. Any other unused key (e.g. layer3.6+ when
resnet101 weights are read for --arch resnet50) is an error, as is any missing
key or wrong shape. Variants with other stems/shortcuts (timm resnet50d's
deep stem, avg-pool downsample) do not match and are reported as such.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from qaff_jax.convert import common

IGNORABLE = (r"^fc\.", r"num_batches_tracked$")

_LEAF_TO_TORCH = {
    "kernel": "weight", "scale": "weight", "bias": "bias",
    "mean": "running_mean", "var": "running_var",
}


def torch_key(path: tuple[str, ...]) -> str:
  """Flax path ('layer1', '0', 'bn1', 'mean') -> 'layer1.0.bn1.running_mean'."""
  return common.torch_name(path, _LEAF_TO_TORCH)


_transform = common.kernel_transform


def convert_resnet(tensors: Mapping[str, np.ndarray],
                   make: Callable[..., Any], *, source: str = "<state dict>",
                   arch: str = "resnet", allow_unused: bool = False
                   ) -> common.Converted:
  """Maps a torchvision-layout ResNet state dict onto the backbone `make` builds.

  Args:
    tensors: {torch key: array} (see `common.read_state_dict`).
    make: backbone builder, e.g. `models.resnet.resnet101` (called as
      `make(rngs=...)` under `nnx.eval_shape`; nothing is materialised).
    source: file name for messages.
    arch: architecture name for messages.
    allow_unused: accept unexpected extra keys.

  Returns:
    The converted params/model_state (float32 arrays of the model's shapes).

  Raises:
    common.ConversionError: missing keys, shape mismatches or unexpected keys,
      all listed, naming `source`.
  """
  _, params, rest = common.abstract_backbone(make)
  matcher = common.KeyMatcher(tensors, source, arch)

  def value_of(path, leaf):
    got = matcher.take(torch_key(path), tuple(leaf.shape),
                       _transform(path, len(leaf.shape)))
    return None if got is None else np.asarray(got, leaf.dtype)

  out_params = common.fill(params, value_of)
  out_state = common.fill(rest, value_of)
  unused = matcher.finish(IGNORABLE, allow_unused=allow_unused)
  return common.Converted(out_params, out_state, sorted(matcher.used), unused,
                          notes=[])
