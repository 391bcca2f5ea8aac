"""Margin-based softmax losses over a (possibly huge, row-sharded) class matrix.

ArcFace (Deng et al. 2019): target logit s*cos(theta + m).
CosFace (Wang et al. 2018): target logit s*(cos(theta) - m).

The class-weight matrix lives in `MarginClassifier`. Under `jax.jit` with the
weight rows sharded over devices and the (small) batch of descriptors
replicated, the logits come out sharded by class, and the log-sum-exp reduces
across devices: the full B x num_classes logits never sit on one device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Class-matrix losses first, then pair losses (which ignore the class matrix).
LOSSES = ("arcface", "cosface", "curricularface", "madacos", "contrastive", "triplet")


class MarginClassifier(nnx.Module):
  """Class-centre matrix `weight` [num_rows, dim]; rows >= num_classes are padding."""

  def __init__(self, num_classes: int, dim: int, *, num_rows: int | None = None,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    num_rows = num_rows or num_classes
    if num_rows < num_classes:
      raise ValueError(f"num_rows={num_rows} < num_classes={num_classes}")
    self.num_classes = num_classes
    init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(dim))
    self.weight = nnx.Param(init(rngs.params(), (num_rows, dim), param_dtype))


def _l2n(x, axis=-1, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def cosine_logits(embeddings, weight, *, embedding_sharding=None,
                  logits_sharding=None):
  """cos(theta) between L2-normalised embeddings [B, D] and class rows [C, D], f32."""
  emb = _l2n(embeddings.astype(jnp.float32))
  if embedding_sharding is not None:
    emb = jax.lax.with_sharding_constraint(emb, embedding_sharding)
  w = _l2n(weight.astype(jnp.float32))
  cos = jnp.einsum("bd,cd->bc", emb, w)
  if logits_sharding is not None:
    cos = jax.lax.with_sharding_constraint(cos, logits_sharding)
  return jnp.clip(cos, -1.0, 1.0)


def target_logits(cos_target, name: str, margin: float):
  """The margin-adjusted cosine of the true class."""
  if name == "cosface":
    return cos_target - margin
  if name == "arcface":
    # The floor keeps d(sin)/d(cos) finite at cos = +-1 (sqrt'(0) * 0 is NaN).
    sin = jnp.sqrt(jnp.clip(1.0 - cos_target ** 2, 1e-12, 1.0))
    phi = cos_target * math.cos(margin) - sin * math.sin(margin)
    # Past theta + m > pi, cos(theta + m) is no longer decreasing in theta; use
    # the usual linear continuation so the target stays monotone.
    threshold = math.cos(math.pi - margin)
    return jnp.where(cos_target > threshold, phi,
                     cos_target - math.sin(math.pi - margin) * margin)
  raise ValueError(f"config.loss.name={name!r}; choose one of {LOSSES}")


def margin_softmax_loss(embeddings, weight, labels, *, num_classes: int,
                        name: str = "arcface", scale: float = 30.0,
                        margin: float = 0.15, embedding_sharding=None,
                        logits_sharding=None):
  """Per-example margin-softmax cross-entropy and top-1 accuracy.

  Args:
    embeddings: [B, D] descriptors (normalised here again, in f32).
    weight: [C_rows, D] class centres; rows >= num_classes are ignored.
    labels: [B] int class ids in [0, num_classes).
  Returns:
    (loss [B], correct [B] bool): loss = logsumexp(s*logits) - s*logit_true,
    correct = argmax of the plain cosines is the label.
  """
  cos = cosine_logits(embeddings, weight, embedding_sharding=embedding_sharding,
                      logits_sharding=logits_sharding)
  rows = jnp.arange(cos.shape[1])
  valid = rows[None, :] < num_classes
  onehot = rows[None, :] == labels[:, None]
  cos_true = jnp.sum(jnp.where(onehot, cos, 0.0), axis=1)
  adjusted = target_logits(cos_true, name, margin)
  logits = scale * jnp.where(onehot, adjusted[:, None], cos)
  logits = jnp.where(valid, logits, -jnp.inf)
  loss = jax.nn.logsumexp(logits, axis=1) - scale * adjusted
  pred = jnp.argmax(jnp.where(valid, cos, -jnp.inf), axis=1)
  return loss, pred == labels


def classification_loss(embeddings, weight, labels, loss_state: dict, *, num_classes: int,
                        config, scale, embedding_sharding=None, logits_sharding=None):
  """The loss `config.name` (config = config.loss) as (mean loss, accuracy, new loss_state).

  `scale` is config.scale or DELG's trained scale. Accuracy is top-1 over the
  class centres for class-matrix losses, and "nearest batch-mate has the same
  label" for the pair losses. `loss_state["t"]` is CurricularFace's running
  mean positive cosine; the other losses pass it through.
  """
  from qaff_jax import losses_baselines as lb  # noqa: PLC0415 (it imports this module)
  shard = dict(embedding_sharding=embedding_sharding, logits_sharding=logits_sharding)
  name = config.name
  if name in ("arcface", "cosface"):
    loss, correct = margin_softmax_loss(embeddings, weight, labels, num_classes=num_classes,
                                        name=name, scale=scale, margin=config.margin,
                                        **shard)
  elif name == "curricularface":
    loss, correct, t = lb.curricular_face_loss(
        embeddings, weight, labels, loss_state["t"], num_classes=num_classes,
        scale=scale, margin=config.margin, **shard)
    loss_state = {**loss_state, "t": t}
  elif name == "madacos":
    loss, correct = lb.madacos_loss(embeddings, weight, labels, num_classes=num_classes,
                                    alpha=config.madacos_alpha, **shard)
  elif name in ("contrastive", "triplet"):
    fn = lb.contrastive_loss if name == "contrastive" else lb.triplet_loss
    loss, correct, valid = fn(embeddings, labels, margin=config.pair_margin,
                              embedding_sharding=embedding_sharding)
    return (lb.masked_mean(loss, valid), lb.masked_mean(correct.astype(jnp.float32), valid),
            loss_state)
  else:
    raise ValueError(f"config.loss.name={name!r}; choose one of {LOSSES}")
  return jnp.mean(loss), jnp.mean(correct.astype(jnp.float32)), loss_state
