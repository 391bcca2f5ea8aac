"""Losses of the published baselines, as pure functions.

Class-matrix losses take (embeddings [B, D], weight [C_rows, D], labels [B],
num_classes, ...) like `losses.margin_softmax_loss`, accept the same optional
`embedding_sharding` / `logits_sharding` (the cosines come from
`losses.cosine_logits`, so the B x C_rows logits stay split by class rows),
ignore rows >= num_classes, and return per-example (loss [B], correct [B])
with correct = argmax of the plain cosines is the label:

  curricular_face_loss   CurricularFace (CVNet's loss); carries an EMA state t
  madacos_loss           MadaCos (CFCD): scale and margin from the batch
  learnable_scale_loss   ArcFace/CosFace with a trained scale (DELG)

Pair losses (Radenovic et al.'s fine-tuning losses) use no class matrix; the
labels define positives within the batch. They return (loss [B], correct [B],
valid [B]): anchors that have no positive in the batch (and, for the triplet,
no negative) get loss 0, correct False, valid False, and the batch loss is
`masked_mean(loss, valid)`:

  contrastive_loss       all in-batch pairs, cirtorch's contrastive form
  triplet_loss           batch-hard triplets (hardest positive and negative)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qaff_jax import losses

# MadaCos' constant K in the scale formula (official CFCD code, `madacos.py`).
MADACOS_K = 9_999_999.0


def _class_masks(num_rows: int, labels: jax.Array, num_classes: int):
  """(valid [1, C_rows], onehot [B, C_rows]) boolean masks."""
  rows = jnp.arange(num_rows)
  return rows[None, :] < num_classes, rows[None, :] == labels[:, None]


def _softmax_ce(logits: jax.Array, target_logit: jax.Array) -> jax.Array:
  """logsumexp over classes minus the target's logit (padding is -inf)."""
  return jax.nn.logsumexp(logits, axis=1) - target_logit


