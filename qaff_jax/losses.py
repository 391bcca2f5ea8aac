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


# ---------------------------------------------------------------------------
# Fusion training terms (QAFF): which feature should carry an image.

AUX_MODES = ("type_mean", "per_feature", "routed")


def routing_target(candidate_losses, tau: float, valid=None):
  """Routing-distillation target softmax(-loss_i / tau) per example, no gradient.

  Args:
    candidate_losses: [B, K] margin loss of each candidate feature of an
      example against its class (lower = the feature identifies the class).
    tau: temperature (> 0); small tau routes all mass to the best feature.
    valid: optional [B, K] bool; invalid candidates get zero mass.
  Returns:
    [B, K] float32, rows summing to 1 (stop-gradient).
  """
  logits = -jax.lax.stop_gradient(candidate_losses).astype(jnp.float32) / tau
  if valid is not None:
    logits = jnp.where(valid, logits, -jnp.inf)
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def routing_kl(target, log_weights):
  """KL(target || w) per example, [B]; 0 log 0 = 0 (masked features are free)."""
  t = target.astype(jnp.float32)
  log_t = jnp.log(jnp.where(t > 0, t, 1.0))
  return jnp.sum(jnp.where(t > 0, t * (log_t - log_weights), 0.0), axis=-1)


def weight_entropy(log_weights):
  """Shannon entropy (nats) of each row of fusion weights given their logs, [B]."""
  w = jnp.exp(log_weights)
  return -jnp.sum(jnp.where(w > 0, w * log_weights, 0.0), axis=-1)


def type_log_weights(log_weights, types):
  """[B, K] feature log-weights -> [B, T] log total weight of each type.

  `types` is a static [K] int array (0..T-1) of each feature's type.
  """
  groups = [jnp.asarray(types) == t for t in range(int(max(types)) + 1)]
  return jnp.stack([jax.nn.logsumexp(jnp.where(g, log_weights, -jnp.inf), axis=-1)
                    for g in groups], axis=-1)


ROUTE_SIGNALS = ("loss", "distinct")


def background_similarity(feats, labels, valid=None):
  """Per feature, its largest cosine to any feature of an other-class batch-mate.

  Args:
    feats: [B, K, D] unit-norm features (gradients stopped here).
    labels: [B] class ids.
    valid: optional [B, K] bool; invalid features are never matched.
  Returns:
    [B, K] float32 in [-1, 1] (-1 when no other-class batch-mate exists).
    Clutter shared across classes (a background seen behind many objects)
    finds a close match in another class; what identifies the class does not.
  """
  f = jax.lax.stop_gradient(feats).astype(jnp.float32)
  b, k, _ = f.shape
  sim = jnp.einsum("bkd,cjd->bkcj", f, f)                       # [B, K, B, K]
  other = labels[:, None] != labels[None, :]                     # [B, B]
  ok = other[:, None, :, None]
  if valid is not None:
    ok = ok & valid[None, None, :, :]
  sim = jnp.where(ok, sim, -1.0)
  return jax.lax.stop_gradient(jnp.max(sim.reshape(b, k, b * k), axis=-1))


