"""timm / DINOv2 ViT state dict -> `qaff_jax.models.vit.VisionTransformer`.

Key layout (timm `vit_small_patch16_224`, DINOv2 `dinov2_vits14[_reg]`; timm's
`vit_*_dinov2` ports use the same names):

  Flax                              torch key                     transform
  patch_embed/proj/kernel [p,p,3,D] patch_embed.proj.weight [D,3,p,p]  OIHW->HWIO
  blocks/i/norm1/scale, bias        blocks.i.norm1.weight, .bias
  blocks/i/attn/qkv/kernel [D, 3D]  blocks.i.attn.qkv.weight [3D, D]  transpose
  blocks/i/attn/proj/kernel         blocks.i.attn.proj.weight          transpose
  blocks/i/ls1/gamma                blocks.i.ls1.gamma   (DINOv2 LayerScale)
  blocks/i/mlp/fc1/kernel, fc2      blocks.i.mlp.fc1.weight, fc2       transpose
  norm/scale, bias                  norm.weight, norm.bias
  cls_token [1, 1, D]               cls_token (+ pos_embed[:, 0] folded in)
  reg_token [1, R, D]               reg_token (timm) | register_tokens (DINOv2)
  pos_embed [1, gh, gw, D]          pos_embed [1, n_prefix + g*g, D]

`pos_embed` holds 0 (timm `no_embed_class`), 1 (class token) or 1 + R (class
and registers) prefix rows; the prefix rows are added to the tokens they
belong to (exact: a constant plus a constant), and the g x g patch grid is
resampled bicubically to the model's grid when they differ (reported in the
notes). DINOv2 training checkpoints with chunked blocks
(`blocks.<chunk>.<i>.*`) are read as `blocks.<i>.*`. Left out on purpose:
the classifier `head.*` and DINOv2's `mask_token`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import numpy as np

from qaff_jax.convert import common

IGNORABLE = (r"^head\.", r"^mask_token$")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "gamma": "gamma"}
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def unchunk(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """DINOv2 'blocks.<chunk>.<i>.x' keys -> 'blocks.<i>.x' (others unchanged)."""
  return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in tensors.items()}


def torch_key(path: tuple[str, ...]) -> str:
  """Flax path ('blocks', '3', 'norm1', 'scale') -> 'blocks.3.norm1.weight'."""
  return common.torch_name(path, _LEAF_TO_TORCH)


_transform = common.kernel_transform


def _split_pos_embed(pos: np.ndarray, registers: int
                     ) -> tuple[np.ndarray, int] | None:
  """(prefix rows, grid side) of a [1, L, D] table, or None if no layout fits."""
  length = pos.shape[1]
  for n_prefix in (1, 0, 1 + registers):
    side = math.isqrt(max(length - n_prefix, 0))
    if side > 0 and side * side == length - n_prefix:
      return pos[:, :n_prefix], side
  return None


def convert_vit(tensors: Mapping[str, np.ndarray], make: Callable[..., Any],
                *, source: str = "<state dict>", arch: str = "vit",
                allow_unused: bool = False) -> common.Converted:
  """Maps a timm/DINOv2-layout ViT state dict onto the backbone `make` builds.

  Args:
    tensors: {torch key: array} (see `common.read_state_dict`).
    make: backbone builder, e.g. `models.vit.vit_small_patch14`.
    source: file name for messages.
    arch: architecture name for messages.
    allow_unused: accept unexpected extra keys.

  Returns:
    The converted params (the model has no other state).

  Raises:
    common.ConversionError: missing keys, shape mismatches (including patch
      size, width, register count) or unexpected keys, naming `source`.
  """
  # pylint: disable-next=import-outside-toplevel
  from qaff_jax.models import vit as vit_lib

  tensors = unchunk(tensors)
  if "register_tokens" in tensors and "reg_token" not in tensors:
    tensors = dict(tensors)
    tensors["reg_token"] = tensors.pop("register_tokens")
  model, params, rest = common.abstract_backbone(make)
  matcher = common.KeyMatcher(tensors, source, arch)
  notes = []
  registers = model.num_registers
  width = model.out_features
  file_registers = (tensors["reg_token"].shape[1]
                    if "reg_token" in tensors else 0)
  if file_registers != registers:
    matcher.mismatch(f"the file has {file_registers} register tokens, "
                     f"--arch {arch} has {registers}")

  # Position embeddings: fold prefix rows into the tokens, resample the grid.
  prefix_pos = np.zeros((1, 0, width), np.float32)
  grid_pos = None
  pos = matcher.get("pos_embed")
  if pos is not None:
    split = _split_pos_embed(pos, file_registers)
    if pos.ndim != 3 or pos.shape[-1] != width or split is None:
      matcher.mismatch(f"pos_embed: file has {tuple(pos.shape)}, --arch "
                       f"{arch} wants [1, prefix + g*g, {width}]")
    else:
      prefix_pos, side = split
      prefix_pos = prefix_pos.astype(np.float32)
      grid_pos = pos[:, prefix_pos.shape[1]:].reshape(1, side, side, width)
      grid_pos = grid_pos.astype(np.float32)
      if (side, side) != model.grid:
        notes.append(f"pos_embed resampled (bicubic) from {side}x{side} to "
                     f"{model.grid[0]}x{model.grid[1]}")
        grid_pos = np.asarray(vit_lib.resample_pos_embed(grid_pos, model.grid))
      if prefix_pos.shape[1]:
        notes.append(f"{prefix_pos.shape[1]} prefix row(s) of pos_embed "
                     f"folded into cls_token/reg_token")

  def value_of(path, leaf):
    shape = tuple(leaf.shape)
    if path == ("pos_embed",):
      return None if grid_pos is None else grid_pos.astype(leaf.dtype)
    got = matcher.take(torch_key(path) if path[-1] in _LEAF_TO_TORCH
                       else ".".join(path), shape,
                       _transform(path, len(shape)))
    if got is None:
      return None
    got = np.asarray(got, np.float32)
    if path == ("cls_token",) and prefix_pos.shape[1] >= 1:
      got = got + prefix_pos[:, :1]
    if path == ("reg_token",) and prefix_pos.shape[1] == 1 + registers:
      got = got + prefix_pos[:, 1:]
    return got.astype(leaf.dtype)

  out_params = common.fill(params, value_of)
  out_state = common.fill(rest, value_of)
  unused = matcher.finish(IGNORABLE, allow_unused=allow_unused)
  return common.Converted(out_params, out_state, sorted(matcher.used), unused,
                          notes)
