"""The whole retrieval model: backbone -> feature map -> head -> descriptor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def downsample_mask(mask: jax.Array, size: tuple[int, int], stride: int
                    ) -> jax.Array:
  """Pixel mask [B, H, W] -> feature-cell mask [B, h, w] float32 in {0, 1}.

  Rule: feature cell (i, j) covers the input pixels
  [i*stride, (i+1)*stride) x [j*stride, (j+1)*stride) and is valid if ANY of
  them is valid. For an image of valid size (Hv, Wv) padded at the bottom/right
  this marks exactly ceil(Hv/stride) x ceil(Wv/stride) cells, i.e. the size of
  the feature map the unpadded image would give, so padded and unpadded
  extraction pool over the same cells.

  Args:
    mask: [B, H, W]; > 0 marks a valid pixel.
    size: (h, w) of the feature map.
    stride: input pixels per feature cell.

  Returns:
    [B, h, w] float32.
  """
  h, w = size
  m = (mask > 0).astype(jnp.float32)
  b = m.shape[0]
  # Pad (with invalid pixels) or crop to exactly h*stride x w*stride.
  m = m[:, :h * stride, :w * stride]
  m = jnp.pad(m, ((0, 0), (0, h * stride - m.shape[1]),
                  (0, w * stride - m.shape[2])))
  return m.reshape(b, h, stride, w, stride).max(axis=(2, 4))


class RetrievalModel(nnx.Module):
  """`backbone` (images -> NHWC feature map) followed by a `head` (see heads).

  The backbone must expose `output_stride` and `dtype`; when the head asks for
  earlier stages (`head.stages`), also `__call__(x, return_stages=True)`
  returning a dict whose "layer4" entry is the last map.
  """

  def __init__(self, backbone: nnx.Module, head: nnx.Module, *,
               dtype=None):
    """Builds the model.

    Args:
      backbone: images -> feature map (e.g. `resnet.ResNet`).
      head: feature map -> dict with "descriptor" (e.g. `heads.GeMHead`).
      dtype: compute dtype the images are cast to; `backbone.dtype` if None.
    """
    self.backbone = backbone
    self.head = head
    self.dtype = backbone.dtype if dtype is None else dtype

  def __call__(self, images: jax.Array, mask: jax.Array | None = None, *,
               return_features: bool = False) -> dict[str, jax.Array]:
    """Descriptors of a batch of images.

    Args:
      images: [B, H, W, 3] float, already normalised.
      mask: optional [B, H, W], 1 = valid pixel (padded evaluation batches);
        downsampled with `downsample_mask` and passed to the head.
      return_features: also return the backbone map as `"feature_map"`.

    Returns:
      The head's dict ("descriptor" [B, D] float32, unit norm, plus any extra
      keys), with "feature_map" [B, h, w, C] when asked.
    """
    x = images.astype(self.dtype)
    stage_names = tuple(getattr(self.head, "stages", ()))
    kwargs = {}
    if stage_names:
      stages = self.backbone(x, return_stages=True)
      fmap = stages["layer4"]
      kwargs["stages"] = {k: stages[k] for k in stage_names}
    else:
      fmap = self.backbone(x)
    cell_mask = None
    if mask is not None:
      if mask.shape != images.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} must be images' [B, H, W] "
                         f"{images.shape[:3]}")
      cell_mask = downsample_mask(mask, fmap.shape[1:3],
                                  self.backbone.output_stride)
    out = dict(self.head(fmap, cell_mask, **kwargs))
    if return_features:
      out["feature_map"] = fmap
    return out
