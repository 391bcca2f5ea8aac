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
