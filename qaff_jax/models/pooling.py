"""Pooling of NHWC feature maps: generalised-mean (GeM) pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def gem(x: jax.Array, p: jax.Array | float, eps: float = 1e-6,
        mask: jax.Array | None = None) -> jax.Array:
  """Generalised-mean pooling over the spatial axes, in float32.

  `(mean_{valid h,w} clamp(x, eps)^p)^(1/p)`; p=1 is average pooling and
  p -> inf approaches max pooling.

  Args:
    x: [B, H, W, C] feature map (any float dtype).
    p: the exponent, a scalar (or anything broadcastable to [B, C]).
    eps: lower clamp, keeps the power and its gradient finite.
    mask: optional [B, H, W]; cells with mask > 0 are averaged, the others
      ignored. A row without any valid cell pools to `eps`.

  Returns:
    [B, C] float32.
  """
  x = jnp.maximum(x.astype(jnp.float32), eps)
  p = jnp.asarray(p, jnp.float32)
  xp = jnp.power(x, p)
  if mask is None:
    return jnp.power(jnp.mean(xp, axis=(1, 2)), 1.0 / p)
  m = (mask > 0).astype(jnp.float32)[..., None]
  count = jnp.sum(m, axis=(1, 2))  # [B, 1]
  mean = jnp.sum(xp * m, axis=(1, 2)) / jnp.maximum(count, 1.0)
  # Double `where`: the empty branch must not leak inf/NaN into the gradient.
  valid = count > 0
  out = jnp.power(jnp.where(valid, mean, 1.0), 1.0 / p)
  return jnp.where(valid, out, jnp.float32(eps))


class GeM(nnx.Module):
  """GeM pooling with a scalar exponent p (learnable by default).

  With `learn_p=True`, p is an `nnx.Param` scalar (trained like any weight);
  otherwise it is a fixed Python float (static, not in the model state).
  """

  def __init__(self, p: float = 3.0, *, learn_p: bool = True,
               eps: float = 1e-6, rngs: nnx.Rngs | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the pooling.

    Args:
      p: initial (or fixed) exponent.
      learn_p: whether p is a trainable parameter.
      eps: lower clamp of the input.
      rngs: unused (interface uniformity).
      dtype: unused; GeM always computes in float32.
      param_dtype: storage dtype of a learnable p.
    """
    del rngs, dtype
    self.learn_p = learn_p
    self.p = nnx.Param(jnp.asarray(p, param_dtype)) if learn_p else float(p)
    self.eps = eps

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[B, H, W, C] (+ optional [B, H, W] mask) -> [B, C] float32."""
    p = self.p[...] if self.learn_p else self.p
    return gem(x, p, self.eps, mask)
