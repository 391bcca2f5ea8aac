"""Margin losses against NumPy, and the class matrix staying sharded under jit."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qaff_jax import losses, parallel


def _numpy_margin_loss(emb, w, labels, name, s, m, num_classes):
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  cos = np.clip(emb @ w.T, -1, 1)[:, :num_classes]
  out = []
  for i, y in enumerate(labels):
    c = cos[i, y]
    if name == "cosface":
      t = c - m
    else:
      theta = math.acos(c)
      t = math.cos(theta + m) if theta + m <= math.pi else c - math.sin(math.pi - m) * m
    z = s * cos[i].copy()
    z[y] = s * t
    out.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - s * t)
  return np.array(out), cos.argmax(1) == labels


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_margin_loss_matches_numpy(name):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 8)).astype(np.float32)
  w = rng.normal(size=(12, 8)).astype(np.float32)  # 10 classes + 2 padding rows
  labels = rng.integers(0, 10, 6)
  loss, correct = losses.margin_softmax_loss(
      jnp.asarray(emb), jnp.asarray(w), jnp.asarray(labels), num_classes=10,
      name=name, scale=30.0, margin=0.15)
  want_loss, want_correct = _numpy_margin_loss(emb, w, labels, name, 30.0, 0.15, 10)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(correct, want_correct)


def test_arcface_large_angle_branch_is_monotone():
  # theta + m > pi: target falls back to cos - sin(pi - m) * m (still decreasing).
  cos = jnp.array([-0.999, -0.995, 0.5])
  t = losses.target_logits(cos, "arcface", 0.5)
  assert t[0] < t[1] < t[2]
  np.testing.assert_allclose(t[0], -0.999 - math.sin(math.pi - 0.5) * 0.5, rtol=1e-6)


def test_padding_rows_never_win():
  emb = jnp.ones((2, 4))
  w = jnp.concatenate([-jnp.ones((3, 4)), jnp.ones((1, 4))])  # padding row = emb
  loss, correct = losses.margin_softmax_loss(
      emb, w, jnp.array([0, 1]), num_classes=3, name="cosface", scale=10.0, margin=0.0)
  # All real classes tie, so the loss is log(3) and the padding row is excluded.
  np.testing.assert_allclose(loss, np.log(3.0) * np.ones(2), rtol=1e-5)


def test_sharded_loss_equals_single_device_and_never_gathers_logits():
  mesh = parallel.make_mesh(2)  # (4, 2)
  rng = np.random.default_rng(1)
  b, c, d = 16, 64, 8
  emb = rng.normal(size=(b, d)).astype(np.float32)
  w = rng.normal(size=(c, d)).astype(np.float32)
  labels = rng.integers(0, 60, b).astype(np.int32)
  emb_sh = parallel.batch_sharding(mesh, 2)
  w_sh = parallel.class_rows_sharding(mesh)

  def f(e, w, y):
    loss, _ = losses.margin_softmax_loss(
        e, w, y, num_classes=60, embedding_sharding=NamedSharding(mesh, P()),
        logits_sharding=NamedSharding(mesh, P(None, parallel.CLASS_AXES)))
    return jnp.mean(loss)

  g = jax.jit(jax.value_and_grad(f, argnums=1),
              in_shardings=(emb_sh, w_sh, parallel.batch_sharding(mesh, 1)))
  args = (jax.device_put(emb, emb_sh), jax.device_put(w, w_sh),
          jax.device_put(labels, parallel.batch_sharding(mesh, 1)))
  (value, grad_w) = g(*args)
  want_value, want_grad = jax.jit(jax.value_and_grad(f, argnums=1))(emb, w, labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad_w, want_grad, rtol=1e-4, atol=1e-6)
  # The gradient of the class matrix stays split by rows over all 8 devices.
  assert grad_w.sharding.spec == P(parallel.CLASS_AXES, None) or \
      grad_w.sharding.shard_shape(grad_w.shape) == (c // 8, d)
  # No collective in the compiled program moves a full B x C logits array.
  hlo = g.lower(*args).compile().as_text()
  for line in hlo.splitlines():
    if re.search(r"all-gather|all-to-all", line):
      assert f"[{b},{c}]" not in line, line
      assert f"[{c},{d}]" not in line, line


def test_arcface_gradient_is_finite_at_cos_one():
  emb = jnp.array([[1.0, 0.0]])
  w = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # the embedding sits exactly on its class
  grad = jax.grad(lambda e: jnp.sum(losses.margin_softmax_loss(
      e, w, jnp.array([0]), num_classes=2)[0]))(emb)
  assert bool(jnp.all(jnp.isfinite(grad)))


# ------------------------------------------------------ QAFF fusion terms


def test_routing_target_hand_worked():
  # softmax(-[1, 2, 3] / 1) = [1, e^-1, e^-2] / (1 + e^-1 + e^-2)
  t = np.asarray(losses.routing_target(jnp.array([[1.0, 2.0, 3.0]]), 1.0))
  z = 1 + math.exp(-1) + math.exp(-2)
  np.testing.assert_allclose(t[0], [1 / z, math.exp(-1) / z, math.exp(-2) / z], rtol=1e-6)
  # A masked candidate gets no mass; tau 0.5 doubles the gaps: [1, 0, e^-2] / (1 + e^-2).
  t = np.asarray(losses.routing_target(jnp.array([[0.0, 5.0, 1.0]]), 0.5,
                                       jnp.array([[True, False, True]])))
  np.testing.assert_allclose(t[0], [1 / (1 + math.exp(-2)), 0.0,
                                    math.exp(-2) / (1 + math.exp(-2))], rtol=1e-6)
  # KL(t || uniform over 3) = sum t log t + log 3; KL(t || t) = 0; masked entries are free.
  kl = float(losses.routing_kl(t, jnp.log(jnp.full((1, 3), 1 / 3)))[0])
  tt = t[0][t[0] > 0]
  assert kl == pytest.approx(float(np.sum(tt * np.log(tt)) + math.log(3)), rel=1e-5)
  log_w = jnp.log(jnp.where(t > 0, t, 1.0)) + jnp.where(t > 0, 0.0, -1e9)
  assert float(losses.routing_kl(t, log_w)[0]) == pytest.approx(0.0, abs=1e-6)
  # The target carries no gradient.
  g = jax.grad(lambda l: jnp.sum(losses.routing_target(l, 1.0)))(jnp.ones((1, 3)))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def _fake_out(losses_per_feature, log_w):
  """A head output whose features' 'loss' is their first coordinate."""
  b, k = losses_per_feature.shape
  d = 4
  feats = np.zeros((b, k, d), np.float32)
  feats[..., 0] = losses_per_feature
  return {"aux_descriptors": {"global": jnp.asarray(feats[:, 0]),
                              "regional": jnp.asarray(feats[:, 1:5]),
                              "scale": jnp.asarray(feats[:, 5:])},
          "fusion_log_weights": jnp.asarray(log_w, jnp.float32),
          "fusion_valid": jnp.ones((b, k), bool)}


