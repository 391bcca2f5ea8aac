"""Every backbone, head and loss trains 2 steps under the (4, 2) mesh.

Step 1 is checked against NumPy: the loss the trainer reports (main loss plus
QAFF's auxiliary, routing and entropy terms with their weights), its
auxiliary metrics, the class-matrix update (the loss's gradient through SGD
with nesterov momentum and weight decay), DELG's learned-scale update and
CurricularFace's running t. The NumPy losses are written from the papers'
definitions (ArcFace, CosFace, CurricularFace's official code, MadaCos' CFCD
formulas, cirtorch's contrastive, batch-hard triplet), on the descriptors the
model gives for the same params and batch.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from qaff_jax import config_lib, parallel, train_lib
from qaff_jax.data import transforms


def _variant(backbone, head, loss, extra, *, slow=False):
  name = f"{backbone}-{head}-{loss}" + "".join(f"-{v}" for v in extra.values())
  return pytest.param(backbone, head, loss, extra, id=name,
                      marks=[pytest.mark.slow] if slow else [])


VARIANTS = [
    # (backbone, head, loss, extra overrides)
    _variant("resnet_tiny", "qaff", "arcface", {"loss.aux_weight": 0.25}),
    _variant("resnet_tiny", "spca", "arcface", {}),
    _variant("resnet_tiny", "delg", "arcface", {"loss.learn_scale": True}),
    _variant("resnet_tiny", "dolg", "arcface", {}),
    _variant("resnet_tiny", "cvnet", "curricularface", {}),
    _variant("resnet_tiny", "superglobal", "cosface", {}),
    _variant("resnet_tiny", "gem", "arcface", {}),
    _variant("resnet_tiny", "gem", "madacos", {"loss.madacos_alpha": 1e-8}),  # s, m unclamped
    _variant("resnet_tiny", "gem", "contrastive", {"loss.pair_margin": 1.3}),  # negatives active
    _variant("resnet_tiny", "gem", "triplet", {"loss.pair_margin": 0.1}),
    # QAFF ablations (fusion modes, plain-GeM global branch)
    *[_variant("resnet_tiny", "qaff", "arcface", {"model.qaff.fusion": mode})
      for mode in ("uniform", "static", "concat", "global", "regional", "scale")],
    _variant("resnet_tiny", "qaff", "arcface", {"model.qaff.global_pool": "gem"}),
    # QAFF fusion training: attention fusion, routing distillation, entropy,
    # fusion learning-rate multiplier, per-feature / routed auxiliary losses
    _variant("resnet_tiny", "qaff", "arcface", {
        "model.qaff.fusion": "attention", "model.qaff.route_weight": 1.0,
        "model.qaff.entropy_weight": 0.01, "model.qaff.fusion_lr_mult": 5.0,
        "loss.aux_weight": 0.25, "loss.aux_mode": "routed"}),
    _variant("resnet_tiny", "qaff", "arcface", {
        "model.qaff.fusion": "attention", "model.qaff.route_weight": 1.0,
        "model.qaff.route_signal": "distinct", "model.qaff.route_tau": 0.05,
        "loss.aux_weight": 1.0, "loss.aux_mode": "per_feature"}),
    _variant("resnet_tiny", "qaff", "curricularface", {
        "model.qaff.route_weight": 1.0, "model.qaff.route_over": "types",
        "loss.aux_weight": 0.25, "loss.aux_mode": "per_feature", "grad_accum": 2}),
    # Other backbones: the same trainer path at real width / other families;
    # their models have their own tests, so these are `slow`.
    _variant("resnet50", "gem", "arcface", {}, slow=True),  # the Bottleneck path at real width
    _variant("ultron_tiny", "gem", "arcface", {}, slow=True),
    _variant("vit_tiny", "gem", "arcface", {}, slow=True),
]


def small_config(backbone, head, loss, extra):
  c = config_lib.base_config()
  c.model.update(dict(backbone=backbone, head=head, dim=16, dtype="float32"))
  c.model.qaff.mlp_hidden = 8
  c.model.qaff.num_tokens = 4
  c.model.qaff.token_dim = 8
  c.model.qaff.heads = 2
  c.loss.name = loss
  c.data.num_classes = 12
  c.data.num_train_images = 64
  c.data.image_size = 32
  c.batch_size = 16
  c.total_steps = 2
  c.optim.warmup_epochs = 0.0
  c.mesh.model = 2
  return config_lib.apply_overrides(c, extra)


# ---------------------------------------------------------------------------
# NumPy references (float64), from the papers' definitions.


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(z, axis=-1):
  top = np.max(z, axis=axis, keepdims=True)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(z - top), axis=axis))


def _arc(c, m):
  """ArcFace's cos(theta + m) and its d/dcos(theta); past theta + m > pi the
  usual linear continuation cos(theta) - m sin(pi - m) (slope 1)."""
  theta = np.arccos(np.clip(c, -1.0, 1.0))
  inside = theta + m < math.pi
  value = np.where(inside, np.cos(theta + m), c - math.sin(math.pi - m) * m)
  slope = np.where(inside, np.sin(theta + m) / np.sin(theta), 1.0)
  return value, slope


def np_margin_ce(emb, w, labels, *, num_classes, kind, s, m, t=0.0):
  """One margin-softmax cross-entropy per row.

  kind: 'arcface' (target s cos(theta_y + m)), 'cosface' (s (cos_y - m)),
  'curricularface' (target as ArcFace; negatives with cos_j > cos(theta_y + m)
  become cos_j (t' + cos_j), t' = 0.99 t + 0.01 mean(cos_y), the official
  code), 'plain_margin' (s (cos_y - m) with s, m given: MadaCos).
  Returns (loss [N], dloss_i/dcos_ij [N, rows] (0 on padding rows),
  dloss_i/ds [N], accuracy-correct [N], t').
  """
  e, wn = _unit(emb), _unit(w)
  cos = e @ wn.T
  n, rows = cos.shape
  i = np.arange(n)
  c_y = cos[i, labels]
  if kind in ("arcface", "curricularface"):
    target, d_target = _arc(c_y, m)
  else:
    target, d_target = c_y - m, np.ones(n)
  unscaled, d_unscaled = cos.copy(), np.ones_like(cos)
  t_new = t
  if kind == "curricularface":
    t_new = 0.99 * t + 0.01 * np.mean(c_y)
    hard = cos > np.cos(np.arccos(c_y) + m)[:, None]
    unscaled = np.where(hard, cos * (t_new + cos), cos)
    d_unscaled = np.where(hard, t_new + 2 * cos, 1.0)
  unscaled[i, labels] = target
  d_unscaled[i, labels] = d_target
  real = np.arange(rows) < num_classes
  z = np.where(real, s * unscaled, -np.inf)
  lse = _logsumexp(z)
  loss = lse - s * target
  p = np.exp(z - lse[:, None])
  onehot = np.arange(rows)[None, :] == labels[:, None]
  d_cos = np.where(real, s * (p - onehot) * d_unscaled, 0.0)
  d_s = np.sum(np.where(real, p * unscaled, 0.0), axis=1) - target
  correct = np.argmax(np.where(real, cos, -np.inf), axis=1) == labels
  return loss, d_cos, d_s, correct, t_new


def np_grad_w(emb, w, d_cos, row_weights):
  """d(sum_i a_i loss_i)/dW from dloss_i/dcos_ij, cos_ij = e_i . w_j / |w_j| (e_i unit)."""
  e, norm = _unit(emb), np.linalg.norm(w, axis=1, keepdims=True)
  wn = w / norm
  cos = e @ wn.T
  g = row_weights[:, None] * d_cos
  return (g.T @ e - np.sum(g * cos, axis=0)[:, None] * wn) / norm


def np_madacos_s_m(emb, w, labels, num_classes, alpha):
  """MadaCos (CFCD, official code): s, m from the batch's median target cosine."""
  cos = _unit(emb) @ _unit(w).T
  c_y = cos[np.arange(len(labels)), labels]
  k = np.argsort(c_y, kind="stable")[(len(c_y) - 1) // 2]   # torch.median: the lower one
  c = c_y[k]
  s = max(32.0, math.log(9_999_999 * (1 - alpha) / alpha) / (1 - c))
  negatives = np.delete(cos[k, :num_classes], labels[k])
  log_b = _logsumexp(s * negatives)
  return s, max(0.0, c - (log_b + math.log(alpha / (1 - alpha))) / s)


def _sq_dist(emb):
  e = _unit(emb)
  return np.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1)


def _nearest_same(emb, labels, valid):
  d = _sq_dist(emb) + np.diag(np.full(len(labels), np.inf))
  return np.mean((labels[np.argmin(d, axis=1)] == labels)[valid]) if valid.any() else 0.0


def np_contrastive(emb, labels, margin):
  """cirtorch: per anchor, 0.5 d^2 over its positives + 0.5 max(0, margin - d)^2 over
  its negatives (d Euclidean on unit vectors); mean over anchors with a positive."""
  d2 = _sq_dist(emb)
  d = np.sqrt(np.maximum(d2, 0.0))
  same = labels[:, None] == labels[None, :]
  pos = same & ~np.eye(len(labels), dtype=bool)
  per = (np.sum(np.where(pos, 0.5 * d2, 0.0), axis=1)
         + np.sum(np.where(~same, 0.5 * np.maximum(margin - d, 0.0) ** 2, 0.0), axis=1))
  valid = pos.any(axis=1)
  return np.mean(per[valid]), _nearest_same(emb, labels, valid)


def np_triplet(emb, labels, margin):
  """Batch-hard triplet on squared distances: max(0, d(a, hardest p) - d(a, hardest n) + m)."""
  d2 = _sq_dist(emb)
  same = labels[:, None] == labels[None, :]
  pos = same & ~np.eye(len(labels), dtype=bool)
  per = np.maximum(np.max(np.where(pos, d2, -np.inf), axis=1)
                   - np.min(np.where(~same, d2, np.inf), axis=1) + margin, 0.0)
  valid = pos.any(axis=1) & (~same).any(axis=1)
  return np.mean(per[valid]), _nearest_same(emb, labels, valid)


def _softmax_masked(logits, ok):
  z = np.where(ok, logits, -np.inf)
  return np.exp(z - _logsumexp(z)[:, None])


def _kl(target, log_q):
  safe = np.where(target > 0, target, 1.0)
  return np.sum(np.where(target > 0, target * (np.log(safe) - log_q), 0.0), axis=1)


def np_fusion_terms(out, labels, w, config, s):
  """QAFF's auxiliary, routing and entropy terms (README / QAFFSettings), and the
  auxiliary term's class-matrix gradient."""
  qc, lc = config.model.qaff, config.loss
  aux = out["aux_descriptors"]
  parts = [aux["global"][:, None], aux["regional"], aux["scale"]]
  type_ids = [t for t, p in enumerate(parts) if p.shape[1]]
  parts = [p for p in parts if p.shape[1]]
  feats = np.concatenate(parts, axis=1)                                   # [B, K, D]
  b, k, dim = feats.shape
  types = np.concatenate([np.full(p.shape[1], t) for t, p in zip(type_ids, parts)])
  valid, log_w = out["fusion_valid"], out["fusion_log_weights"]
  kind = lc.name if lc.name in ("arcface", "cosface") else "arcface"
  margin = dict(num_classes=config.data.num_classes, kind=kind, s=s, m=lc.margin)
  flat = feats.reshape(b * k, dim)
  feat_loss, feat_dcos, *_ = np_margin_ce(flat, w, np.repeat(labels, k), **margin)
  feat_loss = feat_loss.reshape(b, k)
  means = np.stack([p.mean(axis=1) for p in parts], axis=1)               # [B, T, D]
  type_loss, type_dcos, *_ = np_margin_ce(
      means.reshape(-1, dim), w, np.repeat(labels, len(parts)), **margin)
  type_loss = type_loss.reshape(b, len(parts))

  # Routing target and KL.
  tau = qc.route_tau
  if qc.route_over == "features":
    if qc.route_signal == "distinct":
      e = _unit(feats)
      sim = np.einsum("bkd,cjd->bkcj", e, e)
      ok = (labels[:, None] != labels[None, :])[:, None, :, None] & valid[None, None]
      cand = np.max(np.where(ok, sim, -1.0).reshape(b, k, -1), axis=-1)
    else:
      cand = feat_loss
    target = _softmax_masked(-cand / tau, valid)
    route = np.mean(_kl(target, log_w))
  else:
    in_type = np.stack([types == t for t in type_ids])                   # [T, K]
    type_log_w = np.stack([_logsumexp(np.where(g, log_w, -np.inf)) for g in in_type], 1)
    type_valid = np.stack([np.any(valid & g, axis=1) for g in in_type], 1)
    target = _softmax_masked(-type_loss / tau, type_valid)
    route = np.mean(_kl(target, type_log_w))
  weights = np.exp(log_w)
  entropy = np.mean(-np.sum(np.where(weights > 0, weights * log_w, 0.0), axis=1))

  if lc.aux_mode == "type_mean":
    aux_loss = np.mean(type_loss)
    grad = np_grad_w(means.reshape(-1, dim), w, type_dcos,
                     np.full(type_loss.size, 1 / type_loss.size))
  elif lc.aux_mode == "per_feature":
    aux_loss = np.sum(feat_loss * valid) / max(valid.sum(), 1)
    grad = np_grad_w(flat, w, feat_dcos, (valid / max(valid.sum(), 1)).reshape(-1))
  else:  # routed: each feature's loss weighted by the (constant) routing target
    assert qc.route_over == "features", "reference covers routed aux over features"
    aux_loss = np.mean(np.sum(target * np.where(valid, feat_loss, 0.0), axis=1))
    grad = np_grad_w(flat, w, feat_dcos, (target * valid / b).reshape(-1))
  return {"aux": aux_loss, "route": route, "entropy": entropy, "grad_w": grad}


def np_step_reference(config, outs, labels, w, scale):
  """Step 1 as NumPy: loss, accuracy, class-matrix and scale gradients, t, fusion terms.

  `outs` are the head outputs of the micro-batches (one without grad_accum);
  the loss of a micro-batch is main + aux_weight aux + route_weight KL +
  entropy_weight entropy, averaged over micro-batches, as are the gradients.
  """
  lc = config.loss
  qaff = config.model.head == "qaff"
  t = 0.0
  totals, accs, grads, grads_s, terms = [], [], [], [], []
  for out, y in zip(outs, labels):
    emb = out["descriptor"]
    if lc.name in ("contrastive", "triplet"):
      fn = np_contrastive if lc.name == "contrastive" else np_triplet
      loss, acc = fn(emb, y, lc.pair_margin)
      grad, grad_s = np.zeros_like(w), 0.0
    else:
      kw = dict(num_classes=config.data.num_classes, s=scale, m=lc.margin)
      if lc.name == "madacos":
        s_b, m_b = np_madacos_s_m(emb, w, y, config.data.num_classes, lc.madacos_alpha)
        kw.update(s=s_b, m=m_b)
      per, d_cos, d_s, correct, t = np_margin_ce(
          emb, w, y, kind="plain_margin" if lc.name == "madacos" else lc.name, t=t, **kw)
      loss, acc = np.mean(per), np.mean(correct)
      grad = np_grad_w(emb, w, d_cos, np.full(len(y), 1 / len(y)))
      grad_s = np.mean(d_s)
    if qaff and (lc.aux_weight > 0 or config.model.qaff.route_weight > 0
                 or config.model.qaff.entropy_weight != 0):
      assert not config.loss.learn_scale, "reference: no scale gradient of fusion terms"
      f = np_fusion_terms(out, y, w, config, scale)
      qc = config.model.qaff
      loss = (loss + lc.aux_weight * f["aux"] + qc.route_weight * f["route"]
              + qc.entropy_weight * f["entropy"])
      grad = grad + lc.aux_weight * f["grad_w"]
      terms.append(f)
    totals.append(loss)
    accs.append(acc)
    grads.append(grad)
    grads_s.append(grad_s)
  ref = {"loss": np.mean(totals), "accuracy": np.mean(accs), "grad_w": np.mean(grads, 0),
         "grad_scale": np.mean(grads_s), "t": t}
  if terms:
    for key in ("aux", "route", "entropy"):
      ref[key] = np.mean([f[key] for f in terms])
  return ref


def _sgd_delta(config, grad, param, decays: bool):
  """Optax's first nesterov-SGD step at lr(0) = config.optim.lr (no warm-up: the
  cosine starts at lr): -lr (1 + momentum) (g + wd p [kernels only])."""
  o = config.optim
  g = grad + (o.weight_decay * param if decays else 0.0)
  return -o.lr * (1 + o.momentum) * g


def _head_outputs(graphdef, params, model_state, images, accum):
  """The descriptors the trainer's forward sees: same module, train mode, per micro-batch."""
  fwd = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, copy=True).net(
      transforms.normalize_jnp(x)))
  outs = []
  for x in np.split(images, accum):
    out = jax.device_get(fwd(params, model_state, x))
    outs.append(jax.tree.map(
        lambda a: np.asarray(a, np.float64) if np.issubdtype(a.dtype, np.floating)
        else np.asarray(a), out))
  return outs