def fusion_terms(out: dict, per_example_loss, *, types, route_over: str = "features",
                 route_tau: float = 1.0, aux_mode: str = "type_mean",
                 need_route: bool = True, route_signal: str = "loss",
                 labels=None) -> dict:
  """Auxiliary, routing and entropy terms of a fusion head's output.

  Args:
    out: the head's output: `aux_descriptors` {"global": [B, D], "regional":
      [B, R, D], "scale": [B, S, D]}, `fusion_log_weights` [B, K],
      `fusion_valid` [B, K] (K = 1 + R + S, features in that order).
    per_example_loss: f(embeddings [N, D], repeat: int) -> [N] margin loss of
      each row against the labels repeated `repeat` times (row-major: the
      rows of example b are b*repeat .. b*repeat + repeat - 1).
    types: [K] static ints, 0 global / 1 regional / 2 scale.
    route_over: 'features' or 'types' (see `QAFFSettings`).
    route_tau: routing-target temperature.
    aux_mode: 'type_mean' (loss of each type's mean descriptor, averaged over
      types), 'per_feature' (loss of every feature, averaged), 'routed'
      (each example's feature losses weighted by its routing target: every
      feature learns from the examples it is the best candidate for).
    need_route: compute the routing KL (else 0).
    route_signal: 'loss' (candidates scored by their margin loss) or
      'distinct' (features scored by `background_similarity`: the target is
      softmax(-sim / tau), mass on what no other class shares; features only).
    labels: [B] class ids ('distinct' only).
  Returns:
    {"aux": scalar, "route": scalar KL (mean over the batch),
     "entropy": scalar mean entropy of the weights, "target_max": mean of the
     target's largest mass}.
  """
  if aux_mode not in AUX_MODES:
    raise ValueError(f"config.loss.aux_mode={aux_mode!r}; choose one of {AUX_MODES}")
  if route_signal not in ROUTE_SIGNALS:
    raise ValueError(f"model.qaff.route_signal={route_signal!r}; choose one of "
                     f"{ROUTE_SIGNALS}")
  aux = out["aux_descriptors"]
  log_w = out["fusion_log_weights"].astype(jnp.float32)
  valid = out["fusion_valid"]
  b = log_w.shape[0]
  types = [int(t) for t in types]
  parts = [aux["global"][:, None], aux["regional"], aux["scale"]]
  feats = jnp.concatenate([p for p in parts if p.shape[1]], axis=1)      # [B, K, D]
  means = jnp.stack([p.mean(axis=1) for p in parts if p.shape[1]], axis=1)
  type_ids = [t for t, p in enumerate(parts) if p.shape[1]]

  need_features = aux_mode != "type_mean" or (need_route and route_over == "features")
  feat_loss = type_loss = None
  if need_features:
    k = feats.shape[1]
    feat_loss = per_example_loss(feats.reshape(b * k, -1), k).reshape(b, k)
  if aux_mode == "type_mean" or (need_route and route_over == "types"):
    t = means.shape[1]
    type_loss = per_example_loss(means.reshape(b * t, -1), t).reshape(b, t)

  if route_over == "features":
    cand_loss, cand_log_w, cand_valid = feat_loss, log_w, valid
    if route_signal == "distinct":
      cand_loss = background_similarity(feats, labels, valid)
  else:
    type_valid = jnp.stack([jnp.any(jnp.where(jnp.asarray(types) == t, valid, False), -1)
                            for t in type_ids], axis=-1)
    cand_loss = type_loss
    cand_log_w = type_log_weights(log_w, types)[:, jnp.asarray(type_ids)]
    cand_valid = type_valid
  route = jnp.zeros((), jnp.float32)
  target_max = jnp.zeros((), jnp.float32)
  target = None
  if need_route or aux_mode == "routed":
    if cand_loss is None:  # routed aux over types needs the type losses
      cand_loss = type_loss
    target = routing_target(cand_loss, route_tau, cand_valid)
    target_max = jnp.mean(jnp.max(target, axis=-1))
    if need_route:
      route = jnp.mean(routing_kl(target, cand_log_w))

  if aux_mode == "type_mean":
    aux_loss = jnp.mean(type_loss)
  elif aux_mode == "per_feature":
    aux_loss = jnp.sum(jnp.where(valid, feat_loss, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
  else:  # routed: the target over features (a type target spreads within its type)
    if route_over == "features":
      feat_target = target
    else:
      feat_target = routing_target(feat_loss, route_tau, valid)
    aux_loss = jnp.mean(jnp.sum(feat_target * jnp.where(valid, feat_loss, 0.0), axis=-1))
  return {"aux": aux_loss, "route": route,
          "entropy": jnp.mean(weight_entropy(log_w)), "target_max": target_max}