def test_fusion_terms_route_aux_and_entropy_hand_worked():
  types = [0, 1, 1, 1, 1, 2]  # grid 2, one scale
  feat_loss = np.array([[3.0, 1.0, 4.0, 4.0, 4.0, 3.0]], np.float32)
  log_w = np.log(np.full((1, 6), 1 / 6))
  out = _fake_out(feat_loss, log_w)
  first = lambda emb, repeat: emb[:, 0]
  terms = losses.fusion_terms(out, first, types=types, route_over="features",
                              route_tau=1.0, aux_mode="routed")
  t = np.exp(-feat_loss[0]) / np.exp(-feat_loss[0]).sum()
  assert float(terms["route"]) == pytest.approx(float(np.sum(t * np.log(t * 6))), rel=1e-5)
  assert float(terms["aux"]) == pytest.approx(float(np.sum(t * feat_loss[0])), rel=1e-5)
  assert float(terms["entropy"]) == pytest.approx(math.log(6), rel=1e-6)
  assert float(terms["target_max"]) == pytest.approx(float(t.max()), rel=1e-6)
  # Per-feature aux: the plain mean; type_mean: mean over types of the loss of
  # each type's mean descriptor (global 3, regional mean 13/4, scale 3).
  terms = losses.fusion_terms(out, first, types=types, aux_mode="per_feature",
                              need_route=False)
  assert float(terms["aux"]) == pytest.approx(float(feat_loss.mean()), rel=1e-6)
  assert float(terms["route"]) == 0.0
  terms = losses.fusion_terms(out, first, types=types, route_over="types",
                              aux_mode="type_mean")
  assert float(terms["aux"]) == pytest.approx((3 + 13 / 4 + 3) / 3, rel=1e-6)
  # Over types the target is softmax(-[3, 13/4, 3]) and w's type totals are
  # [1/6, 4/6, 1/6].
  tl = np.array([3.0, 13 / 4, 3.0])
  tt = np.exp(-tl) / np.exp(-tl).sum()
  want = np.sum(tt * np.log(tt / np.array([1 / 6, 4 / 6, 1 / 6])))
  assert float(terms["route"]) == pytest.approx(float(want), rel=1e-5)
  with pytest.raises(ValueError, match="config.loss.aux_mode"):
    losses.fusion_terms(out, first, types=types, aux_mode="mean")