def _correct(cos: jax.Array, valid: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(jnp.where(valid, cos, -jnp.inf), axis=1) == labels


def _safe_sqrt(x: jax.Array, tiny: float = 1e-12) -> jax.Array:
  """sqrt with a zero (not infinite) gradient at 0."""
  pos = x > tiny
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


# ------------------------------------------------------------- CurricularFace


def curricular_face_logits(
    embeddings: jax.Array, weight: jax.Array, labels: jax.Array,
    t: jax.Array | float, *, num_classes: int, scale: float = 30.0,
    margin: float = 0.15, momentum: float = 0.01, embedding_sharding=None,
    logits_sharding=None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """CurricularFace logits (Huang et al., CVPR 2020) and the updated t.

  With cos_j the cosines and y the label (official code, HuangYG123):

    t'       = (1 - momentum) * t + momentum * mean_batch(cos_y)  (no grad)
    target   = cos(theta_y + m), or cos_y - m sin(m) once theta_y + m > pi
               (ArcFace's continuation, as `losses.target_logits`, with a
               finite gradient at cos_y = +-1)
    cos_j    -> cos_j * (t' + cos_j)   where cos_j > cos(theta_y + m)  (hard)
    logits   = s * [target at y, modulated cos_j elsewhere]

  Note t' (not t) modulates, as in the official code; it enters without a
  gradient. The caller carries t as training state (initialised to 0) and
  feeds back the returned value next step.

  Args:
    embeddings: [B, D] descriptors.
    weight: [C_rows, D] class centres; rows >= num_classes are padding.
    labels: [B] int labels.
    t: scalar, the running mean of cos_y.
    num_classes: real classes.
    scale: s.
    margin: m.
    momentum: EMA weight of the new batch mean.
    embedding_sharding: optional, see `losses.cosine_logits`.
    logits_sharding: optional, see `losses.cosine_logits`.

  Returns:
    (logits [B, C_rows] float32 with -inf on padding rows,
     scaled target logit [B], plain cosines [B, C_rows], new t scalar).
  """
  cos = losses.cosine_logits(embeddings, weight,
                             embedding_sharding=embedding_sharding,
                             logits_sharding=logits_sharding)
  valid, onehot = _class_masks(cos.shape[1], labels, num_classes)
  cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=1)
  # sin with a finite gradient at cos_y = +-1 (where sqrt' is infinite).
  sin_y = _safe_sqrt(jnp.clip(1.0 - cos_y * cos_y, 0.0, 1.0))
  cos_ym = cos_y * math.cos(margin) - sin_y * math.sin(margin)
  target = jnp.where(cos_y > math.cos(math.pi - margin), cos_ym,
                     cos_y - math.sin(math.pi - margin) * margin)
  new_t = jax.lax.stop_gradient(
      (1.0 - momentum) * jnp.asarray(t, jnp.float32)
      + momentum * jnp.mean(cos_y))
  hard = cos > cos_ym[:, None]
  modulated = jnp.where(hard, cos * (new_t + cos), cos)
  logits = scale * jnp.where(onehot, target[:, None], modulated)
  logits = jnp.where(valid, logits, -jnp.inf)
  return logits, scale * target, cos, new_t


def curricular_face_loss(
    embeddings: jax.Array, weight: jax.Array, labels: jax.Array,
    t: jax.Array | float, *, num_classes: int, scale: float = 30.0,
    margin: float = 0.15, momentum: float = 0.01, embedding_sharding=None,
    logits_sharding=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example CurricularFace cross-entropy; see `curricular_face_logits`.

  CVNet trains its global descriptor with it (its training code is not
  public; the defaults here are this project's margin-loss defaults, set the
  recipe's s and m in the config). The official CurricularFace code (and
  DOLG's, whose `Arcface` class is in fact this loss) is what is followed.

  Returns:
    (loss [B], correct [B] bool, new t scalar): carry new t to the next step.
  """
  logits, target, cos, new_t = curricular_face_logits(
      embeddings, weight, labels, t, num_classes=num_classes, scale=scale,
      margin=margin, momentum=momentum, embedding_sharding=embedding_sharding,
      logits_sharding=logits_sharding)
  valid, _ = _class_masks(cos.shape[1], labels, num_classes)
  return _softmax_ce(logits, target), _correct(cos, valid, labels), new_t


# -------------------------------------------------------------------- MadaCos


def madacos_scale_margin(cos: jax.Array, labels: jax.Array, *,
                         num_classes: int, alpha: float = 0.02,
                         min_scale: float = 32.0
                         ) -> tuple[jax.Array, jax.Array]:
  """MadaCos' batch-adaptive scale s and margin m (no gradient).

  Zhu et al., "Coarse-to-Fine: Learning Compact Discriminative Representation
  for Single-Stage Image Retrieval" (CFCD), ICCV 2023; formulas as in the
  official code (bassyess/CFCD, `core/model/madacos.py`, alpha 0.02 in its
  configs):

    c   = the median of the batch's target cosines cos_y (the lower median,
          as torch.median; the batch is the global one under jit), taken at
          sample k
    s   = max(min_scale, ln(K (1 - alpha) / alpha) / (1 - c)),  K = 9999999
    B_k = sum_{j != y_k} exp(s cos_kj)                (sample k's negatives)
    m   = max(0, c - ln(B_k alpha / (1 - alpha)) / s)

  Read: s is the scale at which a sample with cos_y = 1 would get softmax
  probability 1 - alpha against K negatives at the median cosine; m is the
  margin that brings the median sample's target probability down to alpha.
  ln B_k is computed as a logsumexp (B_k overflows float32).

  Args:
    cos: [B, C_rows] cosines (padding rows >= num_classes are ignored).
    labels: [B] int labels.
    num_classes: real classes.
    alpha: target probability of the median sample.
    min_scale: floor of s.

  Returns:
    (s, m) float32 scalars, gradient-stopped.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"MadaCos alpha must be in (0, 1), got {alpha}")
  cos = jax.lax.stop_gradient(cos.astype(jnp.float32))
  valid, onehot = _class_masks(cos.shape[1], labels, num_classes)
  cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=1)
  k = jnp.argsort(cos_y)[(cos_y.shape[0] - 1) // 2]
  median = cos_y[k]
  s = math.log(MADACOS_K * (1.0 - alpha) / alpha) / jnp.maximum(
      1.0 - median, 1e-6)
  s = jnp.maximum(s, min_scale)
  negatives = valid[0] & ~onehot[k]
  log_b = jax.nn.logsumexp(jnp.where(negatives, s * cos[k], -jnp.inf))
  m = median - (log_b + math.log(alpha / (1.0 - alpha))) / s
  return s, jnp.maximum(m, 0.0)


def madacos_loss(embeddings: jax.Array, weight: jax.Array, labels: jax.Array,
                 *, num_classes: int, alpha: float = 0.02,
                 min_scale: float = 32.0, with_stats: bool = False,
                 embedding_sharding=None, logits_sharding=None):
  """Per-example MadaCos cross-entropy: CosFace with batch-adaptive s and m.

  logits = s * cos_j for j != y and s * (cos_y - m) for the label, with (s, m)
  from `madacos_scale_margin` treated as constants (the official backward
  passes the gradient through the cosines times s only).

  Returns:
    (loss [B], correct [B] bool), plus {"scale": s, "margin": m} when
    `with_stats`.
  """
  cos = losses.cosine_logits(embeddings, weight,
                             embedding_sharding=embedding_sharding,
                             logits_sharding=logits_sharding)
  s, m = madacos_scale_margin(cos, labels, num_classes=num_classes,
                              alpha=alpha, min_scale=min_scale)
  valid, onehot = _class_masks(cos.shape[1], labels, num_classes)
  target = jnp.sum(jnp.where(onehot, cos, 0.0), axis=1) - m
  logits = s * jnp.where(onehot, target[:, None], cos)
  logits = jnp.where(valid, logits, -jnp.inf)
  loss = _softmax_ce(logits, s * target)
  correct = _correct(cos, valid, labels)
  if with_stats:
    return loss, correct, {"scale": s, "margin": m}
  return loss, correct


# ----------------------------------------------------------- learnable scale


def delg_initial_scale(dim: int) -> float:
  """DELG's initial ArcFace scale: sqrt(D) (45.25 for D = 2048)."""
  return math.sqrt(dim)


class LearnableScale(nnx.Module):
  """A trainable scalar softmax scale (DELG's gamma), `nnx.Param` `scale`."""

  def __init__(self, init: float, *, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.asarray(init, param_dtype))

  def __call__(self) -> jax.Array:
    return self.scale[...]


def learnable_scale_loss(embeddings: jax.Array, weight: jax.Array,
                         labels: jax.Array, scale: jax.Array | float, *,
                         num_classes: int, name: str = "arcface",
                         margin: float = 0.1, embedding_sharding=None,
                         logits_sharding=None
                         ) -> tuple[jax.Array, jax.Array]:
  """`losses.margin_softmax_loss` with a traced scale (DELG's ArcFace).

  DELG trains the global feature with ArcFace (margin 0.1 in the DELF/DELG
  code) and a learnable scale gamma initialised to sqrt(D)
  (`delg_initial_scale`); the gradient reaches `scale` (e.g. the value of a
  `LearnableScale`). Note the public TF2 code creates the variable with
  trainable=False; the paper describes it as learned.

  Returns:
    (loss [B], correct [B] bool).
  """
  return losses.margin_softmax_loss(
      embeddings, weight, labels, num_classes=num_classes, name=name,
      scale=jnp.asarray(scale, jnp.float32), margin=margin,
      embedding_sharding=embedding_sharding, logits_sharding=logits_sharding)


# ---------------------------------------------------------------- pair losses


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` over the `valid` entries (0 when none is valid)."""
  valid = valid.astype(jnp.float32)
  return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _pair_geometry(embeddings: jax.Array, labels: jax.Array,
                   embedding_sharding):
  """Cosines [B, B], squared distances [B, B], positive / negative masks."""
  cos = losses.cosine_logits(embeddings, embeddings,
                             embedding_sharding=embedding_sharding)
  b = cos.shape[0]
  same = labels[:, None] == labels[None, :]
  other = ~jnp.eye(b, dtype=bool)
  # ||a - b||^2 = 2 - 2 cos for unit vectors.
  sq = jnp.maximum(2.0 - 2.0 * cos, 0.0)
  return cos, sq, same & other, ~same


def _nearest_is_positive(cos: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether each anchor's most similar other sample shares its label."""
  b = cos.shape[0]
  others = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, cos)
  return labels[jnp.argmax(others, axis=1)] == labels


def contrastive_loss(embeddings: jax.Array, labels: jax.Array, *,
                     margin: float = 0.7, embedding_sharding=None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """In-batch contrastive loss (Radenovic et al.; cirtorch's form).

  Embeddings are L2-normalised and d_ij = ||a_i - a_j|| = sqrt(2 - 2 cos_ij)
  (cirtorch's Euclidean distance of unit vectors). Per anchor i, over every
  other sample j of the batch:

    loss_i = sum_{j != i, y_j = y_i} 0.5 d_ij^2
           + sum_{y_j != y_i} 0.5 max(0, margin - d_ij)^2

  (cirtorch's per-pair terms, 0.5 included; every unordered pair is counted
  once from each end). Anchors without a positive in the batch are excluded.

  Returns:
    (loss [B], correct [B], valid [B]); correct = the nearest other sample
    shares the label; use `masked_mean(loss, valid)`.
  """
  labels = jnp.asarray(labels)
  cos, sq, pos, neg = _pair_geometry(embeddings, labels, embedding_sharding)
  dist = _safe_sqrt(sq)
  pos_term = jnp.sum(jnp.where(pos, 0.5 * sq, 0.0), axis=1)
  neg_term = jnp.sum(
      jnp.where(neg, 0.5 * jnp.square(jnp.maximum(margin - dist, 0.0)), 0.0),
      axis=1)
  valid = jnp.any(pos, axis=1)
  loss = jnp.where(valid, pos_term + neg_term, 0.0)
  return loss, valid & _nearest_is_positive(cos, labels), valid


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *,
                 margin: float = 0.1, squared: bool = True,
                 embedding_sharding=None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch-hard triplet loss (Hermans et al. 2017 mining, cirtorch's form).

  Per anchor i: hardest positive d_ap = max_{j != i, y_j = y_i} d_ij, hardest
  negative d_an = min_{y_k != y_i} d_ik, loss_i = max(0, d_ap - d_an + margin).
  d is the squared Euclidean distance of the L2-normalised embeddings
  (2 - 2 cos, as cirtorch's TripletLoss) or, with squared=False, its sqrt.
  Anchors without a positive or without a negative in the batch are excluded.

  Returns:
    (loss [B], correct [B], valid [B]); correct = the nearest other sample
    shares the label; use `masked_mean(loss, valid)`.
  """
  labels = jnp.asarray(labels)
  cos, sq, pos, neg = _pair_geometry(embeddings, labels, embedding_sharding)
  dist = sq if squared else _safe_sqrt(sq)
  hardest_pos = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
  valid = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  gap = jnp.where(valid, hardest_pos - hardest_neg, 0.0)
  loss = jnp.where(valid, jnp.maximum(gap + margin, 0.0), 0.0)
  return loss, valid & _nearest_is_positive(cos, labels), valid
