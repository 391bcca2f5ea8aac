"""Retrieval heads: feature map -> L2-normalised global descriptor.

The head interface (what the trainer and the extractor rely on):

  head = SomeHead(in_features, dim, ..., rngs=..., dtype=..., param_dtype=...)
  out = head(feature_map, mask=None)

  feature_map  [B, h, w, C] backbone output (compute dtype).
  mask         None, or [B, h, w] float32 in {0, 1}: 1 = valid cell (padded
               evaluation batches); heads must ignore invalid cells.
  out          dict with at least "descriptor": [B, D] float32, unit L2 norm.
               Extra keys are free (e.g. "fusion_weights" [B, K] for QAFF);
               consumers ignore keys they do not know.

A head that needs earlier backbone stages (e.g. DOLG's local branch on
layer3) sets the class attribute `stages = ("layer3",)`; `RetrievalModel`
then also passes `stages={"layer3": map}` as a keyword argument.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from qaff_jax.models import pooling


class Head(Protocol):
  """Structural type of a head (see the module docstring)."""

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None,
               **kwargs) -> dict[str, jax.Array]:
    ...


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12
                 ) -> jax.Array:
  """x / max(||x||, eps) along `axis`, in float32."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class GeMHead(nnx.Module):
  """GeM (learnable p) -> whitening Linear (C -> D, with bias) -> L2 norm.

  The DELG / CVNet global head. Pooling, whitening and normalisation run in
  float32: they are cheap next to the backbone and the descriptor's precision
  is what retrieval measures.
  """

  stages: tuple[str, ...] = ()

  def __init__(self, in_features: int, dim: int, *, p: float = 3.0,
               learn_p: bool = True, eps: float = 1e-6, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the head.

    Args:
      in_features: channels C of the feature map.
      dim: descriptor size D.
      p: initial GeM exponent.
      learn_p: whether p is trained.
      eps: GeM clamp.
      rngs: parameter RNGs.
      dtype: compute dtype of the backbone; unused here (float32 head).
      param_dtype: storage dtype of the parameters.
    """
    del dtype
    self.pool = pooling.GeM(p, learn_p=learn_p, eps=eps, rngs=rngs,
                            param_dtype=param_dtype)
    self.whiten = nnx.Linear(in_features, dim, use_bias=True,
                             dtype=jnp.float32, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, feature_map: jax.Array, mask: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """[B, h, w, C] -> {"descriptor": [B, D] float32, unit norm}."""
    pooled = self.pool(feature_map, mask)
    return {"descriptor": l2_normalize(self.whiten(pooled))}