def test_background_similarity_hand_worked():
  # Two classes; example 0's cell 1 equals a cell of the other class (shared
  # background), its cell 0 matches nothing there.
  e = np.eye(3, dtype=np.float32)
  feats = jnp.asarray(np.stack([[e[0], e[1]], [e[1], e[2]], [e[0], e[2]]]))
  labels = jnp.array([0, 1, 0])
  sim = np.asarray(losses.background_similarity(feats, labels))
  # Example 0 (class 0) vs example 1 (class 1): e0 -> max(0, 0) = 0, e1 -> 1.
  # Example 2 (class 0) vs example 1: e0 -> 0, e2 -> 1. Example 1 vs 0 and 2.
  np.testing.assert_allclose(sim, [[0, 1], [1, 1], [0, 1]], atol=1e-6)
  # With example 1's second feature invalid, example 2's e2 finds no match.
  valid = jnp.array([[True, True], [True, False], [True, True]])
  sim = np.asarray(losses.background_similarity(feats, labels, valid))
  np.testing.assert_allclose(sim[2], [0, 0], atol=1e-6)
  # A batch of one class has no other-class mate: -1 everywhere.
  assert (np.asarray(losses.background_similarity(feats, jnp.zeros(3, int))) == -1).all()
  # In fusion_terms the target puts mass on the distinctive feature.
  out = {"aux_descriptors": {"global": feats[:, 0], "regional": feats[:, 1:],
                             "scale": jnp.zeros((3, 0, 3))},
         "fusion_log_weights": jnp.log(jnp.full((3, 2), 0.5)),
         "fusion_valid": jnp.ones((3, 2), bool)}
  terms = losses.fusion_terms(out, lambda emb, r: jnp.zeros(emb.shape[0]), types=[0, 1],
                              route_tau=0.1, aux_mode="per_feature", route_signal="distinct",
                              labels=labels)
  t0 = 1 / (1 + math.exp(-10))
  want = np.mean([t0 * math.log(2 * t0) + (1 - t0) * math.log(2 * (1 - t0)), 0.0,
                  t0 * math.log(2 * t0) + (1 - t0) * math.log(2 * (1 - t0))])
  assert float(terms["route"]) == pytest.approx(want, rel=1e-5)