@pytest.mark.parametrize("backbone,head,loss,extra", VARIANTS)
def test_two_steps_on_a_4x2_mesh(backbone, head, loss, extra):
  config = small_config(backbone, head, loss, extra)
  mesh = parallel.make_mesh(config.mesh.model)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  tx, schedule = train_lib.make_optimizer(config)
  graphdef, state, shardings = train_lib.create_train_state(config, mesh, tx)
  step = train_lib.jit_train_step(graphdef, tx, schedule, config, mesh, shardings)
  rng = np.random.default_rng(0)
  before = jax.device_get(state.params)
  w0 = np.asarray(before["classifier"]["weight"][...], np.float64)
  scale0 = float(before["loss_scale"]["scale"][...]) if config.loss.learn_scale \
      else config.loss.scale
  labels = (np.arange(16) // 2 % 12).astype(np.int32)  # pairs: pair losses have positives
  for i in range(2):
    batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             "label": labels, "skipped": np.zeros((16,), np.int32)}
    if i == 0:
      outs = _head_outputs(graphdef, before, jax.device_get(state.model_state),
                           batch["image"], config.grad_accum)
      ref = np_step_reference(config, outs, np.split(labels, config.grad_accum), w0, scale0)
    state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(i))
    metrics = jax.device_get(metrics)
    assert np.isfinite(float(metrics["loss"])), (i, metrics)
    if i == 0:
      np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=2e-4, atol=1e-5)
      np.testing.assert_allclose(metrics["accuracy"], ref["accuracy"], atol=1e-6)
      for key, name in (("aux", "aux_loss"), ("route", "route_kl"),
                        ("entropy", "fusion_entropy")):
        if key in ref and name in metrics:  # the fusion terms' own metrics
          np.testing.assert_allclose(metrics[name], ref[key], rtol=2e-4, atol=1e-5,
                                     err_msg=name)
      first = jax.device_get(state.params)
      # The class matrix moved by the loss's gradient (plus weight decay) through SGD.
      delta = np.asarray(first["classifier"]["weight"][...], np.float64) - w0
      want = _sgd_delta(config, ref["grad_w"], w0, decays=True)
      # (atol: float32's resolution at |w| bounds a difference of two f32 matrices)
      atol = 2e-3 * np.abs(want).max() + 8 * np.finfo(np.float32).eps * np.abs(w0).max()
      np.testing.assert_allclose(delta, want, rtol=2e-3, atol=atol)
      if config.loss.learn_scale:  # DELG: the scale's gradient reached it (no decay: a scalar)
        got = float(first["loss_scale"]["scale"][...]) - scale0
        want_s = _sgd_delta(config, ref["grad_scale"], scale0, decays=False)
        assert abs(want_s) > 1e-4
        np.testing.assert_allclose(got, want_s, rtol=2e-3)
      if loss == "curricularface":  # the running positive cosine after this step
        np.testing.assert_allclose(float(state.loss_state["t"]), ref["t"], rtol=1e-4)
  assert int(state.step) == 2
  after = jax.device_get(state.params)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert sum(moved) > len(moved) // 2
